"""The clients: pre-built RFC 6455 frames and events, the two targets (direct, gateway), a
blocking client for the timed paths and an asyncio one for bursts and the load generator.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from dataclasses import dataclass

from meshrt.worker.frames import client_close_frame
from meshrt.worker.frames import client_text_frame

from .plans import BenchError

MODEL = "gpt-realtime"


# frames are built once and written as often as needed, by the worker's own builders
client_frame = client_text_frame
CLOSE_FRAME = client_close_frame(1000)


def text_event(size: int) -> bytes:
    """A `conversation.item.create` with a text part, padded to exactly `size` bytes."""
    head = (
        '{"type":"conversation.item.create","item":{"type":"message","role":"user",'
        '"content":[{"type":"input_text","text":"'
    )
    tail = '"}]}}'
    return (head + "x" * (size - len(head) - len(tail)) + tail).encode()


def append_event(size: int | None = None, pcm_bytes: int | None = None) -> bytes:
    """An `input_audio_buffer.append` of PCM16 (a byte ramp), either `pcm_bytes` of audio
    or padded to at most `size` bytes overall (the base64 kept a multiple of 4: valid audio)."""
    wrapper = len('{"type":"input_audio_buffer.append","audio":""}')
    if pcm_bytes is None:
        pcm_bytes = (size - wrapper) // 4 * 3
    pcm = bytes((i * 7) & 0xFF for i in range(pcm_bytes))
    return json.dumps(
        {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}, separators=(",", ":")
    ).encode()


def server_frame_len(payload_len: int) -> int:
    return payload_len + 2 + (2 if 126 <= payload_len < 65536 else 8 if payload_len >= 65536 else 0)


def upgrade_request(port: int, query: str, key: str) -> bytes:
    return (
        f"GET /v1/realtime?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {key}\r\n\r\n"
    ).encode()


@dataclass(frozen=True)
class Target:
    """Where a client connects: the simulator directly, or the gateway."""

    name: str  # "direct" | "gateway"
    port: int
    key: str

    def query(self, extra: str = "") -> str:
        return f"model={MODEL}" + (f"&{extra}" if extra else "")


class Conn:
    """A blocking RFC 6455 client: no event loop, frame headers only. `setup_ns` is the time
    from before connect() to the end of the first frame (`session.created`)."""

    def __init__(self, target: Target, extra_query: str = "", timeout: float = 15.0):
        t0 = time.perf_counter_ns()
        self.sock = socket.create_connection(("127.0.0.1", target.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.sock.sendall(upgrade_request(target.port, target.query(extra_query), target.key))
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        if not head.startswith(b"HTTP/1.1 101"):
            self.sock.close()
            raise BenchError(f"{target.name}: upgrade refused: {head.splitlines()[0]!r}")
        opcode, first = self.recv_frame()
        self.setup_ns = time.perf_counter_ns() - t0
        if opcode != 0x1 or b'"session.created"' not in first[:60]:
            self.sock.close()
            raise BenchError(f"{target.name}: expected session.created, got {first[:200]!r}")

    def _more(self) -> None:
        chunk = self.sock.recv(262144)
        if not chunk:
            raise BenchError("connection closed by the peer")
        self.buf += chunk

    def recv_frame(self) -> tuple[int, bytes]:
        while len(self.buf) < 2:
            self._more()
        b0, length, head = self.buf[0], self.buf[1] & 0x7F, 2
        if length >= 126:
            head = 4 if length == 126 else 10
            while len(self.buf) < head:
                self._more()
            length = int.from_bytes(self.buf[2:head], "big")
        while len(self.buf) < head + length:
            self._more()
        payload = bytes(self.buf[head : head + length])
        del self.buf[: head + length]
        return b0 & 0x0F, payload

    def roundtrip_ns(self, frame: bytes, payload_len: int) -> int:
        """Send one frame; return the ns until its echo has been received whole."""
        t0 = time.perf_counter_ns()
        self.sock.sendall(frame)
        need = server_frame_len(payload_len)
        while len(self.buf) < need:
            self._more()
        elapsed = time.perf_counter_ns() - t0
        if (self.buf[0] & 0x0F) != 0x1:
            raise BenchError(f"expected an echoed text frame, got opcode {self.buf[0] & 0x0F}")
        del self.buf[:need]
        return elapsed

    def recv_until(self, marker: bytes) -> bytes:
        while True:
            opcode, payload = self.recv_frame()
            if opcode == 0x8:
                raise BenchError(f"closed while waiting for {marker!r}: {payload!r}")
            if marker in payload[:80]:
                return payload

    def close(self) -> None:
        """Close handshake: send close, wait (bounded) for the peer's close, then drop."""
        try:
            self.sock.sendall(CLOSE_FRAME)
            self.sock.settimeout(2.0)
            while self.recv_frame()[0] != 0x8:
                pass
        except (OSError, BenchError):
            pass
        finally:
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncSession(asyncio.Protocol):
    """A raw WebSocket client session on an asyncio transport: writes pre-built frames, counts
    what it receives (frame headers only). `opened` resolves at the end of the first frame."""

    def __init__(self, target: Target, extra_query: str = ""):
        self.target, self.extra_query = target, extra_query
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future | None = None
        self.closed: asyncio.Future | None = None
        self.t0 = self.open_ns = 0
        self.upgraded = False
        self.closing = False
        self.buf = b""
        self.skip = 0
        self.opcode = 0
        self.rx_bytes = self.rx_frames = 0
        self.next_response = 0.0

    async def open(self, timeout: float = 30.0) -> int:
        loop = asyncio.get_running_loop()
        self.opened, self.closed = loop.create_future(), loop.create_future()
        self.t0 = time.perf_counter_ns()
        await asyncio.wait_for(loop.create_connection(lambda: self, "127.0.0.1", self.target.port), timeout)
        await asyncio.wait_for(self.opened, timeout)
        return self.open_ns - self.t0

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(upgrade_request(self.target.port, self.target.query(self.extra_query), self.target.key))

    def data_received(self, data: bytes) -> None:
        self.rx_bytes += len(data)
        if not self.upgraded:
            self.buf += data
            if b"\r\n\r\n" not in self.buf:
                return
            head, _, data = self.buf.partition(b"\r\n\r\n")
            self.buf = b""
            if not head.startswith(b"HTTP/1.1 101"):
                self._fail(BenchError(f"upgrade refused: {head.splitlines()[0]!r}"))
                return
            self.upgraded = True
        self._scan(data)

    def _scan(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos, size = 0, len(buf)
        while True:
            if self.skip:
                take = min(self.skip, size - pos)
                pos += take
                self.skip -= take
                if self.skip:
                    break
                self._frame_done()
                continue
            if size - pos < 2:
                break
            length, head = buf[pos + 1] & 0x7F, 2
            if length >= 126:
                head = 4 if length == 126 else 10
                if size - pos < head:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + head], "big")
            self.opcode = buf[pos] & 0x0F
            pos += head
            self.skip = length
            if length == 0:
                self._frame_done()
        self.buf = buf[pos:] if pos < size else b""

    def _frame_done(self) -> None:
        self.rx_frames += 1
        if self.opened is not None and not self.opened.done():
            self.open_ns = time.perf_counter_ns()
            self.opened.set_result(True)
        if self.opcode == 0x8 and self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        if self.opened is not None and not self.opened.done():
            self.opened.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self._fail(BenchError(f"connection lost before session.created: {exc!r}"))
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(self.closing)

    def start_close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(CLOSE_FRAME)


