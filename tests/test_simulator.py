"""Tests of the OpenAI Realtime upstream simulator (meshrt.simulator).

The simulator runs in a subprocess (``python -m meshrt.simulator --port 0``)
and is driven over real sockets: by the official ``openai`` SDK, and by a plain
``websockets`` client where the test needs raw frames. Every server event is
validated against the SDK's pydantic models (GA, or beta under OpenAI-Beta).
Expected usage numbers are recomputed here from the formula in docs/simulator.md.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import sys
import tempfile
import time
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from typing import Iterator

import pytest
from openai import AsyncOpenAI
from openai.types.beta.realtime import RealtimeServerEvent as BetaServerEvent
from openai.types.realtime import RealtimeServerEvent as GAServerEvent
from test_meter import ga_usage  # the meter's tests build the same GA usage object
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.exceptions import ConnectionClosedOK
from websockets.exceptions import InvalidMessage
from websockets.exceptions import InvalidStatus

from meshrt import simulator
from meshrt.dev.children import wait_for_line
from meshrt.simulator.server import FAULT_AFTER_TICKS
from meshrt.simulator.session import DEFAULT_INSTRUCTIONS

TEST_DEADLINE_S = 20
ONE_SECOND = b"\x00\x00" * 24_000  # 1 s of PCM16 24 kHz mono silence
INSTRUCTIONS = "You are a terse test assistant."


# --- the formula, restated independently of the implementation ---------------


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def text_tok(text: str) -> int:
    return ceil_div(len(text), 4)


def in_audio_tok(n_bytes: int) -> int:
    return ceil_div(n_bytes * 10, 48_000)


# --- event validation against the SDK's models ---------------------------------


def _models_by_type(union: Any) -> dict[str, Any]:
    inner = typing.get_args(union)[0]  # Annotated[Union[...], PropertyInfo]
    models = {}
    for cls in typing.get_args(inner):
        (literal,) = typing.get_args(cls.model_fields["type"].annotation)
        models[literal] = cls
    return models


GA_MODELS = _models_by_type(GAServerEvent)
BETA_MODELS = _models_by_type(BetaServerEvent)


def validated(raw: str | bytes, beta: bool = False) -> dict:
    event = json.loads(raw)
    models = BETA_MODELS if beta else GA_MODELS
    assert event["type"] in models, f"not a {'beta' if beta else 'GA'} server event: {event['type']}"
    models[event["type"]].model_validate(event)
    return event


# --- running the simulator ----------------------------------------------------------


@dataclass
class Sim:
    proc: subprocess.Popen
    port: int

    def url(self, query: str = "model=gpt-realtime", path: str = "/v1/realtime") -> str:
        return f"ws://127.0.0.1:{self.port}{path}?{query}" if query else f"ws://127.0.0.1:{self.port}{path}"

    def client(self, api_key: str = "sk-test") -> AsyncOpenAI:
        return AsyncOpenAI(api_key=api_key, websocket_base_url=f"ws://127.0.0.1:{self.port}/v1")


@contextmanager
def running_sim(*args: str, stop_signal: int = signal.SIGTERM) -> Iterator[Sim]:
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshrt.simulator", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            # the listening line, whole and exact: it is the simulator's documented interface
            match = wait_for_line(
                proc, r"^meshrt sim listening on ws://127\.0\.0\.1:(\d+)/v1/realtime$", 15, "the simulator"
            )
            yield Sim(proc, int(match.group(1)))
        finally:
            if proc.poll() is None:
                proc.send_signal(stop_signal)
            returncode = proc.wait(timeout=10)
            stderr.seek(0)
            assert returncode == 0, stderr.read().decode()


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    with running_sim() as running:
        yield running


def run(coro: Any) -> Any:
    async def with_deadline() -> Any:
        return await asyncio.wait_for(coro, TEST_DEADLINE_S)

    return asyncio.run(with_deadline())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def sdk_until(conn: Any, event_type: str) -> list[dict]:
    """SDK connection: events up to and including the first ``event_type``."""
    events = []
    while True:
        raw = await conn.recv_bytes()
        conn.parse_event(raw)
        events.append(validated(raw))
        if events[-1]["type"] == event_type:
            return events


async def ws_until(ws: ClientConnection, event_type: str, beta: bool = False) -> list[dict]:
    events = []
    while True:
        events.append(validated(await ws.recv(), beta))
        if events[-1]["type"] == event_type:
            return events


def ws_connect(url: str, headers: dict | None = None, **kwargs: Any) -> Any:
    return connect(
        url,
        additional_headers=headers or {"Authorization": "Bearer sk-test"},
        compression=None,
        ping_interval=None,
        open_timeout=10,
        **kwargs,
    )


def of_type(events: list[dict], event_type: str) -> list[dict]:
    return [e for e in events if e["type"] == event_type]


# --- (1) the official SDK runs a conversation ---------------------------------------


def test_sdk_conversation_usage_matches_formula(sim: Sim) -> None:
    async def body() -> None:
        async with sim.client().realtime.connect(model="gpt-realtime") as conn:
            created = (await sdk_until(conn, "session.created"))[-1]["session"]
            assert created["id"].startswith("sess_") and created["model"] == "gpt-realtime"
            assert created["audio"]["input"]["transcription"] is None
            await conn.session.update(
                session={"type": "realtime", "instructions": INSTRUCTIONS, "output_modalities": ["audio"]}
            )
            updated = (await sdk_until(conn, "session.updated"))[-1]["session"]
            assert updated["instructions"] == INSTRUCTIONS and updated["id"] == created["id"]
            await conn.input_audio_buffer.append(audio=b64(ONE_SECOND))
            await conn.input_audio_buffer.commit()
            committed = await sdk_until(conn, "conversation.item.done")
            assert [e["type"] for e in committed] == [
                "input_audio_buffer.committed",
                "conversation.item.added",
                "conversation.item.done",
            ]
            await conn.response.create()
            events = await sdk_until(conn, "response.done")
            rate_limits = (await sdk_until(conn, "rate_limits.updated"))[-1]
        assert rate_limits["rate_limits"][0]["name"] == "requests"
        _check_audio_response(events)

    run(body())


def _check_audio_response(events: list[dict]) -> None:
    types = [e["type"] for e in events]
    assert types[:4] == [
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
    ]
    assert types[-6:] == [
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    audio = of_type(events, "response.output_audio.delta")
    assert len(audio) == 20  # 1.0 s in 50 ms chunks
    assert sum(len(base64.b64decode(e["delta"])) for e in audio) == 48_000
    transcript = "".join(e["delta"] for e in of_type(events, "response.output_audio_transcript.delta"))
    assert transcript == of_type(events, "response.output_audio_transcript.done")[0]["transcript"]
    done = events[-1]["response"]
    assert done["status"] == "completed"
    assert done["output"][0]["content"][0] == {"type": "output_audio", "transcript": transcript}
    assert done["usage"] == ga_usage(
        text=text_tok(INSTRUCTIONS), audio=10, image=0, cached=(0, 0, 0), text_out=text_tok(transcript), audio_out=20
    )


# --- (2) later responses report cached tokens --------------------------------------------


QUESTION = "Describe this picture."
IMAGE = "data:image/png;base64," + b64(b"\x89PNG\r\n\x1a\n")


def test_second_response_reports_cached_tokens_by_modality(sim: Sim) -> None:
    async def body() -> list[dict]:
        done = []
        async with sim.client().realtime.connect(model="gpt-realtime-mini") as conn:
            await conn.session.update(session={"type": "realtime", "instructions": INSTRUCTIONS})
            await conn.conversation.item.create(
                item={
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": QUESTION}, {"type": "input_image", "image_url": IMAGE}],
                }
            )
            added = of_type(await sdk_until(conn, "conversation.item.done"), "conversation.item.added")
            assert added[0]["item"]["content"][1]["type"] == "input_image"
            for audio, response in (
                (ONE_SECOND, None),
                (ONE_SECOND[:24_000], None),
                (b"", {"output_modalities": ["text"]}),
            ):
                if audio:
                    await conn.input_audio_buffer.append(audio=b64(audio))
                    await conn.input_audio_buffer.commit()
                await (conn.response.create(response=response) if response else conn.response.create())
                done.append(await sdk_until(conn, "response.done"))
        return done

    first, second, third = run(body())
    text = text_tok(INSTRUCTIONS) + text_tok(QUESTION)
    transcript1 = first[-1]["response"]["output"][0]["content"][0]["transcript"]
    assert first[-1]["response"]["usage"] == ga_usage(text, 10, 85, (0, 0, 0), text_tok(transcript1), 20)
    # 2nd input: instructions + question/image + 1 s user audio (all cached) + 1 s assistant audio
    # (10 input tokens) + 0.5 s user audio (5).
    transcript2 = second[-1]["response"]["output"][0]["content"][0]["transcript"]
    assert second[-1]["response"]["usage"] == ga_usage(text, 25, 85, (text, 10, 85), text_tok(transcript2), 20)
    # 3rd, text only: everything of the 2nd input is cached; the 2nd reply adds 10 audio tokens.
    assert not of_type(third, "response.output_audio.delta")
    reply = "".join(e["delta"] for e in of_type(third, "response.output_text.delta"))
    assert reply and reply == of_type(third, "response.output_text.done")[0]["text"]
    assert third[-1]["response"]["output_modalities"] == ["text"]
    assert third[-1]["response"]["usage"] == ga_usage(text, 35, 85, (text, 25, 85), text_tok(reply), 0)


# --- (3) transcription usage ------------------------------------------------------------------


PROMPT = "Expect fruit names."


@pytest.mark.parametrize("model", ["gpt-4o-transcribe", "gpt-4o-mini-transcribe", "whisper-1", "gpt-realtime-whisper"])
def test_transcription_usage(sim: Sim, model: str) -> None:
    audio = ONE_SECOND + ONE_SECOND[:24_000]  # 1.5 s

    async def body() -> dict:
        async with sim.client().realtime.connect(model="gpt-realtime") as conn:
            transcription = {"model": model, **({"prompt": PROMPT} if "transcribe" in model else {})}
            await conn.session.update(
                session={"type": "realtime", "audio": {"input": {"transcription": transcription}}}
            )
            updated = (await sdk_until(conn, "session.updated"))[-1]["session"]
            assert updated["audio"]["input"]["transcription"]["model"] == model
            await conn.input_audio_buffer.append(audio=b64(audio))
            await conn.input_audio_buffer.commit()
            return (await sdk_until(conn, "conversation.item.input_audio_transcription.completed"))[-1]

    event = run(body())
    if model in ("whisper-1", "gpt-realtime-whisper"):
        assert event["usage"] == {"type": "duration", "seconds": 1.5}
    else:
        out = text_tok(event["transcript"])
        assert event["usage"] == {
            "type": "tokens",
            "input_tokens": 15 + text_tok(PROMPT),
            "output_tokens": out,
            "total_tokens": 15 + text_tok(PROMPT) + out,
            "input_token_details": {"text_tokens": text_tok(PROMPT), "audio_tokens": 15},
        }


def test_transcription_intent_session(sim: Sim) -> None:
    async def body() -> None:
        async with ws_connect(sim.url("intent=transcription")) as ws:
            created = validated(await ws.recv())
            assert created["session"]["type"] == "transcription"
            await ws.send(
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {
                            "type": "transcription",
                            "audio": {"input": {"transcription": {"model": "whisper-1"}}},
                        },
                    }
                )
            )
            await ws_until(ws, "session.updated")
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": b64(ONE_SECOND)}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            event = (await ws_until(ws, "conversation.item.input_audio_transcription.completed"))[-1]
            assert event["usage"] == {"type": "duration", "seconds": 1.0}
            await ws.send(json.dumps({"type": "response.create"}))
            assert (await ws_until(ws, "error"))[-1]["error"]["code"] == "response_not_supported"

    run(body())


# --- (4) response.cancel ----------------------------------------------------------------------


def test_cancel_reports_partial_usage(sim: Sim) -> None:
    async def body() -> tuple[list[dict], list[dict]]:
        query = {"sim_pace": "1", "sim_response_ms": "5000"}
        async with sim.client().realtime.connect(model="gpt-realtime", extra_query=query) as conn:
            await conn.input_audio_buffer.append(audio=b64(ONE_SECOND))
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            events = []
            while len(of_type(events, "response.output_audio.delta")) < 3:
                events += await sdk_until(conn, "response.output_audio.delta")
            await conn.response.cancel()
            events += await sdk_until(conn, "response.done")
            await conn.response.cancel()  # nothing in flight any more: in-band error, socket stays open
            after = await sdk_until(conn, "error")
            await conn.session.update(session={"type": "realtime", "instructions": "still here"})
            after += await sdk_until(conn, "session.updated")
        return events, after

    events, after = run(body())
    response = events[-1]["response"]
    assert response["status"] == "cancelled"
    assert response["status_details"]["reason"] == "client_cancelled"
    assert response["output"][0]["status"] == "incomplete"
    sent = len(of_type(events, "response.output_audio.delta"))
    assert 3 <= sent < 100  # 5 s would be 100 chunks
    transcript = "".join(e["delta"] for e in of_type(events, "response.output_audio_transcript.delta"))
    usage = response["usage"]
    assert usage["output_token_details"] == {"audio_tokens": sent, "text_tokens": text_tok(transcript)}
    assert usage["input_tokens"] == text_tok(DEFAULT_INSTRUCTIONS) + 10
    assert of_type(after, "error")[0]["error"]["code"] == "response_cancel_not_active"


# --- in-band errors -----------------------------------------------------------------------------


def test_in_band_errors_keep_the_socket_open(sim: Sim) -> None:
    bad = [
        "{not json",
        json.dumps({"event_id": "evt_1"}),
        json.dumps({"type": "bogus.event", "event_id": "e2"}),
        b"\x00\x01",
        json.dumps({"type": "input_audio_buffer.commit"}),
        json.dumps({"type": "input_audio_buffer.append", "audio": "***"}),
        json.dumps([1, 2]),
    ]

    async def body() -> list[dict]:
        errors = []
        async with ws_connect(sim.url()) as ws:
            await ws_until(ws, "session.created")
            for message in bad:
                await ws.send(message)
                errors.append((await ws_until(ws, "error"))[-1]["error"])
            await ws.send(json.dumps({"type": "session.update", "session": {"instructions": "ok"}}))
            await ws_until(ws, "session.updated")
        return errors

    errors = run(body())
    assert all(e["type"] == "invalid_request_error" for e in errors)
    assert [e["code"] for e in errors] == [
        "invalid_json",
        "missing_required_parameter",
        "invalid_value",
        "unsupported_binary_frame",
        "input_audio_buffer_commit_empty",
        "invalid_value",
        "invalid_json",
    ]
    assert errors[2]["event_id"] == "e2" and errors[2]["param"] == "type"


def test_session_expires_with_error_then_close_1000(sim: Sim) -> None:
    async def body() -> None:
        async with ws_connect(sim.url("model=gpt-realtime&sim_max_session_s=0.3")) as ws:
            await ws_until(ws, "session.created")
            error = (await ws_until(ws, "error"))[-1]["error"]
            assert (error["type"], error["code"]) == ("invalid_request_error", "session_expired")
            with pytest.raises(ConnectionClosedOK):
                await ws.recv()
            assert ws.close_code == 1000 and ws.close_reason == "invalid_request_error.session_expired"

    run(body())


# --- (5) authentication and handshake validation -----------------------------------------------


def test_api_key_is_checked_before_upgrade() -> None:
    async def body(sim: Sim) -> None:
        for headers, code in (({}, "missing_api_key"), ({"Authorization": "Bearer sk-wrong"}, "invalid_api_key")):
            with pytest.raises(InvalidStatus) as caught:
                async with ws_connect(sim.url(), headers=headers or {"X-None": "1"}):
                    pass
            assert caught.value.response.status_code == 401
            assert json.loads(caught.value.response.body)["error"]["code"] == code
        with pytest.raises(InvalidStatus):
            async with sim.client("sk-wrong").realtime.connect(model="gpt-realtime"):
                pass
        async with sim.client("sk-right").realtime.connect(model="gpt-realtime") as conn:
            await sdk_until(conn, "session.created")
        protocols = ["realtime", "openai-insecure-api-key.sk-right"]
        async with ws_connect(sim.url(), headers={"X-None": "1"}, subprotocols=protocols) as ws:
            assert ws.subprotocol == "realtime"
            await ws_until(ws, "session.created")

    with running_sim("--api-key", "sk-right") as keyed:
        run(body(keyed))


@pytest.mark.parametrize(
    ("path", "query", "status"),
    [
        ("/v1/realtime", "", 400),
        ("/v1/realtime", "model=a&call_id=b", 400),
        ("/v1/realtime", "intent=translation", 400),
        ("/v1/realtime", "model=gpt-realtime&sim_fault=bogus", 400),
        ("/v1/realtime", "model=gpt-realtime&sim_response_ms=-5", 400),
        ("/v2/realtime", "model=gpt-realtime", 404),
    ],
)
def test_bad_handshakes_get_json_errors(sim: Sim, path: str, query: str, status: int) -> None:
    async def body() -> None:
        with pytest.raises(InvalidStatus) as caught:
            async with ws_connect(sim.url(query, path)):
                pass
        assert caught.value.response.status_code == status
        assert caught.value.response.headers["Content-Type"] == "application/json"
        assert set(json.loads(caught.value.response.body)["error"]) == {"message", "type", "param", "code"}

    run(body())


def test_unknown_models_are_accepted_and_unknown_calls_are_not(sim: Sim) -> None:
    """A ``call_id`` sideband joins a running WebRTC call (tests/test_simulator_calls.py); there
    is none here, so it gets OpenAI's 404 ``call_not_found``."""

    async def body() -> None:
        async with ws_connect(sim.url("model=some-future-model")) as ws:
            await ws_until(ws, "session.created")
        with pytest.raises(InvalidStatus) as caught:
            async with ws_connect(sim.url("call_id=rtc_123")):
                pass
        assert caught.value.response.status_code == 404
        assert json.loads(caught.value.response.body)["error"]["code"] == "call_not_found"

    run(body())


