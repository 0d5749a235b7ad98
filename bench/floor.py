"""The floor for `meshrt bench`: a relay that only copies bytes, no parsing, no metering.

One uvloop `Protocol` pair per connection, in one process. What it adds over a direct
connection is what any Python relay on this machine pays for two extra socket hops; the gateway's
added round trip is reported next to it, so the share that is meshrt's own work is visible.

    python -m meshrt.bench.floor --upstream-port 8765   # prints "listening on PORT"
"""

from __future__ import annotations

import argparse
import asyncio


class _Half(asyncio.Protocol):
    def __init__(self):
        self.peer: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.pending.append(data)  # the upstream connect is still in progress
        else:
            self.peer.write(data)

    def connection_lost(self, exc) -> None:
        if self.peer is not None:
            self.peer.close()


class _ClientSide(_Half):
    def __init__(self, upstream_port: int):
        super().__init__()
        self.upstream_port = upstream_port

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(_Half, "127.0.0.1", self.upstream_port)
        except OSError:
            self.transport.close()
            return
        upstream.peer = self.transport
        self.peer = upstream.transport
        for data in self.pending:
            self.peer.write(data)
        self.pending.clear()


async def _serve(upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _ClientSide(upstream_port), "127.0.0.1", 0)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Future()


def main() -> None:
    parser = argparse.ArgumentParser(prog="meshrt-bench-floor")
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(_serve(args.upstream_port))
    except ImportError:
        asyncio.run(_serve(args.upstream_port))


if __name__ == "__main__":
    main()
