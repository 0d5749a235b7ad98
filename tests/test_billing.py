"""Metering and billing end to end: sessions with known usage through the simulator, checked to
the picodollar against an independent calculation from the rates `/v1/models` serves."""

from __future__ import annotations

import asyncio
import base64
import json
import random
from decimal import ROUND_HALF_UP
from decimal import Decimal

import httpx
import pytest
from conftest import ended_record
from realtime_client import AUDIO_100MS
from realtime_client import connect_ws
from realtime_client import expect_closed
from realtime_client import recv_json
from realtime_client import recv_until
from realtime_client import run
from sqlmodel import Session
from sqlmodel import select
from websockets.exceptions import ConnectionClosed

from meshrt.shared.money import Money
from meshrt.storage.db import Account
from meshrt.storage.db import LedgerEntry

PER_1M = Decimal(1_000_000)
IMAGE = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()


def usd(value: str | None) -> Decimal:
    return Decimal(value) if value is not None else Decimal(0)


def response_cost(usage: dict, pricing: dict) -> Decimal:
    """OpenAI's rule, written out: cached tokens at the cached rate, the rest of the input at the
    input rate, output at the output rate, per modality."""
    details = usage["input_token_details"]
    cached = details.get("cached_tokens_details", {})
    total = Decimal(0)
    for modality in ("text", "audio", "image"):
        rates = pricing[modality]
        n_in = details.get(f"{modality}_tokens", 0)
        n_cached = cached.get(f"{modality}_tokens", 0)
        total += (n_in - n_cached) * usd(rates["input"]) + n_cached * usd(rates["cached_input"])
    out = usage["output_token_details"]
    total += out["text_tokens"] * usd(pricing["text"]["output"])
    total += out["audio_tokens"] * usd(pricing["audio"]["output"])
    return total / PER_1M


def transcription_cost(usage: dict, pricing: dict) -> Decimal:
    if usage["type"] == "duration":  # docs/billing.md: rounded half up once per event
        exact = Decimal(str(usage["seconds"])) * usd(pricing["per_minute"]) / 60
        return exact.quantize(Decimal("1e-12"), rounding=ROUND_HALF_UP)
    details = usage["input_token_details"]
    return (
        details["text_tokens"] * usd(pricing["text"]["input"])
        + details["audio_tokens"] * usd(pricing["audio"]["input"])
        + usage["output_tokens"] * usd(pricing["text"]["output"])
    ) / PER_1M


def models_served(gateway, key: str) -> dict:
    response = httpx.get(f"{gateway.http_url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200
    return {m["id"]: m for m in response.json()["data"]}


def balance(engine, account_id: str) -> Money:
    with Session(engine) as db:
        return Money(db.get(Account, account_id).balance_pico)


async def converse(ws, transcription_model: str) -> tuple[list[dict], list[dict]]:
    """Two responses (the second with cached input) with audio, text, an image, transcription."""
    await recv_json(ws)
    await ws.send(
        json.dumps(
            {
                "type": "session.update",
                "session": {
                    "type": "realtime",
                    "instructions": "You are a meticulous billing test.",
                    "audio": {"input": {"transcription": {"model": transcription_model}}},
                },
            }
        )
    )
    responses, transcriptions = [], []
    for turn in range(2):
        for _ in range(7):
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": AUDIO_100MS}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await ws.send(
            json.dumps(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "message",
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": f"Turn {turn}: describe this image."},
                            {"type": "input_image", "image_url": IMAGE},
                        ],
                    },
                }
            )
        )
        await ws.send(json.dumps({"type": "response.create"}))
        for event in await recv_until(ws, "response.done", 20):
            if event["type"] == "response.done":
                responses.append(event["response"]["usage"])
            elif event["type"] == "conversation.item.input_audio_transcription.completed":
                transcriptions.append(event["usage"])
    await asyncio.sleep(0.2)  # a transcription may trail the response
    return responses, transcriptions


