"""The frame log: every WebSocket frame of a connection, in wire order, as JSON lines.

Frame log (``frame_log_dir``): one ``<session id>.jsonl`` per connection; first
line ``{"kind": "request", "path", "query", "headers": [[name, value], ...]}``,
then one line per WebSocket frame in wire order, ``{"dir": "in"|"out",
"opcode": "text"|"binary"|"continuation"|"ping"|"pong"|"close", "fin",
"payload_b64"}``, hooked at the frame layer so payloads are the exact bytes.
A handshake refused with an HTTP error adds ``{"kind": "response", "status"}``.

A WebRTC call (calls.py) logs to ``<call id>.jsonl``: first line ``{"kind": "call", "call_id",
"query", "session", "headers"}``, then one line per data-channel message in the same shape as a
frame (``opcode`` ``"text"`` or ``"binary"``, ``fin`` true), so the same readers sum its usage.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any
from urllib.parse import urlsplit

from websockets.frames import Frame
from websockets.frames import Opcode
from websockets.http11 import Request

OPCODE_NAMES = {
    Opcode.CONT: "continuation",
    Opcode.TEXT: "text",
    Opcode.BINARY: "binary",
    Opcode.CLOSE: "close",
    Opcode.PING: "ping",
    Opcode.PONG: "pong",
}


class FrameLog:
    """``<dir>/<connection id>.jsonl``: the request, then every frame, flushed per line."""

    def __init__(self, directory: str, conn_id: str):
        self.path = os.path.join(directory, f"{conn_id}.jsonl")
        self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict) -> None:
        if not self._file.closed:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def request(self, request: Request) -> None:
        parts = urlsplit(request.path)
        headers = [[name, value] for name, value in request.headers.raw_items()]
        self.write({"kind": "request", "path": parts.path, "query": parts.query, "headers": headers})

    def frame(self, direction: str, frame: Frame) -> None:
        self.write(
            {
                "dir": direction,
                "opcode": OPCODE_NAMES.get(frame.opcode, str(frame.opcode)),
                "fin": frame.fin,
                "payload_b64": base64.b64encode(bytes(frame.data)).decode(),
            }
        )

    def message(self, direction: str, message: str | bytes) -> None:
        """One whole data-channel message, logged like a single-frame WebSocket message."""
        text = isinstance(message, str)
        payload = message.encode() if isinstance(message, str) else message
        self.write(
            {
                "dir": direction,
                "opcode": "text" if text else "binary",
                "fin": True,
                "payload_b64": base64.b64encode(payload).decode(),
            }
        )

    def close(self) -> None:
        self._file.close()

    def hook(self, protocol: Any) -> None:
        """Log every frame the sans-I/O protocol parses or serialises, in wire order."""
        recv_frame, send_frame = protocol.recv_frame, protocol.send_frame

        def logged_recv(frame: Frame) -> None:
            self.frame("in", frame)
            recv_frame(frame)

        def logged_send(frame: Frame) -> None:
            self.frame("out", frame)
            send_frame(frame)

        protocol.recv_frame, protocol.send_frame = logged_recv, logged_send
