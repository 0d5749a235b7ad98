"""The price table: the shipped rates, aliases, snapshots, and the checks on operators' files."""

from __future__ import annotations

import copy
import json
from decimal import Decimal

import pytest

from meshrt.shared.money import Money
from meshrt.shared.pricing import ModelKind
from meshrt.shared.pricing import ModelRates
from meshrt.shared.pricing import PriceTable
from meshrt.shared.pricing import PricingError
from meshrt.shared.pricing import load_price_table
from meshrt.shared.pricing import parse_price_table

# OpenAI's published rates (docs/billing.md, The price file), USD per 1M tokens:
# (input, cached input, output).
FLAGSHIP_2 = {"text": ("4", "0.40", "24"), "audio": ("32", "0.40", "64"), "image": ("5", "0.50", None)}
FLAGSHIP_1 = {"text": ("4", "0.40", "16"), "audio": ("32", "0.40", "64"), "image": ("5", "0.50", None)}
MINI = {"text": ("0.60", "0.06", "2.40"), "audio": ("10", "0.30", "20"), "image": ("0.80", "0.08", None)}
MINI_PREVIEW = {"text": ("0.60", "0.30", "2.40"), "audio": ("10", "0.30", "20"), "image": (None, None, None)}
PREVIEW = {"text": ("5", "2.50", "20"), "audio": ("40", "2.50", "80"), "image": (None, None, None)}
TRANSCRIBE = {"text": ("2.50", None, "10"), "audio": ("6.00", None, None), "image": (None, None, None)}
MINI_TRANSCRIBE = {"text": ("1.25", None, "5.00"), "audio": ("3.00", None, None), "image": (None, None, None)}

SHIPPED_TOKEN_RATES = {
    "gpt-realtime-2.1": FLAGSHIP_2,
    "gpt-realtime-2": FLAGSHIP_2,
    "gpt-realtime-1.5": FLAGSHIP_1,
    "gpt-realtime": FLAGSHIP_1,
    "gpt-realtime-2.1-mini": MINI,
    "gpt-realtime-mini": MINI,
    "gpt-4o-mini-realtime-preview": MINI_PREVIEW,
    "gpt-4o-realtime-preview": PREVIEW,
    "gpt-4o-transcribe": TRANSCRIBE,
    "gpt-4o-mini-transcribe": MINI_TRANSCRIBE,
}
SHIPPED_PER_MINUTE = {"whisper-1": "0.006", "gpt-realtime-whisper": "0.017", "gpt-realtime-translate": "0.034"}

ALIASES = {
    "gpt-realtime-2025-08-28": "gpt-realtime",
    "gpt-realtime-mini-2025-10-06": "gpt-realtime-mini",
    "gpt-realtime-mini-2025-12-15": "gpt-realtime-mini",
    "gpt-4o-mini-realtime-preview-2024-12-17": "gpt-4o-mini-realtime-preview",
    "gpt-4o-realtime-preview-2025-06-03": "gpt-4o-realtime-preview",
    "gpt-4o-realtime-preview-2024-12-17": "gpt-4o-realtime-preview",
}

MINIMAL_FILE = {
    "effective_date": "2027-01-01",
    "currency": "usd",
    "models": {
        "model-a": {
            "realtime": True,
            "aliases": ["model-a-2027-01-01"],
            "token_rates_per_1m": {
                "text": {"input": "1.00", "cached_input": "0.10", "output": "2.00"},
                "audio": {"input": "3.00", "cached_input": "0.30", "output": "6.00"},
            },
        },
        "minute-model": {"kind": "transcription", "per_minute": "0.010"},
    },
}


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return load_price_table()


def per_token(usd_per_1m: str | None) -> Money | None:
    """USD per 1M tokens → Money per token, by hand: × 1e12 pd/USD ÷ 1e6 tokens."""
    if usd_per_1m is None:
        return None
    picodollars = Decimal(usd_per_1m) * 10**12 / 10**6
    assert picodollars == picodollars.to_integral_value()
    return Money(int(picodollars))