@pytest.mark.parametrize(
    "model,transcription",
    [
        ("gpt-realtime-2.1", "gpt-4o-transcribe"),
        ("gpt-realtime-2", "gpt-4o-mini-transcribe"),
        ("gpt-realtime-1.5", "whisper-1"),
        ("gpt-realtime", "gpt-4o-transcribe"),
        ("gpt-realtime-2025-08-28", "gpt-realtime-whisper"),
        ("gpt-realtime-2.1-mini", "gpt-4o-mini-transcribe"),
        ("gpt-realtime-mini", "whisper-1"),
        ("gpt-4o-mini-realtime-preview", "gpt-4o-transcribe"),
    ],
)
def test_record_and_balance_match_served_rates_to_the_picodollar(gateway_factory, tenant, engine, model, transcription):
    gw = gateway_factory()
    served = models_served(gw, tenant.key)
    start = balance(engine, tenant.account_id)

    async def go():
        async with connect_ws(gw.ws_url, key=tenant.key, model=model) as ws:
            usage = await converse(ws, transcription)
            return usage, ws.response.headers["x-request-id"]

    (responses, transcriptions), request_id = run(go())
    assert len(responses) == 2 and len(transcriptions) == 2
    assert responses[1]["input_token_details"]["cached_tokens"] > 0
    assert responses[0]["input_token_details"]["image_tokens"] > 0
    expected = sum(response_cost(u, served[model]["pricing"]) for u in responses)
    expected += sum(transcription_cost(u, served[transcription]["pricing"]) for u in transcriptions)
    row = ended_record(engine, request_id)
    assert Money.from_usd(expected.quantize(Decimal("1e-12"))) == Money(row.cost_pico)
    assert row.responses == 2
    assert row.usage["total_tokens"] == sum(u["total_tokens"] for u in responses)
    assert row.usage["input_token_details"]["cached_tokens"] == sum(
        u["input_token_details"]["cached_tokens"] for u in responses
    )
    assert start - balance(engine, tenant.account_id) == Money(row.cost_pico)
    record = httpx.get(f"{gw.http_url}/v1/usage", headers={"Authorization": f"Bearer {tenant.key}"}).json()["data"][0]
    assert record["id"] == row.id and Decimal(record["cost"]["amount"]) == expected.quantize(Decimal("1e-12"))
    assert record["model"] == model  # an alias is recorded as asked; its rates are the canonical model's
    for modality in ("text", "audio", "image"):
        assert record["rates"]["model"][modality] == served[model]["pricing"][modality]


def test_client_that_vanishes_mid_response_is_billed_for_the_partial_response(gateway, sim, tenant, engine):
    before = set(sim.logs())

    async def go():
        ws = await connect_ws(gateway.ws_url, key=tenant.key, query="sim_pace=1&sim_response_ms=3000").__aenter__()
        await recv_json(ws)
        await ws.send(json.dumps({"type": "response.create"}))
        await recv_until(ws, "response.output_audio.delta")
        request_id = ws.response.headers["x-request-id"]
        ws.transport.abort()  # a tab closed: no close frame
        return request_id

    row = ended_record(engine, run(go()))
    assert row.end_reason == "client_closed" and row.close_code == 1006
    assert row.responses == 1 and row.cost_pico > 0
    assert 0 < row.usage["output_tokens"] < 60  # 3 s would be 60 audio tokens: it was cut short
    frames = [json.loads(line) for p in sim.logs() if p not in before for line in p.read_text().splitlines()]
    sent_upstream = [
        json.loads(base64.b64decode(f["payload_b64"]))
        for f in frames
        if f.get("dir") == "in" and f.get("opcode") == "text"
    ]
    assert {"type": "response.cancel"} in sent_upstream


def test_token_cap_ends_the_session_after_delivering_the_crossing_response(gateway, make_tenant, engine):
    capped = make_tenant(token_cap=30)

    async def go():
        async with connect_ws(gateway.ws_url, key=capped.key) as ws:
            await recv_json(ws)
            await ws.send(json.dumps({"type": "response.create"}))
            events = await expect_closed(ws, 20)
            return events, ws.close_code, ws.response.headers["x-request-id"]

    events, code, request_id = run(go())
    types = [e["type"] for e in events]
    assert "response.done" in types and types[-1] == "error"
    assert types.index("response.done") < len(types) - 1
    assert events[-1]["error"]["code"] == "session_token_cap_exceeded" and code == 1008
    row = ended_record(engine, request_id)
    assert row.end_reason == "session_token_cap_exceeded" and row.usage["total_tokens"] >= 30


