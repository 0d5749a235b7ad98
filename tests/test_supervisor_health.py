"""A supervisor never lingers half-dead: a task that fails takes it down with a non-zero exit
(its restarter takes over), and its front door tells a stalled or vanished supervisor apart
from a healthy one within about a second, in /healthz and /readyz."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
from conftest import start_gateway
from conftest import wait_for


def test_a_failing_supervisor_task_exits_nonzero_and_takes_its_front_door_down(tmp_path, database_url, sim):
    gateway = start_gateway(tmp_path, database_url, sim.url)
    frontdoor = gateway.frontdoor_pid()
    children = gateway.children()
    # A real fault in one of the supervisor's tasks: its metrics file cannot be replaced
    metrics = gateway.state_dir / "run" / "metrics.json"
    metrics.unlink(missing_ok=True)
    metrics.mkdir()
    try:
        code = gateway.proc.wait(15)
    finally:
        if gateway.proc.poll() is None:
            gateway.proc.kill()
    assert code == 70, gateway.log_text()[-3000:]
    assert "supervisor failed; exiting" in gateway.log_text()
    _, alive = psutil.wait_procs([c for c in children if c.pid == frontdoor], timeout=10)
    assert not alive
    assert not psutil.pid_exists(frontdoor) or psutil.Process(frontdoor).status() == psutil.STATUS_ZOMBIE


def test_front_door_reports_a_stalled_supervisor_within_a_second(gateway_factory):
    gateway = gateway_factory()
    assert httpx.get(f"{gateway.http_url}/healthz", timeout=5).status_code == 200
    os.kill(gateway.proc.pid, signal.SIGSTOP)  # alive, but answering nothing: a wedge
    try:
        began = time.monotonic()
        health = httpx.get(f"{gateway.http_url}/healthz", timeout=5)
        took = time.monotonic() - began
        ready = httpx.get(f"{gateway.http_url}/readyz", timeout=5)
    finally:
        os.kill(gateway.proc.pid, signal.SIGCONT)
    assert health.status_code == 503 and "supervisor not answering" in health.json()["error"]["message"]
    assert took < 1.5, took
    assert ready.status_code == 503 and "supervisor not answering" in ready.json()["error"]["message"]
    wait_for(
        lambda: httpx.get(f"{gateway.http_url}/readyz", timeout=5).status_code == 200,
        10,
        what="readiness after the supervisor resumed",
    )
    assert httpx.get(f"{gateway.http_url}/healthz", timeout=5).status_code == 200


def test_a_clean_stop_leaves_the_node_left_not_rejoined(gateway_factory, engine):
    """A renewal racing the stop used to read the node's own `left` as "declared lost" and join
    again: a ghost node that others then reaped. Short leases make the race likely."""
    from sqlmodel import Session

    from meshrt.storage.db import Node

    for _ in range(8):
        gateway = gateway_factory(MESHRT_NODE_LEASE_S="0.4")
        node_id = (gateway.state_dir / "node_id").read_text().strip()
        time.sleep(0.5)  # a few renewals
        with Session(engine) as db:
            before = db.get(Node, node_id).incarnation
        gateway.proc.send_signal(signal.SIGTERM)
        assert gateway.proc.wait(20) == 0
        with Session(engine) as db:
            row = db.get(Node, node_id)
            assert (row.state, row.incarnation) == ("left", before), gateway.log_text()[-2000:]
