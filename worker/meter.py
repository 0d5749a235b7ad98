"""Metering: raw upstream text frames in, billable usage increments out. Sans-I/O.

The worker's upstream→client pump calls :func:`may_carry_usage` on every text frame (a byte
check, no parse) and hands the frames it selects to :meth:`Meter.observe`, in arrival order.
``observe`` returns an :class:`Increment` for each frame that is billed — ``response.done`` and
``conversation.item.input_audio_transcription.completed`` — which the worker spools and reports
before it forwards the frame. Increments and their totals (:class:`UsageTotals`, what the
supervisor folds into the session record) are in ``shared/increments.py``; they are re-exported
here.

Invariants:

- ``observe`` never raises and never blocks: a frame it cannot read is counted in
  :attr:`Meter.stats` and logged (without its content), and ``None`` is returned.
- Every ``response.done`` yields an increment, whatever its status; one without usage yields a
  zero-cost increment so the record's ``responses`` counts it.
- Cost is exact: integer tokens × integer picodollars per token; the only rounding is the
  per-minute rule of :func:`meshrt.shared.money.per_minute_cost`.
- Usage is kept as received on the increment (non-integer numbers as exact decimal strings);
  fields meshrt does not know are never dropped, and integer ones are summed in the totals.
- Increments are numbered 1, 2, 3… per meter; :meth:`UsageTotals.add` counts a ``seq`` once, so
  replaying a spool after a crash never bills twice, in any order.

The billing rules (cached split, beta rule, unattributed tokens, transcription defaults) are
written out in ``docs/billing.md``; the functions here follow them one for one.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from meshrt.shared.increments import Increment
from meshrt.shared.increments import IncrementKind
from meshrt.shared.increments import ResponseTokens
from meshrt.shared.increments import TranscriptionTokens
from meshrt.shared.increments import UsageTotals
from meshrt.shared.increments import response_tokens
from meshrt.shared.increments import transcription_tokens
from meshrt.shared.money import Money
from meshrt.shared.money import per_minute_cost
from meshrt.shared.pricing import MODALITIES
from meshrt.shared.pricing import ModelKind
from meshrt.shared.pricing import ModelRates
from meshrt.shared.pricing import PriceTable

__all__ = [
    "DEFAULT_DURATION_TRANSCRIPTION_MODEL",
    "DEFAULT_TOKEN_TRANSCRIPTION_MODEL",
    "Bill",
    "Increment",
    "IncrementKind",
    "Meter",
    "MeterStats",
    "ResponseTokens",
    "TranscriptionTokens",
    "UsageTotals",
    "bill_response",
    "bill_transcription",
    "may_carry_usage",
    "response_tokens",
    "transcription_tokens",
]

RESPONSE_DONE = "response.done"
TRANSCRIPTION_COMPLETED = "conversation.item.input_audio_transcription.completed"
SESSION_EVENTS = frozenset(
    {
        "session.created",
        "session.updated",
        "transcription_session.created",  # beta transcription sessions
        "transcription_session.updated",
    }
)
USAGE_EVENT_TYPES = frozenset({RESPONSE_DONE, TRANSCRIPTION_COMPLETED, *SESSION_EVENTS})

# Used when a session never said which model transcribes its input audio.
DEFAULT_TOKEN_TRANSCRIPTION_MODEL = "gpt-4o-transcribe"
DEFAULT_DURATION_TRANSCRIPTION_MODEL = "whisper-1"

_HEAD = 256
_COMPACT_TYPE_FIRST = b'{"type":"'
_TYPE_KEY = b'"type"'
_TYPE_VALUE = re.compile(rb'\s*:\s*"([^"\\]{1,100})"')
_USAGE_TYPE_BYTES = frozenset(t.encode() for t in USAGE_EVENT_TYPES)
_MARKERS = tuple(b'"' + t.encode() + b'"' for t in sorted(USAGE_EVENT_TYPES))
_COMPACT_USAGE_PREFIXES = tuple(b'{"type":' + marker for marker in _MARKERS)


def may_carry_usage(payload: bytes | bytearray) -> bool:
    """Whether a text frame's payload may be a usage- or session-carrying event (no parse).

    Runs on every upstream frame, so it decides from the first bytes in three tiers:
    ``{"type":"…"`` first (how OpenAI serialises events) → by that value; else the first
    ``"type"`` key within 256 bytes, if it is a top-level key (a single ``{`` before it) → by its
    value; else the quoted event names are looked for anywhere in the payload. It may say True
    for a frame that is not one (the parse sorts that out), never False for one that is.
    """
    if payload.startswith(_COMPACT_USAGE_PREFIXES):
        return True
    if payload.startswith(_COMPACT_TYPE_FIRST):
        return False
    at = payload.find(_TYPE_KEY, 0, _HEAD)
    if at != -1 and payload.count(b"{", 0, at) == 1:
        match = _TYPE_VALUE.match(payload, at + len(_TYPE_KEY))
        if match is not None:
            return match.group(1) in _USAGE_TYPE_BYTES
    return any(marker in payload for marker in _MARKERS)


# ---------------------------------------------------------------------------------------------
# Usage normalisation and billing: pure functions of (rates, usage).


@dataclass(frozen=True, slots=True)
class Bill:
    cost: Money
    by_category: dict[str, Money]
    total_tokens: int
    unpriced: bool


class _Charges:
    """Accumulates category charges; a category with tokens but no rate is charged 0."""

    def __init__(self) -> None:
        self.by_category: dict[str, Money] = {}
        self.unpriced = False

    def add(self, category: str, tokens: int, rate: Money | None) -> None:
        if tokens <= 0:
            return
        if rate is None:
            self.unpriced = True
            charge = Money.ZERO
        else:
            charge = rate * tokens
        self.by_category[category] = self.by_category.get(category, Money.ZERO) + charge

    def bill(self, total_tokens: int) -> Bill:
        cost = sum(self.by_category.values(), Money.ZERO)
        return Bill(cost, self.by_category, total_tokens, self.unpriced)


def bill_response(rates: ModelRates, tokens: ResponseTokens) -> Bill:
    """The cost of one ``response.done`` usage (see :func:`response_tokens`) at ``rates``.

    Per modality: cached input at the cached rate (the input rate if the model has no cached
    rate), the uncached remainder at the input rate, output at the output rate. A category with
    tokens and no rate costs 0 and marks the bill ``unpriced``.
    """
    charges = _Charges()
    for m in MODALITIES:
        r = rates.tokens(m)
        cached = tokens.cached[m]
        charges.add(f"{m}_input", max(0, tokens.input[m] - cached), r.input)
        cached_rate = r.cached_input if r.cached_input is not None else r.input
        charges.add(f"{m}_cached_input", cached, cached_rate)
    charges.add("text_output", tokens.output_text, rates.text.output)
    charges.add("audio_output", tokens.output_audio, rates.audio.output)
    return charges.bill(tokens.total_tokens)


def bill_transcription(rates: ModelRates | None, tokens: TranscriptionTokens) -> Bill:
    """The cost of one transcription usage at ``rates`` (``None``: unknown model, cost 0)."""
    charges = _Charges()
    if tokens.usage_type == "duration":
        rate = rates.per_minute if rates is not None else None
        if rate is None:
            charges.unpriced = True
        else:
            charges.by_category["transcription_minutes"] = per_minute_cost(rate, tokens.seconds)
        return charges.bill(0)
    if tokens.usage_type != "tokens" or rates is None or rates.by_duration:
        charges.unpriced = True
        return charges.bill(tokens.total_tokens)
    charges.add("transcription_text_input", tokens.input_text, rates.text.input)
    charges.add("transcription_audio_input", tokens.input_audio, rates.audio.input)
    charges.add("transcription_text_output", tokens.output_tokens, rates.text.output)
    return charges.bill(tokens.total_tokens)


# ---------------------------------------------------------------------------------------------
# The meter: one per session.


@dataclass
class MeterStats:
    """Counters of one meter, for logs and metrics."""

    frames: int = 0  # frames parsed (selected by may_carry_usage)
    garbage: int = 0  # frames that could not be read; nothing billed for them
    malformed_fields: int = 0  # known usage fields of the wrong type, ignored
    responses: int = 0
    responses_without_usage: int = 0
    transcriptions: int = 0
    unpriced: int = 0  # increments with tokens that had no rate (billed 0)


class Meter:
    """Turns a session's upstream frames into increments. Not thread-safe: one pump feeds it.

    ``rates`` are the session model's (already resolved by the front door); ``price_table``
    resolves the input-transcription model the session announces. ``log`` should carry the
    session and request ids; frame content is never logged.
    """

    def __init__(
        self,
        rates: ModelRates,
        price_table: PriceTable,
        *,
        log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        self.rates = rates
        self.price_table = price_table
        self.transcription_model: str | None = None
        self.stats = MeterStats()
        self.last_error: str | None = None
        self._seq = 0
        self._log = log if log is not None else logging.getLogger(__name__)
        self._rates_used: dict[str, ModelRates] = {rates.model: rates}

    @property
    def seq(self) -> int:
        """The seq of the last increment issued (0 before the first)."""
        return self._seq

    @property
    def rates_used(self) -> tuple[ModelRates, ...]:
        """The session model's rates, then every transcription model's rates billed so far."""
        return tuple(self._rates_used.values())

    def observe(self, payload: bytes | bytearray | memoryview | str) -> Increment | None:
        """Meter one upstream text frame; the increment to spool, or None. Never raises."""
        if isinstance(payload, (str, memoryview)):
            payload = payload.encode() if isinstance(payload, str) else bytes(payload)
        elif not isinstance(payload, (bytes, bytearray)):
            return self._garbage("payload is a %s, not bytes", type(payload).__name__)
        if not may_carry_usage(payload):
            return None
        self.stats.frames += 1
        try:
            event = json.loads(payload, parse_float=Decimal, parse_constant=Decimal)
        except (ValueError, TypeError, RecursionError) as exc:
            return self._garbage("not JSON (%s)", type(exc).__name__)
        try:
            return self._dispatch(event)
        except Exception:
            # A bug here must not kill the relay; it is logged loudly and counted.
            self._log.exception("meter: internal error on a %s frame", _event_type(event))
            return self._garbage("internal error on a %s frame", _event_type(event))

    def _dispatch(self, event: object) -> Increment | None:
        if not isinstance(event, dict):
            return self._garbage("frame is not a JSON object")
        event_type = event.get("type")
        if event_type == RESPONSE_DONE:
            return self._response_done(event)
        if event_type == TRANSCRIPTION_COMPLETED:
            return self._transcription_completed(event)
        if event_type in SESSION_EVENTS:
            self._session_event(event)
        return None

    def _response_done(self, event: dict[str, Any]) -> Increment | None:
        response = event.get("response")
        if not isinstance(response, dict):
            return self._garbage("response.done without a response object")
        usage = response.get("usage")
        if usage is not None and not isinstance(usage, dict):
            return self._garbage("response.done with a non-object usage")
        self.stats.responses += 1
        if usage is None:
            self.stats.responses_without_usage += 1
            usage = {}
        tokens = response_tokens(usage)
        self.stats.malformed_fields += tokens.malformed
        return self._issue(
            IncrementKind.RESPONSE,
            self.rates.model,
            usage,
            bill_response(self.rates, tokens),
            response_id=_str_or_none(response.get("id")),
        )

    def _transcription_completed(self, event: dict[str, Any]) -> Increment | None:
        usage = event.get("usage")
        if usage is None:
            return None  # older upstreams send no usage: nothing to bill
        if not isinstance(usage, dict):
            return self._garbage("transcription completed with a non-object usage")
        tokens = transcription_tokens(usage)
        if tokens is None:
            return self._garbage("transcription duration without usable seconds")
        self.stats.transcriptions += 1
        self.stats.malformed_fields += tokens.malformed
        model, rates = self._transcription_rates(by_duration=tokens.usage_type == "duration")
        if rates is not None:
            self._rates_used.setdefault(rates.model, rates)
        return self._issue(
            IncrementKind.TRANSCRIPTION,
            model,
            usage,
            bill_transcription(rates, tokens),
            item_id=_str_or_none(event.get("item_id")),
        )

    def _transcription_rates(self, by_duration: bool) -> tuple[str, ModelRates | None]:
        """The model to bill a transcription to: the announced one, else the session's own model
        if it is a transcription model priced the same way, else the default for the usage type.
        """
        if self.transcription_model is not None:
            rates = self.price_table.transcription(self.transcription_model)
            if rates is None or rates.by_duration != by_duration:
                return self.transcription_model, None
            return rates.model, rates
        if self.rates.kind is ModelKind.TRANSCRIPTION and self.rates.by_duration == by_duration:
            return self.rates.model, self.rates
        default = DEFAULT_DURATION_TRANSCRIPTION_MODEL if by_duration else DEFAULT_TOKEN_TRANSCRIPTION_MODEL
        rates = self.price_table.transcription(default)
        return (rates.model if rates else default), rates

    def _session_event(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            self._garbage("%s without a session object", event.get("type"))
            return
        found, model = _announced_transcription_model(session)
        if found:
            self.transcription_model = model

    def _issue(
        self,
        kind: IncrementKind,
        model: str,
        usage: dict[str, Any],
        bill: Bill,
        response_id: str | None = None,
        item_id: str | None = None,
    ) -> Increment:
        usage = _jsonable(usage)
        self._seq += 1
        if bill.unpriced:
            self.stats.unpriced += 1
            self._log.warning(
                "meter: %s increment %d for model %s has tokens without a rate; billed 0", kind.value, self._seq, model
            )
        return Increment(
            seq=self._seq,
            kind=kind,
            model=model,
            usage=usage,
            cost=bill.cost,
            by_category=bill.by_category,
            total_tokens=bill.total_tokens,
            response_id=response_id,
            item_id=item_id,
            unpriced=bill.unpriced,
        )

    def _garbage(self, reason: str, *args: object) -> None:
        self.stats.garbage += 1
        self.last_error = reason % args
        self._log.warning("meter: unreadable frame ignored: " + reason, *args)
        return None


def _announced_transcription_model(session: Mapping[str, Any]) -> tuple[bool, str | None]:
    """(found, model) from a session object: GA ``audio.input.transcription`` or beta
    ``input_audio_transcription``. ``found`` with ``None``: transcription turned off or no model.
    """
    audio = session.get("audio")
    audio_input = audio.get("input") if isinstance(audio, dict) else None
    if isinstance(audio_input, dict) and "transcription" in audio_input:
        config = audio_input["transcription"]
    elif "input_audio_transcription" in session:
        config = session["input_audio_transcription"]
    else:
        return False, None
    model = config.get("model") if isinstance(config, dict) else None
    return True, model if isinstance(model, str) and model else None


def _event_type(event: object) -> str:
    value = event.get("type") if isinstance(event, dict) else None
    return value if isinstance(value, str) else "?"


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _jsonable(value: Any) -> Any:
    """A copy with Decimals as exact decimal strings (JSON floats never appear)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Decimal):
        # Plain notation for ordinary values; huge or tiny exponents stay in exact E notation
        # rather than expanding "1e999999" into a million digits.
        plain = value.is_finite() and -40 <= value.adjusted() <= 40
        return format(value, "f") if plain else str(value)
    return value


# ---------------------------------------------------------------------------------------------
# Session totals.
