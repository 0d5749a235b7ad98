"""`meshrt serve --keep`: start the supervisor again when it dies, and leave its workers alone.

Workers outlive their supervisor (they relay on and re-attach to the next one: ARCHITECTURE.md,
Failure and recovery), but only if something starts that next one without killing them. In a
container `meshrt serve` is PID 1's child (tini's); when it dies, tini exits and the runtime
kills every worker with it. The keeper sits between: it runs `meshrt serve` as its child,
forwards SIGTERM and SIGINT to it (a drain), and when the supervisor dies any other way starts a
new one after a short backoff. It is the child subreaper of its subtree, so workers orphaned when
their zygote died with the supervisor become its children, and it reaps them.

It does not restart: after a stop signal (the node is draining), a clean exit (0), a start-up
refusal that would recur (bad settings 2, sandbox required but missing 78), or a crash loop (5
starts within 60 s); it then exits with the supervisor's code. It holds the environment it was
started with (the supervisor needs the secrets at each start) and is non-dumpable.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque

from meshrt.shared import sandbox

log = logging.getLogger("meshrt.keeper")

PR_SET_CHILD_SUBREAPER = 36
BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # before each restart in a row
PERMANENT = (2, 78)  # bad settings; MESHRT_SANDBOX=require with a layer missing
CRASH_LOOP = (5, 60.0)  # this many starts within this many seconds: give up


def should_restart(code: int, stopping: bool, recent_starts: int) -> bool:
    """Whether the supervisor that exited with `code` is started again (a negative code: killed
    by that signal)."""
    if stopping or code == 0 or code in PERMANENT:
        return False
    return recent_starts < CRASH_LOOP[0]


def keep(argv: list[str]) -> int:
    """Run `meshrt <argv>` (serve) until it exits for good; returns its last exit code."""
    _become_subreaper()
    try:
        sandbox.set_nondumpable()  # its environment holds the secrets the supervisor reads
    except OSError:
        pass
    state = {"child": None, "stopping": False}

    def forward(signum, _frame) -> None:
        state["stopping"] = True
        if state["child"] is not None:
            state["child"].send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    starts: deque[float] = deque()
    while True:
        starts.append(time.monotonic())
        child = state["child"] = subprocess.Popen([sys.executable, "-m", "meshrt.supervisor.cli", *argv])
        code = _wait(child)
        while starts and time.monotonic() - starts[0] > CRASH_LOOP[1]:
            starts.popleft()
        if not should_restart(code, state["stopping"], len(starts)):
            if code != 0 and not state["stopping"]:
                log.error("supervisor exited; not starting it again", extra={"fields": {"exit_code": code}})
            return code if code >= 0 else 128 - code
        backoff = BACKOFF_S[min(len(starts) - 1, len(BACKOFF_S) - 1)]  # longer as restarts crowd
        log.error(
            "supervisor died; starting a new one (its workers re-attach)",
            extra={"fields": {"exit_code": code, "backoff_s": backoff}},
        )
        time.sleep(backoff)
        if state["stopping"]:  # told to stop during the backoff: the workers drain by themselves
            return 0


def _wait(child: subprocess.Popen) -> int:
    """The supervisor's exit code, reaping meanwhile every other child that ends (orphaned
    workers, re-parented here)."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return child.wait()
        if pid == child.pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            return child.returncode


def _become_subreaper() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: orphans go to init, which reaps them
        pass
