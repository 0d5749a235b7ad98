"""The meter, fed raw upstream frames as bytes: what each frame costs, to the picodollar.

Expected costs are computed here by hand, in Decimal USD per 1M tokens, from OpenAI's published
rates (docs/billing.md, The price file) — not with the meter's own code.
"""

from __future__ import annotations

import itertools
import json
import logging
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from meshrt.shared.money import Money
from meshrt.shared.pricing import ModelRates
from meshrt.shared.pricing import PriceTable
from meshrt.shared.pricing import load_price_table
from meshrt.worker.meter import Increment
from meshrt.worker.meter import IncrementKind
from meshrt.worker.meter import Meter
from meshrt.worker.meter import UsageTotals
from meshrt.worker.meter import may_carry_usage

# USD per 1M tokens, docs/billing.md, The price file: modality → (input, cached input, output).
RATES = {
    "gpt-realtime-2.1": {"text": ("4", "0.40", "24"), "audio": ("32", "0.40", "64"), "image": ("5", "0.50", None)},
    "gpt-realtime-2": {"text": ("4", "0.40", "24"), "audio": ("32", "0.40", "64"), "image": ("5", "0.50", None)},
    "gpt-realtime-1.5": {"text": ("4", "0.40", "16"), "audio": ("32", "0.40", "64"), "image": ("5", "0.50", None)},
    "gpt-realtime": {"text": ("4", "0.40", "16"), "audio": ("32", "0.40", "64"), "image": ("5", "0.50", None)},
    "gpt-realtime-2.1-mini": {
        "text": ("0.60", "0.06", "2.40"),
        "audio": ("10", "0.30", "20"),
        "image": ("0.80", "0.08", None),
    },
    "gpt-realtime-mini": {
        "text": ("0.60", "0.06", "2.40"),
        "audio": ("10", "0.30", "20"),
        "image": ("0.80", "0.08", None),
    },
    "gpt-4o-mini-realtime-preview": {"text": ("0.60", "0.30", "2.40"), "audio": ("10", "0.30", "20"), "image": None},
    "gpt-4o-realtime-preview": {"text": ("5", "2.50", "20"), "audio": ("40", "2.50", "80"), "image": None},
}
MILLION = Decimal(1_000_000)


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return load_price_table()


def meter_for(table: PriceTable, model: str = "gpt-realtime") -> Meter:
    return Meter(table.get(model), table)


def frame(event: dict, compact: bool = True) -> bytes:
    separators = (",", ":") if compact else (", ", ": ")
    return json.dumps(event, separators=separators).encode()


def ga_usage(text=0, audio=0, image=0, cached=(0, 0, 0), text_out=0, audio_out=0, **extra):
    usage = {
        "total_tokens": text + audio + image + text_out + audio_out,
        "input_tokens": text + audio + image,
        "output_tokens": text_out + audio_out,
        "input_token_details": {
            "text_tokens": text,
            "audio_tokens": audio,
            "image_tokens": image,
            "cached_tokens": sum(cached),
            "cached_tokens_details": {"text_tokens": cached[0], "audio_tokens": cached[1], "image_tokens": cached[2]},
        },
        "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
    }
    usage.update(extra)
    return usage


def response_done(usage, status="completed", response_id="resp_1", compact=True) -> bytes:
    return frame(
        {
            "type": "response.done",
            "event_id": "event_1",
            "response": {
                "object": "realtime.response",
                "id": response_id,
                "status": status,
                "output": [],
                "usage": usage,
            },
        },
        compact,
    )


def transcription_done(usage, item_id="item_1") -> bytes:
    return frame(
        {
            "type": "conversation.item.input_audio_transcription.completed",
            "event_id": "event_2",
            "item_id": item_id,
            "content_index": 0,
            "transcript": "hello there",
            "usage": usage,
        }
    )


def ga_session_updated(transcription) -> bytes:
    return frame(
        {
            "type": "session.updated",
            "event_id": "event_3",
            "session": {
                "type": "realtime",
                "model": "gpt-realtime",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "transcription": transcription}},
            },
        }
    )


def beta_session_updated(transcription, event_type="session.updated") -> bytes:
    return frame(
        {
            "type": event_type,
            "event_id": "event_4",
            "session": {"id": "sess_1", "input_audio_transcription": transcription},
        }
    )


