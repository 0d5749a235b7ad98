"""The front door process: uvicorn + FastAPI on the listening socket the supervisor owns.

Started by the supervisor with the listening socket's fd (so a restart refuses no connection:
the kernel queues them), the database URL and the admin token — never the upstream key.
WebSocket upgrades go through `handoff.HandoffProtocol`; everything else is `app.py`'s.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import ipaddress
import json
import logging
import os
import socket
import threading
from pathlib import Path

import anyio
import uvicorn
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from meshrt.shared import control
from meshrt.shared import logs
from meshrt.shared import sandbox
from meshrt.shared.control import Ping
from meshrt.shared.control import Pong
from meshrt.shared.errors import http_error_body
from meshrt.shared.settings import SECRET_VARIABLES
from meshrt.shared.settings import load_settings
from meshrt.storage import db
from meshrt.storage import ledger

from . import gate
from . import handoff
from .app import create_app
from .app import new_request_id
from .calls import call_routes
from .catalog import load_catalog
from .routes import ROUTERS

log = logging.getLogger("meshrt.frontdoor")

SUPERVISOR_ANSWER_S = 1.0


class FrontDoorContext:
    """What the HTTP routes and the gate share inside one front-door process."""

    def __init__(self, settings, engine, prices, node: str):
        self.settings, self.engine, self.prices, self.node = settings, engine, prices, node
        self.routers = [*ROUTERS, call_routes]
        self.admit_call = None  # (key, model, peer, request_id) -> Grant; set by build()
        # how long a call's placement may take: the supervisor places it upstream, then waits for
        # its worker to join the sideband (Supervisor.call_join_wait_s), each within the connect
        # budget, plus margins
        self.call_answer_s = 2 * settings.upstream_connect_budget_s + 8.0

    async def ask_supervisor(self, message, timeout_s: float):
        """Send one message on a new control connection and return the answer, or None when
        the supervisor could not be reached or did not answer within `timeout_s`."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with anyio.fail_after(timeout_s):
                sock.setblocking(False)
                sock.connect(str(self.settings.control_socket))
                await control.asend(sock, message)
                answer, fds = await control.arecv(sock)
            for fd in fds:
                os.close(fd)
            return answer
        except (OSError, EOFError, TimeoutError, control.ControlError):
            return None
        finally:
            sock.close()

    async def supervisor_problems(self) -> list[str]:
        """Ask the supervisor over the control socket: an answer proves it is alive and serving
        handoffs (a supervisor wedged or gone is seen within SUPERVISOR_ANSWER_S)."""
        answer = await self.ask_supervisor(Ping(), SUPERVISOR_ANSWER_S)
        if isinstance(answer, control.VersionRefused):  # one of us was upgraded on disk while the other ran
            versions = f"version {answer.speaks}, this front door {control.PROTOCOL_VERSION}"
            return [f"supervisor speaks control protocol {versions}"]
        if answer is None:
            return ["supervisor not answering"]
        return list(answer.problems) if isinstance(answer, Pong) else ["supervisor answered nonsense"]

    async def readiness_problems(self) -> list[str]:
        problems = await self.supervisor_problems()
        try:
            with anyio.fail_after(SUPERVISOR_ANSWER_S):
                await anyio.to_thread.run_sync(db.ping, self.engine, abandon_on_cancel=True)
        except Exception as exc:  # noqa: BLE001 - any DB failure means not ready
            problems.append(f"database: {type(exc).__name__}")
        return problems

    async def metrics_snapshot(self) -> dict:
        path = Path(self.settings.state_dir) / "run" / "metrics.json"
        try:
            return json.loads(await anyio.Path(path).read_text())
        except (OSError, ValueError):
            return {}

    def refuse_granted(self, session_id: str, code: str) -> None:
        """A granted session the supervisor would not take: close its row with the code. If the
        database is out of reach, the supervisor's orphaned-grant sweep or recovery ends it."""
        try:
            with Session(self.engine, expire_on_commit=False) as s, s.begin():
                ledger.end_orphaned_grant(s, session_id, code)
        except SQLAlchemyError:
            log.warning("could not end a refused session's row", extra={"session_id": session_id})


MAX_HEAD_BYTES = 32 * 1024  # a request head (request line and headers) larger than this: 431
MAX_HEADERS = 100  # more header lines than this: 431
MAX_BODY_BYTES = 1024 * 1024  # the API's JSON bodies are small; a larger one: 413


def _refusal(status: int, reason: str) -> bytes:
    return f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()


def _release_nothing() -> None:
    pass


