"""Translation sessions (`wss://…/v1/realtime/translations?model=…`, issue #18) end to end, on
asyncio and trio workers: the record is checked to the picodollar against the audio in the
simulator's own frame log (PCM16 and G.711, appends split at odd sizes, a session cut short
mid-append), through `websockets` speaking OpenAI's event names and through the official SDK's
translations client; a balance that runs out stops the session with `insufficient_quota` and a
record equal to the audio forwarded (docs/billing.md, Translation sessions)."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from fractions import Fraction
from urllib.parse import parse_qs

import httpx
import pytest
from conftest import ended_record
from openai import AsyncOpenAI
from realtime_client import connect_ws
from realtime_client import expect_closed
from realtime_client import expect_refusal
from realtime_client import recv_json
from realtime_client import run
from test_billing import balance
from test_billing import models_served
from websockets.frames import Frame
from websockets.frames import Opcode

from meshrt.shared.money import Money

MODEL = "gpt-realtime-translate"
RATE_PD_PER_MIN = Money.from_usd("0.034").picodollars
PCM = {"type": "audio/pcm", "rate": 24000}
PCMU = {"type": "audio/pcmu"}
PCM_200MS = 9600
G711_200MS = 1600


def audio(n: int) -> bytes:
    return bytes((i * 37 + 11) % 256 for i in range(n))


def pieces(total: int, odd: bool, chunk: int) -> list[bytes]:
    """`total` bytes of audio as appends: `chunk` each, or at odd sizes (1, 4799, 333, 7, …),
    so many decode to an odd length and split samples."""
    data = audio(total)
    if not odd:
        return [data[i : i + chunk] for i in range(0, total, chunk)]
    out, at, sizes = [], 0, (1, 4799, 333, 7, 10_001, 9601)
    while at < total:
        out.append(data[at : at + sizes[len(out) % len(sizes)]])
        at += len(out[-1])
    return out


def append_event(piece: bytes) -> str:
    return json.dumps({"type": "session.input_audio_buffer.append", "audio": base64.b64encode(piece).decode()})


# --- the simulator's frame log: what upstream received ---------------------------------------


def sim_received(sim, tag: str, timeout: float = 10) -> list[dict]:
    """The client events the simulator received on the connection tagged `tag`, in order,
    once its log is closed (its close frame logged)."""
    deadline = time.monotonic() + timeout
    while True:
        for path in sim.logs():
            lines = path.read_text().splitlines()
            if lines and parse_qs(json.loads(lines[0]).get("query", "")).get("tag") == [tag]:
                frames = [json.loads(line) for line in lines[1:] if line.endswith("}")]
                if any(f.get("dir") == "in" and f.get("opcode") == "close" for f in frames) or (
                    time.monotonic() > deadline
                ):
                    return [
                        json.loads(base64.b64decode(f["payload_b64"]))
                        for f in frames
                        if f.get("dir") == "in" and f.get("opcode") == "text"
                    ]
        if time.monotonic() > deadline:
            raise AssertionError(f"no simulator log for {tag}")
        time.sleep(0.05)


def expected_from_log(events: list[dict]) -> tuple[int, int, int]:
    """(decoded audio bytes, ticks of 1/48 000 s, cost in picodollars) of the appends upstream
    received, each at the format in force (a session.update's format applies to the appends after
    it), worked out here from the bytes: seconds = bytes ÷ byte rate, cost rounded half up once."""
    ticks_per_byte, n_bytes, ticks = 1, 0, 0
    for event in events:
        if event["type"] == "session.update":
            fmt = event["session"].get("audio", {}).get("input", {}).get("format")
            if fmt is not None:
                ticks_per_byte = 1 if fmt["type"] == "audio/pcm" else 6
        elif event["type"] == "session.input_audio_buffer.append":
            decoded = len(base64.b64decode(event["audio"], validate=True))
            n_bytes += decoded
            ticks += decoded * ticks_per_byte
    seconds = Fraction(ticks, 48_000)
    cost = int(Fraction(RATE_PD_PER_MIN) * seconds / 60 + Fraction(1, 2))
    return n_bytes, ticks, cost


def seconds_text(ticks: int) -> str:
    scaled = int(Fraction(ticks, 48_000) * 10**9 + Fraction(1, 2))
    whole, frac = divmod(scaled, 10**9)
    return f"{whole}.{frac:09d}".rstrip("0").rstrip(".") if frac else str(whole)


def check_record(gateway, engine, tenant, request_id: str, events: list[dict], start: Money, reason: str):
    n_bytes, ticks, cost = expected_from_log(events)
    row = ended_record(engine, request_id)
    assert (row.surface, row.model, row.responses, row.end_reason) == ("translation", MODEL, 0, reason)
    assert row.cost_pico == cost, f"record {Money(row.cost_pico)} != {Money(cost)} for {ticks} ticks"
    assert row.audio_seconds == seconds_text(ticks)
    assert row.usage["input_audio"] == {"seconds": seconds_text(ticks)}
    assert start - balance(engine, tenant.account_id) == Money(cost)
    records = httpx.get(f"{gateway.http_url}/v1/usage", headers={"Authorization": f"Bearer {tenant.key}"}).json()
    record = next(r for r in records["data"] if r["id"] == row.id)
    assert record["surface"] == "translation" and record["audio_seconds"] == seconds_text(ticks)
    assert record["cost"]["by_category"] == ({"translation_audio_input": Money(cost).usd_str()} if cost else {})
    log = gateway.log_text()
    assert "differs from the grant's rates" not in log  # the supervisor's price agreed
    assert "no Billed in time" not in log  # every increment was answered
    return n_bytes, ticks, cost


# --- through meshrt -------------------------------------------------------------------------


async def translate(gateway, key: str, tag: str, fmt: dict, appends: list[bytes], cut: bool = False):
    """One translation session with `websockets` and OpenAI's event names: the format set, the
    appends sent, the deltas read; `cut`: the last append is half written, then the TCP
    connection dropped. Returns (deltas received, request id)."""
    url = gateway.ws_url + "/translations"
    async with connect_ws(url, key=key, model=MODEL, query=f"tag={tag}") as ws:
        created = await recv_json(ws)
        assert created["type"] == "session.created" and created["session"]["type"] == "translation"
        if fmt != PCM:
            await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": fmt}}}}))
            while (event := await recv_json(ws))["type"] != "session.updated":
                assert event["type"] != "error", event
        for piece in appends[:-1] if cut else appends:
            await ws.send(append_event(piece))
        request_id = ws.response.headers["x-request-id"]
        frame_200ms = PCM_200MS if fmt == PCM else G711_200MS
        sent = sum(len(p) for p in (appends[:-1] if cut else appends))
        want = sent // frame_200ms
        deltas = []
        while len([d for d in deltas if d["type"] == "session.output_audio.delta"]) < want:
            event = await recv_json(ws, 10)
            assert event["type"] != "error", event
            deltas.append(event)
        if cut:
            last = Frame(Opcode.TEXT, append_event(appends[-1]).encode()).serialize(mask=True, extensions=[])
            ws.transport.write(last[: len(last) // 2])
            await asyncio.sleep(0.05)
            ws.transport.abort()
    return deltas, request_id


CASES = [
    ("pcm16", PCM, False, PCM_200MS),
    ("pcm16-odd", PCM, True, PCM_200MS),
    ("g711", PCMU, False, G711_200MS),
    ("g711-odd", PCMU, True, G711_200MS),
]


def test_translation_billed_to_the_picodollar_against_the_simulators_frame_log(gateway, make_tenant, engine, sim):
    """PCM16 and G.711, 200 ms appends and odd-size ones (decoded lengths odd, samples split),
    then a session cut short mid-append: each record equals the audio upstream received."""
    tenant = make_tenant()
    for name, fmt, odd, chunk in CASES:
        tag = secrets.token_hex(6)
        start = balance(engine, tenant.account_id)
        total = chunk * 17 + 5  # 3.4 s and a bit
        deltas, request_id = run(translate(gateway, tenant.key, tag, fmt, pieces(total, odd, chunk)))
        events = sim_received(sim, tag)
        n_bytes, ticks, cost = check_record(gateway, engine, tenant, request_id, events, start, "client_closed")
        assert n_bytes == total and cost > 0
        assert sum(d["type"] == "session.output_audio.delta" for d in deltas) == total // chunk
        print(f"\n{name}: {n_bytes} bytes, {seconds_text(ticks)} s, {Money(cost).usd_str()} USD, to the picodollar")

    tag = secrets.token_hex(6)
    start = balance(engine, tenant.account_id)
    appends = pieces(PCM_200MS * 6, False, PCM_200MS)
    _, request_id = run(translate(gateway, tenant.key, tag, PCM, appends, cut=True))
    events = sim_received(sim, tag)
    n_bytes, ticks, cost = check_record(gateway, engine, tenant, request_id, events, start, "client_closed")
    assert n_bytes == PCM_200MS * 5  # the half-sent append never went upstream, and is not billed
    print(f"cut short mid-append: billed {seconds_text(ticks)} s (1 s was billed ahead, then settled)")


def test_translation_through_the_official_sdk(gateway, tenant, engine, sim):
    """`client.realtime.translations.connect(model=…)` of the openai SDK, pointed at meshrt."""
    tag = secrets.token_hex(6)
    start = balance(engine, tenant.account_id)

    async def go():
        client = AsyncOpenAI(api_key=tenant.key, websocket_base_url=f"ws://127.0.0.1:{gateway.port}/v1", max_retries=0)
        async with client.realtime.translations.connect(model=MODEL, extra_query={"tag": tag}) as conn:
            created = await conn.recv()
            assert created.type == "session.created" and created.session.model == MODEL
            await conn.session.update(session={"audio": {"output": {"language": "fr"}}})
            while (event := await conn.recv()).type != "session.updated":
                assert event.type != "error", event
            for piece in pieces(PCM_200MS * 10 + 333, True, PCM_200MS):
                await conn.session.input_audio_buffer.append(audio=base64.b64encode(piece).decode())
            kinds = []
            while kinds.count("session.output_audio.delta") < 10:
                kinds.append((await conn.recv()).type)
            request_id = conn._connection.response.headers["x-request-id"]
        return kinds, request_id

    kinds, request_id = run(go())
    assert "session.output_transcript.delta" in kinds
    events = sim_received(sim, tag)
    n_bytes, ticks, _ = check_record(gateway, engine, tenant, request_id, events, start, "client_closed")
    assert n_bytes == PCM_200MS * 10 + 333


@pytest.mark.parametrize("pace_s", [0.04, 0.0], ids=["5x-real-time", "unpaced"])
def test_balance_running_out_stops_the_translation_within_one_billing_interval(
    gateway, make_tenant, engine, sim, pace_s
):
    """$0.001 pays for 1.76 s of PCM16. The client streams 200 ms appends at 5× real time, or
    as fast as the socket takes them; the session ends with insufficient_quota, its record is the
    audio upstream received, and that audio ends within one billing interval (1 s) of where the
    balance ran out."""
    poor = make_tenant(balance="0.001")
    tag = secrets.token_hex(6)
    start = balance(engine, poor.account_id)

    async def go():
        async with connect_ws(gateway.ws_url + "/translations", key=poor.key, model=MODEL, query=f"tag={tag}") as ws:
            await recv_json(ws)
            sent = 0
            try:
                for piece in pieces(PCM_200MS * 100, False, PCM_200MS):
                    await ws.send(append_event(piece))
                    sent += 1
                    await asyncio.sleep(pace_s)
            except Exception:  # the stop closed the socket mid-send
                pass
            events = await expect_closed(ws, 15)
            return events, ws.close_code, ws.response.headers["x-request-id"], sent

    events, code, request_id, sent = run(go(), 60)
    errors = [e["error"]["code"] for e in events if e["type"] == "error"]
    assert errors == ["insufficient_quota"] and code == 1008
    received = sim_received(sim, tag)
    n_bytes, ticks, cost = check_record(gateway, engine, poor, request_id, received, start, "insufficient_quota")
    final = balance(engine, poor.account_id)
    covered_ticks = Fraction(start.picodollars * 60 * 48_000, RATE_PD_PER_MIN)
    past = Fraction(ticks) - covered_ticks
    print(
        f"\nbalance out ({'5x real time' if pace_s else 'unpaced'}): {sent} appends sent, "
        f"{n_bytes // PCM_200MS} forwarded ({seconds_text(ticks)} s), "
        f"{float(past / 48_000):.3f} s past the balance, final balance {final.display()}"
    )
    # The stop comes when an increment billed ahead takes the balance below zero, and no audio
    # past that increment goes up before the supervisor says the account could pay (it does
    # not): the audio forwarded ends within one interval (1 s) of where the balance ran out —
    # before it (the part billed ahead and not sent is billed back) or after it by at most the
    # interval and the append that crossed — however fast the client sends.
    assert -48_000 <= past <= 48_000 + PCM_200MS


# --- admission -------------------------------------------------------------------------------


def test_translation_admission(shared_gateway, tenant):
    url = shared_gateway.ws_url

    for full_url, model, code in (
        (url, MODEL, "model_not_found"),  # a translation model opens no conversation session
        (url + "/translations", "gpt-realtime", "model_not_found"),
        (url + "/translations", "gpt-9-translate", "model_not_found"),
        (url + "/translations", None, "missing_model"),
    ):
        error, _, _ = run(expect_refusal(full_url, key=tenant.key, model=model))
        assert error["error"]["code"] == code, (full_url, model, error)
    minted = httpx.post(
        f"{shared_gateway.http_url}/v1/realtime/client_secrets",
        headers={"Authorization": f"Bearer {tenant.key}"},
        json={"session": {"type": "realtime", "model": MODEL}},
    )
    assert minted.status_code == 400 and minted.json()["error"]["code"] == "invalid_parameter"
    served = models_served(shared_gateway, tenant.key)
    assert served[MODEL]["pricing"] == {
        "currency": "usd",
        "unit": "per_minute",
        "per_minute": "0.034",
        "audio_per_minute": "0.034",
    }


def test_an_older_database_gets_the_audio_seconds_column(engine, make_tenant):
    """`create_schema` adds `audio_seconds` (nullable) the way `surface` was added; older rows
    read null. On the test database's engine (SQLite, or PostgreSQL with MESHRT_TEST_DATABASE_URL)."""
    from sqlalchemy import text

    from meshrt.storage.db import create_schema

    tenant = make_tenant()
    with engine.begin() as db:
        db.execute(text('ALTER TABLE "realtime_session" DROP COLUMN "audio_seconds"'))
        db.execute(
            text(
                "INSERT INTO realtime_session (id, request_id, account_id, api_key_id, model, node, state, "
                "client_addr, started_at, responses, usage, cost_pico, by_category, rates, reserved_pico, "
                "reserve_version) VALUES ('sess_old_tr', 'req_old_tr', :account, :key, 'gpt-realtime', '', 'ended', "
                "'', CURRENT_TIMESTAMP, 0, '{}', 0, '{}', '{}', 0, 0)"
            ),
            {"account": tenant.account_id, "key": tenant.key_id},
        )
    changes = create_schema(engine)
    assert changes.columns == ("realtime_session.audio_seconds",)
    with engine.connect() as db:
        row = db.execute(text("SELECT audio_seconds, surface FROM realtime_session WHERE id = 'sess_old_tr'")).one()
    assert tuple(row) == (None, "realtime")