def usd(amount: Decimal) -> Money:
    return Money.from_usd(amount)


# --- may_carry_usage ---------------------------------------------------------------------------

USAGE_TYPES = [
    "response.done",
    "conversation.item.input_audio_transcription.completed",
    "session.created",
    "session.updated",
    "transcription_session.updated",
]


@pytest.mark.parametrize("event_type", USAGE_TYPES)
@pytest.mark.parametrize("compact", [True, False])
def test_may_carry_usage_selects_usage_and_session_events(event_type, compact):
    assert may_carry_usage(frame({"type": event_type, "event_id": "e"}, compact))


@pytest.mark.parametrize(
    "event_type",
    [
        "response.output_audio.delta",
        "response.created",
        "rate_limits.updated",
        "error",
        "response.done.extra",
        "session.update",
        "input_audio_buffer.committed",
    ],
)
@pytest.mark.parametrize("compact", [True, False])
def test_may_carry_usage_skips_other_events(event_type, compact):
    assert not may_carry_usage(frame({"type": event_type, "delta": "A" * 20000}, compact))


def test_may_carry_usage_finds_type_after_event_id():
    assert may_carry_usage(frame({"event_id": "event_1", "type": "response.done"}))


def test_may_carry_usage_finds_type_after_a_long_transcript():
    payload = frame(
        {
            "event_id": "e",
            "transcript": "x" * 5000,
            "usage": {},
            "type": "conversation.item.input_audio_transcription.completed",
        }
    )
    assert may_carry_usage(payload)


def test_may_carry_usage_is_not_fooled_by_a_nested_type_first():
    payload = frame({"response": {"output": [{"type": "message"}]}, "type": "response.done"})
    assert may_carry_usage(payload)


def test_may_carry_usage_accepts_bytearray_and_never_raises_on_junk():
    assert may_carry_usage(bytearray(b'{"type":"response.done"}'))
    assert not may_carry_usage(b"")
    assert not may_carry_usage(b"\xff\xfe\x00garbage")


# --- responses: exact cost per model -----------------------------------------------------------


@pytest.mark.parametrize("model", sorted(RATES))
def test_response_cost_is_exact_for_every_shipped_model(table, model):
    rates = RATES[model]
    (ti, tc, to), (ai, ac, ao) = rates["text"], rates["audio"]
    image = rates["image"] is not None
    usage = ga_usage(
        text=1000,
        audio=5000,
        image=300 if image else 0,
        cached=(200, 1000, 100 if image else 0),
        text_out=250,
        audio_out=2000,
    )
    per_1m = (
        800 * Decimal(ti)
        + 200 * Decimal(tc)
        + 4000 * Decimal(ai)
        + 1000 * Decimal(ac)
        + 250 * Decimal(to)
        + 2000 * Decimal(ao)
    )
    if image:
        ii, ic, _ = rates["image"]
        per_1m += 200 * Decimal(ii) + 100 * Decimal(ic)

    increment = meter_for(table, model).observe(response_done(usage))

    assert increment.cost == usd(per_1m / MILLION)
    assert increment.model == model
    assert increment.kind is IncrementKind.RESPONSE
    assert not increment.unpriced


def test_gpt_realtime_response_worked_example(table):
    # text: 800×4 + 200×0.40 = 3280; audio: 4000×32 + 1000×0.40 = 128400;
    # image: 200×5 + 100×0.50 = 1050; output: 250×16 + 2000×64 = 132000 → 264730 / 1M USD
    usage = ga_usage(text=1000, audio=5000, image=300, cached=(200, 1000, 100), text_out=250, audio_out=2000)
    increment = meter_for(table).observe(response_done(usage))
    assert increment.cost == Money.from_usd("0.264730")
    assert increment.by_category == {
        "text_input": Money.from_usd("0.0032"),
        "text_cached_input": Money.from_usd("0.00008"),
        "audio_input": Money.from_usd("0.128"),
        "audio_cached_input": Money.from_usd("0.0004"),
        "image_input": Money.from_usd("0.001"),
        "image_cached_input": Money.from_usd("0.00005"),
        "text_output": Money.from_usd("0.004"),
        "audio_output": Money.from_usd("0.128"),
    }
    assert increment.total_tokens == 8550
    assert increment.response_id == "resp_1"


