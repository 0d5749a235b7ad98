"""Translation sessions' metering without sockets (issue #18): the decoded length of appends told
without a JSON parse, bill-before-forward in the relay, bill-ahead batching and the settle at
the end, exact to the picodollar; the conversation path stays unparsed."""

from __future__ import annotations

import base64
import json
from fractions import Fraction

import pytest
from test_relay import client_frame
from test_relay import server_frame
from websockets.frames import Opcode

from meshrt.shared.increments import Increment
from meshrt.shared.increments import IncrementKind
from meshrt.shared.increments import UsageTotals
from meshrt.shared.money import Money
from meshrt.shared.pricing import ModelRates
from meshrt.shared.pricing import load_price_table
from meshrt.worker import translation as tr
from meshrt.worker.meter import Meter
from meshrt.worker.relay import Relay
from meshrt.worker.relay import Target
from meshrt.worker.session_meter import GrantPriceTable
from meshrt.worker.session_meter import bill_again
from meshrt.worker.translation import append_audio_bytes
from meshrt.worker.translation import build_translation_meter

RATE = Money.from_usd("0.034")  # gpt-realtime-translate, per minute


def append(audio: bytes, kind: str = "session.input_audio_buffer.append", **extra) -> bytes:
    return json.dumps({"type": kind, "audio": base64.b64encode(audio).decode(), **extra}).encode()


def expected_cost(ticks: int) -> Money:
    """rate × seconds / 60, rounded half up once, worked out independently of the meter."""
    exact = Fraction(RATE.picodollars) * Fraction(ticks, 48_000) / 60
    return Money(int(exact + Fraction(1, 2)))


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 7, 4799, 9600, 10_001])
@pytest.mark.parametrize("kind", ["session.input_audio_buffer.append", "input_audio_buffer.append"])
def test_decoded_length_without_a_parse(size, kind):
    audio = bytes(range(256)) * (size // 256 + 1)
    assert append_audio_bytes(append(audio[:size], kind, event_id="e1")) == size


def test_decoded_length_fallbacks():
    audio = b"\xff\xfe\xfd" * 11 + b"\x01"
    b64 = base64.b64encode(audio).decode()
    escaped = b64.replace("/", "\\/")  # a JSON encoder that escapes slashes
    assert "\\/" in escaped
    assert append_audio_bytes(f'{{"type":"session.input_audio_buffer.append","audio":"{escaped}"}}'.encode()) == 34
    spelled = '{"type":"session.input_audio_buffer\\u002eappend","audio":"%s"}' % b64
    assert append_audio_bytes(spelled.encode()) == 34
    # not appends
    assert append_audio_bytes(b'{"type":"session.update","session":{"audio":{"input":{}}}}') is None
    assert append_audio_bytes(b'{"type":"session.close"}') is None
    assert append_audio_bytes(b'{"event_id":"audio","type":"session.close"}') is None
    assert append_audio_bytes(b'not json input_audio_buffer.append"') is None


def test_ticks_per_byte_from_session_configs():
    assert tr.ticks_per_byte({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}}}}) == 1
    assert tr.ticks_per_byte({"audio": {"input": {"format": {"type": "audio/pcmu"}}}}) == 6
    assert tr.ticks_per_byte({"audio": {"input": {"format": {"type": "audio/pcma"}}}}) == 6
    assert tr.ticks_per_byte({"input_audio_format": "pcm16"}) == 1
    assert tr.ticks_per_byte({"input_audio_format": "g711_ulaw"}) == 6
    assert tr.ticks_per_byte({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}) == 6
    assert tr.ticks_per_byte({"audio": {"input": {}}}) is None


def translation_relay(bill_ahead_s: float = 1.0, billing: str = "audio"):
    table = load_price_table()
    rates = table.get("gpt-realtime-translate")
    meter = Meter(rates, table)
    relay = Relay("req_1", 10**9, 1 << 24, meter=None)
    relay.translation = build_translation_meter(meter, bill_ahead_s, billing)
    return relay, meter


