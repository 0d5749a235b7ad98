"""SIGTERM drain: new sessions refused with server_shutting_down, live ones run up to
MESHRT_DRAIN_S, then are ended and billed, and the supervisor exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
from conftest import wait_for
from realtime_client import connect_ws
from realtime_client import expect_closed
from realtime_client import expect_refusal
from realtime_client import recv_json
from realtime_client import recv_until
from realtime_client import run
from sqlmodel import Session
from sqlmodel import select

from meshrt.shared.errors import ERRORS
from meshrt.storage.db import SessionRecord


def test_drain_refuses_new_sessions_then_ends_live_ones_and_exits_cleanly(gateway_factory, tenant, engine):
    gw = gateway_factory(MESHRT_DRAIN_S="2")

    async def go():
        async with connect_ws(gw.ws_url, key=tenant.key, query="sim_response_ms=200") as ws:
            await recv_json(ws)
            gw.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: httpx.get(f"{gw.http_url}/readyz").status_code == 503, 5, 0.05, "not ready")
            refused = await expect_refusal(gw.ws_url, key=tenant.key)
            began = time.monotonic()
            await ws.send(json.dumps({"type": "response.create"}))  # the live one still works
            await recv_until(ws, "response.done")
            events = await expect_closed(ws, 15)
            return refused, events[-1], ws.close_code, time.monotonic() - began, ws.response.headers["x-request-id"]

    refused, last, code, waited, request_id = run(go(), 60)
    spec = ERRORS["server_shutting_down"]
    assert refused[0]["error"]["code"] == "server_shutting_down" and refused[1] == spec.close_code == 1012
    assert last["error"]["code"] == "server_shutting_down" and code == 1012
    assert waited < 10
    assert gw.proc.wait(20) == 0
    with Session(engine) as db:
        row = db.exec(select(SessionRecord).where(SessionRecord.request_id == request_id)).one()
    assert row.state == "ended" and row.end_reason == "server_shutting_down" and row.responses == 1
    assert row.cost_pico > 0


def test_drain_exits_as_soon_as_sessions_finish(gateway_factory, tenant):
    gw = gateway_factory(MESHRT_DRAIN_S="30")

    async def go():
        async with connect_ws(gw.ws_url, key=tenant.key) as ws:
            await recv_json(ws)
            gw.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
        began = time.monotonic()
        return began

    began = run(go())
    assert gw.proc.wait(15) == 0
    assert time.monotonic() - began < 10
