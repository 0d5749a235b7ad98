"""The relay's two legs as thin I/O over non-blocking sockets, under anyio (asyncio or trio).

Why not anyio's socket streams: profiling the 1 KB round trip showed 61 % of the worker's CPU in
the stream send path (a lock, an extra event-loop pass, then the syscall) and 10 % more in
receive. Here `write()` is one `send()` syscall, without awaiting anything, when the kernel takes the
bytes whole, which on a live session is nearly always; only a full socket buffer queues the rest,
in order, for `drain()` to flush when the socket is writable. A receive is a wait for
readability and one `recv()`.

`TlsLeg` runs TLS (the real upstream is `wss://`) as ssl.SSLObject over memory BIOs on the same
plain-socket machinery, so both legs share one send and receive path.

`TransportLeg` is every leg on asyncio: a uvloop transport (with uvloop's own TLS for wss://)
whose bytes arrive by callback once the relay starts. `Leg` and `TlsLeg` serve trio, and the
client socket on asyncio until its 101 is sent. All three offer `write(data) -> bool` (never
waits), `drain()` (waits until the backlog is with the kernel) and `close()`.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque

import anyio

RECEIVE_BYTES = 262144


class Leg:
    """One connected, non-blocking socket. `receive()` returns b"" at end of stream; both
    methods raise OSError when the connection breaks."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.sock = sock
        self._queue: deque[bytes] = deque()  # what the kernel would not take yet, in order
        self._flushed: anyio.Event | None = None  # set when a flush in progress empties the queue
        self._error: OSError | None = None

    async def receive(self) -> bytes:
        while True:
            await anyio.wait_readable(self.sock)
            try:
                return self.sock.recv(RECEIVE_BYTES)
            except (BlockingIOError, InterruptedError):
                continue  # a spurious wake-up

    def write(self, data: bytes) -> bool:
        """Send `data` after every earlier write, as far as the kernel takes it now, without
        waiting; the rest is queued in order. True when nothing is left queued."""
        if self._error is not None:
            raise self._error
        if self._queue:
            self._queue.append(data)
            return False
        sent = self._send_some(data)
        if sent == len(data):
            return True
        self._queue.append(data[sent:])
        return False

    async def drain(self) -> None:
        """Wait until every queued byte is with the kernel. One caller flushes; others wait."""
        if self._flushed is not None:
            await self._flushed.wait()
        elif self._queue:
            self._flushed = anyio.Event()
            try:
                await self._flush()
            except OSError as error:
                self._error = error
            finally:
                self._flushed, flushed = None, self._flushed
                flushed.set()
        if self._error is not None:
            raise self._error

    async def send(self, data: bytes) -> None:
        if not self.write(data):
            await self.drain()

    async def _flush(self) -> None:
        while self._queue:
            await anyio.wait_writable(self.sock)
            head = self._queue[0]
            sent = self._send_some(head)
            if sent == len(head):
                self._queue.popleft()
            else:
                self._queue[0] = head[sent:]

    def _send_some(self, data: bytes) -> int:
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0

    def close(self) -> None:
        self.sock.close()

    async def closed(self) -> None:
        """Closing a socket is immediate (kept for the TransportLeg interface)."""


