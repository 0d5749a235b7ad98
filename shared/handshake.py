"""The realtime upgrade, sans-I/O: credentials, their precedence and stripping, the TLS rule,
the 101 and the refusal frames. No socket and no clock in here; front door and worker call it.

Invariants: the tenant's key never leaves `extract_credentials` except as a hash lookup;
`strip_credentials` removes every form of it from the request bytes handed to a worker; the 101
selects `realtime` and nothing else; `redact` removes keys from anything written anywhere.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl
from urllib.parse import unquote_plus
from urllib.parse import urlencode
from urllib.parse import urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request
from websockets.server import ServerProtocol

from .errors import ERRORS
from .errors import error_event

# rsk_: a tenant key; ek_: an ephemeral key minted from one (POST /v1/realtime/client_secrets)
KEY_PATTERN = re.compile(r"(?:rsk|ek)_[A-Za-z0-9]{32,}")
_KEYLIKE = re.compile(r"(rsk|ek)_[A-Za-z0-9_]*")  # "_" too: in "rsk_xrsk_<key>" the key's body must not survive
_QUERY_KEY = re.compile(r"(api_key=)[^&\s\"']*", re.IGNORECASE)
_TOKEN = re.compile(r"[^&\s\"']+")

SUBPROTOCOL = "realtime"
TRANSCRIPTION_INTENT = "transcription"
TRANSLATIONS_PATH = "/v1/realtime/translations"  # translation sessions (`?model=`, billed per minute of audio)
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"
_KEY_TOKEN_PREFIXES = ("openai-insecure-api-key.", "bearer.", "bearer ")
_FORWARDED_HEADERS = ("openai-beta", "openai-safety-identifier", "user-agent")


def redact(text: str) -> str:
    """Replace every key-like token and every api_key= value in `text`, percent-encoded or not."""
    text = _KEYLIKE.sub(r"\1_…REDACTED", text)
    text = _QUERY_KEY.sub(r"\1rsk_…REDACTED", text)
    return _TOKEN.sub(_redact_encoded, text) if "%" in text else text


def _redact_encoded(match: re.Match) -> str:
    """A token hiding a key behind percent-encoding (`api%5Fkey=rsk%5F…`, also double-encoded)."""
    token = decoded = match.group()
    if "%" not in token:
        return token
    for _ in range(3):
        decoded = unquote_plus(decoded)
    return "rsk_…REDACTED" if "rsk_" in decoded or "ek_" in decoded or "api_key=" in decoded.lower() else token


def is_wellformed_key(key: str) -> bool:
    return KEY_PATTERN.fullmatch(key) is not None


def refused_key_detail(key: str) -> str | None:
    """More to say about a refused key than `invalid_api_key`'s message, never the key itself:
    an OpenAI key sent to meshrt is the usual first mistake (the SDK's default key)."""
    if key.startswith("sk-"):
        return "This one looks like an OpenAI key (sk-…): those stay with the gateway's operator."
    return None


def model_detail(model: str) -> str:
    """The requested model, named back to the client (bounded; a key pasted there is redacted)."""
    shown = redact(model)
    return f"Requested: {shown[:64]!r}{'…' if len(shown) > 64 else ''}."


@dataclass(frozen=True)
class Credentials:
    key: str | None  # None: no credential at all
    source: str  # "subprotocol" | "authorization" | "query" | "none"


@dataclass(frozen=True)
class UpgradeRequest:
    """What the front door needs from a parsed upgrade request."""

    path: str
    query: list[tuple[str, str]]
    headers: Headers
    subprotocols: list[str]

    @property
    def model(self) -> str | None:
        values = [v for k, v in self.query if k == "model"]
        return values[-1] if values and values[-1] else None

    @property
    def transcription(self) -> bool:
        """`?intent=transcription`: a transcription session, which names no model in its URL
        (its billed model is the transcription model it configures: docs/billing.md)."""
        values = [v for k, v in self.query if k == "intent"]
        return bool(values) and values[-1] == TRANSCRIPTION_INTENT

    @property
    def call_id(self) -> str | None:
        """`?call_id=`: a tenant's own sideband to one of its WebRTC calls (docs/browsers.md)."""
        values = [v for k, v in self.query if k == "call_id"]
        return values[-1] if values and values[-1] else None

    @property
    def translation(self) -> bool:
        """`/v1/realtime/translations?model=…`: a translation session, metered by meshrt from the
        input audio its client appends (docs/billing.md, Translation sessions)."""
        return self.path == TRANSLATIONS_PATH

    @property
    def surface(self) -> str:
        """What a usage record calls the session: `translation`, `sideband`, `transcription` or `realtime`."""
        if self.translation:
            return "translation"
        if self.call_id is not None:
            return "sideband"
        return "transcription" if self.transcription else "realtime"

    @property
    def beta(self) -> bool:
        if BETA_SUBPROTOCOL in self.subprotocols:
            return True
        return any(v.replace(" ", "").lower() == "realtime=v1" for v in self.headers.get_all("OpenAI-Beta"))

    @property
    def offers_realtime(self) -> bool:
        return SUBPROTOCOL in self.subprotocols


def parse_subprotocols(headers: Headers) -> list[str]:
    tokens: list[str] = []
    for value in headers.get_all("Sec-WebSocket-Protocol"):
        tokens.extend(t.strip() for t in value.split(",") if t.strip())
    return tokens


def parse_upgrade(request: Request) -> UpgradeRequest:
    parts = urlsplit(request.path)
    query = parse_qsl(parts.query, keep_blank_values=True)
    return UpgradeRequest(parts.path, query, request.headers, parse_subprotocols(request.headers))


def _subprotocol_key(token: str) -> str | None:
    lowered = token.lower()
    for prefix in _KEY_TOKEN_PREFIXES:
        if lowered.startswith(prefix):
            return token[len(prefix) :].strip()
    return None


def extract_credentials(upgrade: UpgradeRequest) -> Credentials:
    """Subprotocol key first, then `Authorization: Bearer`, then `?api_key=` (docs/protocol.md, Keys)."""
    for token in upgrade.subprotocols:
        key = _subprotocol_key(token)
        if key is not None:
            return Credentials(key, "subprotocol")
    auths = upgrade.headers.get_all("Authorization")
    if auths:
        auth = ", ".join(a.strip() for a in auths)  # several are ambiguous: refused as invalid_api_key
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return Credentials(value.strip(), "authorization")
        return Credentials(auth, "authorization")  # malformed: refused as invalid_api_key
    for name, value in upgrade.query:
        if name == "api_key":
            return Credentials(value, "query")
    return Credentials(None, "none")


def upstream_query(upgrade: UpgradeRequest, model: str | None = None) -> str:
    """The client's query for the upstream URL, minus `api_key`; with `model` (the grant's, the
    one billed) in place of the client's: an ephemeral key's model holds even when the URL has none.
    A transcription session's URL carries `intent=transcription` and no model: its grant's model
    is only what its record starts with, and a `model` beside the intent is not sent upstream."""
    if (upgrade.transcription and not upgrade.translation) or upgrade.surface == "sideband":  # no model upstream
        return urlencode([(k, v) for k, v in upgrade.query if k not in ("api_key", "model")], errors="surrogateescape")
    if model is None or model == upgrade.model:
        return urlencode([(k, v) for k, v in upgrade.query if k != "api_key"], errors="surrogateescape")
    kept = [(k, v) for k, v in upgrade.query if k not in ("api_key", "model")]
    return urlencode([*kept, ("model", model)], errors="surrogateescape")


def strip_credentials(request: Request) -> bytes:
    """Serialise the request for the worker with every form of the key removed. Nothing else is
    re-encoded, so no line grows past what the worker's parser accepts (websockets: 8 KiB)."""
    parts = urlsplit(request.path)
    headers = Headers()
    for name, value in request.headers.raw_items():
        lowered = name.lower()
        if lowered == "authorization":
            continue
        if lowered == "sec-websocket-protocol":
            kept = [t for t in parse_subprotocols(Headers([(name, value)])) if _subprotocol_key(t) is None]
            if kept:
                headers[name] = ",".join(kept)
            continue
        headers[name] = value
    query = "&".join(field for field in parts.query.split("&") if not _is_query_key(field))
    head = f"GET {parts.path}{'?' + query if query else ''} HTTP/1.1\r\n{headers}"
    # the parser kept non-ASCII bytes as surrogates: hand the worker those same bytes back
    return head.encode("utf-8", "surrogateescape")


def _is_query_key(field: str) -> bool:
    return any(name == "api_key" for name, _ in parse_qsl(field, keep_blank_values=True))


def upstream_headers(upgrade: UpgradeRequest) -> list[tuple[str, str]]:
    """Client headers upstream understands (docs/protocol.md, Upstream); the key never among them."""
    out = [
        (k, v) for k, v in upgrade.headers.raw_items() if k.lower() in _FORWARDED_HEADERS and v.isascii()
    ]  # non-ASCII can't go on the wire upstream
    if upgrade.beta and not any(k.lower() == "openai-beta" for k, _ in out):
        out.append(("OpenAI-Beta", "realtime=v1"))
    return out


def is_secure(headers: Headers, peer_ip: str | None, trusted: tuple, allow_plain_loopback: bool) -> bool:
    """TLS rule: `X-Forwarded-Proto: https` from a trusted proxy, or plain ws on loopback in dev."""
    try:
        peer = ipaddress.ip_address(peer_ip) if peer_ip else None
    except ValueError:
        peer = None
    if peer is not None and any(peer in net for net in trusted):
        protos = headers.get_all("X-Forwarded-Proto")
        if len(protos) == 1 and protos[0].strip().lower() in ("https", "wss"):
            return True
    return bool(allow_plain_loopback and peer is not None and peer.is_loopback)


def _select_realtime(_protocol, offered):
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


def new_server_protocol(max_size: int | None = None) -> ServerProtocol:
    """A websockets server protocol that never negotiates compression (frames are relayed raw)."""
    return ServerProtocol(select_subprotocol=_select_realtime, extensions=None, max_size=max_size)


def parse_request_bytes(raw: bytes) -> tuple[ServerProtocol, Request]:
    """Parse a complete HTTP upgrade request. Raises ValueError if it isn't one."""
    protocol = new_server_protocol()
    protocol.receive_data(raw)
    events = protocol.events_received()
    # eof_sent: bytes after the request that are no frames made the protocol give up on the connection
    if not events or not isinstance(events[0], Request) or protocol.eof_sent:
        raise ValueError(f"not a complete HTTP request: {protocol.handshake_exc!r}")
    return protocol, events[0]


def accept_bytes(protocol: ServerProtocol, request: Request, request_id: str) -> tuple[bytes, int]:
    """The handshake response bytes and its status (101, or 4xx for a bad handshake)."""
    try:
        response = protocol.accept(request)
    except UnicodeEncodeError:  # websockets echoes the bad header, non-ASCII bytes and all, into its 400 body
        response = protocol.reject(400, "Failed to open a WebSocket connection: invalid header.\n")
    response.headers["x-request-id"] = request_id
    protocol.send_response(response)
    return b"".join(protocol.data_to_send()), response.status_code


def error_frames(protocol: ServerProtocol, code: str, request_id: str, detail: str | None = None) -> bytes:
    """An open protocol's bytes for the terminating error frame and its close (docs/errors.md)."""
    spec = ERRORS[code]
    protocol.send_text(error_event(code, request_id, detail))
    protocol.send_close(spec.close_code, spec.close_reason)
    return b"".join(protocol.data_to_send())
