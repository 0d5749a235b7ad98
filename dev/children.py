"""Waiting for a child process (the simulator, a gateway) to say it is listening.

Used by `meshrt dev`, `meshrt bench` and the tests. A reader thread takes the child's stdout
line by line for as long as the child lives: a wait has a real deadline even if the child hangs
without printing, and a chatty child can never block on a full pipe afterwards.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time


class ChildStartError(RuntimeError):
    pass


class ChildOutput:
    """Every stdout line of `proc` (opened with stdout=PIPE, text=True), as it arrives."""

    def __init__(self, proc: subprocess.Popen, what: str = "the child"):
        self.proc, self.what = proc, what
        self.lines: list[str] = []
        self.ended = False  # the child closed its stdout (usually: it exited)
        self._changed = threading.Condition()
        threading.Thread(target=self._pump, name=f"stdout of pid {proc.pid}", daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first line so far or to come that matches `pattern`. Raises ChildStartError, with
        the exit code and the last lines seen, if the child ends or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        checked = 0
        with self._changed:
            while True:
                for line in self.lines[checked:]:
                    match = re.search(pattern, line)
                    if match:
                        return match
                checked = len(self.lines)
                left = deadline - time.monotonic()
                if self.ended or left <= 0:
                    break
                self._changed.wait(left)
        raise ChildStartError(
            f"{self.what} did not print {pattern!r} within {timeout:g} s "
            f"(exit code {self.proc.poll()}); last lines: {self.lines[-5:]!r}"
        )


def wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float, what: str = "the child") -> re.Match:
    """Start reading `proc`'s stdout and wait for a line matching `pattern` (see ChildOutput)."""
    return ChildOutput(proc, what).wait_for(pattern, timeout)
