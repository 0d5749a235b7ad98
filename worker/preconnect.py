"""A pool worker's upstream connection, opened before its session arrives (MESHRT_UPSTREAM_PRECONNECT_S).

Over a WAN, a direct client's set-up is mostly round trips: TCP's, TLS's, the upgrade's. An idle
pool worker opens TCP (and, for wss://, runs the TLS handshake) while it waits for its Spawn, so
its session has only the WebSocket upgrade left, sent with the operator's key, which arrives with
the Spawn (the zygote holds no secret; it knows the upstream URL only). The connection is the
worker's and serves its one session: never shared, never reused after it.

It is kept fresh while the worker waits: replaced once `max_age_s` old, and at once when upstream
closes it (or sends anything: nothing is due before the upgrade). A connect that fails is tried
again after a backoff (1 s, doubling to 30 s), so an unreachable upstream costs a connect attempt
per idle worker now and then. All of it runs before the seccomp filter is loaded (that happens
once the session's upstream handshake is done: shared/sandbox.py), without an event loop: a
non-blocking state machine (`Preconnector`) driven by the worker's `select()` for its Spawn
(`wait_for_spawn`). A Spawn arriving mid-connect abandons the connect; the session connects as
without pre-connection. Workers the zygote forks to refill a pool a burst emptied do not
pre-connect: their Spawn is due at once.

A pre-opened connection that turns out stale at the upgrade (closed or reset before any response)
is dropped for a fresh connect, which the retry logic does not count as an attempt
(worker/upstream.py, `connect_upstream`).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from meshrt.shared import control

CONNECT_TIMEOUT_S = 10.0
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 30.0
SHORT_LIVED_S = 1.0  # closed by upstream sooner than this: reopened after a backoff, not at once


def target(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    return parts.scheme, parts.hostname or "", parts.port or (443 if secure else 80)


@dataclass
class Preconnected:
    """An open upstream connection, TLS done for wss:// (the SSLObject over memory BIOs)."""

    sock: socket.socket
    scheme: str
    host: str
    port: int
    opened_at: float
    tls: ssl.SSLObject | None = None
    incoming: ssl.MemoryBIO | None = None
    outgoing: ssl.MemoryBIO | None = None
    upgrade: tuple | None = None  # (url, websockets' ClientProtocol): the upgrade sent ahead (worker/upstream.py)

    def serves(self, url: str) -> bool:
        return target(url) == (self.scheme, self.host, self.port)

    @property
    def closed(self) -> bool:
        return self.sock.fileno() == -1

    def close(self) -> None:
        self.sock.close()


