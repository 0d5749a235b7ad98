"""Plain HTTP/1.1 on the WebSocket port: the REST side of WebRTC calls (calls.py).

``websockets`` refuses requests with a body, so ``SimConnection`` (server.py) sniffs the first
bytes of each connection: once the request head is complete, a WebSocket upgrade goes to
``websockets`` untouched, anything else is collected here (head, then a ``Content-Length`` body of
at most 1 MiB), answered once, and the connection closed.
"""

from __future__ import annotations

import asyncio

from websockets.datastructures import Headers
from websockets.http11 import Request

from .handshake import HandshakeError

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
HEAD_END = b"\r\n\r\n"


def is_websocket_upgrade(head: bytes) -> bool:
    """Whether a request head (without the blank line) asks for a WebSocket upgrade."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade" and b"websocket" in value.lower():
            return True
    return False


class HttpRequest:
    """One plain HTTP request: method, target, headers, body (``body_done`` resolves once it is
    complete, or with a :class:`HandshakeError` for a head or length the simulator refuses)."""

    def __init__(self, head: bytes):
        self.body = bytearray()
        self.body_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.method, self.path, self.headers = "", "", Headers()
        self._need = 0
        try:
            self._parse_head(head)
        except HandshakeError as exc:
            self.body_done.set_exception(exc)

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise HandshakeError(400, "invalid_request", "Malformed HTTP request line.")
        self.method, self.path = parts[0], parts[1]
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise HandshakeError(400, "invalid_request", "Malformed HTTP header line.")
            self.headers[name] = value.strip()
        if "Transfer-Encoding" in self.headers:
            raise HandshakeError(411, "invalid_request", "Send the body with a Content-Length, not chunked.")
        raw = self.headers.get("Content-Length", "0")
        if not raw.isdigit():
            raise HandshakeError(400, "invalid_request", "Invalid Content-Length.")
        self._need = int(raw)
        if self._need > MAX_BODY_BYTES:
            raise HandshakeError(413, "request_too_large", f"The body is limited to {MAX_BODY_BYTES} bytes.")
        if self._need == 0:
            self.body_done.set_result(None)

    def expects_continue(self) -> bool:
        """``Expect: 100-continue`` with the body still to come (curl sends it for large bodies)."""
        expect = self.headers.get("Expect", "")
        return not self.body_done.done() and expect.lower() == "100-continue" and not self.body

    def feed(self, data: bytes) -> None:
        if self.body_done.done():
            return  # pipelined requests are not served: one request per connection
        self.body += data[: self._need - len(self.body)]
        if len(self.body) >= self._need:
            self.body_done.set_result(None)

    def request(self) -> Request:
        """The head as a ``websockets`` request, for the handshake helpers (auth, frame log)."""
        return Request(self.path, self.headers)