def test_an_alias_bills_at_its_models_rates(table):
    meter = Meter(table.get("gpt-realtime-2025-08-28"), table)
    increment = meter.observe(response_done(ga_usage(text_out=1000)))
    assert increment.model == "gpt-realtime"
    assert increment.cost == usd(1000 * Decimal("16") / MILLION)


def test_spaced_json_is_metered_like_compact_json(table):
    usage = ga_usage(text=10, audio=20, text_out=5)
    compact = meter_for(table).observe(response_done(usage))
    spaced = meter_for(table).observe(response_done(usage, compact=False))
    assert spaced == compact


# --- cached tokens -----------------------------------------------------------------------------


def test_ga_cached_tokens_follow_their_per_modality_split(table):
    # gpt-realtime-mini: text cached 0.06, audio cached 0.30 — the split matters.
    usage = ga_usage(text=500, audio=1000, cached=(100, 600, 0))
    increment = meter_for(table, "gpt-realtime-mini").observe(response_done(usage))
    expected = 400 * Decimal("0.60") + 100 * Decimal("0.06") + 400 * Decimal("10") + 600 * Decimal("0.30")
    assert increment.cost == usd(expected / MILLION)


def test_beta_cached_tokens_go_to_text_first_then_audio(table):
    # Beta usage: one cached_tokens figure, no split. 800 cached: 500 text (all of it), 300 audio.
    usage = {
        "total_tokens": 1800,
        "input_tokens": 1500,
        "output_tokens": 300,
        "input_token_details": {"text_tokens": 500, "audio_tokens": 1000, "cached_tokens": 800},
        "output_token_details": {"text_tokens": 100, "audio_tokens": 200},
    }
    increment = meter_for(table, "gpt-realtime-mini").observe(response_done(usage))
    expected = (
        0 * Decimal("0.60")
        + 500 * Decimal("0.06")
        + 700 * Decimal("10")
        + 300 * Decimal("0.30")
        + 100 * Decimal("2.40")
        + 200 * Decimal("20")
    )
    assert expected == Decimal(11360)
    assert increment.cost == Money.from_usd("0.01136")
    assert increment.by_category["text_cached_input"] == usd(500 * Decimal("0.06") / MILLION)
    assert "text_input" not in increment.by_category


def test_beta_cached_tokens_spill_to_image_last(table):
    usage = {
        "input_tokens": 130,
        "input_token_details": {"text_tokens": 50, "audio_tokens": 30, "image_tokens": 50, "cached_tokens": 100},
    }
    increment = meter_for(table).observe(response_done(usage))
    expected = 50 * Decimal("0.40") + 30 * Decimal("0.40") + 20 * Decimal("0.50") + 30 * Decimal("5")
    assert increment.cost == usd(expected / MILLION)


def test_cached_tokens_beyond_the_ga_split_follow_the_beta_rule(table):
    # cached_tokens 800 but details account for 600: the other 200 go to text (room 400).
    usage = ga_usage(text=500, audio=1000, cached=(100, 500, 0))
    usage["input_token_details"]["cached_tokens"] = 800
    increment = meter_for(table, "gpt-realtime-mini").observe(response_done(usage))
    expected = 200 * Decimal("0.60") + 300 * Decimal("0.06") + 500 * Decimal("10") + 500 * Decimal("0.30")
    assert increment.cost == usd(expected / MILLION)


# --- statuses, missing usage, odd usage -------------------------------------------------------


@pytest.mark.parametrize("status", ["completed", "cancelled", "incomplete", "failed"])
def test_every_response_done_is_billed_whatever_its_status(table, status):
    increment = meter_for(table).observe(response_done(ga_usage(audio=100, audio_out=50), status))
    assert increment.cost == usd((100 * Decimal(32) + 50 * Decimal(64)) / MILLION)


def test_a_cancelled_response_bills_its_partial_usage(table):
    meter = meter_for(table)
    increment = meter.observe(response_done(ga_usage(text=40, audio_out=7), "cancelled"))
    assert increment.cost == usd((40 * Decimal(4) + 7 * Decimal(64)) / MILLION)