def write_file(tmp_path, doc) -> str:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return str(path)


def load_doc(doc) -> PriceTable:
    return parse_price_table(json.dumps(doc), source="test.json")


def test_shipped_file_has_its_effective_date(table):
    assert table.effective_date == "2026-11-01"
    assert table.currency == "usd"


def test_shipped_file_prices_exactly_the_listed_models(table):
    assert {m.model for m in table.models} == set(SHIPPED_TOKEN_RATES) | set(SHIPPED_PER_MINUTE)


@pytest.mark.parametrize("model", sorted(SHIPPED_TOKEN_RATES))
def test_shipped_token_rates_are_openais_rates_per_token(table, model):
    rates = table.get(model)
    for modality, (inp, cached, out) in SHIPPED_TOKEN_RATES[model].items():
        got = rates.tokens(modality)
        assert (got.input, got.cached_input, got.output) == (per_token(inp), per_token(cached), per_token(out)), (
            modality
        )
    assert rates.per_minute is None
    assert rates.effective_date == "2026-11-01"


@pytest.mark.parametrize("model", sorted(SHIPPED_PER_MINUTE))
def test_shipped_per_minute_rates(table, model):
    rates = table.get(model)
    assert rates.per_minute == Money.from_usd(SHIPPED_PER_MINUTE[model])
    assert rates.by_duration
    assert not rates.text.offered and not rates.audio.offered


def test_a_mini_cached_text_token_is_sixty_thousand_picodollars(table):
    # $0.06 / 1M = 6e-8 USD = 60 000 pd
    assert table.get("gpt-realtime-mini").text.cached_input == Money(60_000)


@pytest.mark.parametrize(("alias", "canonical"), sorted(ALIASES.items()))
def test_dated_snapshots_resolve_to_their_model(table, alias, canonical):
    assert table.get(alias).model == canonical
    assert alias in table.aliases(canonical)


@pytest.mark.parametrize("model", ["gpt-realtime-2024-01-01", "gpt-4o", "", "GPT-REALTIME"])
def test_unknown_models_and_unlisted_dates_are_not_priced(table, model):
    assert table.get(model) is None
    assert table.realtime(model) is None


def test_get_with_a_non_string_is_none(table):
    assert table.get(None) is None
    assert table.get(["gpt-realtime"]) is None


def test_realtime_models_list_connectable_ids_with_aliases(table):
    ids = list(table.realtime_models())
    assert ids == [
        "gpt-realtime-2.1",
        "gpt-realtime-2",
        "gpt-realtime-1.5",
        "gpt-realtime",
        "gpt-realtime-2025-08-28",
        "gpt-realtime-2.1-mini",
        "gpt-realtime-mini",
        "gpt-realtime-mini-2025-10-06",
        "gpt-realtime-mini-2025-12-15",
        "gpt-4o-mini-realtime-preview",
        "gpt-4o-mini-realtime-preview-2024-12-17",
        "gpt-realtime-whisper",
        "gpt-realtime-translate",
    ]


def test_shut_down_preview_is_unlisted_and_refused_at_connect(table):
    assert table.realtime("gpt-4o-realtime-preview") is None
    assert table.realtime("gpt-4o-realtime-preview-2024-12-17") is None
    assert table.get("gpt-4o-realtime-preview").listed is False
    assert "gpt-4o-realtime-preview" in table.realtime_models(include_unlisted=True)
    assert table.realtime("gpt-4o-realtime-preview", include_unlisted=True) is not None


@pytest.mark.parametrize("model", ["whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe"])
def test_transcription_models_are_not_connectable(table, model):
    assert table.realtime(model) is None
    assert table.transcription(model).kind is ModelKind.TRANSCRIPTION


def test_realtime_whisper_is_both_connectable_and_a_transcription_model(table):
    assert table.realtime("gpt-realtime-whisper") is table.transcription("gpt-realtime-whisper")