class Preconnector:
    """Opens one upstream connection and keeps it fresh; `take()` hands it over (or None)."""

    def __init__(self, url: str, max_age_s: float, tls_context: ssl.SSLContext | None = None):
        self.scheme, self.host, self.port = target(url)
        self.max_age_s = max_age_s
        self.context = tls_context
        if self.scheme == "wss" and self.context is None:
            from .upstream import tls_context as default_context

            self.context = default_context()
        self.state = "idle"  # idle (retry_at) | tcp | tls | ready
        self.retry_at = 0.0
        self.backoff = BACKOFF_MIN_S
        self.sock: socket.socket | None = None
        self.deadline = 0.0
        self.opened_at = 0.0
        self.out = b""  # TLS records the socket has not taken yet
        self.tls: ssl.SSLObject | None = None
        self.incoming: ssl.MemoryBIO | None = None
        self.outgoing: ssl.MemoryBIO | None = None
        self.opened = 0  # connections opened (for tests and logs)

    # --- the select() loop's side ---

    def plan(self, now: float) -> tuple[list[socket.socket], list[socket.socket], float]:
        """What to wait for: (readable, writable, timeout in seconds)."""
        if self.state == "idle":
            if now >= self.retry_at:
                self._start(now)
            if self.state == "idle":
                return [], [], max(0.0, self.retry_at - now)
        assert self.sock is not None
        if self.state == "ready":
            return [self.sock], [], max(0.0, self.opened_at + self.max_age_s - now)
        writable = [self.sock] if self.state == "tcp" or self.out else []
        readable = [self.sock] if self.state == "tls" else []
        return readable, writable, max(0.0, self.deadline - now)

    def step(self, readable: list, writable: list, now: float) -> None:
        """Advance on what select() reported (and on the clock)."""
        if self.sock is None:
            return
        try:
            if self.state == "tcp" and self.sock in writable:
                status = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if status:
                    raise OSError(status, os.strerror(status))
                if self.context is None:
                    self._ready(now)
                    return
                self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
                self.tls = self.context.wrap_bio(self.incoming, self.outgoing, server_hostname=self.host)
                self.state = "tls"
                self._handshake(now)
            elif self.state == "tls":
                if self.sock in writable and self.out:
                    self._flush()
                if self.sock in readable:
                    self._feed()
                    self._handshake(now)
            elif self.state == "ready" and self.sock in readable:
                if self._went_stale():
                    self._drop(now, closed_by_peer=True)
                    return
            if self.state in ("tcp", "tls") and now >= self.deadline:
                raise TimeoutError("upstream pre-connect timed out")
            if self.state == "ready" and now - self.opened_at >= self.max_age_s:
                self._drop(now, closed_by_peer=False)  # renewed: reopened at once
        except (OSError, ssl.SSLError, ValueError):
            self._fail(now)

    def take(self) -> Preconnected | None:
        """The open connection for a session, or None (one in progress is abandoned)."""
        if self.state != "ready" or self.sock is None:
            self._close()
            return None
        if self._went_stale_nowait():
            self._close()
            return None
        conn = Preconnected(
            self.sock, self.scheme, self.host, self.port, self.opened_at, self.tls, self.incoming, self.outgoing
        )
        self.sock, self.tls, self.state = None, None, "taken"
        return conn

    def close(self) -> None:
        self._close()

    # --- the states ---

    def _start(self, now: float) -> None:
        try:
            self.sock = _connect_nonblocking(self.host, self.port)
        except OSError:
            self._fail(now)
            return
        self.state, self.deadline, self.out = "tcp", now + CONNECT_TIMEOUT_S, b""

    def _ready(self, now: float) -> None:
        self.state, self.opened_at = "ready", now
        self.backoff = BACKOFF_MIN_S
        self.opened += 1

    def _handshake(self, now: float) -> None:
        assert self.tls is not None and self.outgoing is not None
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self.out += self.outgoing.read()
            self._flush()
            return
        self.out += self.outgoing.read()
        self._flush()
        if self.out:  # the last records must be sent before the connection counts as open
            raise OSError(errno.EAGAIN, "TLS records left unsent")  # rare: a full socket buffer
        self._ready(now)

    def _flush(self) -> None:
        assert self.sock is not None
        while self.out:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                return
            self.out = self.out[sent:]

    def _feed(self) -> None:
        assert self.sock is not None and self.incoming is not None
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            raise ConnectionResetError("upstream closed the connection during TLS")
        self.incoming.write(data)

    def _went_stale(self) -> bool:
        """Readable while waiting: upstream closed it, reset it, or sent something (for TLS,
        records that hold no data, such as session tickets, are taken in and are no sign)."""
        assert self.sock is not None
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        if not data:
            return True
        if self.tls is None or self.incoming is None:
            return True  # nothing is due before the upgrade
        self.incoming.write(data)
        try:
            self.tls.read(65536)
        except ssl.SSLWantReadError:
            return False  # a post-handshake message (a ticket): the connection is fine
        except ssl.SSLError:
            return True
        return True  # application data before the upgrade: not a connection to use

    def _went_stale_nowait(self) -> bool:
        assert self.sock is not None
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable) and self._went_stale()

    def _drop(self, now: float, closed_by_peer: bool) -> None:
        lived = now - self.opened_at
        self._close()
        if closed_by_peer and lived < SHORT_LIVED_S:
            self._fail(now)  # an upstream that closes idle connections at once: not in a loop
        else:
            self.state, self.retry_at = "idle", now

    def _fail(self, now: float) -> None:
        self._close()
        self.state, self.retry_at = "idle", now + self.backoff
        self.backoff = min(BACKOFF_MAX_S, self.backoff * 2)

    def _close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.tls, self.incoming, self.outgoing, self.out = None, None, None, None, b""
        if self.state != "taken":
            self.state = "idle"


def _connect_nonblocking(host: str, port: int) -> socket.socket:
    try:  # an address literal needs no resolver
        ip = ipaddress.ip_address(host.strip("[]"))
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        address: tuple = (str(ip), port)
    except ValueError:  # a name: resolved here, blocking (a Spawn arriving meanwhile waits for it)
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        status = sock.connect_ex(address)
        if status not in (0, errno.EINPROGRESS):
            raise OSError(status, os.strerror(status))
    except BaseException:
        sock.close()
        raise
    return sock


def wait_for_spawn(channel: socket.socket, url: str, max_age_s: float):
    """An idle pool worker's wait: keeps a connection to `url` open until the Spawn comes on
    `channel`. Returns (message, fds, Preconnected or None); raises as `control.recv` does."""
    if select.select([channel], [], [], 0)[0]:  # the Spawn is here already: no connect to begin
        message, fds = control.recv(channel)
        return message, fds, None
    connector = Preconnector(url, max_age_s)
    try:
        while True:
            now = time.monotonic()
            readable, writable, timeout = connector.plan(now)
            ready_r, ready_w, _ = select.select([channel, *readable], writable, [], timeout)
            if channel in ready_r:
                conn = connector.take()
                message, fds = control.recv(channel)
                return message, fds, conn
            connector.step(ready_r, ready_w, time.monotonic())
    except BaseException:
        connector.close()
        raise
