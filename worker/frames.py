"""WebSocket frame scanning, sans-I/O: split a byte stream into whole raw frames.

The relay forwards frames as they are on the wire: a client's masked frame is already a valid
client frame upstream, and upstream's unmasked frame is a valid server frame toward the client.
So only headers are parsed here; payloads are never copied or unmasked unless asked for.
Violations raise ProtocolViolation with the RFC 6455 close code to answer with.
"""

from __future__ import annotations

from dataclasses import dataclass

from websockets.frames import Frame
from websockets.frames import Opcode
from websockets.frames import apply_mask

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
_DATA = (OP_CONT, OP_TEXT, OP_BINARY)
_KNOWN = (OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG)


class ProtocolViolation(Exception):
    def __init__(self, close_code: int, reason: str):
        super().__init__(reason)
        self.close_code = close_code
        self.reason = reason
        self.chunk: bytes = b""
        self.frames: list = []  # the complete, valid frames scanned before the violation


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs a setattr call per field,
class RawFrame:  # and one is built per relayed frame
    opcode: int
    fin: bool
    start: int  # offset of the frame in the chunk it was scanned from
    payload_start: int
    end: int
    mask: bytes | None
    message_start: bool  # first frame of a data message (text/binary opcode)


class FrameScanner:
    """Feeds on stream bytes; yields complete frames as offsets into the returned chunk.

    `expect_masked`: True for the client leg (RFC 6455: client frames must be masked).
    `max_message`: limit on a data message's total payload (fragments summed); over it,
    ProtocolViolation(1009). Control frames are checked (≤125 bytes, not fragmented).
    """

    def __init__(self, expect_masked: bool, max_message: int | None = None):
        self.expect_masked = expect_masked
        self.max_message = max_message
        self._pending = b""
        self._in_message = False
        self._message_size = 0

    @property
    def in_message(self) -> bool:
        """True while a fragmented data message is unfinished (nothing may be injected)."""
        return self._in_message

    def feed(self, data: bytes) -> tuple[bytes, list[RawFrame]]:
        """Return (chunk, frames): frames index into chunk; chunk[:frames[-1].end] is complete."""
        chunk = self._pending + data if self._pending else data
        frames: list[RawFrame] = []
        pos, size = 0, len(chunk)
        try:
            while pos < size:  # (most reads end on a frame boundary: no call to find that out)
                frame = self._scan_one(chunk, pos, size)
                if frame is None:
                    break
                frames.append(frame)
                pos = frame.end
        except ProtocolViolation as violation:
            # the frames before the bad one are good: the caller still relays (and bills) them
            violation.chunk, violation.frames = chunk, frames
            self._pending = b""
            raise
        self._pending = chunk[pos:] if pos < size else b""
        return chunk, frames

    def whole(self, data: bytes) -> int:
        """The usual read, told in a few byte compares: when nothing is pending, no message is in
        progress and `data` is exactly one unfragmented text or binary frame (masked as this leg
        must be, payload under 64 KiB and within `max_message`), the offset its payload starts at;
        else 0, and nothing changed: `feed` takes it. (At audio rate every read is one such frame,
        and a worker's cost per frame is mostly the code it touches after waking.)"""
        if self._pending or self._in_message or len(data) < 6:
            return 0
        b0, b1 = data[0], data[1]
        if (b0 != 0x81 and b0 != 0x82) or (b1 >= 0x80) != self.expect_masked:
            return 0
        length, head = b1 & 0x7F, 2
        if length == 126:
            length, head = (data[2] << 8) | data[3], 4
        elif length == 127:
            return 0
        if b1 >= 0x80:
            head += 4
        if len(data) - head != length or (self.max_message is not None and length > self.max_message):
            return 0
        self._message_size = length
        return head

    def _scan_one(self, chunk: bytes, pos: int, size: int) -> RawFrame | None:
        # runs once per relayed frame: the usual one, a whole message, is tracked inline
        if size - pos < 2:
            return None
        b0, b1 = chunk[pos], chunk[pos + 1]
        opcode, length = b0 & 0x0F, b1 & 0x7F
        if b0 & 0x70:
            raise ProtocolViolation(1002, "reserved bits set")
        if opcode not in _KNOWN:
            raise ProtocolViolation(1002, f"unknown opcode {opcode}")
        masked = b1 & 0x80
        if (masked != 0) != self.expect_masked:
            raise ProtocolViolation(1002, "incorrect masking")
        fin = b0 & 0x80 != 0
        head = pos + 2
        if length == 126:
            if size - head < 2:
                return None
            length = int.from_bytes(chunk[head : head + 2], "big")
            head += 2
        elif length == 127:
            if size - head < 8:
                return None
            length = int.from_bytes(chunk[head : head + 8], "big")
            if length >> 63:
                raise ProtocolViolation(1002, "payload length out of range")
            head += 8
        if opcode >= OP_CLOSE:
            if length > 125 or not fin:
                raise ProtocolViolation(1002, "bad control frame")
            message_start = False
        elif fin and opcode != OP_CONT and not self._in_message:  # a whole message in one frame
            if self.max_message is not None and length > self.max_message:
                raise ProtocolViolation(1009, "message too large")
            self._message_size, message_start = length, True
        else:
            message_start = self._track_message(opcode, fin, length)
        mask = None
        if masked:
            if size - head < 4:
                self._untrack(opcode, fin, length, message_start)
                return None
            mask = chunk[head : head + 4]
            head += 4
        if size - head < length:
            self._untrack(opcode, fin, length, message_start)
            return None
        return RawFrame(opcode, fin, pos, head, head + length, mask, message_start)

    def _track_message(self, opcode: int, fin: bool, length: int) -> bool:
        """A data frame: check fragmentation and the message's size so far."""
        if opcode == OP_CONT:
            if not self._in_message:
                raise ProtocolViolation(1002, "unexpected continuation frame")
            self._message_size += length
        else:
            if self._in_message:
                raise ProtocolViolation(1002, "expected a continuation frame")
            self._message_size = length
        if self.max_message is not None and self._message_size > self.max_message:
            raise ProtocolViolation(1009, "message too large")
        self._in_message = not fin
        return opcode != OP_CONT

    def _untrack(self, opcode: int, fin: bool, length: int, message_start: bool) -> None:
        """Undo _track_message for a frame that turned out incomplete (it is re-scanned later)."""
        if opcode not in _DATA:
            return
        if message_start:
            self._in_message, self._message_size = False, 0
        else:
            self._in_message, self._message_size = True, self._message_size - length


def payload(chunk: bytes, frame: RawFrame) -> bytes:
    """A frame's payload, unmasked (websockets' C speedup): the relay reads every client text
    message this way to judge it (worker/preauth.py), so no import or copy more than needed."""
    data = chunk[frame.payload_start : frame.end]
    return data if frame.mask is None else apply_mask(data, frame.mask)


def client_text_frame(data: bytes) -> bytes:
    """A masked text frame, as a client sends it (for what the gateway itself sends upstream)."""
    return Frame(Opcode.TEXT, data).serialize(mask=True, extensions=[])


def client_close_frame(code: int, reason: str = "") -> bytes:
    from websockets.frames import Close

    return Frame(Opcode.CLOSE, Close(code, reason).serialize()).serialize(mask=True, extensions=[])


def server_close_frame(code: int, reason: str = "") -> bytes:
    from websockets.frames import Close

    return Frame(Opcode.CLOSE, Close(code, reason).serialize()).serialize(mask=False, extensions=[])


def server_text_frame(data: bytes) -> bytes:
    return Frame(Opcode.TEXT, data).serialize(mask=False, extensions=[])
