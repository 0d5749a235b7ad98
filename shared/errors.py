"""The gateway's error table: one place for every error code, its type, close code and message.

The front door, the worker, the tests and docs/errors.md all read `ERRORS`. A session-terminating
error is one text frame (`error_event`) followed by a close whose reason is `<type>.<code>`.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass


class Fault(enum.Enum):
    """Whose fault an error is (h11's Local/Remote split, widened to three parties)."""

    CLIENT = "client"
    UPSTREAM = "upstream"
    GATEWAY = "gateway"


@dataclass(frozen=True)
class ErrorSpec:
    code: str
    type: str
    close_code: int
    http_status: int
    fault: Fault
    message: str

    @property
    def close_reason(self) -> str:
        return f"{self.type}.{self.code}"


def _spec(code, type_, close, http, fault, message) -> ErrorSpec:
    return ErrorSpec(code, type_, close, http, fault, message)


_C, _U, _G = Fault.CLIENT, Fault.UPSTREAM, Fault.GATEWAY
_INVALID = "invalid_request_error"

# A table reads best one row a line: the formatter leaves it alone.
# fmt: off
ERRORS: dict[str, ErrorSpec] = {
    s.code: s
    for s in (
        _spec("tls_required", _INVALID, 1008, 403, _C, "Connect with wss:// or https:// (TLS is required)."),
        _spec("missing_api_key", _INVALID, 1008, 401, _C,
              "No API key provided. Send it as a subprotocol, an Authorization header or ?api_key=."),
        _spec("invalid_api_key", _INVALID, 1008, 401, _C,
              "Incorrect API key provided. meshrt takes an rsk_ key issued by this gateway "
              "(or an ek_ key minted with one)."),
        _spec("missing_model", _INVALID, 1008, 400, _C, "The 'model' query parameter is required."),
        _spec("model_not_found", _INVALID, 1008, 404, _C,
              "The model does not exist or is not a realtime model here; GET /v1/models lists the ones you can use."),
        _spec("insufficient_quota", "insufficient_quota", 1008, 429, _C,
              "Your balance is exhausted. Top up your account to reconnect."),
        _spec("session_token_cap_exceeded", _INVALID, 1008, 429, _C,
              "This session reached its total token cap."),
        _spec("too_many_sessions", "rate_limit_error", 1008, 429, _C,
              "Too many concurrent sessions for this account."),
        _spec("message_too_large", _INVALID, 1009, 413, _C, "A client message exceeds the size limit."),
        _spec("session_idle_timeout", _INVALID, 1000, 408, _C,
              "The session was idle for too long without a client message."),
        _spec("session_expired", _INVALID, 1000, 408, _C, "The session reached its maximum length."),
        _spec("server_at_capacity", "server_error", 1013, 503, _G,
              "This server is at capacity. Try again shortly."),
        _spec("server_shutting_down", "server_error", 1012, 503, _G,
              "This server is shutting down. Reconnect to continue."),
        _spec("service_unavailable", "server_error", 1013, 503, _G,
              "The gateway cannot reach its database right now. Try again shortly."),
        _spec("node_lost", "server_error", 1012, 503, _G, "This node lost its lease. Reconnect to continue."),
        _spec("key_revoked", _INVALID, 1008, 401, _C,
              "The API key of this session was revoked. Connect again with a valid key."),
        _spec("account_deactivated", _INVALID, 1008, 403, _C, "This session's account was deactivated."),
        _spec("upstream_unavailable", "server_error", 1013, 502, _U,
              "The upstream Realtime API could not be reached."),
        _spec("upstream_error", "server_error", 1014, 502, _U,
              "The upstream Realtime API rejected the connection."),
        _spec("call_not_found", _INVALID, 1008, 404, _C,
              "No live call of this account has that call_id."),
        _spec("internal_error", "server_error", 1011, 500, _G, "The gateway hit an internal error."),
    )
}
# fmt: on


class EndReason(str, enum.Enum):
    """How a session ended (the usage record's `end_reason`): one side closed, or an error code
    of ERRORS ended it (a test keeps the two lists equal)."""

    CLIENT_CLOSED = "client_closed"
    UPSTREAM_CLOSED = "upstream_closed"
    TLS_REQUIRED = "tls_required"
    MISSING_API_KEY = "missing_api_key"
    INVALID_API_KEY = "invalid_api_key"
    MISSING_MODEL = "missing_model"
    MODEL_NOT_FOUND = "model_not_found"
    INSUFFICIENT_QUOTA = "insufficient_quota"
    SESSION_TOKEN_CAP_EXCEEDED = "session_token_cap_exceeded"
    TOO_MANY_SESSIONS = "too_many_sessions"
    MESSAGE_TOO_LARGE = "message_too_large"
    SESSION_IDLE_TIMEOUT = "session_idle_timeout"
    SESSION_EXPIRED = "session_expired"
    SERVER_AT_CAPACITY = "server_at_capacity"
    SERVER_SHUTTING_DOWN = "server_shutting_down"
    SERVICE_UNAVAILABLE = "service_unavailable"
    NODE_LOST = "node_lost"
    KEY_REVOKED = "key_revoked"
    ACCOUNT_DEACTIVATED = "account_deactivated"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_ERROR = "upstream_error"
    CALL_NOT_FOUND = "call_not_found"
    INTERNAL_ERROR = "internal_error"

    @classmethod
    def of(cls, text: object) -> "EndReason":
        """An end reason reported by a worker (untrusted): anything unknown is a gateway fault."""
        try:
            return cls(text)
        except ValueError:
            return cls.INTERNAL_ERROR


class GatewayError(Exception):
    """An error with a code from ERRORS, raised inside a process and turned into a value at its edge."""

    def __init__(self, code: str, detail: str | None = None):
        self.spec = ERRORS[code]
        self.detail = detail
        super().__init__(f"{code}: {detail}" if detail else code)

    @property
    def code(self) -> str:
        return self.spec.code

    @property
    def message(self) -> str:
        return f"{self.spec.message} {self.detail}" if self.detail else self.spec.message


def error_event(code: str, request_id: str, detail: str | None = None) -> bytes:
    """The terminating error frame's payload (docs/errors.md, The error frame), as UTF-8 JSON bytes."""
    spec = ERRORS[code]
    message = f"{spec.message} {detail}" if detail else spec.message
    body = {
        "type": "error",
        "error": {"type": spec.type, "code": spec.code, "message": message},
        "request_id": request_id,
    }
    return json.dumps(body, separators=(",", ":")).encode()


# In-band refusals: a client event the gateway does not forward, answered with an `error` event
# while the session stays open (docs/errors.md, Refused events). Codes are ERRORS' own.
REFUSALS = {
    "insufficient_quota": "The balance cannot cover the response this event would start. Top up the "
    "account; this session stays open.",
    "service_unavailable": "The gateway cannot reserve the cost of the response this event would start "
    "right now (its database did not answer). Try again shortly; this session stays open.",
}


def refusal_event(code: str, request_id: str, client_event_id: str | None, detail: str | None = None) -> bytes:
    """An OpenAI-shaped `error` event for a refused client event; `error.event_id` names it."""
    spec = ERRORS[code]
    message = f"{REFUSALS[code]} {detail}" if detail else REFUSALS[code]
    body = {
        "type": "error",
        "error": {"type": spec.type, "code": spec.code, "message": message, "param": None, "event_id": client_event_id},
        "request_id": request_id,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def http_error_body(code: str, message: str, type_: str, request_id: str) -> dict:
    """The JSON body of an HTTP error (docs/protocol.md, HTTP errors)."""
    return {"error": {"code": code, "message": message, "type": type_}, "request_id": request_id}