# --- (6) fault injection -----------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "status"), [("reject_401", 401), ("reject_429", 429), ("reject_500", 500)])
def test_reject_faults(sim: Sim, fault: str, status: int) -> None:
    async def body() -> None:
        with pytest.raises(InvalidStatus) as caught:
            async with ws_connect(sim.url(f"model=gpt-realtime&sim_fault={fault}")):
                pass
        assert caught.value.response.status_code == status
        assert "message" in json.loads(caught.value.response.body)["error"]

    run(body())


def test_refuse_fault(sim: Sim) -> None:
    async def body() -> None:
        with pytest.raises(InvalidMessage):  # the TCP connection ends without any HTTP response
            async with ws_connect(sim.url("model=gpt-realtime&sim_fault=refuse")):
                pass

    run(body())


def test_slow_accept_fault(sim: Sim) -> None:
    async def body() -> float:
        start = time.monotonic()
        async with ws_connect(sim.url("model=gpt-realtime&sim_fault=slow_accept&sim_delay_ms=400")) as ws:
            elapsed = time.monotonic() - start
            await ws_until(ws, "session.created")
        return elapsed

    assert run(body()) >= 0.4


@pytest.mark.parametrize("fault", ["close_mid_response", "drop_mid_response"])
def test_mid_response_faults(sim: Sim, fault: str) -> None:
    async def body() -> tuple[list[dict], Any]:
        events = []
        async with ws_connect(sim.url(f"model=gpt-realtime&sim_fault={fault}")) as ws:
            await ws.send(json.dumps({"type": "response.create"}))
            with pytest.raises(ConnectionClosed) as caught:
                while True:
                    events.append(validated(await ws.recv()))
        return events, caught.value

    events, closed = run(body())
    assert len(of_type(events, "response.output_audio.delta")) == FAULT_AFTER_TICKS
    assert not of_type(events, "response.done")
    if fault == "close_mid_response":
        assert closed.rcvd is not None and closed.rcvd.code == 1011
    else:
        assert closed.rcvd is None  # TCP aborted without a close frame