def test_conversation_models_are_not_transcription_models(table):
    assert table.transcription("gpt-realtime") is None
    assert table.transcription("nope") is None


def test_pricing_json_for_a_token_model(table):
    assert table.get("gpt-realtime-2025-08-28").pricing_json() == {
        "currency": "usd",
        "unit": "per_1m_tokens",
        "text": {"input": "4.00", "cached_input": "0.40", "output": "16.00"},
        "audio": {"input": "32.00", "cached_input": "0.40", "output": "64.00"},
        "image": {"input": "5.00", "cached_input": "0.50", "output": None},
    }


def test_pricing_json_for_a_mini_model_keeps_every_decimal(table):
    pricing = table.get("gpt-realtime-mini").pricing_json()
    assert pricing["text"] == {"input": "0.60", "cached_input": "0.06", "output": "2.40"}
    assert pricing["image"] == {"input": "0.80", "cached_input": "0.08", "output": None}


def test_pricing_json_for_a_per_minute_model(table):
    assert table.get("gpt-realtime-whisper").pricing_json() == {
        "currency": "usd",
        "unit": "per_minute",
        "per_minute": "0.017",
    }


@pytest.mark.parametrize("model", sorted(SHIPPED_TOKEN_RATES) + sorted(SHIPPED_PER_MINUTE))
def test_snapshot_round_trips_through_json(table, model):
    rates = table.get(model)
    stored = json.loads(json.dumps(rates.snapshot()))
    assert ModelRates.from_snapshot(stored) == rates


def test_snapshot_names_the_model_and_date(table):
    snap = table.get("gpt-realtime").snapshot()
    assert snap["model"] == "gpt-realtime"
    assert snap["effective_date"] == "2026-11-01"
    assert snap["text"]["output"] == "16.00"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda s: s.pop("model"), "model"),
        (lambda s: s["text"].__setitem__("input", 4.0), "text.input"),
        (lambda s: s["text"].__setitem__("input", "-4"), "text.input"),
        (lambda s: s.__setitem__("video", {}), "video"),
        (lambda s: s.__setitem__("unit", "per_token"), "unit"),
        (lambda s: s.__setitem__("currency", "eur"), "currency"),
    ],
)
def test_a_bad_snapshot_is_refused(table, mutate, field):
    snap = table.get("gpt-realtime").snapshot()
    mutate(snap)
    with pytest.raises(PricingError, match=field.replace(".", r"\.")):
        ModelRates.from_snapshot(snap)


def test_operator_file_overrides_the_shipped_one(tmp_path):
    doc = copy.deepcopy(MINIMAL_FILE)
    table = load_price_table(write_file(tmp_path, doc))
    assert table.effective_date == "2027-01-01"
    assert table.get("gpt-realtime") is None
    assert table.realtime("model-a-2027-01-01").text.input == per_token("1.00")
    assert table.transcription("minute-model").per_minute == Money.from_usd("0.010")
    assert table.source.endswith("prices.json")


def test_operator_can_list_the_shut_down_preview(tmp_path):
    doc = json.loads(json.dumps(MINIMAL_FILE))
    doc["models"]["gpt-4o-realtime-preview"] = {
        "realtime": True,
        "listed": True,
        "token_rates_per_1m": {"text": {"input": "5", "cached_input": "2.5", "output": "20"}},
    }
    table = load_price_table(write_file(tmp_path, doc))
    assert table.realtime("gpt-4o-realtime-preview").text.output == per_token("20")
    assert not table.get("gpt-4o-realtime-preview").image.offered


def test_a_missing_file_is_a_pricing_error(tmp_path):
    with pytest.raises(PricingError, match="cannot read"):
        load_price_table(str(tmp_path / "nope.json"))


def test_a_file_that_is_not_json_is_a_pricing_error(tmp_path):
    with pytest.raises(PricingError, match="not valid JSON"):
        load_price_table(write_file(tmp_path, "{effective_date: 2026}"))


def _bad(mutate):
    doc = copy.deepcopy(MINIMAL_FILE)
    mutate(doc)
    return doc