def test_concurrent_sessions_of_one_account_drain_a_small_balance_exactly(gateway_factory, make_tenant, engine):
    """Without pre-authorisation (MESHRT_PREAUTH=0; with it, tests/test_preauth.py): usage is
    billed after the fact and the quota stop ends every session once the balance is below zero."""
    gw = gateway_factory(MESHRT_MAX_CONCURRENT_SESSIONS="30", MESHRT_PREAUTH="0")
    poor = make_tenant(balance="0.01")
    start = balance(engine, poor.account_id)
    rng = random.Random(7)

    async def session(i: int):
        await asyncio.sleep(rng.random() * 0.2)
        # paced like real audio: a response takes its 200 ms, so "in flight" means something
        async with connect_ws(gw.ws_url, key=poor.key, query="sim_response_ms=200&sim_pace=1") as ws:
            created = await recv_json(ws)
            if created["type"] == "error":  # the balance may already be gone
                await expect_closed(ws)
                return created["error"]["code"], ws.response.headers["x-request-id"], False
            seen: list[dict] = []
            try:
                while not any(e["type"] == "error" for e in seen):
                    await ws.send(json.dumps({"type": "response.create"}))
                    while (event := await recv_json(ws, 20))["type"] not in ("response.done", "error"):
                        seen.append(event)
                    seen.append(event)
            except ConnectionClosed:
                pass
            seen += await expect_closed(ws, 20)
            last_error = next((e for e in reversed(seen) if e.get("type") == "error"), None)
            return (last_error or {}).get("error", {}).get("code", "closed"), ws.response.headers["x-request-id"], True

    async def all_sessions():
        return await asyncio.gather(*(session(i) for i in range(20)))

    results = run(all_sessions(), 120)
    rows = [ended_record(engine, request_id) for _, request_id, admitted in results if admitted]
    for (code, _, _), row in zip([x for x in results if x[2]], rows):
        assert (code, row.end_reason, row.close_code) == ("insufficient_quota", "insufficient_quota", 1008)
    assert {code for code, _, _ in results} == {"insufficient_quota"}
    final = balance(engine, poor.account_id)
    assert start - final == Money(sum(r.cost_pico for r in rows))
    with Session(engine) as db:
        debits = db.exec(
            select(LedgerEntry).where(LedgerEntry.account_id == poor.account_id, LedgerEntry.kind == "usage")
        ).all()
    assert Money(-sum(e.amount_pico for e in debits)) == start - final
    assert final.picodollars <= 0
    biggest = max(r.cost_pico // max(r.responses, 1) for r in rows if r.responses)
    # Overshoot is bounded by the responses in flight when the stop lands: per session, the one
    # that crossed zero and at most one the client started before the stop reached its worker
    # (that one is cancelled and billed for its partial usage).
    assert final.picodollars >= -2 * len(rows) * biggest


def test_usage_api_filters_and_paginates(gateway, tenant, engine):
    async def one(model: str):
        async with connect_ws(gateway.ws_url, key=tenant.key, model=model) as ws:
            await recv_json(ws)
            return ws.response.headers["x-request-id"]

    ids = [run(one(m)) for m in ("gpt-realtime", "gpt-realtime-mini", "gpt-realtime")]
    rows = [ended_record(engine, r) for r in ids]
    auth = {"Authorization": f"Bearer {tenant.key}"}
    page = httpx.get(f"{gateway.http_url}/v1/usage?limit=2", headers=auth).json()
    assert [r["id"] for r in page["data"]] == [rows[2].id, rows[1].id] and page["has_more"]
    rest = httpx.get(f"{gateway.http_url}/v1/usage?limit=2&after={page['last_id']}", headers=auth).json()
    assert [r["id"] for r in rest["data"]] == [rows[0].id] and not rest["has_more"]
    mini = httpx.get(f"{gateway.http_url}/v1/usage?model=gpt-realtime-mini", headers=auth).json()
    assert [r["id"] for r in mini["data"]] == [rows[1].id]
    bad = httpx.get(f"{gateway.http_url}/v1/usage?limit=0", headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_parameter"
    assert httpx.get(f"{gateway.http_url}/v1/usage").json()["error"]["code"] == "missing_api_key"
    account = httpx.get(f"{gateway.http_url}/v1/account", headers=auth).json()
    assert account["id"] == tenant.account_id and Money.from_usd(account["balance"]) == balance(
        engine, tenant.account_id
    )
