"""The session path end to end: client → front door → supervisor → zygote → worker → simulator,
with real processes and sockets, on asyncio and trio workers."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal

import httpx
import pytest
from conftest import OPERATOR_KEY
from conftest import ended_record
from conftest import wait_for
from openai import AsyncOpenAI
from realtime_client import AUDIO_100MS
from realtime_client import connect_ws
from realtime_client import expect_closed
from realtime_client import recv_json
from realtime_client import recv_until
from realtime_client import run
from sqlmodel import Session

from meshrt.storage.db import SessionRecord


def sim_log(sim, after: set) -> list[dict]:
    """The frame log of the one simulator connection opened since `after` was taken."""
    new = [p for p in sim.logs() if p not in after]
    assert len(new) == 1, new
    return [json.loads(line) for line in new[0].read_text().splitlines()]


def record(engine, session_id: str | None = None, request_id: str | None = None) -> SessionRecord:
    with Session(engine) as db:
        from sqlmodel import select

        query = select(SessionRecord)
        query = (
            query.where(SessionRecord.id == session_id)
            if session_id
            else query.where(SessionRecord.request_id == request_id)
        )
        return db.exec(query).first()


def test_sdk_conversation_is_relayed_byte_for_byte(gateway, sim, tenant, engine):
    before = set(sim.logs())

    async def conversation():
        client = AsyncOpenAI(api_key=tenant.key, websocket_base_url=f"ws://127.0.0.1:{gateway.port}/v1")
        async with client.realtime.connect(model="gpt-realtime") as conn:
            sent: list[bytes] = []
            raw_send = conn._connection.send

            async def recording_send(message, *args, **kwargs):
                sent.append(message.encode() if isinstance(message, str) else bytes(message))
                return await raw_send(message, *args, **kwargs)

            conn._connection.send = recording_send
            received = [await conn.recv_bytes()]  # session.created
            await conn.session.update(
                session={"type": "realtime", "instructions": "Be brief.", "output_modalities": ["audio"]}
            )
            for _ in range(5):
                await conn.input_audio_buffer.append(audio=AUDIO_100MS)
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            while True:
                raw = await conn.recv_bytes()
                received.append(raw)
                if json.loads(raw)["type"] == "response.done":
                    break
            request_id = conn._connection.response.headers["x-request-id"]
        return sent, received, request_id

    sent, received, request_id = run(conversation())
    types = [json.loads(r)["type"] for r in received]
    assert types[0] == "session.created" and types[-1] == "response.done"
    assert "session.updated" in types and "response.output_audio.delta" in types
    assert "response.output_audio_transcript.delta" in types
    frames = sim_log(sim, before)
    upstream_out = [
        base64.b64decode(f["payload_b64"]) for f in frames if f.get("dir") == "out" and f["opcode"] == "text"
    ]
    upstream_in = [base64.b64decode(f["payload_b64"]) for f in frames if f.get("dir") == "in" and f["opcode"] == "text"]
    assert upstream_out[: len(received)] == received  # every server event, same bytes, same order
    assert upstream_in == sent  # every client event, same bytes, same order
    row = ended_record(engine, request_id)
    assert row.end_reason == "client_closed" and row.close_code == 1000
    assert row.account_id == tenant.account_id and row.api_key_id == tenant.key_id
    assert row.pid and row.ended_at is not None


def test_a_reader_that_stalls_gets_every_message_in_order(gateway, tenant):
    """Upstream's echoes outrun a client that stops reading: the worker's write buffer to the
    client fills, backpressure reaches upstream, and once the client reads again every message
    arrives whole and in order (both worker backends)."""
    messages = [
        json.dumps({"type": "conversation.item.create", "n": n, "pad": chr(97 + n) * 2_000_000}) for n in range(8)
    ]

    async def go():
        async with connect_ws(gateway.ws_url, key=tenant.key, query="sim_echo=1") as ws:
            await recv_json(ws)

            async def send_all():
                for m in messages:
                    await ws.send(m)

            sender = asyncio.create_task(send_all())
            await asyncio.sleep(1.5)  # not reading: 16 MB of echoes back up behind us
            got = [await asyncio.wait_for(ws.recv(), 30) for _ in messages]
            await sender
            return got

    assert run(go(), 90) == messages


@pytest.mark.parametrize("how", ["insecure", "bearer-dot", "authorization", "query"])
def test_every_auth_form_opens_a_session_and_the_key_stays_behind(gateway, sim, tenant, how):
    before = set(sim.logs())

    async def go():
        async with connect_ws(gateway.ws_url, key=tenant.key, how=how, user_agent_header="voice-agent/2.1") as ws:
            created = await recv_json(ws)
            assert created["type"] == "session.created"
            headers = ws.response.headers
            if how in ("insecure", "bearer-dot"):
                assert ws.subprotocol == "realtime"
                assert headers.get_all("Sec-WebSocket-Protocol") == ["realtime"]
            assert headers["x-request-id"].startswith("req_")
            assert tenant.key not in str(headers.raw_items())

    run(go())
    request = sim_log(sim, before)[0]
    assert request["kind"] == "request"
    dumped = json.dumps(request)
    assert tenant.key not in dumped and "rsk_" not in dumped
    assert dict((k.lower(), v) for k, v in request["headers"])["authorization"] == f"Bearer {OPERATOR_KEY}"
    assert "api_key" not in request["query"]
    agents = [v for k, v in request["headers"] if k.lower() == "user-agent"]
    assert agents == ["voice-agent/2.1"]  # the client's, once: it replaces websockets' own
    wait_for(lambda: "session finalised" in gateway.log_text(), 10)
    assert tenant.key not in gateway.log_text()


def test_subprotocol_key_wins_over_query_key(gateway, tenant, make_tenant):
    other = make_tenant()

    async def go():
        bad = "rsk_" + "Z" * 40
        async with connect_ws(gateway.ws_url, key=tenant.key, how="insecure", query=f"api_key={bad}") as ws:
            assert (await recv_json(ws))["type"] == "session.created"
        async with connect_ws(gateway.ws_url, key=bad, how="insecure", query=f"api_key={other.key}") as ws:
            event = await recv_json(ws)
            assert event["error"]["code"] == "invalid_api_key"

    run(go())


def test_plain_get_of_realtime_is_426(gateway):
    response = httpx.get(f"{gateway.http_url}/v1/realtime?model=gpt-realtime")
    assert response.status_code == 426
    assert response.headers["upgrade"] == "websocket"
    body = response.json()
    assert body["error"]["code"] == "upgrade_required" and body["request_id"].startswith("req_")
    assert response.headers["x-request-id"] == body["request_id"]


def test_upstream_close_code_and_reason_reach_the_client(gateway, tenant, engine):
    async def go():
        async with connect_ws(gateway.ws_url, key=tenant.key, query="sim_fault=close_mid_response") as ws:
            await recv_json(ws)
            await ws.send(json.dumps({"type": "response.create"}))
            await expect_closed(ws)
            return ws.close_code, ws.response.headers["x-request-id"]

    code, request_id = run(go())
    assert code == 1011
    row = ended_record(engine, request_id)
    assert row.end_reason == "upstream_closed" and row.close_code == 1011


def test_pings_binary_and_fragments_pass_through(gateway, sim, tenant):
    before = set(sim.logs())

    async def go():
        async with connect_ws(gateway.ws_url, key=tenant.key, query="sim_echo=1") as ws:
            await recv_json(ws)
            pong = await ws.ping(b"meshrt-ping")
            await asyncio.wait_for(pong, 5)
            await ws.send(b"\x00\x01binary\xff")
            assert await asyncio.wait_for(ws.recv(), 5) == b"\x00\x01binary\xff"
            await ws.send(['{"type":', '"session.update"}'])  # a fragmented text message
            assert await asyncio.wait_for(ws.recv(), 5) == '{"type":"session.update"}'

    run(go())
    frames = sim_log(sim, before)
    opcodes = [(f["dir"], f["opcode"]) for f in frames[1:]]
    assert ("in", "ping") in opcodes and ("out", "pong") in opcodes
    assert ("in", "binary") in opcodes and ("in", "continuation") in opcodes


def test_concurrent_sessions_run_in_distinct_processes_and_a_killed_worker_hurts_no_other(gateway, tenant, engine):
    async def go():
        conns = [await connect_ws(gateway.ws_url, key=tenant.key).__aenter__() for _ in range(3)]
        for ws in conns:
            await recv_json(ws)
        rows = [
            wait_for(
                lambda ws=ws: (r := record(engine, request_id=ws.response.headers["x-request-id"])) and r.pid and r, 10
            )
            for ws in conns
        ]
        pids = [row.pid for row in rows]
        assert len(set(pids)) == 3 and os.getpid() not in pids
        os.kill(pids[0], signal.SIGKILL)
        await expect_closed(conns[0], 10)
        for ws in conns[1:]:
            await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime"}}))
            assert (await recv_until(ws, "session.updated"))[-1]["type"] == "session.updated"
            await ws.close()
        return rows

    rows = run(go())
    killed = ended_record(engine, rows[0].request_id)
    assert killed.end_reason == "internal_error" and killed.close_code == 1011
    for row in rows[1:]:
        assert ended_record(engine, row.request_id).end_reason == "client_closed"


def test_killing_the_front_door_drops_no_live_session(gateway, tenant):
    async def go():
        async with connect_ws(gateway.ws_url, key=tenant.key) as ws:
            await recv_json(ws)
            old = gateway.frontdoor_pid()
            os.kill(old, signal.SIGKILL)
            for _ in range(3):
                await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime"}}))
                await recv_until(ws, "session.updated")
            wait_for(lambda: gateway.frontdoor_pid() not in (None, old), 15, 0.05, "a new front door")
            # the listening socket never closed: a new session connects through the new front door
            async with connect_ws(gateway.ws_url, key=tenant.key) as ws2:
                assert (await recv_json(ws2, 20))["type"] == "session.created"

    run(go(), 60)


def test_metrics_count_sessions_and_money_without_ids(gateway, tenant):
    async def go():
        async with connect_ws(gateway.ws_url, key=tenant.key, query="sim_response_ms=100") as ws:
            await recv_json(ws)
            await ws.send(json.dumps({"type": "response.create"}))
            await recv_until(ws, "response.done")

    run(go())

    def scraped():
        text = httpx.get(f"{gateway.http_url}/metrics").text
        return text if 'meshrt_sessions_ended_total{end_reason="client_closed"} 1' in text else None

    text = wait_for(scraped, 10, 0.2, "metrics to show the ended session")
    assert "meshrt_sessions_started_total 1" in text and "meshrt_usage_increments_total 1" in text
    cost = next(line for line in text.splitlines() if line.startswith("meshrt_usage_cost_usd_total"))
    assert float(cost.split()[1]) > 0
    assert tenant.key not in text and "sess_" not in text and "req_" not in text
