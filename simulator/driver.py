"""The response streaming of one session, independent of its transport: a driver reads client
messages from any async iterable and sends server events through a ``send`` callable, so a
WebSocket connection (server.py) and a WebRTC call's data channel plus its sidebands (calls.py)
share it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterable
from typing import Awaitable
from typing import Callable

from websockets.exceptions import ConnectionClosed

from .handshake import ConnOptions
from .session import CHUNK_MS
from .session import ResponseRun
from .session import SimSession
from .session import StartResponse

log = logging.getLogger("meshrt.sim")

FAULT_AFTER_TICKS = 3

Send = Callable[[str], Awaitable[None]]
Close = Callable[[int, str], Awaitable[None]]


class Driver:
    """Runs one simulated session: client messages in, server events out.

    ``send(text)`` delivers one server event (JSON text); ``close(code, reason)`` ends the
    transport (session expiry, ``close_mid_response``); ``abort()`` drops it without a goodbye
    (``drop_mid_response``). ``ConnectionClosed`` raised by ``send`` means the transport is gone.
    """

    def __init__(self, session: SimSession, opts: ConnOptions, send: Send, close: Close, abort: Callable[[], None]):
        self.session, self.opts = session, opts
        self._send, self._close, self._abort = send, close, abort
        self.stream: asyncio.Task | None = None
        self.expiring = False

    async def send(self, event: dict) -> None:
        await self._send(json.dumps(event, separators=(",", ":")))

    async def run(self, messages: AsyncIterable[str | bytes], greet: bool = True) -> None:
        """Handle ``messages`` until they end; ``greet`` sends ``session.created`` first."""
        if greet:
            await self.send(self.session.created_event())
        expiry = asyncio.create_task(self._expire_later())
        try:
            async for message in messages:
                await self._on_message(message)
        except ConnectionClosed:
            pass
        finally:
            await self._stop(expiry)

    async def _stop(self, expiry: asyncio.Task) -> None:
        tasks = [expiry] + ([self.stream] if self.stream is not None else [])
        if not self.expiring:
            expiry.cancel()
        if self.stream is not None:  # the transport is gone: nothing more can be sent
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
        except Exception:  # pragma: no cover - a simulator bug; keep the transport alive for diagnosis
            log.exception("response stream failed")

    async def _ticks(self, run: ResponseRun) -> bool:
        """Send the deltas; False when a fault ended the transport."""
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
            self._abort()
        else:
            await self._close(1011, "simulated upstream failure")
        return True

    async def _expire_later(self) -> None:
        await asyncio.sleep(self.opts.max_session_s)
        self.expiring = True
        if self.stream is not None:
            self.stream.cancel()
        try:
            await self.send(self.session.expired_event(self.opts.max_session_s))
            await self._close(1000, "invalid_request_error.session_expired")
        except ConnectionClosed:
            pass
