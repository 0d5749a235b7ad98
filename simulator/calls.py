"""WebRTC calls, OpenAI's second transport: ``POST /v1/realtime/calls`` answers an SDP offer with
an aiortc peer; the ``oai-events`` data channel then carries the same session as a WebSocket
(one :class:`Driver`), and sideband WebSockets (``/v1/realtime?call_id=...``) join it.

Routes (plain HTTP on the WebSocket port, plainhttp.py): ``POST /v1/realtime/calls``,
``POST /v1/realtime/calls/{call_id}/hangup``, ``POST /v1/realtime/client_secrets``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from email.parser import BytesParser
from email.policy import HTTP
from http import HTTPStatus
from typing import Any
from typing import AsyncIterator
from urllib.parse import urlsplit

from aiortc import RTCConfiguration
from aiortc import RTCPeerConnection
from aiortc import RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack
from aiortc.mediastreams import MediaStreamError
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response

from .driver import Driver
from .framelog import FrameLog
from .handshake import FAULT_REJECTIONS
from .handshake import ConnOptions
from .handshake import HandshakeError
from .handshake import SimConfig
from .handshake import call_not_found
from .handshake import call_options
from .handshake import check_auth
from .plainhttp import HttpRequest
from .session import DEFAULT_MODEL
from .session import SimSession

log = logging.getLogger("meshrt.sim")

EVENTS_CHANNEL = "oai-events"
CLIENT_SECRET_TTL_S = 600
CONNECT_TIMEOUT_S = 30  # a call whose peer never connects ends
HANGUP_PATH = re.compile(r"^/v1/realtime/calls/(?P<call_id>[^/]+)/hangup$")


def _response(status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))), ("Connection", "close")])
    for name, value in (extra or {}).items():
        headers[name] = value
    return Response(status, HTTPStatus(status).phrase, headers, body)


def _json_response(status: int, payload: Any) -> Response:
    return _response(status, json.dumps(payload).encode(), "application/json")


def _bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> HandshakeError:
    return HandshakeError(400, code, message, param=param)


def _offer_and_session(request: HttpRequest) -> tuple[str, dict | None]:
    """The SDP offer and the ``session`` JSON part (None for a bare ``application/sdp`` body)."""
    content_type = request.headers.get("Content-Type", "")
    body = bytes(request.body)
    if content_type.split(";")[0].strip().lower() == "application/sdp":
        return body.decode("utf-8", "replace"), None
    if not content_type.lower().startswith("multipart/form-data"):
        raise _bad_request("Send the offer as application/sdp or multipart/form-data (parts 'sdp', 'session').")
    head = b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    parts: dict[str, bytes] = {}
    if message.is_multipart():
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if isinstance(name, str) and isinstance(payload, bytes):
                parts[name] = payload
    if "sdp" not in parts:
        raise _bad_request("Missing required form part 'sdp'.", "missing_required_parameter", "sdp")
    session = None
    if "session" in parts:
        try:
            session = json.loads(parts["session"])
        except ValueError:
            session = None
        if not isinstance(session, dict):
            raise _bad_request("The 'session' part must be a JSON object.", "invalid_value", "session")
    return parts["sdp"].decode("utf-8", "replace"), session


class Call:
    """One WebRTC call: the peer connection, its session and driver, and its sidebands."""

    def __init__(self, registry: CallRegistry, call_id: str, session: SimSession, opts: ConnOptions):
        self.registry, self.id, self.session, self.opts = registry, call_id, session, opts
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel: Any = None
        self.sidebands: set[ServerConnection] = set()
        self.log: FrameLog | None = None
        self.ended = False
        self._inbox: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self._lock = asyncio.Lock()  # one event at a time to every receiver: the same order everywhere
        self._tasks: set[asyncio.Task] = set()
        self._driver_task: asyncio.Task | None = None
        self._channel_open = False
        self.driver = Driver(session, opts, self._broadcast, self._close, self._abort)

    # the peer

    async def answer(self, offer_sdp: str) -> str:
        """The answer SDP to ``offer_sdp``, candidates included; ValueError for a bad offer."""
        if not offer_sdp.startswith("v=0") or "\nm=" not in offer_sdp.replace("\r\n", "\n"):
            raise ValueError("not an SDP offer with at least one media section")
        pc = self.pc
        pc.on("datachannel", self._on_datachannel)
        pc.on("track", self._on_track)
        pc.on("connectionstatechange", self._on_state)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        for transceiver in pc.getTransceivers():
            offered = getattr(transceiver, "_offerDirection", None)
            if transceiver.kind == "audio" and offered in ("sendrecv", "recvonly") and transceiver.sender.track is None:
                pc.addTrack(AudioStreamTrack())  # silence: output audio is in the events
        await pc.setLocalDescription(await pc.createAnswer())
        return pc.localDescription.sdp

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _on_datachannel(self, channel: Any) -> None:
        if channel.label != EVENTS_CHANNEL or self.channel is not None or self.ended:
            return
        self.channel = channel
        channel.on("message", self._on_message)
        channel.on("close", lambda: self._spawn(self.end()))
        if channel.readyState == "open":
            self._opened()
        else:
            channel.on("open", self._opened)

    def start(self) -> None:
        """Run the session from now on (a sideband may drive it before the data channel opens),
        and end the call if its peer is not connected within ``CONNECT_TIMEOUT_S``."""
        self._driver_task = self._spawn(self.driver.run(self._messages(), greet=False))
        self._spawn(self._connect_watchdog())

    async def _connect_watchdog(self) -> None:
        await asyncio.sleep(CONNECT_TIMEOUT_S)
        if self.pc.connectionState != "connected":
            await self.end()

    def _opened(self) -> None:
        if self.ended or self._channel_open:
            return
        self._channel_open = True
        self._send_channel(json.dumps(self.session.created_event(), separators=(",", ":")))
        if self.opts.fault == "call_ended":
            self._spawn(self._end_later(self.opts.delay_ms / 1000))

    def _on_message(self, message: str | bytes) -> None:
        if self.log:
            self.log.message("in", message)
        self._inbox.put_nowait(message)

    def _on_track(self, track: Any) -> None:
        self._spawn(self._discard(track))  # every kind: an unread track queues its frames forever

    async def _discard(self, track: Any) -> None:
        try:
            while True:
                await track.recv()
        except MediaStreamError:
            pass

    async def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            await self.end()

    async def _end_later(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        await self.end()

    # the session's transport

    async def _messages(self) -> AsyncIterator[str | bytes]:
        while True:
            message = await self._inbox.get()
            if message is None:
                return
            yield message

    def _send_channel(self, text: str) -> None:
        channel = self.channel
        if self._channel_open and channel.readyState == "open":
            channel.send(text)
            if self.log:
                self.log.message("out", text)

    async def _broadcast(self, text: str) -> None:
        async with self._lock:
            self._send_channel(text)
            for ws in list(self.sidebands):
                try:
                    await ws.send(text)
                except ConnectionClosed:
                    self.sidebands.discard(ws)

    async def _close(self, code: int, reason: str) -> None:
        self._spawn(self.end())  # not awaited: the driver's own task may be the caller

    def _abort(self) -> None:
        self._spawn(self.end())

    # sidebands

    async def attach(self, ws: ServerConnection) -> None:
        """Run one sideband: ``session.created``, then the call's events; its messages feed the call."""
        async with self._lock:
            if self.ended:
                await ws.close(1000)
                return
            await ws.send(json.dumps(self.session.created_event(), separators=(",", ":")))
            self.sidebands.add(ws)
        try:
            async for message in ws:
                if not self.ended:
                    self._inbox.put_nowait(message)
        except ConnectionClosed:
            pass
        finally:
            self.sidebands.discard(ws)

    # the end

    async def end(self) -> None:
        """End the call once: it leaves the registry, the driver stops, sidebands get close 1000,
        the peer connection closes."""
        if self.ended:
            return
        self.ended = True
        self.registry.calls.pop(self.id, None)
        self._inbox.put_nowait(None)
        sidebands, self.sidebands = list(self.sidebands), set()
        await asyncio.gather(*(ws.close(1000) for ws in sidebands), return_exceptions=True)
        try:
            await self.pc.close()
        except Exception:  # pragma: no cover - aiortc teardown of a half-set-up peer
            log.exception("closing the peer connection failed")
        current = asyncio.current_task()
        pending = [t for t in self._tasks if t is not current and t is not self._driver_task]
        for task in pending:
            task.cancel()
        if self._driver_task is not None and self._driver_task is not current:
            pending.append(self._driver_task)
        await asyncio.gather(*pending, return_exceptions=True)
        if self.log:
            self.log.close()


