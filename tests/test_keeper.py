"""`meshrt serve --keep` (supervisor/keeper.py), the image's command: a supervisor SIGKILLed
mid-session is started again on the same port, the session's worker (orphaned, re-parented to
the keeper) relays on and re-attaches, and the record is exact; a stop signal drains and ends
the keeper; a refusal that would recur is not retried."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import psutil
from conftest import _stop
from conftest import ended_record
from conftest import start_gateway
from conftest import wait_for
from realtime_client import connect_ws
from realtime_client import recv_json
from realtime_client import recv_until
from realtime_client import run

from meshrt.supervisor.keeper import should_restart


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def supervisors(keeper_pid: int) -> list[psutil.Process]:
    return [
        c
        for c in psutil.Process(keeper_pid).children()
        if "meshrt.supervisor.cli" in " ".join(c.cmdline()) and c.status() != psutil.STATUS_ZOMBIE
    ]


def test_a_killed_supervisor_is_started_again_and_its_session_goes_on(tmp_path, database_url, sim, tenant, engine):
    port = free_port()
    gw = start_gateway(tmp_path, database_url, sim.url, command=("serve", "--keep"), MESHRT_PORT=str(port))
    try:
        first = wait_for(lambda: supervisors(gw.proc.pid), 10, 0.05, "the keeper's supervisor")[0]

        async def go():
            async with connect_ws(f"ws://127.0.0.1:{port}/v1/realtime", key=tenant.key) as ws:
                await recv_json(ws)
                await ws.send(json.dumps({"type": "response.create"}))
                await recv_until(ws, "response.done")
                first.kill()  # SIGKILL: no drain, no goodbye
                first.wait(10)
                await ws.send(json.dumps({"type": "response.create"}))  # the worker relays on alone
                await recv_until(ws, "response.done")
                wait_for(lambda: "worker re-attached" in gw.log_text(), 20, 0.1, "the worker to re-attach")
                await ws.send(json.dumps({"type": "response.create"}))
                await recv_until(ws, "response.done")
                return ws.response.headers["x-request-id"]

        request_id = run(go(), 60)
        row = ended_record(engine, request_id)
        assert row.end_reason == "client_closed" and row.responses == 3 and row.cost_pico > 0
        second = supervisors(gw.proc.pid)
        assert len(second) == 1 and second[0].pid != first.pid
        assert "supervisor died; starting a new one" in gw.log_text()
        gw.proc.send_signal(signal.SIGTERM)  # the keeper passes it on: a drain, then it ends too
        assert gw.proc.wait(30) == 0
    finally:
        _stop(gw.proc)


def test_a_refusal_that_would_recur_is_not_retried(tmp_path):
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "meshrt.supervisor.cli", "serve", "--keep"],
        env={"MESHRT_STATE_DIR": str(tmp_path), "MESHRT_WORKER_UIDS": "nonsense", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "MESHRT_WORKER_UIDS" in done.stderr
    assert time.monotonic() - began < 10


def test_what_is_restarted():
    assert should_restart(70, stopping=False, recent_starts=1)  # a supervisor task failed
    assert should_restart(-9, stopping=False, recent_starts=1)  # killed
    assert not should_restart(0, stopping=False, recent_starts=1)  # a clean exit
    assert not should_restart(-15, stopping=True, recent_starts=1)  # told to stop
    assert not should_restart(78, stopping=False, recent_starts=1)  # sandbox required, missing
    assert not should_restart(70, stopping=False, recent_starts=5)  # a crash loop
