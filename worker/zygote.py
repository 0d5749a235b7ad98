"""The zygote: a small single-threaded process that forks one worker per session.

It is started by the supervisor with a scrubbed environment before any database handle or
secret exists, and pre-imports everything a worker needs, so a fork costs ~ms and the child
inherits no tenant data. Protocol on its channel (SOCK_SEQPACKET): Spawn in (fds: client
socket, worker channel, spool file) → Spawned out; every reaped child → WorkerExited out.
It keeps idle workers forked ahead (`--warm-min` to `--warm-max`, sized by worker/pool.py from
the measured arrival rate, set-up time and memory), each waiting on its own socket for a Spawn
after rehearsing the set-up path (warmup.rehearse), so that its first page faults are paid early.
Given the upstream URL (never the key), an idle worker also opens its upstream connection ahead
(worker/preconnect.py), so its session has only the WebSocket upgrade left.
Every worker sends it an fd of its own smaps_rollup (WorkerMemory): the zygote reads their PSS
and reports the pool and that memory to the supervisor (PoolStatus) once a second.

Post-fork checklist in the child: default signal handlers, SIGINT ignored (the supervisor
decides when sessions end), the zygote's channel closed, resource limits applied; the child
never returns into the zygote's loop (it ends in os._exit).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import select
import signal
import socket
import time

from meshrt.shared import control
from meshrt.shared import sandbox
from meshrt.worker import pool
from meshrt.worker import preconnect
from meshrt.worker import warmup

log = logging.getLogger("meshrt.zygote")


def _preimport() -> None:
    # ssl encodes a server name with the idna codec, imported at first use: a worker under a uid
    # of its own may not be able to read the interpreter's files (a Python under /root) by then
    import encodings.idna  # noqa: F401

    import anyio  # noqa: F401
    import anyio._backends._asyncio  # noqa: F401
    import anyio._backends._trio  # noqa: F401
    import trio  # noqa: F401

    from meshrt.worker import call  # noqa: F401
    from meshrt.worker import preauth  # noqa: F401 - session.run imports it: compiled per worker if not here
    from meshrt.worker import session  # noqa: F401
    from meshrt.worker import session_meter  # noqa: F401
    from meshrt.worker import translation  # noqa: F401
    from meshrt.worker import upstream  # noqa: F401
    from meshrt.worker import warmup  # noqa: F401

    upstream.tls_context()
    if sandbox.seccomp_available() is None:
        sandbox.build_filter()  # libseccomp loaded and its first-use costs paid before any fork
        sandbox.build_base_filter()  # each worker adds only its pid's rules to its copy
    warmup.warm_up()
    import gc

    gc.collect()
    gc.freeze()  # inherited objects stay out of the children's GC passes (fewer copy-on-write faults)


# A pool worker just handed a session is not replaced at once: the fork (~2 ms of CPU, plus the
# child's first page faults) would compete with that session's set-up on a small machine.
REFILL_DELAY_S = 0.02

WORKER_MAX_FDS = 64  # a session needs ~10: client, upstream, channel, spool, event loop, pipes

STATUS_INTERVAL_S = 1.0  # PoolStatus to the supervisor, and the pool's size decided again
MEMORY_INTERVAL_S = 5.0  # every worker's smaps_rollup read (~0.6 ms each), or less often (MEMORY_CPU_SHARE)
MEMORY_BATCH = 8  # workers read at a time (~4 ms), then the zygote serves what waits
MEMORY_BATCH_GAP_S = 0.002
MEMORY_CPU_SHARE = 0.02  # of a core, at most, spent reading workers' memory
RETIRE_INTERVAL_S = 1.0  # at most one idle worker above the target retired per this
INITIAL_SETUP_S = 0.05  # a pool worker's fork and rehearsal until one is measured
INITIAL_IDLE_COST = 6 * 1024 * 1024  # an idle worker's private memory until one is measured


def _report_memory(sock: socket.socket) -> None:
    """In a new worker: send the zygote an fd of our own smaps_rollup (only we may open it)."""
    try:
        fd = os.open("/proc/self/smaps_rollup", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # not Linux, or no /proc: the pool is sized without memory
    try:
        control.send(sock, control.WorkerMemory(os.getpid(), time.monotonic()), [fd])
    except OSError:
        pass  # the zygote retired us, or is gone
    finally:
        os.close(fd)


def _memory_available() -> int | None:
    """MemAvailable, or less: the room left under this cgroup's memory.max (a container's limit)."""
    try:
        with open("/proc/meminfo", "rb") as f:
            available = pool.mem_available_bytes(f.read())
    except OSError:
        available = None
    try:
        with open("/sys/fs/cgroup/memory.max", "rb") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", "rb") as f:
            used = int(f.read())
        if limit != b"max":
            room = max(0, int(limit) - used)
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    return available


def _limit_resources(memory_mb: int) -> None:
    """One runaway session must not starve the node of memory or file descriptors."""
    if memory_mb:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 1024 * 1024, memory_mb * 1024 * 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (WORKER_MAX_FDS, WORKER_MAX_FDS))


def _run_session(spawn, fds: list[int], preconnected: preconnect.Preconnected | None = None) -> None:
    """The worker's whole life after the fork; never returns into the zygote's code."""
    code = 70
    try:
        _limit_resources(spawn.config.memory_limit_mb)
        sandbox.limit_worker(spawn.config.sandbox, spawn.config.max_session_s)
        from meshrt.worker.session import run

        client_fd, channel_fd, spool_fd = fds
        code = run(spawn.grant, spawn.config, spawn.request, client_fd, channel_fd, spool_fd, preconnected)
    except BaseException:  # noqa: BLE001 - the child must never unwind into the zygote loop
        log.exception("worker failed before its session ran")
    finally:
        os._exit(code)


class Zygote:
    """Forks workers, keeping `warm` idle ones forked ahead: a session then starts in a process
    that already exists (its fork and first page faults paid off the set-up path)."""

    def __init__(
        self,
        channel: socket.socket,
        floor: int,
        ceiling: int,
        uids: sandbox.WorkerUids | None = None,
        mode="on",
        upstream_url: str = "",
        preconnect_s: float = 0.0,
    ):
        self.channel = channel
        self.uids, self.mode = uids, mode  # each worker's own uid (MESHRT_WORKER_UIDS), when root
        self.upstream_url, self.preconnect_s = upstream_url, preconnect_s  # pool workers connect ahead
        self.floor, self.ceiling = floor, max(floor, ceiling)
        self.warm = floor  # the pool's size now: pool.pool_target's, decided once a second
        self.idle: dict[int, socket.socket] = {}  # pid -> our end of that idle worker's socket
        self.last_spawn = 0.0  # monotonic time of the last session handed out
        self.backend = "uvloop"  # the event loop pool workers rehearse: the last session's (default: settings')
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.arrivals = pool.ArrivalRate()
        self.setup = pool.RecentMedian(INITIAL_SETUP_S)  # a pool worker's fork to rehearsed, seconds
        self.idle_cost = pool.Smoothed(INITIAL_IDLE_COST)  # an idle worker's private bytes
        self.mem_available: int | None = None
        self.rehearsing: dict[int, float] = {}  # pid -> when it was forked, until it reports
        self.plain: set[int] = set()  # idle workers that skipped the rehearsal (see _rehearses)
        self.reporting: dict[int, socket.socket] = {}  # pid -> the socket its WorkerMemory comes on
        self.smaps: dict[int, int] = {}  # pid -> an fd of its smaps_rollup
        self.pss: dict[int, int] = {}  # pid -> its PSS, last read
        self.read_s = 0.0
        self.memory_round: list[int] = []  # workers still to read in this round
        self.round_private: list[int] = []
        self.round_read_s = 0.0
        self.from_pool = self.forked = 0  # sessions handed to an idle worker / forked on the spot
        self.next_status = self.next_memory = self.last_retire = 0.0

    def _post_fork(self) -> None:
        """In a new child: default signals, and none of the zygote's descriptors."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when sessions end
        self.channel.close()
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)
        for sock in self.idle.values():
            sock.close()
        for sock in self.reporting.values():
            sock.close()
        for fd in self.smaps.values():  # else they hold fd numbers past the worker's RLIMIT_NOFILE
            os.close(fd)

    def _own_uid(self) -> int | None:
        """The uid the next worker runs under, or None (workers keep the zygote's)."""
        if self.uids is None:
            return None
        try:
            return self.uids.take()
        except sandbox.SandboxError as exc:
            log.error("no worker uid free; this worker keeps the zygote's", extra={"fields": {"error": str(exc)}})
            return None

    def _become(self, uid: int | None) -> None:
        """In the child, first thing: its own uid (under `require`, none: it exits)."""
        if uid is None:
            return
        try:
            sandbox.become_worker_user(uid)
        except OSError as exc:
            log.error("worker uid not taken", extra={"fields": {"uid": uid, "error": str(exc)}})
            if self.mode == "require":
                os._exit(78)

    def _fork_idle(self, rehearse: bool, preconnect_ahead: bool | None = None) -> None:
        """An idle pool worker; `rehearse`: it runs warmup.rehearse first; `preconnect_ahead`
        (default: as `rehearse`): it opens its upstream connection while it waits."""
        preconnect_ahead = rehearse if preconnect_ahead is None else preconnect_ahead
        ours, theirs = control.seqpacket_pair()
        forked_at = time.monotonic()
        uid = self._own_uid()
        pid = os.fork()
        if pid == 0:
            ours.close()
            self._post_fork()
            self._become(uid)
            try:
                if rehearse:
                    warmup.rehearse(self.backend)
            except Exception as exc:  # noqa: BLE001 - only an optimisation; the session runs without it
                log.warning("pool worker rehearsal failed", extra={"fields": {"error": repr(exc)}})
            try:
                sandbox.prepare_worker()
            except Exception as exc:  # noqa: BLE001 - built again when its session needs it
                log.warning("pool worker filter not built", extra={"fields": {"error": repr(exc)}})
            _report_memory(theirs)  # before any Spawn is read: the zygote may wait for it
            preconnected = None
            try:
                # before the seccomp filter, like any connect; not by a worker forked to refill a pool
                # a burst emptied: its Spawn is due at once, and a connect begun would be wasted
                if self.upstream_url and self.preconnect_s > 0 and preconnect_ahead:
                    spawn, fds, preconnected = preconnect.wait_for_spawn(theirs, self.upstream_url, self.preconnect_s)
                else:
                    spawn, fds = control.recv(theirs)
            except (EOFError, OSError, control.ControlError):
                os._exit(0)  # the zygote is gone, or retired us: nothing to do
            theirs.close()
            from meshrt.worker import session

            session.POOLED = True
            _run_session(spawn, fds, preconnected)
        theirs.close()
        if uid is not None:
            self.uids.hold(pid, uid)
        self.idle[pid] = ours
        self.reporting[pid] = ours
        if rehearse:
            self.rehearsing[pid] = forked_at
        else:
            self.plain.add(pid)

    def _fork_session(self, spawn, fds: list[int]) -> int:
        ours, theirs = control.seqpacket_pair()
        uid = self._own_uid()
        pid = os.fork()
        if pid == 0:
            ours.close()
            self._post_fork()
            self._become(uid)
            _report_memory(theirs)
            theirs.close()
            _run_session(spawn, fds)
        theirs.close()
        if uid is not None:
            self.uids.hold(pid, uid)
        self.reporting[pid] = ours
        return pid

    # --- workers' memory and the pool's size ---------------------------------------------------

    def _collect(self, pid: int) -> None:
        """Take the WorkerMemory a worker sent, if it has come; the socket it came on is closed
        unless it is an idle worker's (its Spawn goes there)."""
        sock = self.reporting.get(pid)
        if sock is None:
            return
        try:
            received = control.recv_nowait(sock)
        except (EOFError, OSError, control.ControlError):  # it died, or sent nonsense: not measured
            received = (None, [])
        if received is None:
            return  # not yet
        message, fds = received
        del self.reporting[pid]
        forked_at = self.rehearsing.pop(pid, None)
        if isinstance(message, control.WorkerMemory) and len(fds) == 1 and pid not in self.smaps:
            self.smaps[pid] = fds.pop()
            self._read_one(pid)  # counted at once, not at the next reading of all
            if forked_at is not None:
                self.setup.add(max(0.0, message.ready_at - forked_at))
        for fd in fds:
            os.close(fd)
        if self.idle.get(pid) is not sock:
            sock.close()

    def _forget(self, pid: int) -> None:
        """A child was reaped: its memory is no longer ours to count, its uid free again."""
        if self.uids is not None:
            self.uids.free(pid)
        sock = self.reporting.pop(pid, None)
        if sock is not None and self.idle.get(pid) is not sock:
            sock.close()
        self.rehearsing.pop(pid, None)
        self.plain.discard(pid)
        self.pss.pop(pid, None)
        fd = self.smaps.pop(pid, None)
        if fd is not None:
            os.close(fd)

    def _read_one(self, pid: int) -> int | None:
        """Read one worker's smaps_rollup: its PSS is kept; its private bytes returned."""
        try:
            rollup = os.pread(self.smaps[pid], 4096, 0)
        except OSError:
            return None  # exiting: reaped soon
        pss = pool.pss_bytes(rollup)
        if pss is not None:
            self.pss[pid] = pss
        return pool.private_bytes(rollup)

    def _read_memory(self) -> None:
        """Read the next MEMORY_BATCH workers of this round (a read costs ~0.6 ms: the zygote
        must not stop forking for the whole node's); the round's end updates the totals."""
        if not self.memory_round:
            for pid in list(self.reporting):
                self._collect(pid)
            self.memory_round = list(self.smaps)
            self.round_private, self.round_read_s = [], 0.0
        began = time.monotonic()
        for _ in range(min(MEMORY_BATCH, len(self.memory_round))):
            pid = self.memory_round.pop()
            if pid in self.smaps and (own := self._read_one(pid)) is not None and pid in self.idle:
                self.round_private.append(own)
        self.round_read_s += time.monotonic() - began
        if self.memory_round:
            return
        if self.round_private:
            self.idle_cost.add(sum(self.round_private) / len(self.round_private))
        self.read_s = self.round_read_s
        # at most MEMORY_CPU_SHARE of a core: 1000 workers (~0.6 s a round) are read every 30 s
        self.next_memory = time.monotonic() + max(MEMORY_INTERVAL_S, self.read_s / MEMORY_CPU_SHARE)

    def _size(self, now: float, arriving: bool = False) -> None:
        """The pool's size now. It grows only as sessions arrive, by one at most per arrival:
        forking and rehearsing a dozen workers at once would take the CPU the sessions arriving
        need (a bench run saw set-up p99 double); it shrinks once a second (_retire)."""
        target = pool.pool_target(
            self.arrivals.rate(now),
            self.setup.value + REFILL_DELAY_S,
            self.mem_available,
            int(self.idle_cost.value),
            self.floor,
            self.ceiling,
        )
        if target > self.warm:
            target = max(self.floor, min(target, self.warm + 1)) if arriving else max(self.floor, self.warm)
        self.warm = target

    def _retire(self, now: float) -> None:
        """An idle worker above the target ends (its socket closes: it exits on the EOF)."""
        if len(self.idle) > self.warm and now - self.last_retire >= RETIRE_INTERVAL_S:
            # the oldest of those that skipped the rehearsal, else the oldest: the pool left
            # after a burst keeps its rehearsed workers
            pid = next((p for p in self.idle if p in self.plain), None) or next(iter(self.idle))
            self.plain.discard(pid)
            sock = self.idle.pop(pid)
            self.reporting.pop(pid, None)
            self.rehearsing.pop(pid, None)
            sock.close()
            self.last_retire = now

    def _status(self) -> control.PoolStatus:
        now = time.monotonic()
        return control.PoolStatus(
            idle=len(self.idle),
            target=self.warm,
            workers=len(self.pss),
            pss_bytes=sum(self.pss.values()),
            idle_pss_bytes=sum(self.pss.get(pid, 0) for pid in self.idle),
            arrival_rate=round(self.arrivals.rate(now), 3),
            setup_s=round(self.setup.value, 4),
            mem_available=-1 if self.mem_available is None else self.mem_available,
            read_s=round(self.read_s, 4),
            from_pool=self.from_pool,
            forked=self.forked,
        )

    def _periodic(self, now: float) -> None:
        if self.memory_round or now >= self.next_memory:  # a round under way, or one due
            self._read_memory()
        if now >= self.next_status:
            self.next_status = now + STATUS_INTERVAL_S
            self.mem_available = _memory_available()  # two small files: every time
            for pid in list(self.reporting):
                self._collect(pid)
            self._size(now)
            self._retire(now)
            try:
                control.send(self.channel, self._status())
            except OSError:
                pass

    def _spawn(self, datagram: bytes, fds: list[int]) -> None:
        """Hand a Spawn to an idle worker as received, and only then decode it: re-encoding the
        grant would cost ~0.2 ms, and whatever the zygote writes after a fork first costs it
        copy-on-write faults (~100 here, ~0.3 ms) that should not delay the session. Only the
        supervisor writes to this channel; a worker sent something else exits on it."""
        pid = None
        while self.idle and pid is None and len(fds) == 3:
            candidate = self._next_idle()
            sock = self.idle.pop(candidate)
            self.plain.discard(candidate)
            try:
                control.send_datagram(sock, datagram, fds)
                pid = candidate
            except OSError:
                pass  # that idle worker died; try the next
            finally:
                if self.reporting.get(candidate) is not sock:
                    sock.close()  # else closed once its WorkerMemory is in (_collect)
        try:
            spawn = control.decode(datagram)
        except control.ControlError as exc:
            log.error("spawn message not understood", extra={"fields": {"error": str(exc)}})
            spawn = None
        if isinstance(spawn, control.Spawn) and len(fds) == 3:
            self.backend = spawn.config.backend
            if pid is None:
                pid = self._fork_session(spawn, fds)
                self.forked += 1
            else:
                self.from_pool += 1
            self.last_spawn = time.monotonic()
            self.arrivals.arrived(self.last_spawn)
            self._size(self.last_spawn, arriving=True)  # a step up in arrivals grows the pool at once
        for fd in fds:
            os.close(fd)
        if isinstance(spawn, control.Spawn) and pid is not None:
            control.send(self.channel, control.Spawned(spawn.grant.session_id, pid))

    def _next_idle(self) -> int:
        """The idle worker the next session goes to: the newest rehearsed one, else the newest."""
        return next((p for p in reversed(self.idle) if p not in self.plain), None) or next(reversed(self.idle))

    def _rehearses(self, wait: float) -> bool:
        """Whether the idle worker forked now rehearses (worker.warmup.rehearse). Only one that
        fills the pool up to its floor, and not while a burst has emptied the pool (`wait` > 0:
        a session was handed out less than REFILL_DELAY_S ago). A rehearsal costs a worker ~10 ms
        of CPU to save ~3 ms of its set-up: a quiet node's sessions get rehearsed workers, and the
        workers a rising arrival rate adds above the floor, whose sessions are CPU-bound, skip it."""
        return wait <= 0 and len(self.idle) < self.floor

    def _refill(self) -> float | None:
        """Fork idle workers up to the pool's size; returns how long to wait before the rest
        (the refill delay after a session was handed out), or None."""
        while len(self.idle) < self.warm:
            wait = self.last_spawn + REFILL_DELAY_S - time.monotonic()
            if self.idle and wait > 0:  # an empty pool is refilled at once
                return wait
            self._fork_idle(rehearse=self._rehearses(wait), preconnect_ahead=wait <= 0)
        return None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._forget(pid)
            idle = self.idle.pop(pid, None)
            if idle is not None:
                idle.close()
            exit_code = os.waitstatus_to_exitcode(status)
            message = control.WorkerExited(
                pid, exit_code if exit_code >= 0 else None, -exit_code if exit_code < 0 else None
            )
            try:
                control.send(self.channel, message)
            except OSError:
                pass

    def _drain_wakeups(self) -> None:
        while True:
            try:
                if not os.read(self.wakeup_r, 4096):
                    return
            except BlockingIOError:
                return

    def serve(self) -> int:
        signal.set_wakeup_fd(self.wakeup_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: None)  # the supervisor closes our channel to stop us
        control.send(self.channel, control.ZygoteReady(os.getpid()))
        while True:
            now = time.monotonic()
            self._periodic(now)
            timeout = max(0.0, min(self.next_status, self.next_memory) - now)
            if self.memory_round:
                timeout = MEMORY_BATCH_GAP_S  # spawns waiting are served between two batches
            wait = self._refill()
            if wait is not None:
                timeout = min(timeout, wait)
            readable, _, _ = select.select([self.channel, self.wakeup_r], [], [], timeout)
            if self.wakeup_r in readable:
                self._drain_wakeups()
                self._reap()
            if self.channel not in readable:
                continue
            try:
                datagram, fds = control.recv_undecoded(self.channel)
            except (EOFError, ConnectionResetError):  # reset: it died with our messages unread
                return 0  # the supervisor is gone; running workers finish their sessions
            except control.ControlError as exc:
                log.error("control message not understood", extra={"fields": {"error": str(exc)}})
                continue
            self._spawn(datagram, fds)


