"""Soak: a thousand-odd sessions opened and closed — a third politely, a third abruptly after
the handshake, a third vanishing mid-response — then the supervisor and the front door are back
to their baseline (fds, children, memory) and every admitted session has exactly one record."""

from __future__ import annotations

import asyncio
import json
import random

import psutil
from conftest import wait_for
from realtime_client import connect_ws
from realtime_client import recv_json
from realtime_client import run
from sqlalchemy import func
from sqlmodel import Session
from sqlmodel import select

from meshrt.storage.db import SessionRecord

SESSIONS = 1200
CONCURRENCY = 24


def snapshot(gateway) -> dict:
    supervisor = psutil.Process(gateway.proc.pid)
    frontdoor = psutil.Process(gateway.frontdoor_pid())
    return {
        "supervisor_fds": supervisor.num_fds(),
        "frontdoor_fds": frontdoor.num_fds(),
        "supervisor_rss": supervisor.memory_info().rss,
        "frontdoor_rss": frontdoor.memory_info().rss,
        "descendants": len(gateway.children()),
    }


async def one_session(url: str, key: str, style: int, ids: list[str]) -> None:
    ws = await connect_ws(url, key=key, query="sim_response_ms=300").__aenter__()
    ids.append(ws.response.headers["x-request-id"])
    await recv_json(ws)
    if style == 0:
        await ws.close()
    elif style == 1:
        ws.transport.abort()
    else:
        await ws.send(json.dumps({"type": "response.create"}))
        await recv_json(ws)  # response.created: now vanish mid-response
        ws.transport.abort()


async def soak(url: str, key: str, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    ids: list[str] = []
    gate = asyncio.Semaphore(CONCURRENCY)

    async def bounded(style: int):
        async with gate:
            await one_session(url, key, style, ids)

    await asyncio.gather(*(bounded(rng.randrange(3)) for _ in range(count)))
    return ids


def settled(engine, account_id: str) -> bool:
    with Session(engine) as db:
        return (
            db.exec(
                select(func.count())
                .select_from(SessionRecord)
                .where(SessionRecord.account_id == account_id, SessionRecord.state != "ended")
            ).one()
            == 0
        )


def test_soak_returns_to_baseline_with_one_record_per_session(gateway_factory, make_tenant, engine):
    # a fixed pool: the baseline counts its workers (a sized pool follows the arrivals, and the
    # soak's arrivals move its target; tests/test_operator_pool.py covers sizing)
    gw = gateway_factory(MESHRT_MAX_CONCURRENT_SESSIONS="100", MESHRT_DRAIN_USAGE_S="0.5", MESHRT_WARM_WORKERS="4")
    tenant = make_tenant(balance="1000", max_concurrent_sessions=5000)
    warm = run(soak(gw.ws_url, tenant.key, 60, seed=1), 120)
    wait_for(lambda: settled(engine, tenant.account_id), 30, 0.1, "warm-up sessions to settle")
    idle = 2 + int(gw.env.get("MESHRT_WARM_WORKERS", "4"))  # front door, zygote, its warm pool
    wait_for(lambda: snapshot(gw)["descendants"] == idle, 30, 0.1, "only front door, zygote and pool")
    baseline = snapshot(gw)

    ids = run(soak(gw.ws_url, tenant.key, SESSIONS, seed=2), 600)
    assert len(ids) == SESSIONS
    wait_for(lambda: settled(engine, tenant.account_id), 60, 0.1, "every session to be finalised")
    wait_for(lambda: snapshot(gw)["descendants"] == idle, 30, 0.1, "every session's worker to exit")
    after = wait_for(
        lambda: (
            (s := snapshot(gw))["supervisor_fds"] <= baseline["supervisor_fds"]
            and s["frontdoor_fds"] <= baseline["frontdoor_fds"]
            and s
        ),
        20,
        0.1,
        "fds back to baseline",
    )
    assert after["supervisor_rss"] - baseline["supervisor_rss"] < 24 * 2**20, (baseline, after)
    assert after["frontdoor_rss"] - baseline["frontdoor_rss"] < 24 * 2**20, (baseline, after)
    with Session(engine) as db:
        rows = db.exec(
            select(SessionRecord.request_id, SessionRecord.end_reason).where(
                SessionRecord.account_id == tenant.account_id
            )
        ).all()
    by_request = {}
    for request_id, end_reason in rows:
        by_request.setdefault(request_id, []).append(end_reason)
    assert set(by_request) == set(ids) | set(warm)
    assert all(len(reasons) == 1 for reasons in by_request.values())
    reasons = [r[0] for r in by_request.values()]
    assert set(reasons) <= {"client_closed"}, {r: reasons.count(r) for r in set(reasons)}