@pytest.mark.parametrize("usage", [None, "absent"])
def test_a_response_without_usage_is_counted_at_zero_cost(table, usage):
    meter = meter_for(table)
    response = {"id": "resp_9", "status": "failed"}
    if usage is None:
        response["usage"] = None
    increment = meter.observe(frame({"type": "response.done", "response": response}))
    assert increment.cost == Money.ZERO and increment.usage == {}
    assert increment.response_id == "resp_9"
    assert meter.stats.responses == 1 and meter.stats.responses_without_usage == 1


def test_output_tokens_beyond_the_details_are_billed_as_text(table):
    usage = ga_usage(text_out=100, audio_out=150)
    usage["output_tokens"] = 300
    increment = meter_for(table).observe(response_done(usage))
    assert increment.by_category["text_output"] == usd(150 * Decimal(16) / MILLION)


def test_usage_with_only_totals_is_billed_as_text(table):
    increment = meter_for(table).observe(response_done({"input_tokens": 10, "output_tokens": 3}))
    assert increment.cost == usd((10 * Decimal(4) + 3 * Decimal(16)) / MILLION)
    assert increment.total_tokens == 13


def test_image_tokens_on_a_model_without_image_rates_are_unpriced(table):
    meter = meter_for(table, "gpt-4o-mini-realtime-preview")
    increment = meter.observe(response_done(ga_usage(text=10, image=500)))
    assert increment.unpriced
    assert increment.by_category["image_input"] == Money.ZERO
    assert increment.cost == usd(10 * Decimal("0.60") / MILLION)
    assert meter.stats.unpriced == 1


def test_unknown_usage_fields_are_kept_and_do_not_crash(table):
    usage = ga_usage(text=10, text_out=20, reasoning_tokens=12)
    usage["output_token_details"]["reasoning_tokens"] = 12
    usage["input_token_details"]["video_tokens"] = 0
    usage["future"] = {"kind": "x", "ratio": 0.25}
    increment = meter_for(table).observe(response_done(usage))
    assert increment.usage["reasoning_tokens"] == 12
    assert increment.usage["output_token_details"]["reasoning_tokens"] == 12
    assert increment.usage["future"] == {"kind": "x", "ratio": "0.25"}
    assert increment.cost == usd((10 * Decimal(4) + 20 * Decimal(16)) / MILLION)


def test_wrong_typed_usage_fields_are_ignored_and_counted(table):
    meter = meter_for(table)
    usage = ga_usage(text=10, audio=20)
    usage["input_token_details"]["audio_tokens"] = "twenty"
    usage["output_tokens"] = -5
    increment = meter.observe(response_done(usage))
    # the 20 audio tokens are still in input_tokens (30): unattributed, so billed as text.
    assert increment.cost == usd(30 * Decimal(4) / MILLION)
    assert meter.stats.malformed_fields == 2


# --- garbage -----------------------------------------------------------------------------------

GARBAGE = [
    b'{"type":"response.done"',
    b'{"type":"response.done","response":"done"}',
    b'{"type":"response.done","response":{"usage":"lots"}}',
    b'[{"type":"response.done"}]',
    b'{"type":"response.done","response":' + b"[" * 100_000,
    b'{"type":"response.done","response":{"usage":{"input_tokens":1' + b"0" * 5000 + b"}}}",
    b'{"type":"conversation.item.input_audio_transcription.completed","usage":7}',
    b'{"type":"conversation.item.input_audio_transcription.completed","usage":{"type":"duration","seconds":"soon"}}',
    b'{"type":"conversation.item.input_audio_transcription.completed","usage":{"type":"duration","seconds":-3}}',
    b'{"type":"conversation.item.input_audio_transcription.completed","usage":{"type":"duration","seconds":NaN}}',
    b'{"type":"session.updated","session":null}',
    b'{"type":"response.done","response":{"usage":{}}}\xff',
]


@pytest.mark.parametrize("payload", GARBAGE)
def test_garbage_frames_return_none_and_are_counted(table, payload):
    meter = meter_for(table)
    assert meter.observe(payload) is None
    assert meter.stats.garbage == 1
    assert meter.last_error
    assert meter.seq == 0


