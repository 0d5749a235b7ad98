"""Database faults on demand, for tests that want to see the gateway survive them.

- `PgFaultProxy`: a TCP proxy in front of PostgreSQL. `refuse()` closes its listening socket
  (new connects get ECONNREFUSED, like a server that is restarting), `drop()` resets every open
  connection (a failover, a cut network), `stall()` forwards nothing while keeping sockets open
  (a hung server: only client-side timeouts notice; the proxy's kernel still ACKs bytes and
  answers keepalives, so TCP-level timeouts do not fire as they would in a real partition),
  `heal()` forwards again. `outage(kind, seconds)` heals by itself.
- `SqliteLock`: holds SQLite's write lock from another connection (busy timeouts, "database is
  locked"). `PgTableLock`: holds ACCESS EXCLUSIVE locks on tables (a long migration; lock and
  statement timeouts).
- `fault_schedule`: a seeded, non-overlapping, bounded list of faults for a seeded fault suite.

Everything runs in daemon threads, every wait has a deadline, and each object is a context
manager that stops its thread and closes its sockets on exit.
"""

from __future__ import annotations

import errno
import math
import random
import selectors
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence
from urllib.parse import urlsplit
from urllib.parse import urlunsplit

MAX_OUTAGE_S = 120.0  # no fault lasts longer than this: a forgotten one cannot hang a run
_CALL_TIMEOUT_S = 5.0  # how long a mode switch waits for the proxy thread to apply it
_BUF_CAP = 1 << 20  # per direction: stop reading a side while its peer has this much unsent
_LOG_CAP = 2000
OUTAGE_KINDS = ("refuse", "drop", "stall", "restart")


def _now() -> float:
    return time.monotonic()