def test_invalid_key_after_accept_fault(sim: Sim) -> None:
    async def body() -> None:
        async with ws_connect(sim.url("model=gpt-realtime&sim_fault=invalid_key_after_accept")) as ws:
            error = validated(await ws.recv())
            assert error["error"]["code"] == "invalid_api_key"
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 3000
            assert ws.close_reason == "invalid_request_error.invalid_api_key"

    run(body())


def test_global_fault_flag_and_per_connection_override() -> None:
    async def body(sim: Sim) -> None:
        with pytest.raises(InvalidStatus) as caught:
            async with ws_connect(sim.url()):
                pass
        assert caught.value.response.status_code == 429
        async with ws_connect(sim.url("model=gpt-realtime&sim_fault=none")) as ws:
            await ws_until(ws, "session.created")

    with running_sim("--fault", "reject_429", stop_signal=signal.SIGINT) as faulty:
        run(body(faulty))


# --- (7) frame log ---------------------------------------------------------------------------------


def test_frame_log_records_exact_bytes(tmp_path: Any) -> None:
    odd_text = '{ "type" : "session.update",\n  "session": {"instructions": "h\u00e9llo \u2713"} }'.encode()
    binary = b"\x00\x01\xff"

    async def body(sim: Sim) -> tuple[str, list[bytes]]:
        headers = {"Authorization": "Bearer sk-test", "X-Trace-Id": "abc 123"}
        async with ws_connect(sim.url("model=gpt-realtime&x=1"), headers=headers) as ws:
            received = [await ws.recv(decode=False)]
            await ws.send(odd_text, text=True)
            received.append(await ws.recv(decode=False))
            await (await ws.ping(b"ping!"))
            await ws.send(binary)
            received.append(await ws.recv(decode=False))
        return json.loads(received[0])["session"]["id"], received

    with running_sim("--frame-log-dir", str(tmp_path)) as logged:
        session_id, received = run(body(logged))
        lines = _wait_for_log(tmp_path / f"{session_id}.jsonl")
    request = lines[0]
    assert (request["kind"], request["path"], request["query"]) == ("request", "/v1/realtime", "model=gpt-realtime&x=1")
    assert ["X-Trace-Id", "abc 123"] in request["headers"] and ["Authorization", "Bearer sk-test"] in request["headers"]
    frames = [(f["dir"], f["opcode"], base64.b64decode(f["payload_b64"])) for f in lines[1:]]
    close = b"\x03\xe8"  # 1000, no reason
    assert frames == [
        ("out", "text", received[0]),
        ("in", "text", odd_text),
        ("out", "text", received[1]),
        ("in", "ping", b"ping!"),
        ("out", "pong", b"ping!"),
        ("in", "binary", binary),
        ("out", "text", received[2]),
        ("in", "close", close),
        ("out", "close", close),
    ]