def test_garbage_does_not_stop_later_billing(table):
    meter = meter_for(table)
    meter.observe(GARBAGE[0])
    increment = meter.observe(response_done(ga_usage(text=1)))
    assert increment.seq == 1 and increment.cost == usd(Decimal(4) / MILLION)


def test_frames_without_usage_are_ignored_without_counting(table):
    meter = meter_for(table)
    assert meter.observe(frame({"type": "response.created", "response": {}})) is None
    assert meter.observe(b"not json at all") is None
    assert meter.stats.garbage == 0


def test_observe_takes_str_and_memoryview_too(table):
    payload = response_done(ga_usage(text=1))
    assert meter_for(table).observe(payload.decode()).cost == usd(Decimal(4) / MILLION)
    assert meter_for(table).observe(memoryview(payload)).cost == usd(Decimal(4) / MILLION)
    assert meter_for(table).observe(12345) is None  # type: ignore[arg-type]


def test_garbage_is_logged_without_the_frame_content(table, caplog):
    with caplog.at_level(logging.WARNING):
        meter_for(table).observe(b'{"type":"response.done","response":"my secret words"}')
    assert "meter" in caplog.text
    assert "secret" not in caplog.text


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.sampled_from(
        [
            b'{"type":"response.done"',
            b'{"type":"session.updated"',
            b'{"type":"conversation.item.input_audio_transcription.completed"',
        ]
    ),
    tail=st.binary(max_size=200),
)
def test_observe_never_raises_on_random_bytes(prefix, tail):
    table = load_price_table()
    meter = Meter(table.get("gpt-realtime"), table)
    meter.observe(prefix + tail)


@settings(max_examples=200, deadline=None)
@given(
    usage=st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-5, 10**6)
        | st.text(max_size=5)
        | st.decimals(allow_nan=False, places=3, min_value=-10, max_value=10),
        lambda children: st.dictionaries(
            st.sampled_from(
                [
                    "input_tokens",
                    "output_tokens",
                    "total_tokens",
                    "text_tokens",
                    "audio_tokens",
                    "image_tokens",
                    "cached_tokens",
                    "input_token_details",
                    "cached_tokens_details",
                    "output_token_details",
                    "type",
                    "seconds",
                    "new_tokens",
                ]
            ),
            children,
            max_size=6,
        ),
        max_leaves=20,
    )
)
def test_arbitrary_usage_shapes_never_crash_meter_or_totals(usage):
    table = load_price_table()
    meter = Meter(table.get("gpt-realtime-mini"), table)
    body = json.dumps(usage, default=str)
    totals = UsageTotals()
    for payload in (
        b'{"type":"response.done","response":{"usage":' + body.encode() + b"}}",
        b'{"type":"conversation.item.input_audio_transcription.completed","usage":' + body.encode() + b"}",
    ):
        increment = meter.observe(payload)
        if increment is not None:
            assert increment.cost >= Money.ZERO
            totals.add(increment)
    json.dumps(totals.as_record_usage())


# --- transcription -----------------------------------------------------------------------------

TOKENS_USAGE = {
    "type": "tokens",
    "input_tokens": 120,
    "output_tokens": 30,
    "total_tokens": 150,
    "input_token_details": {"text_tokens": 20, "audio_tokens": 100},
}


def test_transcription_tokens_default_to_gpt_4o_transcribe(table):
    increment = meter_for(table).observe(transcription_done(TOKENS_USAGE))
    # 20 × 2.50 + 100 × 6.00 + 30 × 10 = 950 per 1M
    assert increment.cost == Money.from_usd("0.00095")
    assert increment.model == "gpt-4o-transcribe"
    assert increment.kind is IncrementKind.TRANSCRIPTION
    assert increment.total_tokens == 150
    assert increment.item_id == "item_1"
    assert increment.by_category == {
        "transcription_text_input": usd(20 * Decimal("2.50") / MILLION),
        "transcription_audio_input": usd(100 * Decimal("6.00") / MILLION),
        "transcription_text_output": usd(30 * Decimal("10") / MILLION),
    }