def _abort(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST (ECONNRESET), not an orderly FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _End:
    """One socket of a proxied connection; `out` holds bytes waiting to be written to it."""

    __slots__ = ("pair", "sock", "peer", "out", "read_eof", "shut", "mask", "upstream")

    def __init__(self, pair: _Pair, sock: socket.socket, upstream: bool):
        self.pair, self.sock, self.upstream = pair, sock, upstream
        self.peer: _End | None = None
        self.out = bytearray()
        self.read_eof = False  # this socket sent us EOF
        self.shut = False  # we shut down writing on this socket
        self.mask = 0


class _Pair:
    __slots__ = ("n", "client", "upstream", "connecting")

    def __init__(self, n: int, client: socket.socket, upstream: socket.socket):
        self.n = n
        self.client, self.upstream = _End(self, client, False), _End(self, upstream, True)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.connecting = True


class PgFaultProxy:
    """A loopback TCP proxy to `target` whose faults can be switched from any thread.

    Each mode call returns once the proxy thread has applied it, and each is idempotent:
    refuse() / stall() / heal() set the mode; drop() resets the open connections and forwards
    new ones; restart() is refuse() plus drop() at once. Any explicit call cancels a pending
    outage() timer. Counters: accepted, active, bytes_up (client to server), bytes_down, reset.
    """

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432), max_connections: int = 256):
        self.target = target
        self.max_connections = max_connections
        self.port = 0
        self.log: list[tuple[float, str]] = []
        self.accepted = self.bytes_up = self.bytes_down = self.reset = 0
        self._listening, self._stalled = True, False
        self._pairs: dict[int, _Pair] = {}
        self._listener: socket.socket | None = None
        self._sel: selectors.BaseSelector | None = None
        self._thread: threading.Thread | None = None
        self._calls: list[tuple[Callable[[], None], threading.Event, list]] = []
        self._calls_lock = threading.Lock()
        self._stopping = False
        self._crash: BaseException | None = None
        self._timer: threading.Timer | None = None
        self._timer_lock = threading.Lock()

    # --- public -----------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return "refuse" if not self._listening else "stall" if self._stalled else "forward"

    @property
    def active(self) -> int:
        return len(self._pairs)

    def stats(self) -> dict:
        return {
            "mode": self.mode,
            "accepted": self.accepted,
            "active": self.active,
            "reset": self.reset,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
        }

    def url(self, database_url: str) -> str:
        """`database_url` (postgresql[+driver]://user:pw@host:port/db?...) pointed at the proxy."""
        parts = urlsplit(database_url)
        if not parts.scheme.startswith("postgres"):
            raise ValueError(f"not a PostgreSQL URL: {database_url!r}")
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def start(self) -> PgFaultProxy:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._listen()
        self._note(f"listening on 127.0.0.1:{self.port} -> {self.target[0]}:{self.target[1]}")
        self._thread = threading.Thread(target=self._run, name=f"pg-fault-proxy:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Reset every connection, close every socket and end the thread (bounded)."""
        self._cancel_timer()
        if self._thread is None:
            return
        self._stopping = True
        self._wake()
        self._thread.join(_CALL_TIMEOUT_S)
        if self._thread.is_alive():
            raise RuntimeError(f"proxy thread did not stop; log: {self.log[-10:]}")

    def __enter__(self) -> PgFaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _switch(self, kind: str) -> None:
        """Apply a mode now (cancelling a pending outage's heal); returns once applied."""
        self._cancel_timer()
        self._call(lambda: self._apply(kind))

    def refuse(self) -> None:
        self._switch("refuse")

    def drop(self) -> None:
        self._switch("drop")

    def restart(self) -> None:
        self._switch("restart")

    def stall(self) -> None:
        self._switch("stall")

    def heal(self) -> None:
        self._switch("heal")

    def outage(self, kind: str, seconds: float) -> threading.Event:
        """Apply `kind` (refuse, drop, stall, restart) now and heal after `seconds`; returns an
        Event set once healed. drop is instantaneous, so its outage only spaces a schedule."""
        if kind not in OUTAGE_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {OUTAGE_KINDS}")
        if not 0 < seconds <= MAX_OUTAGE_S:
            raise ValueError(f"outage of {seconds} s: must be in (0, {MAX_OUTAGE_S}]")
        self._cancel_timer()
        healed = threading.Event()
        self._call(lambda: self._apply(kind, f" for {seconds:g} s"))

        def end() -> None:
            with self._timer_lock:
                if self._timer is not timer:
                    return  # cancelled or replaced meanwhile
                self._timer = None
            try:
                self._call(lambda: self._apply("heal", " (end of outage)"))
            except RuntimeError:
                pass  # stopped meanwhile
            healed.set()

        timer = threading.Timer(seconds, end)
        timer.daemon = True
        with self._timer_lock:
            self._timer = timer
        timer.start()
        return healed

    # --- thread-side ------------------------------------------------------------------------

    def _note(self, event: str) -> None:
        self.log.append((_now(), event))
        if len(self.log) > _LOG_CAP:
            del self.log[: _LOG_CAP // 10]

    def _cancel_timer(self) -> None:
        with self._timer_lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # full (a wake-up is already pending) or closed (stopped)

    def _call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the proxy thread and wait for it (the selector is not thread-safe)."""
        if self._thread is None or not self._thread.is_alive() or self._stopping:
            raise RuntimeError(f"proxy not running (crash: {self._crash!r})")
        done, result = threading.Event(), []
        with self._calls_lock:
            self._calls.append((fn, done, result))
        self._wake()
        if not done.wait(_CALL_TIMEOUT_S):
            raise RuntimeError(f"proxy thread did not answer in {_CALL_TIMEOUT_S} s (crash: {self._crash!r})")
        if result:
            raise result[0]

    def _apply(self, kind: str, detail: str = "") -> None:
        if kind in ("drop", "restart"):
            n = len(self._pairs)
            for pair in list(self._pairs.values()):
                self._close(pair, reset=True)
            self.reset += n
            detail += f" ({n} connection(s) reset)"
        if kind in ("refuse", "restart"):
            if self._listener is not None:
                self._sel.unregister(self._listener)
                self._listener.close()
                self._listener = None
            self._listening, self._stalled = False, False
        else:
            if self._listener is None:
                self._listen()
            self._listening, self._stalled = True, kind == "stall"
        self._note(kind + detail)
        for pair in list(self._pairs.values()):
            self._refresh(pair)

    def _listen(self) -> None:
        """Bind (the same port after the first time, so clients' URLs stay valid) and listen."""
        deadline = _now() + 2.0
        while True:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", self.port))
                break
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRINUSE or _now() > deadline:
                    raise
                time.sleep(0.05)
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._sel.register(sock, selectors.EVENT_READ, "listener")

    def _run(self) -> None:
        try:
            while not self._stopping:
                for key, events in self._sel.select(timeout=0.5):
                    if key.data is None:
                        self._drain_calls()
                    elif key.data == "listener":
                        self._accept()
                    else:
                        self._service(key.data, events)
                self._drain_calls()
        except BaseException as exc:  # noqa: BLE001 - recorded for the test thread
            self._crash = exc
            self._note(f"proxy thread crashed: {exc!r}")
        finally:
            for pair in list(self._pairs.values()):
                self._close(pair, reset=True)
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()
            self._stopping = True
            self._drain_calls()  # fail anyone still waiting
            self._note("stopped")

    def _drain_calls(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        with self._calls_lock:
            calls, self._calls = self._calls, []
        for fn, done, result in calls:
            try:
                if self._stopping:
                    raise RuntimeError("proxy stopped")
                fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                result.append(exc)
            done.set()

    def _accept(self) -> None:
        for _ in range(64):
            try:
                client, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.accepted += 1
            n = self.accepted
            if len(self._pairs) >= self.max_connections:
                self._note(f"#{n} reset: over {self.max_connections} connections")
                _abort(client)
                continue
            client.setblocking(False)
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            upstream.setblocking(False)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = upstream.connect_ex(self.target)
            if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                self._note(f"#{n} upstream connect failed: {errno.errorcode.get(err, err)}")
                upstream.close()
                _abort(client)
                continue
            pair = _Pair(n, client, upstream)
            self._pairs[n] = pair
            self._note(f"#{n} accepted" + (" (stalled)" if self._stalled else ""))
            self._refresh(pair)

    def _service(self, end: _End, events: int) -> None:
        pair = end.pair
        if pair.n not in self._pairs:
            return  # closed earlier in this round of events
        try:
            if events & selectors.EVENT_WRITE:
                if end.upstream and pair.connecting:
                    err = end.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        self._note(f"#{pair.n} upstream connect failed: {errno.errorcode.get(err, err)}")
                        self._close(pair, reset=True)
                        return
                    pair.connecting = False
                if end.out and not self._stalled:
                    sent = end.sock.send(end.out)
                    del end.out[:sent]
                    if end.upstream:
                        self.bytes_up += sent
                    else:
                        self.bytes_down += sent
            if events & selectors.EVENT_READ and not self._stalled:
                data = end.sock.recv(65536)
                if data:
                    end.peer.out += data
                else:
                    end.read_eof = True
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._note(f"#{pair.n} {'upstream' if end.upstream else 'client'} error: {exc!r}")
            self._close(pair, reset=True)
            return
        self._refresh(pair)

    def _refresh(self, pair: _Pair) -> None:
        """Half-close and close as EOFs arrive, then set each socket's selector interest."""
        if pair.n not in self._pairs:
            return
        if not self._stalled and not pair.connecting:
            for end in (pair.client, pair.upstream):
                if end.peer.read_eof and not end.out and not end.shut:
                    try:
                        end.sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    end.shut = True
            if pair.client.shut and pair.upstream.shut:
                self._close(pair, reset=False)
                return
        for end in (pair.client, pair.upstream):
            mask = 0
            if end.upstream and pair.connecting:
                mask = selectors.EVENT_WRITE  # completion of the non-blocking connect
            elif not self._stalled:
                if not end.read_eof and len(end.peer.out) < _BUF_CAP:
                    mask |= selectors.EVENT_READ
                if end.out:
                    mask |= selectors.EVENT_WRITE
            self._interest(end, mask)

    def _interest(self, end: _End, mask: int) -> None:
        if mask == end.mask:
            return
        if end.mask == 0:
            self._sel.register(end.sock, mask, end)
        elif mask == 0:
            self._sel.unregister(end.sock)
        else:
            self._sel.modify(end.sock, mask, end)
        end.mask = mask

    def _close(self, pair: _Pair, reset: bool) -> None:
        if self._pairs.pop(pair.n, None) is None:
            return
        for end in (pair.client, pair.upstream):
            if end.mask:
                self._sel.unregister(end.sock)
                end.mask = 0
            if reset:
                _abort(end.sock)
            else:
                end.sock.close()
        if not reset:
            self._note(f"#{pair.n} closed")


# --- lock holders ---------------------------------------------------------------------------


class _LockHolder:
    """Takes a lock on its own connection in its own thread, holds it for `seconds`, releases.

    `hold(seconds)` returns once the lock is taken (or raises what prevented it); the lock goes
    by itself after `seconds`, or at `release()` / the end of a `with` block."""

    what = "lock"

    def __init__(self, acquire_timeout_s: float = 5.0):
        self.acquire_timeout_s = acquire_timeout_s
        self.log: list[tuple[float, str]] = []
        self._thread: threading.Thread | None = None
        self._release = threading.Event()
        self._taken = threading.Event()
        self._error: BaseException | None = None

    @property
    def held(self) -> bool:
        return self._taken.is_set() and self._thread is not None and self._thread.is_alive()

    def hold(self, seconds: float):
        if not 0 < seconds <= MAX_OUTAGE_S:
            raise ValueError(f"hold of {seconds} s: must be in (0, {MAX_OUTAGE_S}]")
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(f"{self.what} already held")
        self._release.clear()
        self._taken.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(seconds,), name=self.what, daemon=True)
        self._thread.start()
        deadline = _now() + self.acquire_timeout_s + 2.0
        while not self._taken.wait(0.02):
            if not self._thread.is_alive() or _now() > deadline:
                self.release()
                raise self._error or TimeoutError(f"{self.what} not taken in {self.acquire_timeout_s} s")
        return self

    def release(self, timeout: float = 5.0) -> None:
        self._release.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"{self.what} holder did not end in {timeout} s")

    def wait_released(self, timeout: float) -> bool:
        """Whether the lock went by itself within `timeout` seconds."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.held

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _run(self, seconds: float) -> None:
        conn = None
        try:
            conn = self._open(seconds)
            self._acquire(conn)
            self.log.append((_now(), f"{self.what} taken for {seconds:g} s"))
            self._taken.set()
            early = self._release.wait(seconds)
            self.log.append((_now(), f"{self.what} released" + (" early" if early else "")))
        except BaseException as exc:  # noqa: BLE001 - re-raised by hold()
            self._error = exc
            self.log.append((_now(), f"{self.what} failed: {exc!r}"))
        finally:
            if conn is not None:
                try:
                    conn.rollback()
                finally:
                    conn.close()

    def _open(self, seconds: float):
        raise NotImplementedError

    def _acquire(self, conn) -> None:
        raise NotImplementedError


class SqliteLock(_LockHolder):
    """SQLite's write lock on `path`. `BEGIN EXCLUSIVE` (the default) takes it at once: in WAL
    mode (the gateway's) other writers get SQLITE_BUSY and readers still read; in rollback-journal
    mode readers are locked out too. mode="IMMEDIATE" blocks only writers in both."""

    def __init__(self, path, mode: str = "EXCLUSIVE", acquire_timeout_s: float = 5.0):
        if mode.upper() not in ("EXCLUSIVE", "IMMEDIATE"):
            raise ValueError(f"mode {mode!r}: EXCLUSIVE or IMMEDIATE")
        super().__init__(acquire_timeout_s)
        self.path, self.mode = str(path), mode.upper()
        self.what = f"sqlite {self.mode} lock on {self.path}"

    def _open(self, seconds: float):
        return sqlite3.connect(self.path, timeout=self.acquire_timeout_s, isolation_level=None, check_same_thread=False)

    def _acquire(self, conn) -> None:
        conn.execute(f"BEGIN {self.mode}")


class PgTableLock(_LockHolder):
    """ACCESS EXCLUSIVE locks on `tables` ("name" or "schema.name") in an open transaction:
    every other statement touching them, reads included, waits (then hits lock_timeout or
    statement_timeout). The server ends the holder by itself if this process dies."""

    def __init__(self, url: str, tables: Sequence[str], acquire_timeout_s: float = 5.0):
        if not tables:
            raise ValueError("no tables to lock")
        super().__init__(acquire_timeout_s)
        self.url = pg_conninfo(url)
        self.tables = [tables] if isinstance(tables, str) else list(tables)
        self.what = f"ACCESS EXCLUSIVE lock on {', '.join(self.tables)}"

    def _open(self, seconds: float):
        import psycopg

        conn = psycopg.connect(self.url, connect_timeout=max(2, int(self.acquire_timeout_s)), autocommit=True)
        ms = int(self.acquire_timeout_s * 1000)
        conn.execute(f"SET lock_timeout = {ms}")
        conn.execute(f"SET statement_timeout = {ms}")
        # if this process is killed mid-hold, the server still ends the transaction
        conn.execute(f"SET idle_in_transaction_session_timeout = {int((seconds + 10) * 1000)}")
        return conn

    def _acquire(self, conn) -> None:
        from psycopg import errors
        from psycopg import sql

        names = sql.SQL(", ").join(sql.Identifier(*t.split(".")) for t in self.tables)
        deadline = _now() + self.acquire_timeout_s
        while True:
            conn.execute("BEGIN")
            try:
                conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(names))
                return
            except errors.DeadlockDetected as exc:
                # LOCK TABLE takes its tables one by one; a gateway transaction holding a row lock
                # on a later one while it waits for an earlier one is a deadlock the server breaks
                # by ending one side. When that side is the holder, the fault was not injected: try
                # again (when it is the gateway, that is a fault the gateway must survive).
                conn.rollback()
                self.log.append((_now(), f"{self.what}: deadlock broken by the server, taking it again"))
                if _now() > deadline:
                    raise TimeoutError(f"{self.what} not taken in {self.acquire_timeout_s} s") from exc
                time.sleep(0.05)


def pg_conninfo(url: str) -> str:
    """A libpq URL from a SQLAlchemy one: postgresql+psycopg://... -> postgresql://..."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme.startswith("postgres"):
        raise ValueError(f"not a PostgreSQL URL: {url!r}")
    return "postgresql://" + rest


# --- seeded schedules -----------------------------------------------------------------------


def fault_schedule(
    seed: int | str,
    duration_s: float,
    kinds: Sequence[str],
    max_faults: int,
    *,
    min_len_s: float = 0.5,
    max_len_s: float = 3.0,
    min_gap_s: float = 1.0,
    busy_fraction: float = 0.5,
) -> list[tuple[float, str, float]]:
    """[(start offset s, kind, length s)], sorted, the same for the same arguments.

    Between 1 and `max_faults` faults (fewer if they do not fit), each `min_len_s`..`max_len_s`
    long, together at most `busy_fraction` of `duration_s`; at least `min_gap_s` of calm before
    each fault and after the last, so the system can recover; all within [0, duration_s]."""
    if not kinds:
        raise ValueError("no fault kinds")
    if duration_s <= 0 or max_faults < 0 or not 0 < min_len_s <= max_len_s or min_gap_s < 0:
        raise ValueError("bad schedule bounds")
    rng = random.Random(seed if isinstance(seed, int) else str(seed))
    # in whole milliseconds, so rounding cannot make faults overlap or overrun
    dur, gap = int(duration_s * 1000), math.ceil(min_gap_s * 1000)
    lo, hi = math.ceil(min_len_s * 1000), int(max_len_s * 1000)
    budget = int(dur * busy_fraction)
    n = rng.randint(1, max_faults) if max_faults else 0
    while n and (n * lo > budget or n * lo + (n + 1) * gap > dur):
        n -= 1
    if n == 0:
        return []
    lengths = [rng.randint(lo, hi) for _ in range(n)]
    if sum(lengths) > budget:  # shrink the part above the minimum to fit the budget
        keep = (budget - n * lo) / (sum(lengths) - n * lo)
        lengths = [lo + int((x - lo) * keep) for x in lengths]
    slack = dur - sum(lengths) - (n + 1) * gap
    cuts = sorted(rng.randint(0, slack) for _ in range(n))
    schedule, t, prev_cut = [], 0, 0
    for length, cut in zip(lengths, cuts):
        t += gap + cut - prev_cut
        prev_cut = cut
        schedule.append((t / 1000, rng.choice(list(kinds)), length / 1000))
        t += length
    return schedule