class PeerCounts:
    """The connections this front door holds, per peer address, up to `cap` each (0: no cap).

    The peer is the TCP peer, as the gate's TLS rule and `client_addr` take it: the cap is applied
    before a byte is parsed, so X-Forwarded-For is never read (and could be forged). Peers in
    `exempt` (MESHRT_FORWARDED_ALLOW_IPS) are proxies, each carrying many clients: they are not
    counted, and limiting their clients is the proxy's job (deploy/nginx.conf's `limit_conn`)."""

    def __init__(self, cap: int, exempt: tuple = ()):
        self.cap, self.exempt = cap, exempt
        self.open: dict[str, int] = {}
        self._warned: set[str] = set()  # peers refused since they last had no connection: log once

    def take(self, peer: str | None):
        """A function that gives the connection's place back (call it any number of times), or
        None when the peer already holds `cap` connections."""
        if not self.cap or peer is None or self._exempt(peer):
            return _release_nothing
        held = self.open.get(peer, 0)
        if held >= self.cap:
            if peer not in self._warned:
                self._warned.add(peer)
                log.warning("connections refused: peer at its cap", extra={"fields": {"peer": peer, "cap": self.cap}})
            return None
        self.open[peer] = held + 1
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            if given_back:
                return
            given_back = True
            left = self.open[peer] - 1
            if left:
                self.open[peer] = left
            else:
                del self.open[peer]
                self._warned.discard(peer)

        return give_back

    def _exempt(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self.exempt)


def _too_many_connections() -> bytes:
    request_id = new_request_id()
    body = http_error_body(
        "too_many_connections", "Too many open connections from this address.", "rate_limit_error", request_id
    )
    return handoff.http_response(429, "Too Many Requests", body, request_id, extra="Retry-After: 1\r\n")


def bounded_protocol(timeout_s: float, peers: PeerCounts | None = None):
    """uvicorn's httptools protocol with the bounds uvicorn lacks, so that a client cannot hold
    or grow the front door: at most `peers.cap` open connections per peer address (429 as the
    connection is made, before a byte is read), a deadline on each request head and on each
    request body (a client trickling either — slowloris — would hold its connection for ever:
    408), a limit on the head's size and header count (431), and on the body's size (413, from
    Content-Length before a byte of it is read, or as chunks arrive). A response sent before its
    request's body has all arrived (a 401 for a missing token, a 404) ends the connection: the
    rest of the body is never waited for. It also refuses HTTP/1.0 upgrades, which uvicorn would
    hand on as HTTP/1.1."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    peers = peers or PeerCounts(0)

    class BoundedProtocol(HttpToolsProtocol):
        _give_back = staticmethod(_release_nothing)  # this connection's place in its peer's count
        _deadline = None
        _refused = False
        _in_head = True  # between a message's start and its headers' end
        _head_bytes = 0  # bytes read while in the head (a read may carry some of the body too)
        _head_size = 0  # the head's own bytes, as parsed
        _headers = 0
        _body_bytes = 0

        def _arm(self, expired) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout_s, expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _refuse(self, status: int, reason: str) -> None:
            self._deadline = None
            self._disarm()
            self._refused = True
            if not self.transport.is_closing():
                self.transport.write(_refusal(status, reason))
                self.transport.close()

        def _timed_out(self) -> None:
            self._deadline = None
            self._refuse(408, "Request Timeout")

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            give_back = peers.take(peer[0] if isinstance(peer, tuple) else None)
            if give_back is None:
                self._refused = True
                transport.write(_too_many_connections())
                transport.close()
                return
            self._give_back = give_back
            self._arm(self._timed_out)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            # still in the head after this read (one read is at most the transport's buffer):
            # a head that did not end within the limit is refused without reading more of it
            if self._in_head and self._head_bytes > MAX_HEAD_BYTES and not self._refused:
                self._refuse(431, "Request Header Fields Too Large")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_bytes, self._head_size, self._headers, self._body_bytes = True, 0, 0, 0, 0
            self._arm(self._timed_out)

        def on_url(self, url: bytes) -> None:
            self._head_size += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._headers += 1
            self._head_size += len(name) + len(value) + 4
            if self._headers > MAX_HEADERS or self._head_size > MAX_HEAD_BYTES:
                return self._refuse(431, "Request Header Fields Too Large")
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._disarm()
            if self._refused:
                return
            if self.parser.should_upgrade() and self.parser.get_http_version() != "1.1":
                # RFC 6455 needs HTTP/1.1; uvicorn would pass the upgrade on relabelled as 1.1
                self._refused = True
                request_id = new_request_id()
                body = http_error_body(
                    "invalid_request", "WebSocket upgrades need HTTP/1.1.", "invalid_request_error", request_id
                )
                self.transport.write(handoff.http_response(400, "Bad Request", body, request_id))
                self.transport.close()
                return
            length = dict(self.headers).get(b"content-length") if not self.parser.should_upgrade() else None
            if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
                return self._refuse(413, "Content Too Large")
            super().on_headers_complete()
            if not self.parser.should_upgrade():
                self._arm(self._timed_out)  # the body's deadline, until the message completes

        def on_body(self, body: bytes) -> None:
            if self._refused:
                return
            self._body_bytes += len(body)
            if self._body_bytes > MAX_BODY_BYTES:
                return self._refuse(413, "Content Too Large")
            super().on_body(body)

        def on_message_complete(self) -> None:
            self._disarm()
            self._in_head = True
            if not self._refused:
                super().on_message_complete()

        def _start_asgi_task(self, cycle, app) -> None:
            super()._start_asgi_task(cycle, _closing_if_body_unread(cycle, app))

        def handle_websocket_upgrade(self) -> None:
            if self._refused:
                return
            super().handle_websocket_upgrade()
            # the connection is the WebSocket protocol's now, and so is its place in the count:
            # given back when that protocol hands the socket off or loses it
            successor = self.transport.get_protocol()
            give_back, self._give_back = self._give_back, _release_nothing
            if isinstance(successor, handoff.HandoffProtocol):
                successor.give_back = give_back
            else:
                give_back()

        def connection_lost(self, exc) -> None:
            self._disarm()
            self._give_back()
            super().connection_lost(exc)

    return BoundedProtocol


def _closing_if_body_unread(cycle, app):
    """The ASGI app, but a response that starts before its request's body has all arrived says
    `Connection: close` and uvicorn closes the connection after it: otherwise the connection
    would stay open, reading the rest of a body nobody wants, until the body's deadline."""

    async def app_closing_early(scope, receive, send):
        async def send_closing_early(message):
            if message["type"] == "http.response.start" and cycle.more_body:
                cycle.keep_alive = False
            await send(message)

        await app(scope, receive, send_closing_early)

    return app_closing_early


