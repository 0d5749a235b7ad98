"""The warm pool sizes itself and /metrics shows it (docs/operations.md, Warm pool): idle workers,
the target, the workers' memory as PSS (read through the fd each worker sends of its own
smaps_rollup: workers are non-dumpable), real processes; and the zygote's retirement, in-process."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import wait_for
from realtime_client import connect_ws
from realtime_client import recv_json
from realtime_client import run

from meshrt.shared import control
from meshrt.worker.zygote import RETIRE_INTERVAL_S
from meshrt.worker.zygote import Zygote


def gauges(gw) -> dict[str, float]:
    text = httpx.get(f"{gw.http_url}/metrics", timeout=5).text
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line and not line.startswith("#") and "{" not in line
    }


def test_metrics_show_the_pool_and_the_workers_pss_and_a_burst_grows_the_pool(gateway_factory, make_tenant):
    gw = gateway_factory(MESHRT_WARM_WORKERS_MIN="1", MESHRT_WARM_WORKERS_MAX="8")
    tenant = make_tenant(max_concurrent_sessions=50)
    at_rest = wait_for(
        lambda: (g := gauges(gw))["meshrt_workers_pss_bytes"] > 0 and g["meshrt_warm_workers"] == 1 and g,
        15,
        0.2,
        "the pool's first memory reading",
    )

    async def one() -> None:
        async with connect_ws(gw.ws_url, key=tenant.key) as ws:
            await recv_json(ws)

    async def go():
        async with connect_ws(gw.ws_url, key=tenant.key) as held:
            await recv_json(held)
            with_session = wait_for(
                lambda: (
                    (g := gauges(gw))["meshrt_live_sessions"] == 1
                    and g["meshrt_workers"] == 1 + g["meshrt_warm_workers"]
                    and g["meshrt_workers_pss_bytes"] > g["meshrt_warm_workers_pss_bytes"]
                    and g
                ),
                15,
                0.2,
                "the session's worker counted",
            )
        for _ in range(3):  # a burst: 24 sessions within about a second
            await asyncio.gather(*(one() for _ in range(8)))
        return with_session

    with_session = run(go(), 60)
    grown = wait_for(
        lambda: (g := gauges(gw))["meshrt_warm_workers_target"] > 1 and g["meshrt_warm_workers"] > 1 and g,
        10,
        0.2,
        "the pool to grow after the burst",
    )
    print(
        f"\nat rest: {at_rest['meshrt_warm_workers']:.0f} idle, PSS {at_rest['meshrt_workers_pss_bytes'] / 2**20:.1f}"
        f" MiB; one session: {with_session['meshrt_workers']:.0f} workers,"
        f" PSS {with_session['meshrt_workers_pss_bytes'] / 2**20:.1f} MiB"
        f" ({with_session['meshrt_warm_workers_pss_bytes'] / 2**20:.1f} MiB idle); after the burst:"
        f" {grown['meshrt_session_arrival_rate']:.1f}/s, target {grown['meshrt_warm_workers_target']:.0f},"
        f" {grown['meshrt_warm_workers']:.0f} idle; set-up {grown['meshrt_warm_worker_setup_seconds'] * 1000:.0f} ms"
    )
    assert at_rest["meshrt_warm_workers_target"] == 1 and at_rest["meshrt_workers"] == 1
    assert at_rest["meshrt_memory_available_bytes"] > 0
    session_pss = with_session["meshrt_workers_pss_bytes"] - with_session["meshrt_warm_workers_pss_bytes"]
    assert session_pss > 1024 * 1024  # the session's worker, counted
    assert 0 < grown["meshrt_warm_worker_setup_seconds"] < 5
    assert grown["meshrt_warm_workers_target"] <= 8


def test_idle_workers_above_the_target_retire_one_a_second():
    channel, supervisor_end = control.seqpacket_pair()
    zygote = Zygote(channel, 1, 8)
    workers = {}
    for pid in (101, 102, 103):  # stand-ins for idle workers: our ends and theirs
        ours, theirs = control.seqpacket_pair()
        zygote.idle[pid] = ours
        workers[pid] = theirs
    zygote.warm = 1
    zygote._retire(100.0)
    assert list(zygote.idle) == [102, 103]  # the oldest first
    zygote._retire(100.0 + RETIRE_INTERVAL_S / 2)
    assert len(zygote.idle) == 2  # not yet
    zygote._retire(100.0 + RETIRE_INTERVAL_S)
    zygote._retire(100.0 + 2 * RETIRE_INTERVAL_S)
    assert list(zygote.idle) == [103]  # down to the target, and no further
    for pid in (101, 102):
        with socket.socket(fileno=workers[pid].detach()) as theirs:
            assert theirs.recv(10) == b""  # EOF: a pool worker exits on it
    status = zygote._status()
    assert (status.idle, status.target) == (1, 1)
    assert control.decode(control.encode(status)) == status
    for sock in (*zygote.idle.values(), workers[103], channel, supervisor_end):
        sock.close()


def test_only_workers_up_to_the_floor_rehearse_and_a_burst_keeps_the_rehearsed_ones():
    channel, supervisor_end = control.seqpacket_pair()
    zygote = Zygote(channel, 2, 8)
    forks = []
    next_pid = iter(range(200, 300))

    def fork_idle(rehearse, preconnect_ahead=None):  # records the decision; a stand-in joins the pool
        pid = next(next_pid)
        forks.append((pid, rehearse, preconnect_ahead))
        zygote.idle[pid], _ = control.seqpacket_pair()
        if not rehearse:
            zygote.plain.add(pid)

    zygote._fork_idle = fork_idle
    zygote.warm = 5
    assert zygote._refill() is None  # a quiet node: nothing handed out lately
    assert forks == [(200, True, True), (201, True, True), (202, False, True), (203, False, True), (204, False, True)]
    assert zygote.plain == {202, 203, 204}
    assert zygote._next_idle() == 201  # the newest rehearsed worker takes the next session
    zygote.idle.pop(201), zygote.idle.pop(200)  # two sessions took the rehearsed ones
    zygote.idle.pop(204), zygote.idle.pop(203), zygote.idle.pop(202)  # and a burst the rest
    zygote.plain.clear()
    forks.clear()
    zygote.last_spawn = time.monotonic()  # a session was handed out just now: one worker at once
    assert zygote._refill() > 0  # the rest after the refill delay
    assert forks == [(205, False, False)]  # no rehearsal, no connect ahead: its Spawn is due now
    zygote.last_spawn -= 1  # the burst is over
    assert zygote._refill() is None
    assert forks[1:] == [(206, True, True), (207, False, True), (208, False, True), (209, False, True)]
    zygote.warm = 2
    for i in range(3):
        zygote._retire(1000.0 + i * RETIRE_INTERVAL_S)
    assert list(zygote.idle) == [206, 209]  # the plain ones retire first, the oldest of them first
    assert zygote._next_idle() == 206  # the rehearsed one, though older
    for sock in (*zygote.idle.values(), channel, supervisor_end):
        sock.close()


FAKE_KUBECTL = r"""#!{python}
import json, pathlib, sys, urllib.request
state = pathlib.Path({state!r})
args = sys.argv[1:]
if "--raw" in args:
    pod = args[args.index("--raw") + 1].split("/pods/")[1].split(":")[0]
    if pod != "meshrt-a":
        sys.exit(1)  # a pod that does not answer
    sys.stdout.write(urllib.request.urlopen({metrics!r}).read().decode())