class TlsLeg(Leg):
    """TLS over a Leg: the handshake and records go through memory BIOs, so the socket stays
    ours. `connect` performs the client handshake."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str):
        super().__init__(sock)
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=server_hostname)

    @classmethod
    def adopt(
        cls, sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
    ) -> "TlsLeg":
        """A connection whose handshake is done already (worker/preconnect.py)."""
        leg = cls.__new__(cls)
        Leg.__init__(leg, sock)
        leg._incoming, leg._outgoing, leg._tls = incoming, outgoing, tls
        return leg

    async def connect(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush_records()
                if not await self._read_records():
                    raise ConnectionResetError("connection closed during the TLS handshake") from None
        await self._flush_records()

    async def receive(self) -> bytes:
        while True:
            try:
                data = self._tls.read(RECEIVE_BYTES)
            except ssl.SSLWantReadError:
                if not await self._read_records():
                    return b""  # EOF without close_notify: the peer is gone either way
                continue
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLError as error:
                raise ConnectionError(f"TLS error: {error}") from error
            if self._outgoing.pending:  # e.g. a key update answered while reading
                await self._flush_records()
            return data

    def write(self, data: bytes) -> bool:
        try:
            self._tls.write(data)  # into the memory BIO: always whole
        except ssl.SSLError as error:
            raise ConnectionError(f"TLS error: {error}") from error
        return super().write(self._outgoing.read())

    async def _flush_records(self) -> None:
        if self._outgoing.pending and not Leg.write(self, self._outgoing.read()):
            await self.drain()

    async def _read_records(self) -> bool:
        raw = await Leg.receive(self)
        if not raw:
            self._incoming.write_eof()
            return False
        self._incoming.write(raw)
        return True


class TransportLeg(asyncio.Protocol):
    """A leg as an asyncio (uvloop) transport, the leg of the asyncio relay: bytes arrive by
    callback from the loop's C code, so relaying a frame wakes no task and awaits nothing, as in
    a plain byte-copying relay. Writes are buffered by the transport; when its buffer passes the
    high-water mark, the other leg stops reading until it drains (backpressure end to end).

    Until `relay()` is called (the upstream's HTTP handshake), bytes are kept for `receive()`."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.peer: TransportLeg | None = None  # whose reading pauses while we can't write
        self._on_data = self._on_lost = None
        self._inbox: list[bytes] = []
        self._arrived = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.lost = asyncio.Event()
        self._gone = False  # lost.is_set(), read on every write without a call
        self.held = False  # its events wait for a reservation: not read until answered

    @classmethod
    async def connect(cls, host: str, port: int, tls: ssl.SSLContext | None) -> "TransportLeg":
        _, leg = await asyncio.get_running_loop().create_connection(
            cls, host, port, ssl=tls, server_hostname=host if tls else None
        )
        return leg

    @classmethod
    async def adopt(cls, sock: socket.socket) -> "TransportLeg":
        """Wrap a connected socket (the transport owns it from here)."""
        _, leg = await asyncio.get_running_loop().connect_accepted_socket(cls, sock=sock)
        return leg

    def relay(self, on_data, on_lost) -> bytes:
        """From now on, bytes go to `on_data` as they arrive; returns what arrived before."""
        self._on_data, self._on_lost = on_data, on_lost
        early, self._inbox = b"".join(self._inbox), []
        if self.lost.is_set():
            asyncio.get_running_loop().call_soon(on_lost)
        return early

    async def receive(self) -> bytes:
        """Before `relay()`: the next bytes, or b"" at end of stream."""
        while not self._inbox:
            if self.lost.is_set():
                return b""
            self._arrived.clear()
            await self._arrived.wait()
        data, self._inbox = b"".join(self._inbox), []
        return data

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._on_data is not None:
            self._on_data(data)
        else:
            self._inbox.append(data)
            self._arrived.set()

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc) -> None:
        self._gone = True
        self._writable.set()
        self._arrived.set()
        self.lost.set()
        if self._on_lost is not None:
            self._on_lost()

    def pause_writing(self) -> None:
        self._writable.clear()
        if self.peer is not None and self.peer.transport is not None and not self.peer.transport.is_closing():
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writable.set()
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing() and not peer.held:
            peer.transport.resume_reading()

    def hold(self, on: bool) -> None:
        """Stop reading this leg while what it sent waits for a reservation, or read again
        (unless its peer's full buffer still holds it back)."""
        self.held = on
        if self.transport is None or self.transport.is_closing():
            return
        if on:
            self.transport.pause_reading()
        elif self.peer is None or self.peer._writable.is_set():
            self.transport.resume_reading()

    # the Leg interface
    def write(self, data: bytes) -> bool:
        transport = self.transport
        if self._gone or transport.is_closing():
            raise ConnectionResetError("connection lost")
        transport.write(data)
        return True  # buffered by the transport, which flushes it on its own

    async def drain(self) -> None:
        await self._writable.wait()

    async def send(self, data: bytes) -> None:
        self.write(data)
        await self.drain()

    def close(self) -> None:
        """Close after flushing what the transport still holds."""
        if self.transport is not None:
            self.transport.close()

    async def closed(self) -> None:
        await self.lost.wait()


class TlsTransportLeg(TransportLeg):
    """A TransportLeg over a TLS connection whose handshake a pool worker did before its session
    (worker/preconnect.py): uvloop's own TLS cannot take over an SSLObject, so the records go
    through the SSLObject's memory BIOs here, as in `TlsLeg`, on a plain transport."""

    def __init__(self, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO):
        super().__init__()
        self._tls, self._incoming, self._outgoing = tls, incoming, outgoing

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        plain = []
        while True:
            try:
                chunk = self._tls.read(RECEIVE_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify: the transport's EOF follows
                break
            except ssl.SSLError:
                self.transport.abort()
                return
            if not chunk:
                break
            plain.append(chunk)
        if self._outgoing.pending:  # e.g. a key update answered while reading
            self.transport.write(self._outgoing.read())
        if plain:
            super().data_received(b"".join(plain))

    def write(self, data: bytes) -> bool:
        if self._gone or self.transport.is_closing():
            raise ConnectionResetError("connection lost")
        try:
            self._tls.write(data)  # into the memory BIO: always whole
        except ssl.SSLError as error:
            raise ConnectionError(f"TLS error: {error}") from error
        self.transport.write(self._outgoing.read())
        return True
