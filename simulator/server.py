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

from .framelog import FrameLog
from .handshake import FAULT_REJECTIONS
from .handshake import FAULTS
from .handshake import ConnOptions
from .handshake import HandshakeError
from .handshake import SimConfig
from .handshake import parse_options
from .session import CHUNK_MS
from .session import ResponseRun
from .session import SimSession
from .session import StartResponse

log = logging.getLogger("meshrt.sim")

FAULT_AFTER_TICKS = 3
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class SimConnection(ServerConnection):
    """A websockets server connection carrying the simulator's per-connection options."""

    sim: ConnOptions | None = None


class _Driver:
    """Runs one simulated session on an accepted socket."""

    def __init__(self, ws: SimConnection, opts: ConnOptions):
        self.ws, self.opts = ws, opts
        self.session: SimSession = opts.session  # type: ignore[assignment]
        self.stream: asyncio.Task | None = None
        self.expiring = False

    async def send(self, event: dict) -> None:
        await self.ws.send(json.dumps(event, separators=(",", ":")))

    async def run(self) -> None:
        await self.send(self.session.created_event())
        expiry = asyncio.create_task(self._expire_later())
        try:
            async for message in self.ws:
                await self._on_message(message)
        except ConnectionClosed:
            pass
        finally:
            await self._stop(expiry)

    async def _stop(self, expiry: asyncio.Task) -> None:
        tasks = [expiry] + ([self.stream] if self.stream is not None else [])
        if not self.expiring:
            expiry.cancel()
        if self.stream is not None:  # the socket is gone: nothing more can be sent
            self.stream.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            await self.send(
                self.session.error(
                    "unsupported_binary_frame",
                    "Binary frames are not supported; send client events as JSON text frames.",
                )
            )
            return
        for output in self.session.handle(message):
            if isinstance(output, StartResponse):
                await self._start(output.run)
            else:
                await self.send(output)

    async def _start(self, run: ResponseRun) -> None:
        for event in self.session.response_head(run):
            await self.send(event)
        self.stream = asyncio.create_task(self._stream(run))

    async def _stream(self, run: ResponseRun) -> None:
        try:
            if not await self._ticks(run):
                return
            status = "cancelled" if run.cancel_requested else "incomplete" if run.limit_reached else "completed"
            for event in self.session.response_finish(run, status):
                await self.send(event)
        except ConnectionClosed:
            pass
        except Exception:  # pragma: no cover - a simulator bug; keep the socket alive for diagnosis
            log.exception("response stream failed")

    async def _ticks(self, run: ResponseRun) -> bool:
        """Send the deltas; False when a fault ended the connection."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for tick in range(run.ticks):
            if run.cancel_requested:
                break
            for event in self.session.response_tick(run, tick):
                await self.send(event)
            if run.limit_reached:
                break
            if tick == min(FAULT_AFTER_TICKS, run.ticks) - 1 and await self._mid_response_fault():
                return False
            delay = start + (tick + 1) * CHUNK_MS / 1000 - loop.time() if self.opts.pace else 0
            await asyncio.sleep(max(0.0, delay))
        return True

    async def _mid_response_fault(self) -> bool:
        if self.session.responses != 1 or self.opts.fault not in ("close_mid_response", "drop_mid_response"):
            return False
        if self.opts.fault == "drop_mid_response":
            self.ws.transport.abort()
        else:
            await self.ws.close(1011, "simulated upstream failure")
        return True

    async def _expire_later(self) -> None:
        await asyncio.sleep(self.opts.max_session_s)
        self.expiring = True
        if self.stream is not None:
            self.stream.cancel()
        try:
            await self.send(self.session.expired_event(self.opts.max_session_s))
            await self.ws.close(1000, "invalid_request_error.session_expired")
        except ConnectionClosed:
            pass


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

    def __init__(self, config: SimConfig):
        self.config = config

    async def process_request(self, ws: SimConnection, request: Request) -> Response | None:
        try:
            opts = parse_options(request, self.config)
        except HandshakeError as exc:
            self._log_rejection(ws, request, exc.status)
            return exc.response()
        opts.session = SimSession(opts.model, beta=opts.beta, kind=opts.kind, response_ms=opts.response_ms)
        if self.config.frame_log_dir:
            opts.log = FrameLog(self.config.frame_log_dir, opts.session.id)
            opts.log.request(request)
            opts.log.hook(ws.protocol)
        ws.sim = opts
        return await self._handshake_fault(ws, opts)

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
            elif opts.echo:
                await _echo(ws, opts.session)
            else:
                await _Driver(ws, opts).run()
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
) -> None:
    """Run the simulator until cancelled; ``ready(port)`` is called once listening.
    With ``tls`` it serves wss://, like the real API."""
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; expected one of {', '.join(FAULTS)}")
    if frame_log_dir:
        os.makedirs(frame_log_dir, exist_ok=True)
    sim = Simulator(SimConfig(api_key=api_key, frame_log_dir=frame_log_dir, pace=pace, fault=fault))
    async with ws_serve(
        sim.handler,
        host,
        port,
        process_request=sim.process_request,
        select_subprotocol=_select_subprotocol,
        create_connection=SimConnection,
        compression=None,
        max_size=MAX_MESSAGE_BYTES,
        ping_interval=None,
        server_header="meshrt-sim",
        ssl=tls,
    ) as server:
        actual_port = server.sockets[0].getsockname()[1]
        if ready is not None:
            ready(actual_port)
        await asyncio.Future()
