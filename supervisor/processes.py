"""Process control: the supervisor's two children, the zygote and the front door — how each is
started, how its exit is seen, and when it is restarted.

A child that dies is restarted after a backoff. One that keeps dying young (before `young_s`)
is in a crash loop — a bad setting, a broken install — and restarting it for ever would only
hide that: the supervisor exits with EXIT_CHILD_CRASH_LOOP so its restarter and the operator see
it (gunicorn's WORKER_BOOT_ERROR and uvicorn's STARTUP_FAILURE are the models).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from dataclasses import field

import anyio
from anyio.abc import Process

from meshrt.shared import control
from meshrt.shared.settings import Settings
from meshrt.shared.settings import scrubbed_env
from meshrt.shared.settings import settings_env

log = logging.getLogger("meshrt.supervisor")

EXIT_OK = 0
EXIT_CHILD_CRASH_LOOP = 3  # a child kept dying at start: see its own error above
EXIT_CRASHED = 70  # EX_SOFTWARE: a supervisor task failed; a fresh supervisor takes over


class CrashLoop(Exception):
    def __init__(self, child: str, deaths: int, within_s: float, exit_code: int | None):
        super().__init__(
            f"the {child} died {deaths} times in a row within {within_s:g} s of starting "
            f"(last exit code {exit_code}); see its error above"
        )
        self.child = child


@dataclass
class RestartPolicy:
    """When to restart a child that exited (sans-I/O: the caller sleeps and starts)."""

    child: str
    young_s: float = 5.0  # a child that dies sooner than this after its start died young
    max_young_deaths: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    young_deaths: int = field(default=0, init=False)

    def after_exit(self, lived_s: float, exit_code: int | None) -> float:
        """The backoff before the next start; raises CrashLoop when it should not be restarted."""
        self.young_deaths = self.young_deaths + 1 if lived_s < self.young_s else 0
        if self.young_deaths >= self.max_young_deaths:
            raise CrashLoop(self.child, self.young_deaths, self.young_s, exit_code)
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, self.young_deaths - 1))


@dataclass
class Child:
    """A started child; any number of tasks may wait for its exit (the event loop reaps it)."""

    proc: Process
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def lived_s(self) -> float:
        return time.monotonic() - self.started

    def running(self) -> bool:
        return self.proc.returncode is None

    def kill(self) -> None:
        if self.running():
            self.proc.kill()

    def terminate(self) -> None:
        if self.running():
            self.proc.terminate()

    async def exited(self) -> int:
        return await self.proc.wait()


async def _start(command: list[str], pass_fds: list[int], env: dict[str, str]) -> Child:
    proc = await anyio.open_process(
        command, pass_fds=pass_fds, env=env, stdin=subprocess.DEVNULL, stdout=None, stderr=None
    )
    return Child(proc)


async def start_zygote(settings: Settings) -> tuple[Child, socket.socket]:
    """The zygote, with a scrubbed environment (no secret, no setting) and its channel."""
    ours, theirs = control.seqpacket_pair()
    try:
        child = await _start(
            [
                sys.executable,
                "-m",
                "meshrt.worker.zygote",
                "--channel-fd",
                str(theirs.fileno()),
                "--log-level",
                settings.log_level,
                "--warm-min",
                str(settings.warm_pool_bounds[0]),
                "--warm-max",
                str(settings.warm_pool_bounds[1]),
                "--sandbox",
                settings.sandbox,
                *(["--worker-uids", "%d-%d" % settings.worker_uid_range] if settings.worker_uid_range else []),
                *(  # not a secret: pool workers open their upstream connection ahead (worker/preconnect.py)
                    ["--upstream-url", settings.upstream_url, "--preconnect-s", str(settings.upstream_preconnect_s)]
                    if settings.upstream_preconnect_s > 0
                    else []
                ),
            ],
            [theirs.fileno()],
            scrubbed_env(),
        )
    finally:
        theirs.close()
    ours.setblocking(False)
    log.info("zygote started", extra={"pid": child.pid})
    return child, ours


async def start_frontdoor(settings: Settings, listener: socket.socket, node: str) -> Child:
    """The front door on the listening socket, with the settings but never the upstream key."""
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env.update(settings_env(settings))
    env.pop("OPENAI_API_KEY", None)
    fd = listener.fileno()
    child = await _start(
        [sys.executable, "-m", "meshrt.frontdoor", "--fd", str(fd), "--node", node, "--parent-pid", str(os.getpid())],
        [fd],
        env,
    )
    log.info("front door started", extra={"pid": child.pid})
    return child


def contains(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether `error`, or any exception grouped inside it, is a `kind`."""
    if isinstance(error, kind):
        return True
    return isinstance(error, BaseExceptionGroup) and any(contains(e, kind) for e in error.exceptions)
