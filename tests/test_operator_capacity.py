"""A full node tells its load balancer (docs/operations.md, Health): `/readyz` turns 503 while the
live sessions fill `MESHRT_MAX_SESSIONS`, and 200 again as soon as one ends; `/metrics` shows the
live sessions and the capacity. Real processes: the simulator and `meshrt serve`."""

from __future__ import annotations

import time

import httpx
from conftest import wait_for
from realtime_client import connect_ws
from realtime_client import expect_refusal
from realtime_client import recv_json
from realtime_client import run


def gauge(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_readyz_is_503_while_the_node_is_full_and_200_once_a_slot_frees(gateway_factory, make_tenant):
    gw = gateway_factory(MESHRT_MAX_SESSIONS="2")
    tenant = make_tenant(max_concurrent_sessions=5)

    def readyz() -> httpx.Response:
        return httpx.get(f"{gw.http_url}/readyz", timeout=5)

    async def go():
        assert readyz().status_code == 200
        async with connect_ws(gw.ws_url, key=tenant.key) as first:
            await recv_json(first)
            assert readyz().status_code == 200  # one of two
            async with connect_ws(gw.ws_url, key=tenant.key) as second:
                await recv_json(second)
                full = readyz()
                refused = await expect_refusal(gw.ws_url, key=tenant.key)
                metrics = wait_for(
                    lambda: (
                        (t := httpx.get(f"{gw.http_url}/metrics", timeout=5).text)
                        and gauge(t, "meshrt_live_sessions") == 2
                        and t
                    ),
                    5,
                    0.1,
                    "metrics to show two live sessions",
                )
                closed_at = time.monotonic()
            wait_for(lambda: readyz().status_code == 200, 5, 0.01, "ready again")
            ready_after = time.monotonic() - closed_at
        return full, refused, metrics, ready_after

    full, refused, metrics, ready_after = run(go(), 60)
    assert full.status_code == 503, full.text
    assert full.json()["error"]["message"] == "at capacity (2 of 2 sessions)"
    assert refused[0]["error"]["code"] == "server_at_capacity"
    assert gauge(metrics, "meshrt_live_sessions") == 2 and gauge(metrics, "meshrt_max_sessions") == 2
    print(f"\n/readyz 200 again {ready_after * 1000:.0f} ms after the client closed its session")
    assert ready_after < 2, ready_after
    assert readyz().status_code == 200 and gw.proc.poll() is None
