"""The command line: ``meshrt sim`` and ``python -m meshrt.simulator`` (flags in docs/simulator.md)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys

from meshrt.shared.settings import port_argument

from .handshake import FAULTS
from .server import serve


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="meshrt sim", description="OpenAI Realtime upstream simulator.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=port_argument, default=8765, help="port to bind, 0 = ephemeral (default 8765)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: any key)")
    parser.add_argument("--frame-log-dir", default=None, help="write a JSONL frame log per connection here")
    parser.add_argument("--pace", action="store_true", help="send output audio in real time")
    parser.add_argument("--fault", choices=FAULTS, default=None, help="inject this fault on every connection and call")
    parser.add_argument(
        "--handshake-delay-ms",
        type=float,
        default=0.0,
        help="act out a WAN link of this round trip: one on TCP connect, one for TLS, one for the upgrade (default 0)",
    )
    parser.add_argument("--tls-cert", default=None, help="serve wss:// with this PEM certificate (chain)")
    parser.add_argument("--tls-key", default=None, help="the certificate's PEM private key")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    args.tls = None
    if args.tls_cert:
        args.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            args.tls.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            parser.error(f"cannot load --tls-cert/--tls-key: {exc}")
    if not 0 <= args.handshake_delay_ms <= 10000:
        parser.error("--handshake-delay-ms must be between 0 and 10000")
    if not args.host.strip():
        parser.error("--host must not be empty")
    if args.api_key is not None and not args.api_key.strip():
        parser.error("--api-key must not be empty")
    if args.frame_log_dir:
        try:
            os.makedirs(args.frame_log_dir, exist_ok=True)
        except OSError as exc:
            parser.error(f"--frame-log-dir {args.frame_log_dir!r} cannot be created: {exc.strerror}")
        if not os.access(args.frame_log_dir, os.W_OK):
            parser.error(f"--frame-log-dir {args.frame_log_dir!r} is not writable")
    return args


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def ready(port: int) -> None:
        scheme = "wss" if args.tls else "ws"
        print(f"meshrt sim listening on {scheme}://{_url_host(args.host)}:{port}/v1/realtime", flush=True)

    server = asyncio.create_task(
        serve(
            args.host,
            args.port,
            args.api_key,
            args.frame_log_dir,
            args.pace,
            ready,
            args.fault,
            args.tls,
            handshake_delay_ms=args.handshake_delay_ms,
        )
    )
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({server, stopper}, return_when=asyncio.FIRST_COMPLETED)
    for task in (server, stopper):
        task.cancel()
    await asyncio.gather(server, stopper, return_exceptions=True)  # serve() ends its calls first
    if server.done() and not server.cancelled() and server.exception() is not None:
        raise server.exception()  # type: ignore[misc]


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="meshrt sim: %(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.CRITICAL)
    try:
        asyncio.run(_run(args))
    except OSError as exc:
        print(f"meshrt sim: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