def run_appends(relay, pieces: list[bytes]):
    """Feed appends one read at a time, the supervisor answering each increment's Billed at
    once; returns (increments, forwarded bytes)."""
    increments, forwarded = [], b""
    for piece in pieces:
        frame = client_frame(Opcode.TEXT, append(piece))
        actions = relay.from_client(frame)
        targets = [t for t, _ in actions]
        assert targets in ([Target.UPSTREAM], [Target.BILL, Target.UPSTREAM])
        if targets[0] is Target.BILL:
            increments.append(actions[0][1])
            # never forwarded beyond what increments cover
            assert relay.translation.covered >= relay.translation.forwarded
            assert relay.billed(actions[0][1].seq) == []  # the supervisor: counted, and paid for
        forwarded += b"".join(p for t, p in actions if t is Target.UPSTREAM)
    return increments, forwarded


def test_audio_past_an_unanswered_increment_waits_for_the_supervisors_billed():
    """However fast a client sends, audio runs at most one interval past what the supervisor
    said the account could pay for: the append that needs a new increment is held (and every
    read after it) until `Billed` of the last one, or the shell's deadline (seq 0)."""
    relay, _ = translation_relay(bill_ahead_s=0.4)
    chunk = [client_frame(Opcode.TEXT, append(bytes(9600))) for _ in range(6)]
    first = relay.from_client(chunk[0])  # 0.2 s: increment 1 covers 0.6 s
    assert [t for t, _ in first] == [Target.BILL, Target.UPSTREAM] and relay.translation.awaiting == 1
    assert [t for t, _ in relay.from_client(chunk[1] + chunk[2])] == [Target.UPSTREAM]  # 0.6 s: covered
    assert relay.from_client(chunk[3]) == [] and relay.holding  # 0.8 s would need increment 2
    assert relay.from_client(chunk[4]) == [] and relay.awaiting_billed == 1
    assert relay.translation.forwarded == 3 * 9600
    released = relay.billed(1)
    assert [t for t, _ in released] == [Target.BILL, Target.UPSTREAM, Target.UPSTREAM]
    assert released[0][1].seq == 2 and not relay.holding and relay.translation.awaiting == 2
    assert [t for t, _ in relay.from_client(chunk[5])] == [Target.UPSTREAM]  # 1.2 s: covered
    assert relay.from_client(chunk[0]) == [] and relay.holding  # 1.4 s: held for Billed of 2
    assert relay.billed(1) == [] and relay.holding  # an older answer releases nothing
    assert [t for t, _ in relay.billed(0)] == [Target.BILL, Target.UPSTREAM]  # the deadline passed
    assert relay.translation.forwarded == 7 * 9600 and not relay.holding
    # a stop (insufficient_quota) while audio waits: it is dropped, so the client's close is read
    assert relay.from_client(chunk[1] + chunk[2] + chunk[3] + chunk[4] + chunk[5]) != [] and relay.holding
    relay.end("insufficient_quota")
    assert not relay.holding and relay.awaiting_billed is None
    assert relay.billed(0) == []


def odd_pieces(audio: bytes) -> list[bytes]:
    out, at, sizes = [], 0, (1, 4799, 333, 7, 10_001, 9600)
    while at < len(audio):
        out.append(audio[at : at + sizes[len(out) % len(sizes)]])
        at += len(out[-1])
    return out


