"""The worker's I/O shell in-process, on both backends, with real sockets: what a client sees
when the worker itself fails. An internal failure cannot be provoked from outside, so the
upstream connector is replaced by one that raises (the only stand-in in this file)."""

from __future__ import annotations

import base64
import json
import os
import socket
import time

import anyio
import pytest
from websockets.frames import Frame
from websockets.frames import Opcode
from websockets.streams import StreamReader

from meshrt.shared import control
from meshrt.shared.control import Grant
from meshrt.shared.control import WorkerConfig
from meshrt.shared.control import WorkerEnded
from meshrt.worker import session as worker_session

REQUEST = (
    b"GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: "
    + base64.b64encode(os.urandom(16))
    + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def read_answer(sock: socket.socket) -> tuple[bytes, list[Frame]]:
    """The HTTP response head and every frame until the close (or EOF)."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"EOF before a response head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    reader = StreamReader()
    reader.feed_data(rest)
    frames: list[Frame] = []
    while True:
        parser = Frame.parse(reader.read_exact, mask=False)
        try:
            while True:
                next(parser)
                chunk = sock.recv(65536)
                if not chunk:
                    return head, frames
                reader.feed_data(chunk)
        except StopIteration as done:
            frames.append(done.value)
            if done.value.opcode is Opcode.CLOSE:
                sock.sendall(Frame(Opcode.CLOSE, done.value.data).serialize(mask=True, extensions=[]))
                return head, frames


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_failure_before_the_101_still_gives_the_client_an_internal_error_frame(monkeypatch, tmp_path, backend):
    async def broken_connect(*args, **kwargs):
        raise RuntimeError("a bug in the worker")

    monkeypatch.setattr(worker_session, "connect_upstream", broken_connect)
    client, served = socket.socketpair()
    channel, supervisor_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    spool_fd = os.open(tmp_path / "spool.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    grant = Grant("sess_1", "req_1", "acct_1", "key_1", "gpt-realtime", 10**9, {}, started_at=time.time())
    config = WorkerConfig(upstream_url="ws://127.0.0.1:9/v1/realtime")
    session = worker_session.WorkerSession(grant, config, REQUEST, served, channel, spool_fd)
    try:
        with client:
            worker_done = []

            def answer():
                return read_answer(client)

            async def main():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(lambda: session.run())
                    worker_done.append(await anyio.to_thread.run_sync(answer))

            anyio.run(main, backend=backend)
        head, frames = worker_done[0]
        assert head.startswith(b"HTTP/1.1 101"), head
        assert b"x-request-id: req_1" in head.lower()
        error = json.loads(frames[0].data)
        assert error["type"] == "error" and error["error"]["code"] == "internal_error"
        assert frames[-1].opcode is Opcode.CLOSE and int.from_bytes(frames[-1].data[:2], "big") == 1011
        ended, _ = control.recv(supervisor_end)
        assert isinstance(ended, WorkerEnded) and ended.end_reason == "internal_error" and not ended.upgraded
        assert b'"end_reason":"internal_error"' in (tmp_path / "spool.jsonl").read_bytes()
    finally:
        channel.close()
        supervisor_end.close()
        os.close(spool_fd)