async def close_sessions(sessions: list[AsyncSession], timeout: float = 5.0) -> None:
    for s in sessions:
        s.start_close()
    waiting = [s.closed for s in sessions if s.closed is not None and not s.closed.done()]
    if waiting:
        await asyncio.wait(waiting, timeout=timeout)
    for s in sessions:
        if s.transport is not None and not s.transport.is_closing():
            s.transport.abort()


async def open_burst(target: Target, n: int) -> tuple[list[float], float]:
    """Open n sessions at once; returns (per-connection set-up ms, wall ms of the burst)."""
    sessions = [AsyncSession(target) for _ in range(n)]
    t0 = time.perf_counter_ns()
    try:
        times = await asyncio.gather(*(s.open() for s in sessions))
        wall = time.perf_counter_ns() - t0
    finally:
        await close_sessions(sessions)
    return [t / 1e6 for t in times], wall / 1e6


async def open_burst_counted(target: Target, n: int) -> tuple[list[float], float, int]:
    """Open n sessions at once, counting refusals rather than failing on the first; returns
    (set-up ms of those that opened, wall ms until the last settled, refused)."""
    sessions = [AsyncSession(target) for _ in range(n)]
    t0 = time.perf_counter_ns()
    try:
        results = await asyncio.gather(*(s.open() for s in sessions), return_exceptions=True)
        wall = time.perf_counter_ns() - t0
    finally:
        await close_sessions(sessions)
    times = [r / 1e6 for r in results if not isinstance(r, BaseException)]
    return times, wall / 1e6, n - len(times)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def run_async(coro):
    loop = new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