def _wait_for_log(path: Any) -> list[dict]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if path.exists():
            lines = [json.loads(line) for line in path.read_text().splitlines()]
            if lines and lines[-1].get("dir") == "out" and lines[-1].get("opcode") == "close":
                return lines
        time.sleep(0.02)  # polling a file another process writes, under a deadline
    raise AssertionError(f"frame log {path} never recorded the closing handshake")


# --- (8) beta protocol ------------------------------------------------------------------------------


def test_beta_protocol_names_and_usage_shape(sim: Sim) -> None:
    async def body() -> tuple[list[dict], list[dict], list[dict]]:
        async with ws_connect(
            sim.url(), headers={"Authorization": "Bearer sk-test", "OpenAI-Beta": "realtime=v1"}
        ) as ws:
            created = (await ws_until(ws, "session.created", beta=True))[-1]["session"]
            assert "modalities" in created and "type" not in created
            await ws.send(
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {"instructions": INSTRUCTIONS, "input_audio_transcription": {"model": "whisper-1"}},
                    }
                )
            )
            await ws_until(ws, "session.updated", beta=True)
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": b64(ONE_SECOND)}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            commit = await ws_until(ws, "conversation.item.input_audio_transcription.completed", beta=True)
            await ws.send(json.dumps({"type": "response.create"}))
            first = await ws_until(ws, "response.done", beta=True)
            await ws.send(json.dumps({"type": "response.create", "response": {"modalities": ["text"]}}))
            second = await ws_until(ws, "response.done", beta=True)
        return commit, first, second

    commit, first, second = run(body())
    assert [e["type"] for e in commit] == [
        "input_audio_buffer.committed",
        "conversation.item.created",
        "conversation.item.input_audio_transcription.completed",
    ]
    assert commit[-1]["usage"] == {"type": "duration", "seconds": 1.0}
    types = {e["type"] for e in first}
    assert {
        "response.audio.delta",
        "response.audio_transcript.delta",
        "response.audio.done",
        "conversation.item.created",
    } <= types
    assert not any(t.startswith(("response.output_audio", "conversation.item.added")) for t in types)
    transcript = "".join(e["delta"] for e in of_type(first, "response.audio_transcript.delta"))
    usage = first[-1]["response"]["usage"]
    assert usage == {
        "total_tokens": text_tok(INSTRUCTIONS) + 10 + text_tok(transcript) + 20,
        "input_tokens": text_tok(INSTRUCTIONS) + 10,
        "output_tokens": text_tok(transcript) + 20,
        "input_token_details": {"cached_tokens": 0, "text_tokens": text_tok(INSTRUCTIONS), "audio_tokens": 10},
        "output_token_details": {"text_tokens": text_tok(transcript), "audio_tokens": 20},
    }
    assert of_type(second, "response.text.delta") and not of_type(second, "response.audio.delta")
    details = second[-1]["response"]["usage"]["input_token_details"]
    assert details == {
        "cached_tokens": text_tok(INSTRUCTIONS) + 10,
        "text_tokens": text_tok(INSTRUCTIONS),
        "audio_tokens": 20,
    }