def test_transcription_model_is_learned_from_a_ga_session_update(table):
    meter = meter_for(table)
    assert meter.observe(ga_session_updated({"model": "gpt-4o-mini-transcribe"})) is None
    increment = meter.observe(transcription_done(TOKENS_USAGE))
    # 20 × 1.25 + 100 × 3.00 + 30 × 5.00 = 475 per 1M
    assert increment.cost == Money.from_usd("0.000475")
    assert increment.model == "gpt-4o-mini-transcribe"
    assert meter.transcription_model == "gpt-4o-mini-transcribe"


def test_transcription_duration_defaults_to_whisper_1(table):
    increment = meter_for(table).observe(transcription_done({"type": "duration", "seconds": 2.5}))
    # 0.006 USD/min × 2.5 s / 60
    assert increment.cost == usd(Decimal("0.006") * Decimal("2.5") / 60)
    assert increment.model == "whisper-1"
    assert increment.by_category == {"transcription_minutes": increment.cost}
    assert increment.usage == {"type": "duration", "seconds": "2.5"}
    assert increment.total_tokens == 0


def test_transcription_model_is_learned_from_a_beta_session_update(table):
    meter = meter_for(table)
    meter.observe(frame({"type": "session.created", "session": {"model": "gpt-realtime"}}))
    meter.observe(beta_session_updated({"model": "gpt-realtime-whisper"}))
    increment = meter.observe(transcription_done({"type": "duration", "seconds": 7}))
    # 0.017 × 7 / 60 = 0.0019833… USD = 1 983 333 333.3 pd → 1 983 333 333 (half up)
    assert increment.cost == Money(1_983_333_333)
    assert increment.model == "gpt-realtime-whisper"


def test_beta_transcription_session_update_is_learned_too(table):
    meter = meter_for(table)
    meter.observe(beta_session_updated({"model": "gpt-4o-mini-transcribe"}, "transcription_session.updated"))
    assert meter.transcription_model == "gpt-4o-mini-transcribe"


def test_turning_transcription_off_forgets_the_model(table):
    meter = meter_for(table)
    meter.observe(ga_session_updated({"model": "gpt-4o-mini-transcribe"}))
    meter.observe(ga_session_updated(None))
    assert meter.transcription_model is None
    assert meter.observe(transcription_done(TOKENS_USAGE)).model == "gpt-4o-transcribe"


def test_a_session_event_without_transcription_settings_keeps_the_model(table):
    meter = meter_for(table)
    meter.observe(ga_session_updated({"model": "gpt-4o-mini-transcribe"}))
    meter.observe(frame({"type": "session.updated", "session": {"instructions": "be brief"}}))
    assert meter.transcription_model == "gpt-4o-mini-transcribe"


def test_a_transcription_only_session_bills_at_its_own_model(table):
    meter = meter_for(table, "gpt-realtime-whisper")
    increment = meter.observe(transcription_done({"type": "duration", "seconds": 60}))
    assert increment.model == "gpt-realtime-whisper"
    assert increment.cost == Money.from_usd("0.017")


def test_an_unknown_transcription_model_bills_zero_but_keeps_the_usage(table):
    meter = meter_for(table)
    meter.observe(ga_session_updated({"model": "gpt-9-transcribe"}))
    increment = meter.observe(transcription_done(TOKENS_USAGE))
    assert increment.unpriced
    assert increment.cost == Money.ZERO
    assert increment.model == "gpt-9-transcribe"
    assert increment.usage == TOKENS_USAGE
    assert increment.total_tokens == 150


def test_usage_priced_differently_from_its_model_is_unpriced(table):
    meter = meter_for(table)
    meter.observe(ga_session_updated({"model": "whisper-1"}))
    increment = meter.observe(transcription_done(TOKENS_USAGE))
    assert increment.unpriced and increment.cost == Money.ZERO


def test_a_transcription_without_usage_bills_nothing(table):
    meter = meter_for(table)
    payload = frame(
        {"type": "conversation.item.input_audio_transcription.completed", "item_id": "i", "transcript": "hi"}
    )
    assert meter.observe(payload) is None
    assert meter.stats.garbage == 0


