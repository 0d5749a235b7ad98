"""The upgrade request: path, auth, and the per-connection options its query selects, faults
included; a refusal is an HTTP error with OpenAI's JSON body.

Fault injection (``sim_fault=NAME`` per connection, or ``--fault NAME`` /
``serve(fault=NAME)`` for every connection; ``sim_fault=none`` overrides):

* ``reject_401`` / ``reject_429`` / ``reject_500``: HTTP error with a JSON body
  instead of the upgrade.
* ``refuse``: the TCP connection is aborted before any HTTP response.
* ``slow_accept``: wait ``sim_delay_ms`` (default 2000) before accepting.
* ``close_mid_response``: on the first response, after 3 ticks, close 1011.
* ``drop_mid_response``: on the first response, after 3 ticks, abort TCP
  (no close frame).
* ``invalid_key_after_accept``: accept, send an ``invalid_api_key`` error
  event, close 3000 ``invalid_request_error.invalid_api_key``.

WebRTC calls (``POST /v1/realtime/calls?sim_fault=NAME``, or ``--fault``; calls.py):

* ``sideband_refused``: sideband WebSockets (``/v1/realtime?call_id=...``) of
  this call get HTTP 503 ``service_unavailable``.
* ``call_ended``: the call ends by itself ``sim_delay_ms`` (default 2000)
  after its data channel opens, as a hangup would.
* ``reject_*`` answer the calls POST with that HTTP error, ``slow_accept``
  delays its answer, and ``close_mid_response`` / ``drop_mid_response`` end
  the call after 3 ticks of its first response; the other faults do nothing
  to a call.

``/v1/realtime/translations?model=…`` opens a translation session (simulator/session.py).

Other query parameters: ``sim_echo=1`` (echo every client message verbatim,
nothing else after ``session.created``), ``sim_max_session_s`` (default 3600;
then ``error`` ``session_expired`` and close 1000).
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from dataclasses import field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs
from urllib.parse import urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request
from websockets.http11 import Response

from meshrt.shared.ids import new_id

from .framelog import FrameLog
from .session import DEFAULT_MAX_SESSION_S
from .session import DEFAULT_MODEL
from .session import DEFAULT_RESPONSE_MS
from .session import SimSession

DEFAULT_DELAY_MS = 2000
TRANSLATIONS_PATH = "/v1/realtime/translations"
FAULTS = (
    "reject_401",
    "reject_429",
    "reject_500",
    "refuse",
    "slow_accept",
    "close_mid_response",
    "drop_mid_response",
    "invalid_key_after_accept",
    "sideband_refused",
    "call_ended",
)


class HandshakeError(Exception):
    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.type, self.param = status, code, message, type_, param

    def response(self) -> Response:
        body = json.dumps(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        ).encode()
        headers = Headers(
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
                ("x-request-id", new_id("req")),
            ]
        )
        if self.status == 429:
            headers["Retry-After"] = "1"
        return Response(self.status, HTTPStatus(self.status).phrase, headers, body)


@dataclass
class SimConfig:
    api_key: str | None = None
    frame_log_dir: str | None = None
    pace: bool = False
    fault: str | None = None
    handshake_delay_ms: float = 0.0  # one WAN round trip: paid on TCP connect, TLS and the upgrade


@dataclass
class ConnOptions:
    model: str
    kind: str
    beta: bool
    response_ms: int = DEFAULT_RESPONSE_MS
    pace: bool = False
    echo: bool = False
    fault: str | None = None
    delay_ms: int = DEFAULT_DELAY_MS
    max_session_s: float = DEFAULT_MAX_SESSION_S
    session: SimSession | None = field(default=None, repr=False)
    log: FrameLog | None = field(default=None, repr=False)
    call: Any = field(default=None, repr=False)  # the calls.Call a sideband joins


def _single(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise HandshakeError(400, "invalid_value", f"Query parameter '{name}' given more than once.", param=name)
    return values[0]


def _int_param(query: dict, name: str, default: int, high: int) -> int:
    raw = _single(query, name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > high:
        raise HandshakeError(400, "invalid_value", f"'{name}' must be an integer from 0 to {high}.", param=name)
    return int(raw)


def _bool_param(query: dict, name: str) -> bool:
    raw = _single(query, name)
    if raw is None or raw.lower() in ("0", "false", ""):
        return False
    if raw.lower() in ("1", "true"):
        return True
    raise HandshakeError(400, "invalid_value", f"'{name}' must be 0/1/true/false.", param=name)


def _max_session(query: dict) -> float:
    raw = _single(query, "sim_max_session_s")
    if raw is None:
        return DEFAULT_MAX_SESSION_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e9:
        raise HandshakeError(
            400, "invalid_value", "'sim_max_session_s' must be a positive number.", param="sim_max_session_s"
        )
    return value


def _target(query: dict) -> tuple[str, str]:
    """(model, kind) from exactly one of model / call_id / intent=transcription."""
    given = [name for name in ("model", "call_id", "intent") if name in query]
    if len(given) != 1:
        raise HandshakeError(
            400,
            "invalid_request",
            "Provide exactly one of the query parameters 'model', 'call_id' or 'intent=transcription'.",
        )
    value = _single(query, given[0]) or ""
    if given[0] == "intent" and value != "transcription":
        raise HandshakeError(400, "invalid_value", "'intent' must be 'transcription'.", param="intent")
    if not value:
        raise HandshakeError(400, "invalid_value", f"'{given[0]}' must not be empty.", param=given[0])
    if given[0] == "model":
        return value, "realtime"
    return DEFAULT_MODEL, "transcription" if given[0] == "intent" else "realtime"


def _translation_target(query: dict) -> tuple[str, str]:
    """A translation session (`/v1/realtime/translations`) names its model."""
    model = _single(query, "model")
    if not model:
        raise HandshakeError(400, "invalid_request", "Provide the query parameter 'model'.", param="model")
    return model, "translation"


def _fault(query: dict, default: str | None) -> str | None:
    raw = _single(query, "sim_fault")
    if raw is None:
        return default
    if raw == "none":
        return None
    if raw not in FAULTS:
        raise HandshakeError(400, "invalid_value", f"Unknown sim_fault '{raw}'.", param="sim_fault")
    return raw


def _subprotocols(request: Request) -> list[str]:
    return [p.strip() for value in request.headers.get_all("Sec-WebSocket-Protocol") for p in value.split(",")]


def _is_beta(request: Request) -> bool:
    values = [v.strip() for h in request.headers.get_all("OpenAI-Beta") for v in h.split(",")]
    return "realtime=v1" in values or "openai-beta.realtime-v1" in _subprotocols(request)


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("Authorization")
    if auth is not None and auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    for proto in _subprotocols(request):
        if proto.startswith("openai-insecure-api-key."):
            return proto[len("openai-insecure-api-key.") :]
    return None


def check_auth(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    key = _presented_key(request)
    if not key:
        raise HandshakeError(
            401,
            "missing_api_key",
            "You didn't provide an API key. Provide it in the Authorization header (Authorization: Bearer YOUR_KEY).",
        )
    if not hmac.compare_digest(key.encode(), api_key.encode()):
        raise HandshakeError(401, "invalid_api_key", "Incorrect API key provided.")


def _call_model(query: dict) -> str:
    model = _single(query, "model")
    if model is None:
        return DEFAULT_MODEL
    if not model:
        raise HandshakeError(400, "invalid_value", "'model' must not be empty.", param="model")
    return model


def call_options(query_string: str, config: SimConfig) -> ConnOptions:
    """The options of a WebRTC call from its ``POST /v1/realtime/calls`` query."""
    query = parse_qs(query_string, keep_blank_values=True)
    return ConnOptions(
        model=_call_model(query),
        kind="realtime",
        beta=False,
        response_ms=_int_param(query, "sim_response_ms", DEFAULT_RESPONSE_MS, 3_600_000),
        pace=config.pace or _bool_param(query, "sim_pace"),
        fault=_fault(query, config.fault),
        delay_ms=_int_param(query, "sim_delay_ms", DEFAULT_DELAY_MS, 600_000),
        max_session_s=_max_session(query),
    )


def call_id_of(request: Request) -> str | None:
    """The ``call_id`` of a sideband upgrade (its query is already validated)."""
    values = parse_qs(urlsplit(request.path).query).get("call_id")
    return values[0] if values else None


def parse_options(request: Request, config: SimConfig) -> ConnOptions:
    parts = urlsplit(request.path)
    path = parts.path.rstrip("/")
    if path not in ("/v1/realtime", TRANSLATIONS_PATH):
        raise HandshakeError(404, "not_found", f"Unknown path '{parts.path}'. Use /v1/realtime.")
    check_auth(request, config.api_key)
    query = parse_qs(parts.query, keep_blank_values=True)
    model, kind = _translation_target(query) if path == TRANSLATIONS_PATH else _target(query)
    return ConnOptions(
        model=model,
        kind=kind,
        beta=_is_beta(request),
        response_ms=_int_param(query, "sim_response_ms", DEFAULT_RESPONSE_MS, 3_600_000),
        pace=config.pace or _bool_param(query, "sim_pace"),
        echo=_bool_param(query, "sim_echo"),
        fault=_fault(query, config.fault),
        delay_ms=_int_param(query, "sim_delay_ms", DEFAULT_DELAY_MS, 600_000),
        max_session_s=_max_session(query),
    )


SIDEBAND_REFUSED = HandshakeError(
    503, "service_unavailable", "Sideband connections to this call are refused (simulated).", "server_error"
)


def call_not_found(call_id: str) -> HandshakeError:
    return HandshakeError(404, "call_not_found", f"Call '{call_id}' not found.")


FAULT_REJECTIONS = {
    "reject_401": HandshakeError(401, "invalid_api_key", "Incorrect API key provided (simulated)."),
    "reject_429": HandshakeError(429, "rate_limit_exceeded", "Rate limit reached (simulated).", "requests"),
    "reject_500": HandshakeError(500, "server_error", "The server had an error (simulated).", "server_error"),
}
