"""What a session is billed, as data: usage increments and their totals. Sans-I/O.

Shared because both sides use it: a worker's meter (`worker/meter.py`) makes an
:class:`Increment` for each billed event and writes it (as JSON) to its spool and its channel;
the supervisor rebuilds increments with :meth:`Increment.from_json` and folds them with
:class:`UsageTotals` into the session's record. The usage normalisation both need
(:func:`response_tokens`, :func:`transcription_tokens`) lives here too.

Invariants:

- Usage is kept as received on the increment (non-integer numbers as exact decimal strings);
  fields meshrt does not know are never dropped, and integer ones are summed in the totals.
- :meth:`UsageTotals.add` counts a ``seq`` once, so replaying a spool after a crash never bills
  twice, in any order.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from decimal import Context
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction
from typing import Any

from meshrt.shared.money import Money
from meshrt.shared.pricing import MODALITIES

__all__ = [
    "Increment",
    "IncrementKind",
    "ResponseTokens",
    "TranscriptionTokens",
    "UsageTotals",
    "response_tokens",
    "transcription_tokens",
]

_MAX_SECONDS = Decimal(10**9)
AUDIO_TICKS_PER_SECOND = 48_000  # an audio increment's unit: one byte of PCM16 at 24 kHz, 1/6 of G.711's
# Seconds are bounded (≤ 1e9, exponent ≥ -60), so sums of them are exact at this precision.
_EXACT = Context(prec=200)


class IncrementKind(StrEnum):
    RESPONSE = "response"
    TRANSCRIPTION = "transcription"
    AUDIO = "audio"  # a translation session's input audio, metered by meshrt (worker/translation.py)


@dataclass(frozen=True)
class Increment:
    """One billed event of a session. The dict fields are not to be mutated.

    ``usage`` is upstream's usage object as received, except that non-integer numbers are exact
    decimal strings (``"seconds": "2.5"``) so it is JSON as it stands.
    """

    seq: int
    kind: IncrementKind
    model: str
    usage: dict[str, Any]
    cost: Money
    by_category: dict[str, Money]
    total_tokens: int
    response_id: str | None = None
    item_id: str | None = None
    unpriced: bool = False

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict for the spool and the control channel; money as int picodollars."""
        return {
            "seq": self.seq,
            "kind": self.kind.value,
            "model": self.model,
            "usage": self.usage,
            "cost_picodollars": self.cost.picodollars,
            "by_category_picodollars": {k: v.picodollars for k, v in self.by_category.items()},
            "total_tokens": self.total_tokens,
            "response_id": self.response_id,
            "item_id": self.item_id,
            "unpriced": self.unpriced,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Increment:
        """Rebuild an increment from :meth:`to_json`; raises ``ValueError`` if malformed."""
        try:
            seq, total = data["seq"], data["total_tokens"]
            if not (_is_count(seq) and seq >= 1 and _is_count(total)):
                raise ValueError("seq and total_tokens must be integers")
            usage, by_cat = data["usage"], data["by_category_picodollars"]
            if not isinstance(usage, dict) or not isinstance(by_cat, dict):
                raise ValueError("usage and by_category_picodollars must be objects")
            refs = data.get("response_id"), data.get("item_id")
            if not all(ref is None or isinstance(ref, str) for ref in refs):
                raise ValueError("response_id and item_id must be strings or null")
            if not isinstance(data["model"], str) or not isinstance(data["unpriced"], bool):
                raise ValueError("model must be a string and unpriced a boolean")
            cost = Money(data["cost_picodollars"])
            by_category = {str(k): Money(v) for k, v in by_cat.items()}
            if sum(by_category.values(), Money.ZERO) != cost:
                raise ValueError("cost_picodollars is not the sum of by_category_picodollars")
            return cls(
                seq=seq,
                kind=IncrementKind(data["kind"]),
                model=data["model"],
                usage=usage,
                cost=cost,
                by_category=by_category,
                total_tokens=total,
                response_id=refs[0],
                item_id=refs[1],
                unpriced=data["unpriced"],
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed increment: {exc!r}") from exc


@dataclass(frozen=True, slots=True)
class ResponseTokens:
    """A ``response.done`` usage object as billed: every token attributed to a category."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    input: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(MODALITIES, 0))
    cached: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(MODALITIES, 0))
    output_text: int = 0
    output_audio: int = 0
    malformed: int = 0  # known fields of the wrong type, ignored

    @property
    def cached_tokens(self) -> int:
        return sum(self.cached.values())


@dataclass(frozen=True, slots=True)
class TranscriptionTokens:
    """A transcription usage object as billed (``type`` ``tokens`` or ``duration``)."""

    usage_type: str
    input_text: int = 0
    input_audio: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    seconds: Decimal = Decimal(0)
    malformed: int = 0

    @property
    def input_tokens(self) -> int:
        return self.input_text + self.input_audio


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _Reader:
    """Reads token counts out of a usage object, counting fields of the wrong type."""

    def __init__(self) -> None:
        self.malformed = 0

    def obj(self, parent: object, key: str) -> Mapping[str, Any]:
        value = parent.get(key) if isinstance(parent, Mapping) else None
        if value is None or isinstance(value, Mapping):
            return value or {}
        self.malformed += 1
        return {}

    def count(self, parent: Mapping[str, Any], key: str) -> int | None:
        value = parent.get(key)
        if value is None or _is_count(value):
            return value
        self.malformed += 1
        return None


def response_tokens(usage: Mapping[str, Any]) -> ResponseTokens:
    """Attribute a ``response.done`` usage object to categories (docs/billing.md, "How a response is charged").

    - Per-modality input and output come from ``input_token_details`` / ``output_token_details``;
      tokens in ``input_tokens`` / ``output_tokens`` beyond their sum are text.
    - Cached tokens come from ``cached_tokens_details`` (GA); any part of ``cached_tokens`` it
      does not attribute (all of it in beta) goes to text first, then audio, then image, each up
      to its uncached input.
    """
    read = _Reader()
    in_details = read.obj(usage, "input_token_details")
    cached_details = read.obj(in_details, "cached_tokens_details")
    out_details = read.obj(usage, "output_token_details")

    inputs = {m: read.count(in_details, f"{m}_tokens") or 0 for m in MODALITIES}
    input_tokens = max(read.count(usage, "input_tokens") or 0, sum(inputs.values()))
    inputs["text"] += input_tokens - sum(inputs.values())

    cached = {m: read.count(cached_details, f"{m}_tokens") or 0 for m in MODALITIES}
    cached_total = read.count(in_details, "cached_tokens")
    unattributed = max(0, (cached_total or 0) - sum(cached.values()))
    for m in MODALITIES:
        take = min(unattributed, max(0, inputs[m] - cached[m]))
        cached[m] += take
        unattributed -= take

    out_text = read.count(out_details, "text_tokens") or 0
    out_audio = read.count(out_details, "audio_tokens") or 0
    output_tokens = max(read.count(usage, "output_tokens") or 0, out_text + out_audio)
    out_text += output_tokens - (out_text + out_audio)

    total = max(read.count(usage, "total_tokens") or 0, input_tokens + output_tokens)
    return ResponseTokens(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=total,
        input=inputs,
        cached=cached,
        output_text=out_text,
        output_audio=out_audio,
        malformed=read.malformed,
    )


def transcription_tokens(usage: Mapping[str, Any]) -> TranscriptionTokens | None:
    """Read a transcription usage object; ``None`` if ``seconds`` of a duration is unusable.

    Input tokens beyond ``text_tokens + audio_tokens`` are audio (what a transcriber reads).
    """
    read = _Reader()
    usage_type = usage.get("type")
    if not isinstance(usage_type, str):
        usage_type = "duration" if "seconds" in usage else "tokens"
    if usage_type == "duration":
        seconds = _decimal_seconds(usage.get("seconds"))
        if seconds is None:
            return None
        return TranscriptionTokens(usage_type, seconds=seconds)
    details = read.obj(usage, "input_token_details")
    text = read.count(details, "text_tokens") or 0
    audio = read.count(details, "audio_tokens") or 0
    input_tokens = max(read.count(usage, "input_tokens") or 0, text + audio)
    output = read.count(usage, "output_tokens") or 0
    total = max(read.count(usage, "total_tokens") or 0, input_tokens + output)
    return TranscriptionTokens(
        usage_type,
        input_text=text,
        input_audio=input_tokens - text,
        output_tokens=output,
        total_tokens=total,
        malformed=read.malformed,
    )


def _decimal_seconds(value: object) -> Decimal | None:
    if isinstance(value, bool):
        return None
    try:
        seconds = Decimal(value) if isinstance(value, (int, str, Decimal)) else None
    except ArithmeticError:
        return None
    if seconds is None or not seconds.is_finite() or not 0 <= seconds <= _MAX_SECONDS:
        return None
    if seconds and seconds.as_tuple().exponent < -60:
        return None
    return seconds


_RESPONSE_KNOWN = frozenset(
    {
        ("total_tokens",),
        ("input_tokens",),
        ("output_tokens",),
        ("input_token_details", "text_tokens"),
        ("input_token_details", "audio_tokens"),
        ("input_token_details", "image_tokens"),
        ("input_token_details", "cached_tokens"),
        ("input_token_details", "cached_tokens_details", "text_tokens"),
        ("input_token_details", "cached_tokens_details", "audio_tokens"),
        ("input_token_details", "cached_tokens_details", "image_tokens"),
        ("output_token_details", "text_tokens"),
        ("output_token_details", "audio_tokens"),
    }
)
_TRANSCRIPTION_KNOWN = frozenset(
    {
        ("type",),
        ("seconds",),
        ("total_tokens",),
        ("input_tokens",),
        ("output_tokens",),
        ("input_token_details", "text_tokens"),
        ("input_token_details", "audio_tokens"),
    }
)


_CACHED_DETAILS = ("input_token_details", "cached_tokens_details")


class UsageTotals:
    """The sum of a session's increments, shaped for the usage record (docs/protocol.md, Usage records).

    Order-independent, and idempotent per ``seq``: adding an increment whose seq was already
    added is a no-op (a spool replay), and a *different* increment under a known seq raises
    ``ValueError`` (two sessions' increments mixed up).
    """

    def __init__(self) -> None:
        self._seen: dict[int, Increment] = {}
        self.cost = Money.ZERO
        self._by_category: dict[str, Money] = {}
        self.responses = 0
        self.transcriptions = 0
        self.unpriced = 0
        self.total_tokens = 0
        self._response: dict[tuple[str, ...], int] = {}
        self._transcription: dict[tuple[str, ...], int] = {}
        self._seconds = Decimal(0)
        self.audio_ticks: int | None = None  # a translation session's audio billed, in 1/48 000 s

    @classmethod
    def from_increments(cls, increments: Iterable[Increment]) -> UsageTotals:
        totals = cls()
        for increment in increments:
            totals.add(increment)
        return totals

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, seq: object) -> bool:
        return seq in self._seen

    @property
    def max_seq(self) -> int:
        return max(self._seen, default=0)

    @property
    def by_category(self) -> dict[str, Money]:
        return dict(sorted(self._by_category.items()))

    def add(self, increment: Increment) -> bool:
        """Count ``increment`` once; True if it was new, False if its seq was already counted."""
        prior = self._seen.get(increment.seq)
        if prior is not None:
            if prior != increment:
                raise ValueError(f"increment seq {increment.seq} seen twice with different content")
            return False
        self._seen[increment.seq] = increment
        self.cost += increment.cost
        for category, amount in increment.by_category.items():
            self._by_category[category] = self._by_category.get(category, Money.ZERO) + amount
        self.total_tokens += increment.total_tokens
        self.unpriced += increment.unpriced
        if increment.kind is IncrementKind.RESPONSE:
            self.responses += 1
            _add_counts(self._response, _response_counts(increment.usage))
        elif increment.kind is IncrementKind.AUDIO:
            start, end = increment.usage.get("ticks_from"), increment.usage.get("ticks_to")
            if isinstance(start, int) and isinstance(end, int):
                self.audio_ticks = (self.audio_ticks or 0) + end - start
        else:
            self.transcriptions += 1
            _add_counts(self._transcription, _transcription_counts(increment.usage))
            tokens = transcription_tokens(increment.usage)
            if tokens is not None:
                self._seconds = _EXACT.add(self._seconds, tokens.seconds)
        return True

    def as_record_usage(self) -> dict[str, Any]:
        """The record's ``usage`` object (docs/protocol.md, Usage records): response usage as
        billed, unknown integer fields summed beside it, and ``transcription`` when the session
        had any.
        """
        get = self._response.get
        usage: dict[str, Any] = {
            "total_tokens": get(("total_tokens",), 0),
            "input_tokens": get(("input_tokens",), 0),
            "output_tokens": get(("output_tokens",), 0),
            "input_token_details": {
                "text_tokens": get(("input_token_details", "text_tokens"), 0),
                "audio_tokens": get(("input_token_details", "audio_tokens"), 0),
                "image_tokens": get(("input_token_details", "image_tokens"), 0),
                "cached_tokens": get(("input_token_details", "cached_tokens"), 0),
                "cached_tokens_details": {
                    f"{m}_tokens": get(_CACHED_DETAILS + (f"{m}_tokens",), 0) for m in MODALITIES
                },
            },
            "output_token_details": {
                "text_tokens": get(("output_token_details", "text_tokens"), 0),
                "audio_tokens": get(("output_token_details", "audio_tokens"), 0),
            },
        }
        _merge_extra(usage, self._response, _RESPONSE_KNOWN)
        if self.transcriptions:
            tget = self._transcription.get
            transcription: dict[str, Any] = {
                "total_tokens": tget(("total_tokens",), 0),
                "input_tokens": tget(("input_tokens",), 0),
                "output_tokens": tget(("output_tokens",), 0),
                "input_token_details": {
                    "text_tokens": tget(("input_token_details", "text_tokens"), 0),
                    "audio_tokens": tget(("input_token_details", "audio_tokens"), 0),
                },
                "seconds": format(self._seconds, "f"),
            }
            _merge_extra(transcription, self._transcription, _TRANSCRIPTION_KNOWN)
            usage["transcription"] = transcription
        if self.audio_ticks is not None:
            usage["input_audio"] = {"seconds": self.audio_seconds}
        return usage

    @property
    def audio_seconds(self) -> str | None:
        """Seconds of input audio billed by time (translation sessions), for the record: exact
        when it terminates within 9 decimals, else rounded half up to 9; None when none was."""
        if self.audio_ticks is None:
            return None
        exact = Fraction(self.audio_ticks, AUDIO_TICKS_PER_SECOND)
        scaled = int(exact * 10**9 + Fraction(1, 2))
        whole, frac = divmod(scaled, 10**9)
        return f"{whole}.{frac:09d}".rstrip("0").rstrip(".") if frac else str(whole)

    def as_record_cost(self) -> dict[str, Any]:
        """The record's ``cost`` object: USD decimal strings."""
        return {
            "currency": "usd",
            "amount": self.cost.usd_str(),
            "by_category": {k: v.usd_str() for k, v in self.by_category.items()},
        }


def _response_counts(usage: Mapping[str, Any]) -> dict[tuple[str, ...], int]:
    tokens = response_tokens(usage)
    counts = {
        ("total_tokens",): tokens.total_tokens,
        ("input_tokens",): tokens.input_tokens,
        ("output_tokens",): tokens.output_tokens,
        ("input_token_details", "cached_tokens"): tokens.cached_tokens,
        ("output_token_details", "text_tokens"): tokens.output_text,
        ("output_token_details", "audio_tokens"): tokens.output_audio,
    }
    for m in MODALITIES:
        counts[("input_token_details", f"{m}_tokens")] = tokens.input[m]
        counts[("input_token_details", "cached_tokens_details", f"{m}_tokens")] = tokens.cached[m]
    counts.update(_unknown_counts(usage, _RESPONSE_KNOWN))
    return counts


def _transcription_counts(usage: Mapping[str, Any]) -> dict[tuple[str, ...], int]:
    counts = _unknown_counts(usage, _TRANSCRIPTION_KNOWN)
    tokens = transcription_tokens(usage)
    if tokens is not None and tokens.usage_type != "duration":
        counts[("total_tokens",)] = tokens.total_tokens
        counts[("input_tokens",)] = tokens.input_tokens
        counts[("output_tokens",)] = tokens.output_tokens
        counts[("input_token_details", "text_tokens")] = tokens.input_text
        counts[("input_token_details", "audio_tokens")] = tokens.input_audio
    return counts


def _unknown_counts(
    usage: Mapping[str, Any], known: frozenset[tuple[str, ...]], prefix: tuple[str, ...] = ()
) -> dict[tuple[str, ...], int]:
    """Integer leaves of ``usage`` whose path is not a known field (new token kinds)."""
    out: dict[tuple[str, ...], int] = {}
    for key, value in usage.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            out.update(_unknown_counts(value, known, path))
        elif path not in known and isinstance(value, int) and not isinstance(value, bool):
            out[path] = value
    return out


def _add_counts(into: dict[tuple[str, ...], int], counts: Mapping[tuple[str, ...], int]) -> None:
    for path, value in counts.items():
        into[path] = into.get(path, 0) + value


def _merge_extra(
    target: dict[str, Any], counts: Mapping[tuple[str, ...], int], known: frozenset[tuple[str, ...]]
) -> None:
    """Place unknown summed fields at their paths; sorted, so the result is order-independent.
    A path that collides with a non-object value already there is left out (it stays on the
    increments).
    """
    for path, value in sorted(counts.items()):
        if path in known:
            continue
        node = target
        for key in path[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            if path[-1] not in node:
                node[path[-1]] = value