def test_rates_used_lists_the_transcription_models_billed(table):
    meter = meter_for(table)
    meter.observe(transcription_done({"type": "duration", "seconds": 1}))
    assert [r.model for r in meter.rates_used] == ["gpt-realtime", "whisper-1"]


# --- increments --------------------------------------------------------------------------------


def test_increments_are_numbered_from_one_per_meter(table):
    meter = meter_for(table)
    seqs = [
        meter.observe(response_done(ga_usage(text=1))).seq,
        meter.observe(ga_session_updated(None)),
        meter.observe(transcription_done(TOKENS_USAGE)).seq,
        meter.observe(response_done(ga_usage(text=2))).seq,
    ]
    assert seqs == [1, None, 2, 3]
    assert meter.seq == 3


def test_increment_round_trips_through_json_with_integer_money(table):
    meter = meter_for(table)
    increment = meter.observe(transcription_done({"type": "duration", "seconds": 2.5}))
    wire = json.loads(json.dumps(increment.to_json()))
    assert isinstance(wire["cost_picodollars"], int)
    assert all(isinstance(v, int) for v in wire["by_category_picodollars"].values())
    assert Increment.from_json(wire) == increment


@pytest.mark.parametrize(
    "mutate",
    [
        lambda w: w.__setitem__("cost_picodollars", 1.5),
        lambda w: w.__setitem__("seq", 0),
        lambda w: w.__setitem__("kind", "tip"),
        lambda w: w.pop("usage"),
        lambda w: w.__setitem__("by_category_picodollars", {"text_input": "12"}),
        lambda w: w.__setitem__("cost_picodollars", w["cost_picodollars"] + 1),
    ],
)
def test_a_malformed_increment_is_refused(table, mutate):
    wire = meter_for(table).observe(response_done(ga_usage(text=1))).to_json()
    mutate(wire)
    with pytest.raises(ValueError):
        Increment.from_json(wire)


# --- totals ------------------------------------------------------------------------------------


def session_increments(table) -> list[Increment]:
    meter = meter_for(table, "gpt-realtime-mini")
    frames = [
        ga_session_updated({"model": "gpt-4o-mini-transcribe"}),
        transcription_done(TOKENS_USAGE),
        response_done(
            ga_usage(text=500, audio=1000, cached=(100, 600, 0), text_out=40, audio_out=300, reasoning_tokens=3),
            "completed",
            "resp_1",
        ),
        response_done(
            {
                "input_tokens": 1500,
                "output_tokens": 300,
                "total_tokens": 1800,
                "input_token_details": {"text_tokens": 500, "audio_tokens": 1000, "cached_tokens": 800},
                "output_token_details": {"text_tokens": 100, "audio_tokens": 200},
            },
            "cancelled",
            "resp_2",
        ),
        transcription_done(
            {
                "type": "tokens",
                "input_tokens": 10,
                "output_tokens": 2,
                "total_tokens": 12,
                "input_token_details": {"text_tokens": 0, "audio_tokens": 10},
            }
        ),
    ]
    return [inc for inc in map(meter.observe, frames) if inc is not None]


def test_totals_give_the_record_usage_shape(table):
    totals = UsageTotals.from_increments(session_increments(table))
    assert totals.as_record_usage() == {
        "total_tokens": 1840 + 1800,
        "input_tokens": 1500 + 1500,
        "output_tokens": 340 + 300,
        "input_token_details": {
            "text_tokens": 1000,
            "audio_tokens": 2000,
            "image_tokens": 0,
            "cached_tokens": 700 + 800,
            # second response is beta: 800 cached attributed 500 text, 300 audio
            "cached_tokens_details": {"text_tokens": 600, "audio_tokens": 900, "image_tokens": 0},
        },
        "output_token_details": {"text_tokens": 140, "audio_tokens": 500},
        "reasoning_tokens": 3,
        "transcription": {
            "total_tokens": 162,
            "input_tokens": 130,
            "output_tokens": 32,
            "input_token_details": {"text_tokens": 20, "audio_tokens": 110},
            "seconds": "0",
        },
    }
    assert totals.responses == 2
    assert totals.transcriptions == 2
    assert totals.total_tokens == 1840 + 1800 + 150 + 12