def build(settings, node: str):
    engine = db.make_engine(settings.db_url, settings.db_timeout_s)
    prices = load_catalog(settings)
    ctx = FrontDoorContext(settings, engine, prices, node)
    admit = functools.partial(gate.admit, engine, settings, prices)
    # SQLite: one admission transaction at a time from this process, in arrival order, rather
    # than threads racing for the write lock through SQLite's unfair busy handler.
    serial = threading.Lock() if settings.db_url.startswith("sqlite") else contextlib.nullcontext()

    def admit_one(upgrade, peer_ip, request_id):
        with serial:
            return admit(upgrade, peer_ip, request_id, node)

    def admit_call(key, model, peer_ip, request_id):
        with serial:
            return gate.admit_call(engine, settings, prices, key, model, peer_ip, request_id, node)

    ctx.admit_call = admit_call

    protocol = handoff.protocol_class(
        admit=admit_one,
        new_request_id=new_request_id,
        control_socket=str(settings.control_socket),
        on_refused=ctx.refuse_granted,
        trusted_proxies=settings.forwarded_allow_ips,
    )
    return create_app(ctx), protocol


def die_with_parent(parent_pid: int) -> None:
    """A front door outliving its supervisor would hold the port and hand off to nobody."""
    import ctypes
    import signal as _signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, _signal.SIGTERM)
    if os.getppid() != parent_pid:
        raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshrt-frontdoor")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    settings = load_settings()
    logs.configure("frontdoor", settings.log_level)
    sandbox.harden_process(settings.sandbox, SECRET_VARIABLES)  # it keeps them in `settings` only
    app, protocol = build(settings, args.node)
    listener = socket.socket(fileno=args.fd)
    config = uvicorn.Config(
        app,
        ws=protocol,
        http=bounded_protocol(
            settings.header_timeout_s, PeerCounts(settings.max_connections_per_peer, settings.forwarded_allow_ips)
        ),
        loop="asyncio",
        log_config=None,
        access_log=False,
        # off: the TLS rule (shared.handshake.is_secure) judges X-Forwarded-Proto by the TCP peer,
        # which uvicorn's rewrite of the client address from X-Forwarded-For would hide
        proxy_headers=False,
        ws_max_size=settings.max_message_bytes,
        timeout_graceful_shutdown=2,
    )
    uvicorn.Server(config).run(sockets=[listener])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