def test_wall_clock_billing_is_a_setting(gateway_factory, worker_backend, make_tenant, engine, sim):
    """MESHRT_TRANSLATION_BILLING=wall_clock bills the session's time since its 101 (when more
    than the audio sent), by the same rounding: 0.4 s of audio in a session held open 2 s."""
    gw = gateway_factory(MESHRT_TRANSLATION_BILLING="wall_clock", MESHRT_WORKER_BACKEND=worker_backend)
    tenant = make_tenant()
    tag = secrets.token_hex(6)
    start = balance(engine, tenant.account_id)

    async def go():
        began = time.monotonic()
        async with connect_ws(gw.ws_url + "/translations", key=tenant.key, model=MODEL, query=f"tag={tag}") as ws:
            await recv_json(ws)
            for piece in pieces(PCM_200MS * 2, False, PCM_200MS):
                await ws.send(append_event(piece))
            await asyncio.sleep(2.0)
            request_id = ws.response.headers["x-request-id"]
        return time.monotonic() - began, request_id

    wall, request_id = run(go())
    _, audio_ticks, _ = expected_from_log(sim_received(sim, tag))
    row = ended_record(engine, request_id)
    ticks = round(Fraction(row.audio_seconds) * 48_000)  # 9 decimals: far finer than a tick
    assert seconds_text(ticks) == row.audio_seconds
    assert audio_ticks == PCM_200MS * 2 and 2.0 * 48_000 <= ticks <= wall * 48_000
    assert row.cost_pico == int(Fraction(RATE_PD_PER_MIN * ticks, 60 * 48_000) + Fraction(1, 2))
    assert start - balance(engine, tenant.account_id) == Money(row.cost_pico)
    print(f"\nwall_clock: 0.4 s of audio, session {wall:.3f} s at the client, billed {row.audio_seconds} s")