elif "pods" in args:
    print("meshrt-a meshrt-b")
elif "annotate" in args:
    with open(state / "annotations", "a") as f:
        f.write(" ".join(args[args.index("pod") + 1 :]) + "\n")
    (state / "current").write_text(args[-1].split("=", 1)[1])
elif "pod" in args:
    print((state / "current").read_text() if (state / "current").exists() else "", end="")
"""


def test_pod_deletion_cost_script_annotates_pods_with_their_live_sessions(gateway_factory, make_tenant, tmp_path):
    gw = gateway_factory()
    tenant = make_tenant(max_concurrent_sessions=10)
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(
        FAKE_KUBECTL.format(python=sys.executable, state=str(tmp_path), metrics=f"{gw.http_url}/metrics")
    )
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IEXEC)
    script = Path(__file__).resolve().parent.parent / "deploy" / "pod-deletion-cost.sh"
    env = {**os.environ, "KUBECTL": str(kubectl), "ONCE": "1", "STEP": "1", "NAMESPACE": "calls"}

    async def go():
        async with connect_ws(gw.ws_url, key=tenant.key) as a, connect_ws(gw.ws_url, key=tenant.key) as b:
            await recv_json(a)
            await recv_json(b)
            wait_for(lambda: gauges(gw)["meshrt_live_sessions"] == 2, 10, 0.2, "two live sessions")
            for _ in range(2):  # the second pass finds the cost written already
                subprocess.run(["sh", str(script)], env=env, check=True, timeout=30)

    run(go(), 60)
    assert (tmp_path / "annotations").read_text() == "meshrt-a controller.kubernetes.io/pod-deletion-cost=2\n"


def test_the_pool_grows_by_one_per_arrival_at_most_and_not_between_arrivals():
    channel, supervisor_end = control.seqpacket_pair()
    zygote = Zygote(channel, 1, 8)
    for i in range(40):  # 20/s for 2 s
        zygote.arrivals.arrived(i / 20)
    zygote.setup.add(0.5)  # a slow fork and rehearsal: the rule wants the ceiling
    zygote._size(2.0)
    assert zygote.warm == 1  # no arrival: no growth
    sizes = []
    for i in range(10):
        zygote.arrivals.arrived(2.0 + i / 20)
        zygote._size(2.0 + i / 20, arriving=True)
        sizes.append(zygote.warm)
    assert sizes == [2, 3, 4, 5, 6, 7, 8, 8, 8, 8]
    zygote._size(600.0)  # ten quiet minutes: back to the floor (retired one a second by _retire)
    assert zygote.warm == 1
    channel.close()
    supervisor_end.close()


NOT_DUMPABLE_CHILD = r"""
import os, socket, time
from meshrt.shared import control, sandbox
from meshrt.worker import pool
from meshrt.worker.zygote import _report_memory
ours, theirs = control.seqpacket_pair()
pid = os.fork()
if pid == 0:
    sandbox.set_nondumpable()  # as every worker is
    _report_memory(theirs)
    time.sleep(5)
    os._exit(0)
message, fds = control.recv(ours)  # sent once the child is non-dumpable
try:
    open(f"/proc/{pid}/smaps_rollup").read()
    print("direct: readable")
except PermissionError:
    print("direct: refused")
print("message:", type(message).__name__, message.pid == pid)
print("pss:", pool.pss_bytes(os.pread(fds[0], 4096, 0)) > 0)
os.kill(pid, 9)
"""


def test_a_non_dumpable_workers_memory_is_read_through_the_fd_it_sends():
    """Why workers send an fd: as an ordinary user (uid 10001 in the image), no other process,
    the zygote included, may open a non-dumpable process's smaps_rollup; the fd it opened itself
    reads fine anywhere."""
    if os.getuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run the check as another user")
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", NOT_DUMPABLE_CHILD],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["direct: refused", "message: WorkerMemory True", "pss: True"], done.stdout
