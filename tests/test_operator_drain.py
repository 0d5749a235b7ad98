"""A drain long enough for an hour-long session (docs/operations.md, Drain): by default
MESHRT_DRAIN_S is MESHRT_MAX_SESSION_S, readiness fails at once on SIGTERM, a second signal ends
the live sessions now, and `meshrt dev` keeps a short drain for Ctrl-C."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
from conftest import ended_record
from conftest import wait_for
from realtime_client import connect_ws
from realtime_client import expect_closed
from realtime_client import expect_refusal
from realtime_client import recv_json
from realtime_client import recv_until
from realtime_client import run

from meshrt.dev.demo import DEV_DRAIN_S
from meshrt.dev.demo import dev_drain_s
from meshrt.shared.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_drain_defaults_to_the_longest_session():
    assert load_settings({}).drain_s == 3600 == load_settings({}).max_session_s
    assert load_settings({"MESHRT_MAX_SESSION_S": "900"}).drain_s == 900
    assert load_settings({"MESHRT_MAX_SESSION_S": "900", "MESHRT_DRAIN_S": "40"}).drain_s == 40
    assert load_settings({"MESHRT_DRAIN_S": ""}).drain_s == 3600  # empty: unset


def test_dev_keeps_a_short_drain_unless_told():
    assert dev_drain_s(load_settings({}), {}) == DEV_DRAIN_S == 30
    assert dev_drain_s(load_settings({"MESHRT_DRAIN_S": "120"}), {"MESHRT_DRAIN_S": "120"}) == 120
    assert dev_drain_s(load_settings({"MESHRT_MAX_SESSION_S": "10"}), {}) == 10  # never longer than a session


def test_default_drain_keeps_sessions_and_a_second_signal_ends_them(gateway_factory, tenant, engine):
    gw = gateway_factory(MESHRT_DRAIN_S="")  # conftest's 5 s removed: the default, an hour

    async def go():
        async with connect_ws(gw.ws_url, key=tenant.key) as ws:
            await recv_json(ws)
            gw.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            wait_for(lambda: httpx.get(f"{gw.http_url}/readyz").status_code == 503, 5, 0.01, "not ready")
            not_ready_after = time.monotonic() - signalled
            refused = await expect_refusal(gw.ws_url, key=tenant.key)
            time.sleep(6)  # longer than any drain the tests used to run with: still live
            await ws.send(json.dumps({"type": "response.create"}))
            await recv_until(ws, "response.done")
            assert gw.proc.poll() is None
            gw.proc.send_signal(signal.SIGTERM)  # the operator will not wait the hour
            cut = time.monotonic()
            events = await expect_closed(ws, 15)
            return not_ready_after, refused, events[-1], ws.close_code, time.monotonic() - cut, ws.response

    not_ready_after, refused, last, code, ended_after, response = run(go(), 60)
    assert not_ready_after < 1.0, not_ready_after
    assert refused[0]["error"]["code"] == "server_shutting_down" and refused[1] == 1012
    assert last["error"]["code"] == "server_shutting_down" and code == 1012
    assert ended_after < 5, ended_after
    assert gw.proc.wait(20) == 0
    record = ended_record(engine, response.headers["x-request-id"])
    assert record.end_reason == "server_shutting_down" and record.responses == 1 and record.cost_pico > 0
    assert '"drain_s": 3600' in gw.log_text()


def test_systemd_unit_lets_the_drain_finish():
    """deploy/meshrt.service: SIGTERM to the supervisor only (a worker dies on SIGTERM: systemd's
    default KillMode would cut every call), and a stop timeout that covers the drain."""
    unit = (ROOT / "deploy" / "meshrt.service").read_text()
    options = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    assert options["KillSignal"] == "SIGTERM" and options["KillMode"] == "mixed"
    settings = load_settings({})
    assert int(options["TimeoutStopSec"]) >= settings.drain_s + settings.drain_usage_s + 20
