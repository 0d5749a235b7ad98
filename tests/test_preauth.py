"""Pre-authorised responses end to end (docs/billing.md): a response starts only once what it
may cost is reserved against the account's balance, on every node; one the balance cannot cover
is refused in-band and the session stays open; the overdraft of many parallel sessions stays
at zero, and billing stays exact."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time

import httpx
from conftest import ended_record
from conftest import wait_for
from realtime_client import connect_ws
from realtime_client import recv_json
from realtime_client import run
from sqlmodel import Session
from sqlmodel import select

from meshrt.shared.money import Money
from meshrt.storage import accounts
from meshrt.storage.db import Account
from meshrt.storage.db import LedgerEntry


def account_row(engine, account_id: str) -> Account:
    with Session(engine) as db:
        return db.get(Account, account_id)


def debits(engine, account_id: str) -> int:
    with Session(engine) as db:
        entries = db.exec(
            select(LedgerEntry).where(LedgerEntry.account_id == account_id, LedgerEntry.kind == "usage")
        ).all()
    return -sum(e.amount_pico for e in entries)


async def ask(ws, event_id: str, max_output_tokens: int | None = None) -> dict:
    """One response.create; the response.done or the error event that answers it."""
    params = {} if max_output_tokens is None else {"response": {"max_output_tokens": max_output_tokens}}
    await ws.send(json.dumps({"type": "response.create", "event_id": event_id, **params}))
    while True:
        event = await recv_json(ws, 30)
        if event["type"] in ("response.done", "error"):
            return event


async def still_open(ws) -> bool:
    """The session answers another event: a refusal did not end it."""
    await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": "x"}}))
    while True:
        event = await recv_json(ws, 10)
        if event["type"] == "session.updated":
            return True


def test_a_response_the_balance_cannot_cover_is_refused_in_band_and_the_session_stays_open(
    gateway, make_tenant, engine
):
    """The issue's case: a balance of $0.000001 and ten parallel sessions each asking for a
    long response. None starts; each gets an insufficient_quota error naming its event and can go
    on; the balance is untouched."""
    poor = make_tenant(balance="0.000001", max_concurrent_sessions=10)

    async def one(i: int):
        async with connect_ws(gateway.ws_url, key=poor.key, query="sim_response_ms=60000") as ws:
            assert (await recv_json(ws))["type"] == "session.created"
            answer = await ask(ws, f"evt_long_{i}")
            return answer, await still_open(ws), ws.response.headers["x-request-id"]

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(10)))

    results = run(all_of_them(), 60)
    for i, (answer, open_after, _) in enumerate(results):
        assert answer["type"] == "error", answer
        error = answer["error"]
        assert (error["type"], error["code"], error["event_id"]) == (
            "insufficient_quota",
            "insufficient_quota",
            f"evt_long_{i}",
        )
        assert "stays open" in error["message"] and "$" in error["message"]
        assert open_after
    rows = [ended_record(engine, request_id) for _, _, request_id in results]
    assert all(row.end_reason == "client_closed" and row.responses == 0 for row in rows)
    account = account_row(engine, poor.account_id)
    assert account.balance_pico == Money.from_usd("0.000001").picodollars
    assert account.reserved_pico == 0


def test_parallel_sessions_draw_a_small_balance_down_without_overdraft(gateway_factory, make_tenant, engine):
    """Ten sessions, each asking for responses until refused: the balance never goes below zero,
    every response served is billed exactly, and nothing stays reserved."""
    gw = gateway_factory(MESHRT_MAX_CONCURRENT_SESSIONS="30")
    poor = make_tenant(balance="0.03")
    start = account_row(engine, poor.account_id).balance_pico
    rng = random.Random(11)

    async def session(i: int):
        await asyncio.sleep(rng.random() * 0.2)
        async with connect_ws(gw.ws_url, key=poor.key, query="sim_response_ms=1000") as ws:
            await recv_json(ws)
            served = 0
            for n in range(50):
                answer = await ask(ws, f"evt_{i}_{n}", max_output_tokens=rng.choice([40, 80, 120]))
                if answer["type"] == "error":
                    assert answer["error"]["code"] == "insufficient_quota", answer
                    break
                served += 1
                assert answer["response"]["usage"]["output_tokens"] <= answer["response"]["max_output_tokens"]
            else:
                raise AssertionError("never refused: the balance should have run out")
            return served, ws.response.headers["x-request-id"]

    async def all_sessions():
        return await asyncio.gather(*(session(i) for i in range(10)))

    results = run(all_sessions(), 120)
    rows = [ended_record(engine, request_id) for _, request_id in results]
    assert sum(served for served, _ in results) == sum(r.responses for r in rows) >= 3
    account = account_row(engine, poor.account_id)
    assert account.balance_pico >= 0, Money(account.balance_pico).usd_str()
    assert start - account.balance_pico == sum(r.cost_pico for r in rows) == debits(engine, poor.account_id)
    assert account.reserved_pico == 0


def test_two_nodes_share_one_balance_without_overdraft(gateway_factory, make_tenant, engine):
    """The reservation is the database's: sessions on two nodes draw on one balance, and the sum
    of what both served never passes it."""
    a = gateway_factory(MESHRT_MAX_CONCURRENT_SESSIONS="30")
    b = gateway_factory(MESHRT_MAX_CONCURRENT_SESSIONS="30")
    poor = make_tenant(balance="0.02")
    start = account_row(engine, poor.account_id).balance_pico

    async def session(gw, i: int):
        async with connect_ws(gw.ws_url, key=poor.key, query="sim_response_ms=800") as ws:
            await recv_json(ws)
            for n in range(50):
                answer = await ask(ws, f"evt_{i}_{n}", max_output_tokens=60)
                if answer["type"] == "error":
                    assert answer["error"]["code"] == "insufficient_quota", answer
                    return ws.response.headers["x-request-id"]
            raise AssertionError("never refused")

    async def all_sessions():
        return await asyncio.gather(*(session(a if i % 2 else b, i) for i in range(8)))

    request_ids = run(all_sessions(), 120)
    rows = [ended_record(engine, r) for r in request_ids]
    assert {r.node for r in rows} == {(gw.state_dir / "node_id").read_text().strip() for gw in (a, b)}
    account = account_row(engine, poor.account_id)
    assert account.balance_pico >= 0, Money(account.balance_pico).usd_str()
    assert start - account.balance_pico == sum(r.cost_pico for r in rows) == debits(engine, poor.account_id)
    assert account.reserved_pico == 0


def test_a_top_up_lets_a_refused_session_go_on(gateway, make_tenant, engine):
    poor = make_tenant(balance="0.000001")

    async def go():
        async with connect_ws(gateway.ws_url, key=poor.key) as ws:
            await recv_json(ws)
            refused = await ask(ws, "evt_before")
            assert refused["type"] == "error" and refused["error"]["code"] == "insufficient_quota"
            accounts.topup(engine, poor.account_id, Money.from_usd("5.00"), "test")
            deadline = time.monotonic() + 10
            while True:  # the worker asks again every second while refused
                answer = await ask(ws, "evt_after")
                if answer["type"] == "response.done" or time.monotonic() > deadline:
                    return answer
                await asyncio.sleep(0.3)

    answer = run(go(), 40)
    assert answer["type"] == "response.done" and answer["response"]["status"] == "completed"


def test_account_shows_reserved_and_available_while_a_response_runs(gateway, make_tenant, engine):
    tenant = make_tenant(balance="10")
    auth = {"Authorization": f"Bearer {tenant.key}"}

    async def go():
        async with connect_ws(gateway.ws_url, key=tenant.key, query="sim_response_ms=3000&sim_pace=1") as ws:
            await recv_json(ws)
            await ws.send(json.dumps({"type": "response.create"}))
            while (await recv_json(ws))["type"] != "response.created":
                pass
            during = httpx.get(f"{gateway.http_url}/v1/account", headers=auth, timeout=10).json()
            await ws.send(json.dumps({"type": "response.cancel"}))
            while (await recv_json(ws))["type"] != "response.done":
                pass
            return during

    during = run(go(), 30)
    reserved, available = Money.from_usd(during["reserved"]), Money.from_usd(during["available"])
    # a response with no output limit is reserved for MESHRT_MAX_RESPONSE_OUTPUT_TOKENS at the
    # highest output rate (gpt-realtime: 4096 × $64/1M = $0.262144), plus its input
    assert reserved.picodollars >= 4096 * 64_000_000
    assert available + reserved == Money.from_usd(during["balance"])
    wait_for(lambda: account_row(engine, tenant.account_id).reserved_pico == 0, 15, what="reservation released")
    after = httpx.get(f"{gateway.http_url}/v1/account", headers=auth, timeout=10).json()
    assert after["reserved"] == "0.00" or Money.from_usd(after["reserved"]).picodollars == 0


def test_many_accounts_at_once_each_stay_within_their_own_balance(gateway_factory, make_tenant, engine):
    """Three accounts, four sessions each, all at once: every account is drawn down to what it
    can pay for and no further, and one account's reservations never take another's room."""
    gw = gateway_factory(MESHRT_MAX_CONCURRENT_SESSIONS="30")
    tenants = [make_tenant(balance=usd) for usd in ("0.006", "0.012", "0.02")]
    starts = {t.account_id: account_row(engine, t.account_id).balance_pico for t in tenants}

    async def session(tenant, i: int):
        async with connect_ws(gw.ws_url, key=tenant.key, query="sim_response_ms=500") as ws:
            await recv_json(ws)
            served = 0
            for n in range(60):
                answer = await ask(ws, f"evt_{i}_{n}", max_output_tokens=30)
                if answer["type"] == "error":
                    assert answer["error"]["code"] == "insufficient_quota", answer
                    return tenant.account_id, served, ws.response.headers["x-request-id"]
                served += 1
            raise AssertionError("never refused")

    async def all_sessions():
        return await asyncio.gather(*(session(t, i) for t in tenants for i in range(4)))

    results = run(all_sessions(), 120)
    for tenant in tenants:
        mine = [r for r in results if r[0] == tenant.account_id]
        rows = [ended_record(engine, request_id) for _, _, request_id in mine]
        account = account_row(engine, tenant.account_id)
        assert sum(served for _, served, _ in mine) == sum(r.responses for r in rows) >= 1
        assert account.balance_pico >= 0, Money(account.balance_pico).usd_str()
        assert starts[tenant.account_id] - account.balance_pico == sum(r.cost_pico for r in rows)
        assert account.reserved_pico == 0
    served = {t.account_id: sum(s for a, s, _ in results if a == t.account_id) for t in tenants}
    # a bigger balance buys more responses: each account spent its own, not another's
    assert served[tenants[0].account_id] < served[tenants[2].account_id], served


SPEECH = base64.b64encode(b"\x01\x00" * 2400).decode()  # 100 ms of PCM16 that is not silence
SILENCE = base64.b64encode(b"\x00\x00" * 2400).decode()
VAD = {
    "type": "session.update",
    "session": {
        "type": "realtime",
        "max_output_tokens": 60,
        "audio": {"input": {"turn_detection": {"type": "server_vad"}}},
    },
}


async def speak_turn(ws) -> dict:
    """Speech, then silence: turn detection commits it and answers with a response by itself;
    the response.done, or the error event that refused the audio."""
    for chunk in (SPEECH, SPEECH, SILENCE):
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
    while True:
        event = await recv_json(ws, 30)
        if event["type"] in ("response.done", "error"):
            return event


def test_automatic_responses_are_reserved_before_the_audio_that_starts_them(gateway, make_tenant, engine):
    """With turn detection on, the audio appends are what start responses: a session speaks turns
    until its balance cannot cover the next response. The audio is then refused in-band (one
    error), no response starts unreserved, and the balance never goes below zero."""
    poor = make_tenant(balance="0.02")
    start = account_row(engine, poor.account_id).balance_pico

    async def go():
        async with connect_ws(gateway.ws_url, key=poor.key, query="sim_response_ms=400") as ws:
            await recv_json(ws)
            await ws.send(json.dumps(VAD))
            served = 0
            for _ in range(40):
                answer = await speak_turn(ws)
                if answer["type"] == "error":
                    assert answer["error"]["code"] == "insufficient_quota", answer
                    break
                served += 1
            else:
                raise AssertionError("never refused")
            assert await still_open(ws)
            return served, ws.response.headers["x-request-id"]

    served, request_id = run(go(), 90)
    row = ended_record(engine, request_id)
    account = account_row(engine, poor.account_id)
    assert served >= 1 and row.responses == served
    assert account.balance_pico >= 0, Money(account.balance_pico).usd_str()
    assert start - account.balance_pico == row.cost_pico == debits(engine, poor.account_id)
    assert account.reserved_pico == 0