def _raise_fd_limit() -> None:
    """The zygote holds an fd per worker (its smaps_rollup): the soft limit (often 1024) up to
    the hard one. Its workers set their own (WORKER_MAX_FDS)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshrt-zygote")
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--warm-min", type=int, default=0, help="idle workers kept forked ahead, at least")
    parser.add_argument("--warm-max", type=int, default=0, help="idle workers kept forked ahead, at most")
    parser.add_argument("--sandbox", choices=sandbox.MODES, default="on")
    parser.add_argument("--worker-uids", default="", help="FIRST-LAST: each worker runs under one of these uids")
    parser.add_argument("--upstream-url", default="", help="pool workers open a connection here ahead (no key)")
    parser.add_argument("--preconnect-s", type=float, default=0.0, help="...renewed this old; 0: off")
    args = parser.parse_args(argv)
    uids = None
    if args.worker_uids:
        first, _, last = args.worker_uids.partition("-")
        uids = sandbox.WorkerUids(int(first), int(last))
    sandbox.harden_process(args.sandbox)  # non-dumpable: its children (workers) inherit it
    sandbox.refuse_io_uring(args.sandbox)  # before any event loop: libuv runs on epoll alone
    channel = socket.socket(fileno=args.channel_fd)
    from meshrt.shared import logs

    logs.configure("worker", args.log_level)
    _preimport()
    _raise_fd_limit()
    zygote = Zygote(
        channel, max(0, args.warm_min), max(0, args.warm_max), uids, args.sandbox, args.upstream_url, args.preconnect_s
    )
    return zygote.serve()


if __name__ == "__main__":
    raise SystemExit(main())