def _text(doc):
    return doc["models"]["model-a"]["token_rates_per_1m"]["text"]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            _bad(lambda d: _text(d).__setitem__("input", 4.0)),
            r"models\.model-a\.token_rates_per_1m\.text\.input: is the JSON number 4\.0",
        ),
        (
            _bad(lambda d: _text(d).__setitem__("output", 2)),
            r"models\.model-a\.token_rates_per_1m\.text\.output: is the JSON number 2",
        ),
        (
            _bad(lambda d: d["models"]["minute-model"].__setitem__("per_minute", 0.01)),
            r"models\.minute-model\.per_minute: is the JSON number",
        ),
        (_bad(lambda d: _text(d).__setitem__("input", "-1.00")), r"text\.input: negative rate"),
        (_bad(lambda d: _text(d).pop("cached_input")), r"text\.cached_input: missing"),
        (_bad(lambda d: _text(d).__setitem__("cached_inptu", "1")), r"text\.cached_inptu: unknown field"),
        (
            _bad(lambda d: d["models"]["model-a"]["token_rates_per_1m"].__setitem__("video", {})),
            r"token_rates_per_1m\.video: unknown category",
        ),
        (
            _bad(lambda d: _text(d).__setitem__("input", "0.0000001")),
            r"text\.input: '0\.0000001' has more than 6 decimals",
        ),
        (_bad(lambda d: _text(d).__setitem__("input", "1e3")), r"text\.input: '1e3' is not a plain decimal"),
        (_bad(lambda d: _text(d).__setitem__("input", "NaN")), r"text\.input: 'NaN' is not a plain decimal"),
        (_bad(lambda d: d.pop("effective_date")), r"effective_date: missing"),
        (_bad(lambda d: d.__setitem__("effective_date", "2026-13-01")), r"effective_date"),
        (_bad(lambda d: d.__setitem__("currency", "eur")), r"currency"),
        (_bad(lambda d: d.__setitem__("models", {})), r"models"),
        (_bad(lambda d: d["models"]["model-a"].__setitem__("per_minute", "1")), r"models\.model-a: give exactly one"),
        (_bad(lambda d: d["models"]["minute-model"].pop("per_minute")), r"models\.minute-model: give exactly one"),
        (_bad(lambda d: d["models"]["model-a"].__setitem__("kind", "chat")), r"models\.model-a\.kind"),
        (_bad(lambda d: d["models"]["model-a"].__setitem__("realtime", "yes")), r"models\.model-a\.realtime"),
        (
            _bad(lambda d: d["models"]["model-a"].__setitem__("aliases", ["minute-model"])),
            r"'minute-model' is defined twice",
        ),
        (
            _bad(lambda d: d["models"]["model-a"].__setitem__("colour", "red")),
            r"models\.model-a\.colour: unknown field",
        ),
    ],
)
def test_a_bad_price_file_names_the_field(tmp_path, doc, message):
    with pytest.raises(PricingError, match=message):
        load_price_table(write_file(tmp_path, doc))


def test_a_float_rate_error_names_the_file(tmp_path):
    doc = _bad(lambda d: _text(d).__setitem__("input", 4.5))
    path = write_file(tmp_path, doc)
    with pytest.raises(PricingError) as caught:
        load_price_table(path)
    assert str(caught.value).startswith(path)
    assert "model-a" in str(caught.value)


def test_duplicate_json_keys_are_refused():
    text = json.dumps(MINIMAL_FILE)[:-1] + ', "currency": "usd"}'
    with pytest.raises(PricingError, match="duplicate key 'currency'"):
        parse_price_table(text)


def test_json_nan_is_refused():
    text = json.dumps(MINIMAL_FILE).replace('"1.00"', "NaN")
    with pytest.raises(PricingError, match="NaN"):
        parse_price_table(text)


def test_a_price_table_in_memory_parses_like_a_file():
    table = load_doc(MINIMAL_FILE)
    assert table.get("model-a").audio.output == per_token("6.00")