def test_totals_cost_is_the_sum_of_hand_computed_costs(table):
    totals = UsageTotals.from_increments(session_increments(table))
    transcription = (
        20 * Decimal("1.25") + 100 * Decimal("3.00") + 30 * Decimal("5.00") + 10 * Decimal("3.00") + 2 * Decimal("5.00")
    )
    ga = (
        400 * Decimal("0.60")
        + 100 * Decimal("0.06")
        + 400 * Decimal("10")
        + 600 * Decimal("0.30")
        + 40 * Decimal("2.40")
        + 300 * Decimal("20")
    )
    beta = (
        500 * Decimal("0.06")
        + 700 * Decimal("10")
        + 300 * Decimal("0.30")
        + 100 * Decimal("2.40")
        + 200 * Decimal("20")
    )
    assert totals.cost == usd((transcription + ga + beta) / MILLION)
    assert sum(totals.by_category.values()) == totals.cost
    cost = totals.as_record_cost()
    assert cost["currency"] == "usd"
    assert Money.from_usd(cost["amount"]) == totals.cost
    assert list(cost["by_category"]) == sorted(cost["by_category"])


def test_totals_count_each_seq_once(table):
    increments = session_increments(table)
    totals = UsageTotals.from_increments(increments)
    before = (totals.cost, totals.as_record_usage(), totals.total_tokens, totals.responses)
    assert [totals.add(inc) for inc in increments] == [False] * len(increments)
    assert (totals.cost, totals.as_record_usage(), totals.total_tokens, totals.responses) == before
    assert len(totals) == len(increments) and totals.max_seq == len(increments)


def test_totals_do_not_depend_on_order(table):
    increments = session_increments(table)
    results = set()
    for order in itertools.permutations(increments):
        totals = UsageTotals.from_increments(order)
        results.add(
            (
                totals.cost,
                json.dumps(totals.as_record_usage()),
                json.dumps(totals.as_record_cost()),
                totals.total_tokens,
            )
        )
    assert len(results) == 1


def test_totals_replayed_from_the_spool_match_the_live_totals(table):
    increments = session_increments(table)
    live = UsageTotals.from_increments(increments)
    spooled = [json.dumps(inc.to_json()) for inc in increments]
    replayed = UsageTotals.from_increments(Increment.from_json(json.loads(s)) for s in spooled)
    assert replayed.as_record_usage() == live.as_record_usage()
    assert replayed.cost == live.cost


def test_a_different_increment_under_a_known_seq_is_refused(table):
    first, second, *_ = session_increments(table)
    totals = UsageTotals.from_increments([first])
    impostor = Increment.from_json(second.to_json() | {"seq": first.seq})
    with pytest.raises(ValueError, match="seq 1"):
        totals.add(impostor)


def test_totals_sum_duration_seconds_exactly(table):
    meter = meter_for(table)
    totals = UsageTotals()
    for seconds in (0.1, 0.2, 2):
        totals.add(meter.observe(transcription_done({"type": "duration", "seconds": seconds})))
    assert totals.as_record_usage()["transcription"]["seconds"] == "2.3"
    assert totals.total_tokens == 0


def test_empty_totals_still_have_the_record_shape():
    usage = UsageTotals().as_record_usage()
    assert usage["total_tokens"] == 0
    assert usage["input_token_details"]["cached_tokens_details"] == {
        "text_tokens": 0,
        "audio_tokens": 0,
        "image_tokens": 0,
    }
    assert "transcription" not in usage
    assert UsageTotals().as_record_cost() == {"currency": "usd", "amount": "0.000000", "by_category": {}}


def test_a_meter_works_from_the_rate_snapshots_a_grant_carries(table):
    snapshots = [table.get(m).snapshot() for m in ("gpt-realtime", "gpt-4o-mini-transcribe")]
    from_grant = PriceTable.from_models(ModelRates.from_snapshot(s) for s in snapshots)
    meter = Meter(from_grant.get("gpt-realtime"), from_grant)
    meter.observe(ga_session_updated({"model": "gpt-4o-mini-transcribe"}))
    assert meter.observe(transcription_done(TOKENS_USAGE)).cost == Money.from_usd("0.000475")
    assert meter.observe(response_done(ga_usage(text=1))).cost == usd(Decimal(4) / MILLION)
