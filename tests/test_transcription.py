"""Transcription sessions (`wss://…/v1/realtime?intent=transcription`, issue #18) end to end: the
official SDK opens one through meshrt, the record is checked to the picodollar against the
simulator's usage at the rates `/v1/models` serves, an unpriced transcription model ends the
session, and a small balance stops it (docs/billing.md, Transcription sessions)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from decimal import Decimal

import httpx
import pytest
from conftest import ended_record
from openai import AsyncOpenAI
from openai import OpenAI
from realtime_client import connect_ws
from realtime_client import expect_closed
from realtime_client import expect_refusal
from realtime_client import recv_json
from realtime_client import run
from test_billing import balance
from test_billing import models_served
from test_billing import transcription_cost

from meshrt.shared.errors import ERRORS
from meshrt.shared.money import Money

PCM16_700MS = b"".join(int(3000 * ((i // 40) % 2 * 2 - 1)).to_bytes(2, "little", signed=True) for i in range(16_800))


def chunks(audio: bytes, odd: bool) -> list[bytes]:
    """The audio as appends: 100 ms each, or split at odd byte sizes (mid-sample)."""
    if not odd:
        return [audio[i : i + 4800] for i in range(0, len(audio), 4800)]
    out, at, sizes = [], 0, (1, 4799, 333, 7, 10_001)
    while at < len(audio):
        size = sizes[len(out) % len(sizes)]
        out.append(audio[at : at + size])
        at += size
    return out


def append(piece: bytes) -> str:
    return json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(piece).decode()})


def sdk(gateway, key: str) -> AsyncOpenAI:
    return AsyncOpenAI(api_key=key, websocket_base_url=f"ws://127.0.0.1:{gateway.port}/v1", max_retries=0)


async def transcribe(gateway, key: str, model: str, odd: bool, commits: int = 2) -> tuple[list[dict], str]:
    """One transcription session through the SDK: the usages of its completed transcriptions
    (as received, exact JSON) and its request id."""
    async with sdk(gateway, key).realtime.connect(extra_query={"intent": "transcription"}) as conn:
        created = json.loads(await conn.recv_bytes())
        assert created["type"] == "session.created" and created["session"]["type"] == "transcription"
        await conn.session.update(
            session={"type": "transcription", "audio": {"input": {"transcription": {"model": model}}}}
        )
        while (event := json.loads(await conn.recv_bytes()))["type"] != "session.updated":
            assert event["type"] != "error", event
        usages = []
        for _ in range(commits):
            for piece in chunks(PCM16_700MS, odd):
                await conn.input_audio_buffer.append(audio=base64.b64encode(piece).decode())
            await conn.input_audio_buffer.commit()
            while (event := json.loads(await conn.recv_bytes()))["type"] != (
                "conversation.item.input_audio_transcription.completed"
            ):
                assert event["type"] != "error", event
            usages.append(event["usage"])
        request_id = conn._connection.response.headers["x-request-id"]
    return usages, request_id


def test_sdk_transcription_session_billed_to_the_picodollar(gateway, tenant, engine):
    served = models_served(gateway, tenant.key)
    for model, usage_type in (("gpt-4o-transcribe", "tokens"), ("whisper-1", "duration")):
        for odd in (False, True):
            start = balance(engine, tenant.account_id)
            usages, request_id = run(transcribe(gateway, tenant.key, model, odd))
            assert [u["type"] for u in usages] == [usage_type, usage_type]
            expected = sum(transcription_cost(u, served[model]["pricing"]) for u in usages)
            row = ended_record(engine, request_id)
            assert Money(row.cost_pico) == Money.from_usd(expected.quantize(Decimal("1e-12"))) > Money.ZERO
            assert start - balance(engine, tenant.account_id) == Money(row.cost_pico)
            assert (row.model, row.surface, row.responses, row.end_reason) == (
                model,
                "transcription",
                0,
                "client_closed",
            )
            records = httpx.get(
                f"{gateway.http_url}/v1/usage", headers={"Authorization": f"Bearer {tenant.key}"}
            ).json()["data"]
            record = next(r for r in records if r["id"] == row.id)
            assert record["surface"] == "transcription" and record["model"] == model
            assert Decimal(record["cost"]["amount"]) == expected.quantize(Decimal("1e-12"))
            if usage_type == "tokens":
                assert row.usage["transcription"]["input_tokens"] == sum(u["input_tokens"] for u in usages)
            else:
                assert Decimal(row.usage["transcription"]["seconds"]) == sum(Decimal(str(u["seconds"])) for u in usages)


def test_conversation_records_say_realtime(shared_gateway, tenant, engine):
    async def go():
        async with connect_ws(shared_gateway.ws_url, key=tenant.key) as ws:
            await recv_json(ws)
            return ws.response.headers["x-request-id"]

    row = ended_record(engine, run(go()))
    assert row.surface == "realtime" and row.model == "gpt-realtime"


@pytest.mark.parametrize("model", ["gpt-9-transcribe", "gpt-realtime"])
def test_unpriced_transcription_model_ends_the_session_before_a_transcription_is_delivered(
    shared_gateway, tenant, engine, model
):
    """Everything is sent at once, so upstream has the audio before meshrt sees the model."""
    start = balance(engine, tenant.account_id)

    async def go():
        async with connect_ws(shared_gateway.ws_url, key=tenant.key, model=None, query="intent=transcription") as ws:
            update = {"type": "transcription", "audio": {"input": {"transcription": {"model": model}}}}
            await ws.send(json.dumps({"type": "session.update", "session": update}))
            for piece in chunks(PCM16_700MS, False):
                await ws.send(
                    json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(piece).decode()})
                )
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            sent = time.monotonic()
            events = await expect_closed(ws, 15)
            print(f"\nunpriced {model!r}: closed {1000 * (time.monotonic() - sent):.1f} ms after the commit was sent")
            return events, ws.close_code, ws.close_reason, ws.response.headers["x-request-id"]

    events, code, reason, request_id = run(go())
    types = [e["type"] for e in events]
    assert "conversation.item.input_audio_transcription.completed" not in types
    assert types[-1] == "error" and events[-1]["error"]["code"] == "model_not_found"
    assert model in events[-1]["error"]["message"]
    spec = ERRORS["model_not_found"]
    assert (code, reason) == (spec.close_code, f"{spec.type}.model_not_found")
    row = ended_record(engine, request_id)
    assert row.end_reason == "model_not_found" and row.cost_pico == 0
    assert balance(engine, tenant.account_id) == start


def test_transcription_session_is_admitted_without_a_model_but_not_without_balance(shared_gateway, make_tenant):
    broke = make_tenant(balance="0")
    event, code, _ = run(expect_refusal(shared_gateway.ws_url, key=broke.key, model=None, query="intent=transcription"))
    assert event["error"]["code"] == "insufficient_quota" and code == 1008
    event, _, _ = run(
        expect_refusal(shared_gateway.ws_url, key="rsk_" + "x" * 40, model=None, query="intent=transcription")
    )
    assert event["error"]["code"] == "invalid_api_key"
    event, _, _ = run(expect_refusal(shared_gateway.ws_url, key=broke.key, model=None, query="intent=translation"))
    assert event["error"]["code"] == "missing_model"  # only transcription is an intent here


@pytest.mark.parametrize("beta", [False, True])
def test_transcription_session_with_a_tiny_balance_is_stopped_below_zero(gateway, make_tenant, engine, beta):
    """Appends are never held for a reservation (there are no responses; server VAD included,
    and in beta, where the session's events do not say `"type": "transcription"`), and
    transcription usage, which no reservation covers, takes the balance below zero once: then
    the session ends with insufficient_quota."""
    poor = make_tenant(balance="0.0005")  # about three 700 ms gpt-4o-transcribe transcriptions
    start = balance(engine, poor.account_id)

    async def go():
        headers = {"OpenAI-Beta": "realtime=v1"} if beta else {}
        async with connect_ws(
            gateway.ws_url, key=poor.key, model=None, query="intent=transcription", headers=headers
        ) as ws:
            vad, model = {"type": "server_vad"}, {"model": "gpt-4o-transcribe"}
            update = (
                {"input_audio_transcription": model, "turn_detection": vad}
                if beta
                else {"type": "transcription", "audio": {"input": {"transcription": model, "turn_detection": vad}}}
            )
            await ws.send(json.dumps({"type": "session.update", "session": update}))
            seen: list[dict] = []
            try:
                for _ in range(40):
                    for piece in chunks(PCM16_700MS, False):
                        await ws.send(
                            json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(piece).decode()})
                        )
                    await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
                    while (event := await recv_json(ws, 10))["type"] not in (
                        "conversation.item.input_audio_transcription.completed",
                        "error",
                    ):
                        seen.append(event)
                    seen.append(event)
                    if event["type"] == "error":
                        break
                    await asyncio.sleep(0.3)  # the quota stop reads the balance every 0.5 s at most
            except Exception:  # the stop closed the socket mid-send
                pass
            seen += await expect_closed(ws, 15)
            return seen, ws.close_code, ws.response.headers["x-request-id"]

    seen, code, request_id = run(go(), 60)
    errors = [e["error"]["code"] for e in seen if e["type"] == "error"]
    assert errors == ["insufficient_quota"] and code == 1008  # no in-band refusal of audio before it
    done = [e for e in seen if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert len(done) >= 3
    row = ended_record(engine, request_id)
    assert row.end_reason == "insufficient_quota"
    final = balance(engine, poor.account_id)
    assert start - final == Money(row.cost_pico) and final.picodollars < 0
    print(f"\ntiny balance (beta={beta}): {len(done)} transcriptions, final balance {final.display()}")


def test_an_older_database_gets_the_surface_column_and_its_rows_say_realtime(engine, make_tenant):
    """`create_schema` (what `meshrt db upgrade` runs) adds `surface` with its server default,
    so the rows from before it read `realtime`; on the test database's own engine (SQLite, or
    PostgreSQL with MESHRT_TEST_DATABASE_URL)."""
    from sqlalchemy import text

    from meshrt.storage.db import create_schema

    tenant = make_tenant()
    with engine.begin() as db:
        db.execute(text('ALTER TABLE "realtime_session" DROP COLUMN "surface"'))
        db.execute(
            text(
                "INSERT INTO realtime_session (id, request_id, account_id, api_key_id, model, node, state, "
                "client_addr, started_at, responses, usage, cost_pico, by_category, rates, reserved_pico, "
                "reserve_version) VALUES ('sess_old', 'req_old', :account, :key, 'gpt-realtime', '', 'ended', "
                "'', CURRENT_TIMESTAMP, 0, '{}', 0, '{}', '{}', 0, 0)"
            ),
            {"account": tenant.account_id, "key": tenant.key_id},
        )
    changes = create_schema(engine)
    assert changes.columns == ("realtime_session.surface",)
    with engine.connect() as db:
        assert db.execute(text("SELECT surface FROM realtime_session WHERE id = 'sess_old'")).scalar_one() == "realtime"


# --- sans-I/O: the worker's side, bytes in, actions out --------------------------------------


def transcription_relay(model_announced: str):
    from websockets.frames import Frame
    from websockets.frames import Opcode

    from meshrt.frontdoor.catalog import Catalog
    from meshrt.shared.control import Grant
    from meshrt.shared.pricing import load_price_table
    from meshrt.worker.preauth import Purse
    from meshrt.worker.relay import Relay
    from meshrt.worker.session_meter import build_meter

    catalog = Catalog(load_price_table())
    model = catalog.transcription_session_model().model
    grant = Grant("sess_t", "req_t", "acct", "key", model, 10_000, catalog.grant_rates(model), surface="transcription")
    meter, may_carry_usage = build_meter(grant)
    purse = Purse.for_rates(meter.meter.rates, 4096, transcription_only=True)
    relay = Relay("req_t", 10_000, 1 << 20, meter=meter, may_carry_usage=may_carry_usage, purse=purse)

    def frame(event: dict) -> bytes:
        return Frame(Opcode.TEXT, json.dumps(event).encode(), True).serialize(mask=False, extensions=[])

    session = {"type": "transcription", "audio": {"input": {"transcription": {"model": model_announced}}}}
    completed = {
        "type": "conversation.item.input_audio_transcription.completed",
        "item_id": "item_1",
        "transcript": "hello",
        "usage": {
            "type": "tokens",
            "input_tokens": 7,
            "output_tokens": 3,
            "total_tokens": 10,
            "input_token_details": {"text_tokens": 0, "audio_tokens": 7},
        },
    }
    return relay, purse, frame({"type": "session.created", "session": session}), frame(completed)


def test_sansio_an_unpriced_model_in_session_created_ends_the_session_before_the_transcription_is_delivered():
    from meshrt.worker.relay import Target

    relay, _, created, completed = transcription_relay("gpt-9-transcribe")
    actions = relay.from_upstream(created + completed)  # one read: the transcription right behind
    to_client = [payload for target, payload in actions if target is Target.CLIENT]
    assert to_client[0] == created and completed not in b"".join(to_client)
    assert b'"model_not_found"' in to_client[1] and to_client[2][:1] == b"\x88"  # error frame, close
    bills = [payload for target, payload in actions if target is Target.BILL]
    assert len(bills) == 1 and bills[0].unpriced and bills[0].cost == Money.ZERO  # recorded, never delivered
    assert any(target is Target.UPSTREAM for target, _ in actions)  # upstream is closed too
    assert relay.outcome.end_reason == "model_not_found"


def test_sansio_a_priced_model_is_billed_and_audio_is_never_held():
    from meshrt.worker.relay import Target

    relay, purse, created, completed = transcription_relay("whisper-1")
    append = json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(PCM16_700MS).decode()})
    assert purse.admit(append.encode())  # before session.created: nothing held, nothing needed
    vad = {"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "server_vad"}}}}}
    assert purse.admit(json.dumps(vad).encode()) and not purse.auto_response  # no response to expect
    assert purse.admit(append.encode())
    purse.session_event({"input_audio_transcription": {"model": "whisper-1"}, "turn_detection": {"type": "server_vad"}})
    assert not purse.auto_response and purse.admit(append.encode())  # beta's server VAD: still no response
    actions = relay.from_upstream(created)
    assert actions == [(Target.CLIENT, created)]
    # whisper-1 bills duration; a tokens usage for it is priced differently: billed 0 and marked
    bill = relay.from_upstream(completed)[0][1]
    assert bill.model == "whisper-1" and bill.unpriced
    relay2, _, created2, completed2 = transcription_relay("gpt-4o-mini-transcribe")
    relay2.from_upstream(created2)
    actions = relay2.from_upstream(completed2)
    assert [t for t, _ in actions] == [Target.BILL, Target.CLIENT]
    assert actions[0][1].model == "gpt-4o-mini-transcribe" and actions[0][1].cost > Money.ZERO
    assert relay2.outcome.end_reason is None


def test_ephemeral_keys_open_transcription_sessions_only_without_session_settings(shared_gateway, tenant, engine):
    mint = OpenAI(api_key=tenant.key, base_url=f"{shared_gateway.http_url}/v1", max_retries=0)
    bare = mint.realtime.client_secrets.create().value
    configured = mint.realtime.client_secrets.create(session={"type": "realtime", "model": "gpt-realtime"}).value
    event, _, _ = run(expect_refusal(shared_gateway.ws_url, key=configured, model=None, query="intent=transcription"))
    assert event["error"]["code"] == "model_not_found" and "gpt-realtime" in event["error"]["message"]

    async def go():
        async with connect_ws(shared_gateway.ws_url, key=bare, model=None, query="intent=transcription") as ws:
            created = await recv_json(ws)
            return created, ws.response.headers["x-request-id"]

    created, request_id = run(go())
    assert created["session"]["type"] == "transcription"
    assert ended_record(engine, request_id).surface == "transcription"


def test_upstream_query_of_a_transcription_session_keeps_the_intent_and_drops_model_and_key():
    from websockets.datastructures import Headers

    from meshrt.shared.handshake import UpgradeRequest
    from meshrt.shared.handshake import upstream_query

    def upgrade(*query):
        return UpgradeRequest("/v1/realtime", list(query), Headers(), [])

    tx = upgrade(("intent", "transcription"), ("model", "gpt-realtime"), ("api_key", "rsk_x"), ("foo", "1"))
    assert tx.transcription and tx.surface == "transcription"
    assert upstream_query(tx, "gpt-4o-transcribe") == "intent=transcription&foo=1"
    conversation = upgrade(("intent", "translation"), ("model", "gpt-realtime"))
    assert not conversation.transcription and conversation.surface == "realtime"
    assert upstream_query(conversation, "gpt-realtime") == "intent=translation&model=gpt-realtime"


def test_server_vad_transcription_session_commits_and_transcribes_turns_billed_exactly(gateway, tenant, engine):
    """The usual transcription session: turn detection commits each turn (speech, then silence),
    upstream transcribes it, nothing answers; every transcription billed, balance down by as much."""
    served = models_served(gateway, tenant.key)
    start = balance(engine, tenant.account_id)
    silence = b"\x00" * 4800

    async def go():
        async with connect_ws(gateway.ws_url, key=tenant.key, model=None, query="intent=transcription") as ws:
            config = {"transcription": {"model": "gpt-4o-mini-transcribe"}, "turn_detection": {"type": "server_vad"}}
            await ws.send(
                json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": config}}})
            )
            usages, types = [], []
            for _ in range(3):
                for piece in [*chunks(PCM16_700MS, True), silence]:
                    await ws.send(append(piece))
                while (event := await recv_json(ws))["type"] != "conversation.item.input_audio_transcription.completed":
                    assert event["type"] != "error", event
                    types.append(event["type"])
                usages.append(event["usage"])
            return usages, types, ws.response.headers["x-request-id"]

    usages, types, request_id = run(go())
    assert "input_audio_buffer.committed" in types and not any(t.startswith("response.") for t in types)
    expected = sum(transcription_cost(u, served["gpt-4o-mini-transcribe"]["pricing"]) for u in usages)
    row = ended_record(engine, request_id)
    assert Money(row.cost_pico) == Money.from_usd(expected.quantize(Decimal("1e-12"))) > Money.ZERO
    assert start - balance(engine, tenant.account_id) == Money(row.cost_pico)
    assert (row.model, row.responses) == ("gpt-4o-mini-transcribe", 0)


def test_a_transcription_ephemeral_key_opens_transcription_sessions_with_its_config(gateway, tenant, engine):
    """An ek_ minted for a transcription session (OpenAI's session.type "transcription"): its
    config reaches upstream before the client's first event, its model is billed, and it opens
    nothing else."""
    served = models_served(gateway, tenant.key)
    mint = OpenAI(api_key=tenant.key, base_url=f"{gateway.http_url}/v1", max_retries=0)
    config = {"transcription": {"model": "gpt-4o-mini-transcribe"}, "turn_detection": None}
    secret = mint.realtime.client_secrets.create(session={"type": "transcription", "audio": {"input": config}})
    assert secret.session.type == "transcription"
    event, _, _ = run(expect_refusal(gateway.ws_url, key=secret.value, how="insecure"))
    assert event["error"]["code"] == "model_not_found" and "intent=transcription" in event["error"]["message"]
    start = balance(engine, tenant.account_id)

    async def go():
        url_args = {"key": secret.value, "how": "insecure", "model": None, "query": "intent=transcription"}
        async with connect_ws(gateway.ws_url, **url_args) as ws:
            created = await recv_json(ws)
            updated = await recv_json(ws)  # the key's config, applied before any event of ours
            for piece in chunks(PCM16_700MS, True):
                await ws.send(append(piece))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            while (event := await recv_json(ws))["type"] != "conversation.item.input_audio_transcription.completed":
                assert event["type"] != "error", event
            return created, updated, event["usage"], ws.response.headers["x-request-id"]

    created, updated, usage, request_id = run(go())
    assert created["session"]["type"] == "transcription" and updated["type"] == "session.updated"
    assert updated["session"]["audio"]["input"]["transcription"]["model"] == "gpt-4o-mini-transcribe"
    row = ended_record(engine, request_id)
    expected = transcription_cost(usage, served["gpt-4o-mini-transcribe"]["pricing"])
    assert Money(row.cost_pico) == Money.from_usd(expected.quantize(Decimal("1e-12"))) > Money.ZERO
    assert (row.surface, row.model, row.api_key_id) == ("transcription", "gpt-4o-mini-transcribe", secret.session.id)
    assert start - balance(engine, tenant.account_id) == Money(row.cost_pico)
