"""The zygote: a small single-threaded process that forks one worker per session.

It is started by the supervisor with a scrubbed environment before any database handle or
secret exists, and pre-imports everything a worker needs, so a fork costs ~ms and the child
inherits no tenant data. Protocol on its channel (SOCK_SEQPACKET): Spawn in (fds: client
socket, worker channel, spool file) → Spawned out; every reaped child → WorkerExited out.
With `--warm N` it keeps N idle workers forked ahead, each waiting on its own socket for a Spawn
after rehearsing the set-up path (warmup.rehearse), so that its first page faults are paid early.

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
from meshrt.worker import warmup

log = logging.getLogger("meshrt.zygote")


def _preimport() -> None:
    import anyio  # noqa: F401
    import anyio._backends._asyncio  # noqa: F401
    import anyio._backends._trio  # noqa: F401
    import trio  # noqa: F401

    from meshrt.worker import session  # noqa: F401
    from meshrt.worker import session_meter  # noqa: F401
    from meshrt.worker import upstream  # noqa: F401
    from meshrt.worker import warmup  # noqa: F401

    upstream.tls_context()
    if sandbox.seccomp_available() is None:
        sandbox.build_filter()  # libseccomp loaded and its first-use costs paid before any fork
    warmup.warm_up()
    import gc

    gc.collect()
    gc.freeze()  # inherited objects stay out of the children's GC passes (fewer copy-on-write faults)


# A pool worker just handed a session is not replaced at once: the fork (~2 ms of CPU, plus the
# child's first page faults) would compete with that session's set-up on a small machine.
REFILL_DELAY_S = 0.02

WORKER_MAX_FDS = 64  # a session needs ~10: client, upstream, channel, spool, event loop, pipes


def _limit_resources(memory_mb: int) -> None:
    """One runaway session must not starve the node of memory or file descriptors."""
    if memory_mb:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 1024 * 1024, memory_mb * 1024 * 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (WORKER_MAX_FDS, WORKER_MAX_FDS))


def _run_session(spawn, fds: list[int]) -> None:
    """The worker's whole life after the fork; never returns into the zygote's code."""
    code = 70
    try:
        _limit_resources(spawn.config.memory_limit_mb)
        sandbox.limit_worker(spawn.config.sandbox, spawn.config.max_session_s)
        from meshrt.worker.session import run

        client_fd, channel_fd, spool_fd = fds
        code = run(spawn.grant, spawn.config, spawn.request, client_fd, channel_fd, spool_fd)
    except BaseException:  # noqa: BLE001 - the child must never unwind into the zygote loop
        log.exception("worker failed before its session ran")
    finally:
        os._exit(code)


class Zygote:
    """Forks workers, keeping `warm` idle ones forked ahead: a session then starts in a process
    that already exists (its fork and first page faults paid off the set-up path)."""

    def __init__(self, channel: socket.socket, warm: int):
        self.channel = channel
        self.warm = warm
        self.idle: dict[int, socket.socket] = {}  # pid -> our end of that idle worker's socket
        self.last_spawn = 0.0  # monotonic time of the last session handed out
        self.backend = "uvloop"  # the event loop pool workers rehearse: the last session's (default: settings')
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

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

    def _fork_idle(self, rehearse: bool) -> None:
        ours, theirs = control.seqpacket_pair()
        pid = os.fork()
        if pid == 0:
            ours.close()
            self._post_fork()
            try:
                if rehearse:
                    warmup.rehearse(self.backend)
            except Exception as exc:  # noqa: BLE001 - only an optimisation; the session runs without it
                log.warning("pool worker rehearsal failed", extra={"fields": {"error": repr(exc)}})
            try:
                sandbox.prepare_worker()
            except Exception as exc:  # noqa: BLE001 - built again when its session needs it
                log.warning("pool worker filter not built", extra={"fields": {"error": repr(exc)}})
            try:
                spawn, fds = control.recv(theirs)
            except (EOFError, OSError, control.ControlError):
                os._exit(0)  # the zygote is gone: nothing to do
            theirs.close()
            _run_session(spawn, fds)
        theirs.close()
        self.idle[pid] = ours

    def _fork_session(self, spawn, fds: list[int]) -> int:
        pid = os.fork()
        if pid == 0:
            self._post_fork()
            _run_session(spawn, fds)
        return pid

    def _spawn(self, datagram: bytes, fds: list[int]) -> None:
        """Hand a Spawn to an idle worker as received, and only then decode it: re-encoding the
        grant would cost ~0.2 ms, and whatever the zygote writes after a fork first costs it
        copy-on-write faults (~100 here, ~0.3 ms) that should not delay the session. Only the
        supervisor writes to this channel; a worker sent something else exits on it."""
        pid = None
        while self.idle and pid is None and len(fds) == 3:
            candidate, sock = self.idle.popitem()
            try:
                control.send_datagram(sock, datagram, fds)
                pid = candidate
            except OSError:
                pass  # that idle worker died; try the next
            finally:
                sock.close()
        try:
            spawn = control.decode(datagram)
        except control.ControlError as exc:
            log.error("spawn message not understood", extra={"fields": {"error": str(exc)}})
            spawn = None
        if isinstance(spawn, control.Spawn) and len(fds) == 3:
            self.backend = spawn.config.backend
            if pid is None:
                pid = self._fork_session(spawn, fds)
            self.last_spawn = time.monotonic()
        for fd in fds:
            os.close(fd)
        if isinstance(spawn, control.Spawn) and pid is not None:
            control.send(self.channel, control.Spawned(spawn.grant.session_id, pid))

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
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
            timeout = None
            while len(self.idle) < self.warm:
                wait = self.last_spawn + REFILL_DELAY_S - time.monotonic()
                if self.idle and wait > 0:  # an empty pool is refilled at once
                    timeout = wait
                    break
                # a pool emptied by a burst is refilled with workers needed now: a rehearsal
                # would only add its CPU to theirs (and delay the session waiting for it)
                self._fork_idle(rehearse=wait <= 0)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshrt-zygote")
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--warm", type=int, default=0, help="idle workers kept forked ahead")
    parser.add_argument("--sandbox", choices=sandbox.MODES, default="on")
    args = parser.parse_args(argv)
    sandbox.harden_process(args.sandbox)  # non-dumpable: its children (workers) inherit it
    sandbox.refuse_io_uring(args.sandbox)  # before any event loop: libuv runs on epoll alone
    channel = socket.socket(fileno=args.channel_fd)
    from meshrt.shared import logs

    logs.configure("worker", args.log_level)
    _preimport()
    return Zygote(channel, max(0, args.warm)).serve()


if __name__ == "__main__":
    raise SystemExit(main())