@pytest.mark.parametrize("fmt,ticks_per_byte", [({"type": "audio/pcm", "rate": 24000}, 1), ({"type": "audio/pcmu"}, 6)])
@pytest.mark.parametrize("odd", [False, True])
def test_relay_bills_before_forwarding_and_settles_to_the_picodollar(fmt, ticks_per_byte, odd):
    relay, _ = translation_relay()
    created = json.dumps({"type": "session.created", "session": {"audio": {"input": {"format": fmt}}}}).encode()
    relay.from_upstream(server_frame(Opcode.TEXT, created))
    audio = bytes(i % 251 for i in range(7 * 9600 + 13))
    pieces = odd_pieces(audio) if odd else [audio[i : i + 9600] for i in range(0, len(audio), 9600)]
    increments, _ = run_appends(relay, pieces)
    settle = relay.settle_translation()
    assert settle is not None and settle.cost <= Money.ZERO
    increments.append(settle)
    ticks = len(audio) * ticks_per_byte
    totals = UsageTotals.from_increments(increments)
    assert totals.audio_ticks == ticks
    assert totals.cost == expected_cost(ticks) == tr.audio_cost(RATE, ticks)
    assert [i.seq for i in increments] == list(range(1, len(increments) + 1))
    assert all(i.kind is IncrementKind.AUDIO for i in increments)
    # batched: one increment per second of audio billed ahead, not one per append
    assert len(increments) - 1 <= -(-ticks // 48_000)
    if ticks_per_byte == 1:  # 200 ms appends: about one increment in five
        assert len(increments) - 1 < len(pieces)
    assert relay.settle_translation() is None  # settled once


def test_supervisor_reprices_audio_increments_the_same():
    relay, meter = translation_relay(bill_ahead_s=0.37)
    increments, _ = run_appends(relay, odd_pieces(bytes(50_000)))
    increments.append(relay.settle_translation())
    rates = meter.rates
    table = GrantPriceTable({"model": rates.snapshot(), "transcription": {}})
    for increment in increments:
        bill = bill_again(table, increment)
        assert (bill.cost, bill.by_category, bill.unpriced) == (
            increment.cost,
            increment.by_category,
            increment.unpriced,
        )
    # and from JSON, as the spool and the channel carry them
    assert [Increment.from_json(i.to_json()) for i in increments] == increments


def test_a_client_format_change_counts_at_the_denser_rate_until_upstream_answers():
    relay, _ = translation_relay(bill_ahead_s=0.001)
    update = {"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}}
    relay.from_client(client_frame(Opcode.TEXT, json.dumps(update).encode()))
    run_appends(relay, [bytes(800)])
    assert relay.translation.forwarded == 800 * 6
    answered = {"type": "session.updated", "session": {"audio": {"input": {"format": {"type": "audio/pcm"}}}}}
    relay.from_upstream(server_frame(Opcode.TEXT, json.dumps(answered).encode()))  # upstream refused the change
    run_appends(relay, [bytes(800)])
    assert relay.translation.forwarded == 800 * 6 + 800


def test_fragmented_appends_are_billed_as_all_audio_before_each_fragment():
    relay, _ = translation_relay(bill_ahead_s=0.001)
    body = append(bytes(4800))
    first = relay.from_client(client_frame(Opcode.TEXT, body[:100], fin=False))
    rest = relay.from_client(client_frame(Opcode.CONT, body[100:], fin=True))
    assert [t for t, _ in first] == [Target.BILL, Target.UPSTREAM]
    assert [t for t, _ in rest] == [Target.BILL, Target.UPSTREAM]
    assert relay.translation.forwarded >= 4800


def test_conversation_sessions_relay_client_frames_unparsed(monkeypatch):
    """The conversation path is unchanged: no translation meter, client frames forwarded as the
    same bytes in one action, and nothing reads their payload."""

    def refuse(*args):
        raise AssertionError("a conversation session's client frame was parsed")

    monkeypatch.setattr("meshrt.worker.relay.wsf.payload", refuse)
    monkeypatch.setattr(tr, "append_audio_bytes", refuse)
    relay = Relay("req_1", 10**9, 1 << 24)
    assert relay.translation is None
    frames = b"".join(client_frame(Opcode.TEXT, append(bytes(n), "input_audio_buffer.append")) for n in (9600, 7))
    assert relay.from_client(frames) == [(Target.UPSTREAM, frames)]


def test_shipped_translation_rate_and_models_json():
    table = load_price_table()
    rates = table.translation("gpt-realtime-translate")
    assert rates is not None and rates.per_minute == RATE and rates.realtime
    assert rates.pricing_json() == {
        "currency": "usd",
        "unit": "per_minute",
        "per_minute": "0.034",
        "audio_per_minute": "0.034",
    }
    assert ModelRates.from_snapshot(rates.snapshot()) == rates
    assert table.translation("gpt-realtime") is None and table.transcription("gpt-realtime-translate") is None


def test_record_audio_seconds_text():
    totals = UsageTotals()
    assert totals.audio_seconds is None
    totals.audio_ticks = 48_000 * 3 + 24_000
    assert totals.audio_seconds == "3.5"
    totals.audio_ticks = 1
    assert totals.audio_seconds == "0.000020833"


def test_simulator_answers_each_200ms_of_translation_input_and_reports_no_usage():
    from meshrt.simulator.session import SimSession

    sim = SimSession("gpt-realtime-translate", kind="translation")
    assert sim.created_event()["session"]["type"] == "translation"
    out = sim.handle(append(bytes(9600 * 2 + 4799)).decode())
    assert [e["type"] for e in out] == ["session.output_transcript.delta", "session.output_audio.delta"] * 2
    assert [e["elapsed_ms"] for e in out] == [0, 0, 200, 200]
    assert len(base64.b64decode(out[1]["delta"])) == 9600
    out = sim.handle(append(bytes(4801)).decode())  # completes the third frame
    assert [e["type"] for e in out] == ["session.output_transcript.delta", "session.output_audio.delta"]
    update = {"audio": {"input": {"format": {"type": "audio/pcmu"}, "transcription": {"model": "gpt-4o-transcribe"}}}}
    assert sim.handle(json.dumps({"type": "session.update", "session": update}))[0]["type"] == "session.updated"
    out = sim.handle(append(bytes(1600)).decode())  # 200 ms of G.711
    assert [e["type"] for e in out] == [
        "session.input_transcript.delta",
        "session.output_transcript.delta",
        "session.output_audio.delta",
    ]
    assert sim.translated_bytes == 9600 * 3 + 1600
    assert sim.handle(json.dumps({"type": "response.create"}))[0]["error"]["code"] == "invalid_value"
    assert sim.handle(json.dumps({"type": "session.close"}))[0]["type"] == "session.closed"
    every = [e["type"] for e in out]
    assert not any("usage" in t or t == "response.done" for t in every)


def test_wall_clock_billing_bills_the_sessions_time_ahead_and_settles_at_the_end():
    """MESHRT_TRANSLATION_BILLING=wall_clock: the time since the session went live is billed
    ahead (the shell calls once per interval), audio beyond it as in `audio` mode, and the end
    settles to max(audio, time)."""
    relay, _ = translation_relay(billing="wall_clock")
    assert relay.translation_clock(0.0)[0][0] is Target.BILL  # at go-live: two intervals ahead
    assert relay.translation.covered == 2 * 48_000
    assert relay.translation_clock(0.5) == []  # still a full interval ahead
    for second in (1.0, 2.0, 3.0):
        assert all(target is Target.BILL for target, _ in relay.translation_clock(second))
        assert relay.translation.covered >= relay.translation.clock + 48_000
    increments, _ = run_appends(relay, [bytes(9600)] * 3)  # 0.6 s of audio: inside the time billed
    assert increments == []
    relay.translation.clock_to(3.25, bill=False)  # the session ended at 3.25 s
    settle = relay.settle_translation()
    assert relay.translation.covered == 3 * 48_000 + 12_000
    assert settle.cost < Money.ZERO
    # audio mode ignores the clock
    audio_only, _ = translation_relay()
    assert audio_only.translation_clock(5.0) == [] and audio_only.settle_translation() is None


def test_the_rounding_example_of_billing_md():
    """2.5 s of PCM16 (120 000 bytes) at $0.034/min: 1 416 666 666.67 pd → 1 416 666 667 pd."""
    assert tr.audio_cost(RATE, 120_000) == Money(1_416_666_667)
    assert tr.audio_cost(Money(1_440_000), 1) == Money(1)  # an exact half rounds up
    assert tr.audio_cost(Money(1_439_999), 1) == Money(0)


def test_translation_settings():
    from meshrt.shared.settings import SettingsError
    from meshrt.shared.settings import load_settings

    defaults = load_settings({})
    assert (defaults.translation_billing, defaults.translation_bill_ahead_s) == ("audio", 1.0)
    chosen = load_settings({"MESHRT_TRANSLATION_BILLING": "wall_clock", "MESHRT_TRANSLATION_BILL_AHEAD_S": "0.5"})
    assert (chosen.translation_billing, chosen.translation_bill_ahead_s) == ("wall_clock", 0.5)
    for bad in ({"MESHRT_TRANSLATION_BILLING": "tokens"}, {"MESHRT_TRANSLATION_BILL_AHEAD_S": "0"}):
        with pytest.raises(SettingsError):
            load_settings(bad)
