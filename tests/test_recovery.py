"""Crash containment and recovery with real processes: a killed worker, a killed supervisor
that comes back, sessions ending while nobody supervises — no usage lost, none counted twice."""

from __future__ import annotations

import asyncio
import json
import os
import signal

from conftest import ended_record
from conftest import wait_for
from realtime_client import connect_ws
from realtime_client import expect_closed
from realtime_client import recv_json
from realtime_client import recv_until
from realtime_client import run
from sqlmodel import Session
from sqlmodel import select

from meshrt.shared.money import Money
from meshrt.storage.db import Account
from meshrt.storage.db import SessionRecord


def live_pid(engine, request_id: str) -> int:
    def find():
        with Session(engine) as db:
            row = db.exec(select(SessionRecord).where(SessionRecord.request_id == request_id)).first()
            return row.pid if row is not None and row.state == "live" and row.pid else None

    return wait_for(find, 10, 0.05, "a live worker")


def balance(engine, account_id: str) -> Money:
    with Session(engine) as db:
        return Money(db.get(Account, account_id).balance_pico)


async def respond(ws) -> dict:
    await ws.send(json.dumps({"type": "response.create"}))
    events = await recv_until(ws, "response.done", 20)
    return events[-1]["response"]["usage"]


def test_killed_worker_is_billed_for_everything_it_spooled(gateway, tenant, engine):
    start = balance(engine, tenant.account_id)

    async def go():
        async with connect_ws(gateway.ws_url, key=tenant.key, query="sim_response_ms=200") as ws:
            await recv_json(ws)
            usages = [await respond(ws), await respond(ws)]
            request_id = ws.response.headers["x-request-id"]
            os.kill(live_pid(engine, request_id), signal.SIGKILL)
            await expect_closed(ws, 10)
            return usages, request_id

    usages, request_id = run(go())
    row = ended_record(engine, request_id)
    assert row.end_reason == "internal_error" and row.responses == 2
    assert row.usage["total_tokens"] == sum(u["total_tokens"] for u in usages)
    assert start - balance(engine, tenant.account_id) == Money(row.cost_pico) and row.cost_pico > 0


def test_supervisor_killed_and_restarted_loses_and_doubles_nothing(gateway_factory, tenant, engine):
    first = gateway_factory()
    start = balance(engine, tenant.account_id)

    async def go():
        conns = [
            await connect_ws(first.ws_url, key=tenant.key, query="sim_response_ms=150").__aenter__() for _ in range(3)
        ]
        seen = {}
        for ws in conns:
            await recv_json(ws)
            seen[ws] = [await respond(ws)]
        os.kill(first.proc.pid, signal.SIGKILL)  # the supervisor: its front door and zygote follow
        first.proc.wait(10)
        for ws in conns:  # relaying goes on unsupervised; usage goes to the spool only
            seen[ws].append(await respond(ws))
        second = gateway_factory(state=first.state_dir)
        for ws in conns:
            seen[ws].append(await respond(ws))
        await conns[0].close()
        for ws in conns[1:]:
            await ws.close()
        return [(ws.response.headers["x-request-id"], usages) for ws, usages in seen.items()], second

    sessions, second = run(go(), 90)
    total = Money(0)
    for request_id, usages in sessions:
        row = ended_record(engine, request_id)
        assert row.end_reason == "client_closed" and row.responses == 3
        assert row.usage["total_tokens"] == sum(u["total_tokens"] for u in usages)
        total += Money(row.cost_pico)
    assert start - balance(engine, tenant.account_id) == total
    assert "worker re-attached" in second.log_text()


def test_session_that_ends_while_unsupervised_keeps_its_end_and_usage(gateway_factory, tenant, engine):
    first = gateway_factory()

    async def go():
        ws = await connect_ws(first.ws_url, key=tenant.key, query="sim_response_ms=150").__aenter__()
        await recv_json(ws)
        usage = await respond(ws)
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
        usage2 = await respond(ws)
        await ws.close()
        return ws.response.headers["x-request-id"], [usage, usage2]

    request_id, usages = run(go(), 60)
    gateway_factory(state=first.state_dir)
    row = ended_record(engine, request_id, 30)
    assert row.end_reason == "client_closed" and row.close_code == 1000 and row.responses == 2
    assert row.usage["total_tokens"] == sum(u["total_tokens"] for u in usages)


def test_a_response_asked_while_no_supervisor_runs_waits_for_the_next_one(gateway_factory, tenant, engine):
    """The session's first response.create needs a reservation; the supervisor is dead when it
    comes. The worker holds it while it re-attaches (the node's lease bounds that), sends its
    Reserve again to the supervisor that comes back, and the response runs: longer without a
    supervisor than a Reserve's own deadline (5 s) is no reason to refuse it."""
    # a worker with no supervisor ends its session after half the lease: 20 s here, so a slow
    # start of the second supervisor on a loaded machine still finds the worker
    lease = {"MESHRT_NODE_LEASE_S": "40"}
    first = gateway_factory(**lease)

    async def go():
        ws = await connect_ws(first.ws_url, key=tenant.key, query="sim_response_ms=150").__aenter__()
        await recv_json(ws)
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
        await ws.send(json.dumps({"type": "response.create"}))
        await asyncio.sleep(6.0)  # past RESERVE_WAIT_S (5 s), well within the worker's fence
        second = gateway_factory(state=first.state_dir, **lease)
        events = await recv_until(ws, "response.done", 20)
        assert not [e for e in events if e["type"] == "error"], events
        await ws.close()
        return ws.response.headers["x-request-id"], events[-1]["response"]["usage"], second

    request_id, usage, second = run(go(), 60)
    row = ended_record(engine, request_id, 30)
    assert row.end_reason == "client_closed" and row.responses == 1
    assert row.usage["total_tokens"] == usage["total_tokens"]
    assert "worker re-attached" in second.log_text()
