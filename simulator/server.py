"""The socket layer: websockets' server hooks, where the faults are acted out, and a driver per
connection that streams the session model's events. ``serve`` runs it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from typing import Any
from typing import Callable

from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request
from websockets.http11 import Response

from meshrt.shared.ids import new_id

from .calls import CallRegistry
from .driver import FAULT_AFTER_TICKS  # noqa: F401 - the mid-response faults' tick, for tests
from .driver import Driver
from .framelog import FrameLog
from .handshake import FAULT_REJECTIONS
from .handshake import FAULTS
from .handshake import SIDEBAND_REFUSED
from .handshake import ConnOptions
from .handshake import HandshakeError
from .handshake import SimConfig
from .handshake import call_id_of
from .handshake import call_not_found
from .handshake import parse_options
from .plainhttp import HEAD_END
from .plainhttp import MAX_HEAD_BYTES
from .plainhttp import HttpRequest
from .plainhttp import is_websocket_upgrade
from .session import SimSession

log = logging.getLogger("meshrt.sim")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
SERVER_HEADER = "meshrt-sim"


class SimConnection(ServerConnection):
    """A websockets server connection carrying the simulator's per-connection options.

    Until the request head is complete its bytes are held back: a WebSocket upgrade is then fed to
    ``websockets`` as it came, any other request is answered as plain HTTP (plainhttp.py) by the
    simulator's call routes (calls.py) and the connection closed.
    """

    sim: ConnOptions | None = None
    simulator: Simulator | None = None
    _sniffed: bytes | None = b""  # None once the connection is known to be a WebSocket
    _plain: HttpRequest | None = None

    def data_received(self, data: bytes) -> None:
        if self._sniffed is None:
            super().data_received(data)
            return
        if self._plain is not None:
            self._plain.feed(data)
            return
        buffered = self._sniffed + data
        end = buffered.find(HEAD_END)
        if end < 0 and len(buffered) <= MAX_HEAD_BYTES:
            self._sniffed = buffered
            return
        if end < 0 or is_websocket_upgrade(buffered[:end]):
            self._sniffed = None
            super().data_received(buffered)
            return
        self._plain = HttpRequest(buffered[:end])
        self._plain.feed(buffered[end + len(HEAD_END) :])
        if self._plain.expects_continue():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.request_rcvd.set_result(None)  # wakes handshake() without a WebSocket request

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        await super().handshake(*args, **kwargs)  # returns at once for a plain request: it has no upgrade
        if self._plain is not None:
            await self._serve_plain(self._plain)

    async def _serve_plain(self, request: HttpRequest) -> None:
        await asyncio.wait([request.body_done, self.connection_lost_waiter], return_when=asyncio.FIRST_COMPLETED)
        if not request.body_done.done():
            return
        try:
            request.body_done.result()
            assert self.simulator is not None
            response = await self.simulator.calls.http(request)
        except HandshakeError as exc:
            response = exc.response()
        except Exception:  # a simulator bug: answer 500 rather than reset the connection
            log.exception("plain HTTP request failed")
            response = HandshakeError(500, "server_error", "The simulator failed.", "server_error").response()
        response.headers["Server"] = SERVER_HEADER
        if "x-request-id" not in response.headers:
            response.headers["x-request-id"] = new_id("req")
        self.transport.write(response.serialize())
        self.transport.close()
        await self.connection_lost_waiter


class DelayedHandshake(asyncio.Protocol):
    """What a WAN link between client and simulator costs at set-up, acted out on loopback: a
    connection's bytes are not read until one round trip after the accept (TCP's handshake), then,
    with TLS, one more before the TLS handshake is answered; the upgrade's response waits one more
    (``Simulator.process_request``). So a direct connect takes 2 round trips (3 with TLS), and a
    connection opened ahead of its request pays only the upgrade's. Bytes after the handshake go
    to the WebSocket connection untouched."""

    def __init__(self, conn: SimConnection, delay_s: float, tls: ssl.SSLContext | None):
        self.conn, self.delay_s, self.tls = conn, delay_s, tls
        self.protocol = conn.protocol  # websockets' subprotocol hook checks it on what the factory made
        self.task: asyncio.Task | None = None
        self.ready = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]
        self.task = asyncio.get_running_loop().create_task(self._open(transport))

    async def _open(self, transport: Any) -> None:
        try:
            await asyncio.sleep(self.delay_s)  # TCP: the connection is usable one round trip on
            if self.tls is not None:
                await asyncio.sleep(self.delay_s)  # TLS 1.3: one round trip for the handshake
                loop = asyncio.get_running_loop()
                transport = await loop.start_tls(transport, self, self.tls, server_side=True)
            else:
                transport.resume_reading()
        except (OSError, ssl.SSLError, ConnectionError, asyncio.CancelledError):
            transport.abort()
            return
        self.ready = True
        self.conn.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.conn.data_received(data)

    def eof_received(self) -> bool | None:
        return self.conn.eof_received() if self.ready else None

    def pause_writing(self) -> None:
        if self.ready:
            self.conn.pause_writing()

    def resume_writing(self) -> None:
        if self.ready:
            self.conn.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ready:
            self.conn.connection_lost(exc)
        elif self.task is not None:
            self.task.cancel()


def _socket_driver(ws: SimConnection, opts: ConnOptions) -> Driver:
    assert opts.session is not None
    return Driver(opts.session, opts, ws.send, ws.close, lambda: ws.transport.abort())


async def _echo(ws: SimConnection, session: SimSession) -> None:
    await ws.send(json.dumps(session.created_event(), separators=(",", ":")))
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass


async def _invalid_key_after_accept(ws: SimConnection, session: SimSession) -> None:
    event = session.error("invalid_api_key", "Incorrect API key provided.")
    try:
        await ws.send(json.dumps(event, separators=(",", ":")))
        await ws.close(3000, "invalid_request_error.invalid_api_key")
    except ConnectionClosed:
        pass


class Simulator:
    """Glue between websockets' server hooks and the per-connection driver."""

    def __init__(self, config: SimConfig, tls: ssl.SSLContext | None = None):
        self.config = config
        self.calls = CallRegistry(config)
        self.tls = tls  # with a handshake delay, TLS is run here (DelayedHandshake), not by the server
        self.delay_s = config.handshake_delay_ms / 1000

    def connection(self, *args: Any, **kwargs: Any) -> SimConnection | DelayedHandshake:
        conn = SimConnection(*args, **kwargs)
        conn.simulator = self
        if self.delay_s > 0:
            return DelayedHandshake(conn, self.delay_s, self.tls)
        return conn

    async def process_request(self, ws: SimConnection, request: Request) -> Response | None:
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)  # the upgrade's round trip
        try:
            opts = parse_options(request, self.config)
            call = self._sideband_call(request)
        except HandshakeError as exc:
            self._log_rejection(ws, request, exc.status)
            return exc.response()
        if call is not None:
            opts.call, opts.session = call, call.session
        else:
            opts.session = SimSession(opts.model, beta=opts.beta, kind=opts.kind, response_ms=opts.response_ms)
        if self.config.frame_log_dir:
            log_id = f"{call.id}-{new_id('conn')}" if call is not None else opts.session.id
            opts.log = FrameLog(self.config.frame_log_dir, log_id)
            opts.log.request(request)
            opts.log.hook(ws.protocol)
        ws.sim = opts
        return await self._handshake_fault(ws, opts)

    def _sideband_call(self, request: Request) -> Any:
        """The running call a ``call_id`` upgrade joins (None for a ``model`` one)."""
        call_id = call_id_of(request)
        if call_id is None:
            return None
        call = self.calls.get(call_id)
        if call is None:
            raise call_not_found(call_id)
        if call.opts.fault == "sideband_refused":
            raise SIDEBAND_REFUSED
        return call

    def _log_rejection(self, ws: SimConnection, request: Request, status: int) -> None:
        if self.config.frame_log_dir:
            frame_log = FrameLog(self.config.frame_log_dir, new_id("conn"))
            frame_log.request(request)
            frame_log.write({"kind": "response", "status": status})
            frame_log.close()

    async def _handshake_fault(self, ws: SimConnection, opts: ConnOptions) -> Response | None:
        if opts.fault in FAULT_REJECTIONS:
            if opts.log:
                opts.log.write({"kind": "response", "status": FAULT_REJECTIONS[opts.fault].status})
                opts.log.close()
            return FAULT_REJECTIONS[opts.fault].response()
        if opts.fault == "refuse":
            if opts.log:
                opts.log.close()
            ws.transport.abort()
            return HandshakeError(503, "refused", "refused").response()  # never reaches the client
        if opts.fault == "slow_accept":
            await asyncio.sleep(opts.delay_ms / 1000)
        return None

    async def handler(self, ws: SimConnection) -> None:
        opts = ws.sim
        assert opts is not None and opts.session is not None
        try:
            if opts.fault == "invalid_key_after_accept":
                await _invalid_key_after_accept(ws, opts.session)
            elif opts.call is not None:
                await opts.call.attach(ws)
            elif opts.echo:
                await _echo(ws, opts.session)
            else:
                await _socket_driver(ws, opts).run(ws)
        finally:
            await ws.close()
            if opts.log:
                await ws.wait_closed()
                opts.log.close()


