"""The zygote: a small single-threaded process that forks one worker per session.

It is started by the supervisor with a scrubbed environment before any database handle or
secret exists, and pre-imports everything a worker needs, so a fork costs ~ms and the child
inherits no tenant data. Protocol on its channel (SOCK_SEQPACKET): Spawn in (fds: client
socket, worker channel, spool file) → Spawned out; every reaped child → WorkerExited out.

Post-fork checklist in the child: default signal handlers, SIGINT ignored (the supervisor
decides when sessions end), the zygote's channel closed, resource limits applied; the child
never returns into the zygote's loop (it ends in os._exit).
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import signal
import socket
import sys


def _preimport() -> None:
    import anyio  # noqa: F401
    import anyio._backends._asyncio  # noqa: F401
    import anyio._backends._trio  # noqa: F401
    import trio  # noqa: F401

    from meshrt.worker import metering, session, upstream  # noqa: F401

    upstream.tls_context()


WORKER_MAX_FDS = 64  # a session needs ~10: client, upstream, channel, spool, event loop, pipes


def _limit_resources(memory_mb: int) -> None:
    """One runaway session must not starve the node of memory or file descriptors."""
    if memory_mb:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 1024 * 1024, memory_mb * 1024 * 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (WORKER_MAX_FDS, WORKER_MAX_FDS))


def _child(spawn, fds: list[int], channel: socket.socket, wakeup_r: int) -> None:
    code = 70
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        channel.close()
        os.close(wakeup_r)
        _limit_resources(spawn.grant.memory_limit_mb)
        from meshrt.worker.session import run

        client_fd, channel_fd, spool_fd = fds
        code = run(spawn.grant, spawn.request, client_fd, channel_fd, spool_fd)
    except BaseException:  # noqa: BLE001 - the child must never unwind into the zygote loop
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def _reap(channel: socket.socket) -> None:
    from meshrt.shared import control

    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        exit_code = os.waitstatus_to_exitcode(status)
        message = control.WorkerExited(pid, exit_code if exit_code >= 0 else None,
                                       -exit_code if exit_code < 0 else None)
        try:
            control.send(channel, message)
        except OSError:
            pass


def serve(channel: socket.socket) -> int:
    from meshrt.shared import control

    wakeup_r, wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wakeup_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: None)  # the supervisor closes our channel to stop us
    control.send(channel, control.ZygoteReady(os.getpid()))
    while True:
        readable, _, _ = select.select([channel, wakeup_r], [], [])
        if wakeup_r in readable:
            while True:
                try:
                    if not os.read(wakeup_r, 4096):
                        break
                except BlockingIOError:
                    break
            _reap(channel)
        if channel not in readable:
            continue
        try:
            spawn, fds = control.recv(channel)
        except EOFError:
            return 0  # the supervisor is gone; running workers go on and finish their sessions
        except control.ControlError as exc:
            print(f"zygote: {exc}", file=sys.stderr)
            continue
        if not isinstance(spawn, control.Spawn) or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            continue
        pid = os.fork()
        if pid == 0:
            _child(spawn, fds, channel, wakeup_r)
        for fd in fds:
            os.close(fd)
        control.send(channel, control.Spawned(spawn.grant.session_id, pid))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshrt-zygote")
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    channel = socket.socket(fileno=args.channel_fd)
    from meshrt.shared import logs

    logs.configure("worker", args.log_level)
    _preimport()
    return serve(channel)


if __name__ == "__main__":
    raise SystemExit(main())