class CallRegistry:
    """The running calls of one simulator, and the HTTP routes that make and end them."""

    def __init__(self, config: SimConfig):
        self.config = config
        self.calls: dict[str, Call] = {}

    def get(self, call_id: str) -> Call | None:
        return self.calls.get(call_id)

    async def close(self) -> None:
        await asyncio.gather(*(call.end() for call in list(self.calls.values())), return_exceptions=True)

    async def http(self, request: HttpRequest) -> Response:
        """Answer one plain HTTP request (an error as OpenAI's JSON shape)."""
        try:
            return await self._route(request)
        except HandshakeError as exc:
            return exc.response()

    async def _route(self, request: HttpRequest) -> Response:
        path = urlsplit(request.path).path.rstrip("/")
        hangup = HANGUP_PATH.match(path)
        known = path in ("/v1/realtime/calls", "/v1/realtime/client_secrets", "/v1/realtime") or hangup
        if not known:
            raise HandshakeError(404, "not_found", f"Unknown path '{path}'.")
        check_auth(request.request(), self.config.api_key)
        if path == "/v1/realtime":
            raise HandshakeError(426, "upgrade_required", "Use a WebSocket upgrade for /v1/realtime.")
        if request.method != "POST":
            raise HandshakeError(405, "method_not_allowed", f"Use POST for {path}.")
        if hangup:
            return await self._hangup(hangup["call_id"])
        if path == "/v1/realtime/client_secrets":
            return self._client_secret(request)
        return await self._create(request)

    async def _hangup(self, call_id: str) -> Response:
        call = self.calls.get(call_id)
        if call is None:
            raise call_not_found(call_id)
        await call.end()
        return _json_response(200, {})

    def _client_secret(self, request: HttpRequest) -> Response:
        try:
            body = json.loads(bytes(request.body) or b"{}")
        except ValueError:
            raise _bad_request("The body must be JSON.", "invalid_json") from None
        wanted = body.get("session") if isinstance(body, dict) else None
        model = wanted.get("model") if isinstance(wanted, dict) else None
        session = SimSession(model if isinstance(model, str) and model else DEFAULT_MODEL)
        if isinstance(wanted, dict):
            session.handle(json.dumps({"type": "session.update", "session": wanted}))
        value = {
            "value": f"ek_sim_{secrets.token_hex(16)}",
            "expires_at": int(time.time()) + CLIENT_SECRET_TTL_S,
            "session": session.config,
        }
        return _json_response(200, value)

    async def _create(self, request: HttpRequest) -> Response:
        query = urlsplit(request.path).query
        opts = call_options(query, self.config)
        if opts.fault in FAULT_REJECTIONS:
            raise FAULT_REJECTIONS[opts.fault]
        offer, session_part = _offer_and_session(request)
        model = opts.model
        if session_part is not None and isinstance(session_part.get("model"), str) and session_part["model"]:
            model = session_part["model"]
        wants_transcription = session_part is not None and session_part.get("type") == "transcription"
        kind = "transcription" if wants_transcription else "realtime"
        session = SimSession(model, kind=kind, response_ms=opts.response_ms)
        if session_part is not None:
            update = {k: v for k, v in session_part.items() if k != "model"}
            for output in session.handle(json.dumps({"type": "session.update", "session": update})):
                if isinstance(output, dict) and output.get("type") == "error":
                    error = output["error"]
                    raise _bad_request(error["message"], error["code"], error.get("param"))
        opts.session = session
        if opts.fault == "slow_accept":
            await asyncio.sleep(opts.delay_ms / 1000)
        call = Call(self, f"rtc_{secrets.token_hex(16)}", session, opts)
        try:
            answer = await call.answer(offer)
        except asyncio.CancelledError:  # the server is shutting down
            await call.end()
            raise
        except Exception as exc:
            await call.end()
            raise _bad_request(f"Invalid SDP offer: {exc}", "invalid_offer", "sdp") from None
        if self.config.frame_log_dir:
            call.log = FrameLog(self.config.frame_log_dir, call.id)
            headers = [[name, value] for name, value in request.headers.raw_items()]
            head = {"kind": "call", "call_id": call.id, "query": query, "session": session_part, "headers": headers}
            call.log.write(head)
        self.calls[call.id] = call
        call.start()
        location = {"Location": f"/v1/realtime/calls/{call.id}"}
        return _response(201, answer.encode(), "application/sdp", location)