def test_beta_selected_by_subprotocol(sim: Sim) -> None:
    async def body() -> dict:
        protocols = ["realtime", "openai-beta.realtime-v1"]
        async with ws_connect(sim.url(), subprotocols=protocols) as ws:
            return (await ws_until(ws, "session.created", beta=True))[-1]

    assert "modalities" in run(body())["session"]


# --- (9) echo mode -------------------------------------------------------------------------------------


def test_echo_mode_returns_every_frame_verbatim(sim: Sim) -> None:
    async def body() -> None:
        async with ws_connect(sim.url("model=gpt-realtime&sim_echo=1")) as ws:
            await ws_until(ws, "session.created")
            for message in (
                '{"type": "response.create"}',
                "not json at all \u2713",
                b"\x00\xffbinary",
                json.dumps({"type": "input_audio_buffer.append", "audio": b64(ONE_SECOND)}),
            ):
                await ws.send(message)
                echoed = await ws.recv()
                assert echoed == message and type(echoed) is type(message)
            with pytest.raises(TimeoutError):  # nothing but echoes: no response was generated
                await asyncio.wait_for(ws.recv(), 0.3)

    run(body())


# --- in-process API and the sans-I/O model ---------------------------------------------------------------


def test_serve_in_process_calls_ready_with_the_port() -> None:
    async def body() -> None:
        port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        server = asyncio.create_task(simulator.serve(port=0, ready=port.set_result))
        try:
            sim = Sim(proc=None, port=await port)  # type: ignore[arg-type]
            async with ws_connect(sim.url()) as ws:
                await ws_until(ws, "session.created")
        finally:
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)

    run(body())


def test_session_model_without_sockets() -> None:
    session = simulator.SimSession("gpt-realtime", response_ms=120)
    assert session.handle(json.dumps({"type": "input_audio_buffer.append", "audio": b64(ONE_SECOND)})) == []
    assert [e["type"] for e in session.handle('{"type": "input_audio_buffer.commit"}')] == [
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    (start,) = session.handle('{"type": "response.create"}')
    run_ = start.run
    session.response_head(run_)
    deltas = [e for tick in range(run_.ticks) for e in session.response_tick(run_, tick)]
    assert [e["type"] for e in deltas].count("response.output_audio.delta") == 3  # 50 + 50 + 20 ms
    done = session.response_finish(run_, "completed")[-2]["response"]
    assert done["usage"]["output_token_details"]["audio_tokens"] == 3  # ceil(120 / 50)


def test_cli_rejects_bad_arguments() -> None:
    for args, needle in (
        (["--port", "70000"], "--port"),
        (["--fault", "nope"], "--fault"),
        (["--host", ""], "--host"),
        (["--tls-cert", "c.pem"], "go together"),
        (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], "--tls-cert"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "meshrt.simulator", *args], capture_output=True, text=True, timeout=20
        )
        assert proc.returncode == 2 and needle in proc.stderr