def _select_subprotocol(ws: ServerConnection, offered: Any) -> str | None:
    return "realtime" if "realtime" in offered else None


async def serve(
    host: str = "127.0.0.1",
    port: int = 8765,
    api_key: str | None = None,
    frame_log_dir: str | None = None,
    pace: bool = False,
    ready: Callable[[int], None] | None = None,
    fault: str | None = None,
    tls: ssl.SSLContext | None = None,
    handshake_delay_ms: float = 0.0,
) -> None:
    """Run the simulator until cancelled; ``ready(port)`` is called once listening.
    With ``tls`` it serves wss://, like the real API. ``handshake_delay_ms`` (one round trip of a
    WAN link) delays each connection's TCP, TLS and upgrade by it (``DelayedHandshake``)."""
    if handshake_delay_ms < 0:
        raise ValueError("handshake_delay_ms must not be negative")
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; expected one of {', '.join(FAULTS)}")
    if frame_log_dir:
        os.makedirs(frame_log_dir, exist_ok=True)
    config = SimConfig(
        api_key=api_key, frame_log_dir=frame_log_dir, pace=pace, fault=fault, handshake_delay_ms=handshake_delay_ms
    )
    sim = Simulator(config, tls)
    async with ws_serve(
        sim.handler,
        host,
        port,
        process_request=sim.process_request,
        select_subprotocol=_select_subprotocol,
        create_connection=sim.connection,
        compression=None,
        max_size=MAX_MESSAGE_BYTES,
        ping_interval=None,
        server_header=SERVER_HEADER,
        ssl=None if sim.delay_s > 0 else tls,
    ) as server:
        actual_port = server.sockets[0].getsockname()[1]
        if ready is not None:
            ready(actual_port)
        try:
            await asyncio.Future()
        finally:
            await sim.calls.close()
