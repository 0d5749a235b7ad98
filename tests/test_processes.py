"""Process control: a child that dies is restarted with a growing backoff; one that keeps dying
young is a crash loop, and the supervisor exits with code 3 instead of restarting it for ever."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import OPERATOR_KEY

from meshrt.supervisor.processes import EXIT_CHILD_CRASH_LOOP
from meshrt.supervisor.processes import CrashLoop
from meshrt.supervisor.processes import RestartPolicy


def test_backoff_grows_while_a_child_dies_young_and_resets_after_a_long_life():
    policy = RestartPolicy("front door", young_s=5, max_young_deaths=5, backoff_s=0.5, max_backoff_s=8)
    assert [policy.after_exit(0.1, 1) for _ in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert policy.after_exit(600, 1) == 0.5  # it had been up a long time: a fresh failure
    for _ in range(4):
        policy.after_exit(0.1, 1)
    with pytest.raises(CrashLoop, match="front door died 5 times in a row within 5 s"):
        policy.after_exit(0.1, 1)


def test_a_front_door_that_cannot_start_ends_the_supervisor_with_exit_3(tmp_path, database_url, sim):
    prices = tmp_path / "prices.json"
    prices.write_text("{}")  # no models: the front door refuses to start with it
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHRT_") and k != "OPENAI_API_KEY"}
    env.update(
        {
            "MESHRT_STATE_DIR": str(tmp_path / "state"),
            "MESHRT_DATABASE_URL": database_url,
            "MESHRT_UPSTREAM_URL": sim.url,
            "OPENAI_API_KEY": OPERATOR_KEY,
            "MESHRT_PORT": "0",
            "MESHRT_PRICING_FILE": str(prices),
        }
    )
    err = tmp_path / "serve.err"
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshrt.supervisor.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(err, "wb"),
    )
    try:
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = err.read_text()
    assert code == EXIT_CHILD_CRASH_LOOP, log[-3000:]
    assert "crash loop" in log and "front door died 5 times in a row" in log, log[-3000:]
    assert log.count("front door started") == 5 and OPERATOR_KEY not in log
