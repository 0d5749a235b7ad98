"""The price table: OpenAI's rates as data, loaded from a JSON price file.

The shipped file is ``meshrt/shared/data/prices.json`` (package data); an operator points
``MESHRT_PRICING_FILE`` at their own copy and the settings object passes that path to
:func:`load_price_table`. The schema and the rules are in ``docs/billing.md``.

Invariants:

- Rates are read from decimal *strings* only; a JSON number anywhere a rate belongs is refused,
  so no rate ever passes through a binary float.
- Every rate is held as exact :class:`~meshrt.shared.money.Money`: token rates per token (the
  file's USD per 1M tokens divided by 1e6, exact because the file allows at most 6 decimals),
  duration rates per minute.
- A bad file never half-loads: :func:`load_price_table` returns a complete table or raises
  :class:`PricingError` whose message names the file and the field (``models.X.…``).
- A :meth:`ModelRates.snapshot` is self-contained (model, effective date, rates) and
  :meth:`ModelRates.from_snapshot` rebuilds exactly the same rates, so a stored session record
  never depends on today's price file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from enum import StrEnum
from importlib import resources
from typing import Any

from meshrt.shared.money import Money

__all__ = [
    "MODALITIES",
    "ModelKind",
    "ModelRates",
    "PriceTable",
    "PricingError",
    "TokenRates",
    "load_price_table",
    "parse_price_table",
]

MODALITIES = ("text", "audio", "image")
RATE_FIELDS = ("input", "cached_input", "output")
TOKENS_PER_RATE_UNIT = 1_000_000
CURRENCY = "usd"
UNIT_TOKENS = "per_1m_tokens"
UNIT_MINUTE = "per_minute"

_SHIPPED = ("meshrt.shared", "data/prices.json")
_DECIMAL_TEXT = re.compile(r"\d+(\.\d+)?")
_TABLE_KEYS = {"effective_date", "currency", "models", "note"}
_MODEL_KEYS = {"realtime", "listed", "kind", "aliases", "token_rates_per_1m", "per_minute", "note"}
_IDENTITY_KEYS = ("model", "effective_date", "kind", "realtime", "listed")


class PricingError(ValueError):
    """A price file or rate snapshot that cannot be used; the message names the field."""


class ModelKind(StrEnum):
    """What a model is used for inside a session."""

    REALTIME = "realtime"  # a conversation model: bills response.done usage
    TRANSCRIPTION = "transcription"  # an input-audio transcription model of a session
    TRANSLATION = "translation"  # a translation session's model: billed per minute of input audio sent


@dataclass(frozen=True, slots=True)
class TokenRates:
    """One modality's rates, as ``Money`` per token; ``None`` where the model does not offer it."""

    input: Money | None = None
    cached_input: Money | None = None
    output: Money | None = None

    @property
    def offered(self) -> bool:
        return any(rate is not None for rate in (self.input, self.cached_input, self.output))


_NOT_OFFERED = TokenRates()


@dataclass(frozen=True, slots=True)
class ModelRates:
    """The rates of one model: per-token rates by modality, or a per-minute rate."""

    model: str
    effective_date: str
    kind: ModelKind = ModelKind.REALTIME
    realtime: bool = False
    listed: bool = True
    text: TokenRates = _NOT_OFFERED
    audio: TokenRates = _NOT_OFFERED
    image: TokenRates = _NOT_OFFERED
    per_minute: Money | None = None

    @property
    def by_duration(self) -> bool:
        """True when the model is priced per minute of audio rather than per token."""
        return self.per_minute is not None

    def tokens(self, modality: str) -> TokenRates:
        """The rates of ``modality`` (``"text"``, ``"audio"`` or ``"image"``)."""
        if modality not in MODALITIES:
            raise KeyError(modality)
        return getattr(self, modality)

    def pricing_json(self) -> dict[str, Any]:
        """The ``pricing`` object served in ``/v1/models``: USD decimal strings, null if absent."""
        if self.per_minute is not None:
            rate = self.per_minute.usd_str(min_decimals=2)
            if self.kind is ModelKind.TRANSLATION:  # billed by the input audio a client sends
                return {"currency": CURRENCY, "unit": UNIT_MINUTE, "per_minute": rate, "audio_per_minute": rate}
            return {"currency": CURRENCY, "unit": UNIT_MINUTE, "per_minute": rate}
        out: dict[str, Any] = {"currency": CURRENCY, "unit": UNIT_TOKENS}
        for modality in MODALITIES:
            rates = self.tokens(modality)
            out[modality] = {field: _per_1m_str(getattr(rates, field)) for field in RATE_FIELDS}
        return out

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able, self-contained copy of these rates, stored on each session record."""
        identity = {
            "model": self.model,
            "effective_date": self.effective_date,
            "kind": str(self.kind),
            "realtime": self.realtime,
            "listed": self.listed,
        }
        return identity | self.pricing_json()

    @classmethod
    def from_snapshot(cls, snapshot: Mapping[str, Any]) -> ModelRates:
        """Rebuild the rates of :meth:`snapshot`; raises :class:`PricingError` if malformed."""
        return _parse_snapshot(snapshot)


class PriceTable:
    """All models of one price file, by canonical name and by alias (dated snapshots)."""

    def __init__(
        self, effective_date: str, entries: Iterable[tuple[ModelRates, tuple[str, ...]]], source: str = "<memory>"
    ) -> None:
        self.effective_date = effective_date
        self.currency = CURRENCY
        self.source = source
        self._models: dict[str, ModelRates] = {}
        self._aliases: dict[str, tuple[str, ...]] = {}
        self._index: dict[str, ModelRates] = {}
        for rates, aliases in entries:
            self._models[rates.model] = rates
            self._aliases[rates.model] = aliases
            for name in (rates.model, *aliases):
                if name in self._index:
                    raise PricingError(f"{source}: model id {name!r} is defined twice")
                self._index[name] = rates

    @classmethod
    def from_models(
        cls, models: Iterable[ModelRates], effective_date: str | None = None, source: str = "<models>"
    ) -> PriceTable:
        """A table of already-parsed rates, e.g. the snapshots a session grant carries
        (``ModelRates.from_snapshot``), so a worker can meter without the price file.
        """
        models = list(models)
        if effective_date is None:
            effective_date = models[0].effective_date if models else ""
        return cls(effective_date, ((rates, ()) for rates in models), source=source)

    def __repr__(self) -> str:
        return f"PriceTable(effective_date={self.effective_date!r}, models={len(self._models)}, source={self.source!r})"

    @property
    def models(self) -> tuple[ModelRates, ...]:
        """Every model of the file (canonical names), in file order."""
        return tuple(self._models.values())

    def aliases(self, model: str) -> tuple[str, ...]:
        """The aliases (dated snapshots) the file lists for canonical ``model``."""
        return self._aliases.get(model, ())

    def get(self, model: object) -> ModelRates | None:
        """The rates of ``model`` (a canonical name or a listed alias), else ``None``."""
        return self._index.get(model) if isinstance(model, str) else None

    def realtime(self, model: object, include_unlisted: bool = False) -> ModelRates | None:
        """The rates of a model a client may connect to, else ``None`` (→ ``model_not_found``)."""
        rates = self.get(model)
        if rates is None or not rates.realtime or not (rates.listed or include_unlisted):
            return None
        return rates

    def grant_rates(self, rates: ModelRates) -> dict[str, Any]:
        """What a session's grant carries: the session model's rates and every transcription
        model's it may announce, so the worker reads no file and a later price change never
        rewrites a session's cost (`GrantPriceTable` reads it back)."""
        transcription = {m.model: m.snapshot() for m in self.models if m.kind == "transcription"}
        return {"effective_date": self.effective_date, "model": rates.snapshot(), "transcription": transcription}

    def transcription(self, model: object) -> ModelRates | None:
        """The rates of an input-audio transcription model, else ``None``."""
        rates = self.get(model)
        return rates if rates is not None and rates.kind is ModelKind.TRANSCRIPTION else None

    def translation(self, model: object) -> ModelRates | None:
        """The rates of a translation model (`/v1/realtime/translations?model=…`), else ``None``."""
        rates = self.get(model)
        return rates if rates is not None and rates.kind is ModelKind.TRANSLATION else None

    def realtime_models(self, include_unlisted: bool = False) -> dict[str, ModelRates]:
        """Connectable model ids (canonical names then their aliases, file order) → rates."""
        out: dict[str, ModelRates] = {}
        for name, rates in self._models.items():
            if rates.realtime and (rates.listed or include_unlisted):
                for model_id in (name, *self._aliases[name]):
                    out[model_id] = rates
        return out


def load_price_table(path: str | os.PathLike[str] | None = None) -> PriceTable:
    """Load a price file: ``path`` (e.g. ``MESHRT_PRICING_FILE``), or the shipped one if None.

    Raises :class:`PricingError` if the file cannot be read or is not a valid price file.
    """
    if path is None:
        resource = resources.files(_SHIPPED[0]).joinpath(_SHIPPED[1])
        source = f"{_SHIPPED[0]}/{_SHIPPED[1]}"
        try:
            data = resource.read_bytes()
        except OSError as exc:
            raise PricingError(f"{source}: cannot read the shipped price file: {exc}") from exc
    else:
        source = os.fspath(path)
        try:
            with open(source, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise PricingError(f"{source}: cannot read price file: {exc.strerror}") from exc
    return parse_price_table(data, source=source)


def parse_price_table(data: str | bytes, source: str = "<memory>") -> PriceTable:
    """Parse the text of a price file; raises :class:`PricingError` naming the bad field."""
    doc = _load_json(data, source)
    if not isinstance(doc, dict):
        raise PricingError(f"{source}: a price file is a JSON object")
    _check_keys(doc, _TABLE_KEYS, "", source)
    effective_date = _parse_date(doc.get("effective_date"), "effective_date", source)
    if doc.get("currency") != CURRENCY:
        raise PricingError(f"{source}: currency: must be {CURRENCY!r}, not {doc.get('currency')!r}")
    models = doc.get("models")
    if not isinstance(models, dict) or not models:
        raise PricingError(f"{source}: models: must be a non-empty object of model name → rates")
    entries = [_parse_model(name, entry, effective_date, source) for name, entry in models.items()]
    return PriceTable(effective_date, entries, source=source)


def _load_json(data: str | bytes, source: str) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise PricingError(f"{source}: duplicate key {key!r}")
            out[key] = value
        return out

    def constant(name: str) -> Any:
        raise PricingError(f"{source}: {name} is not allowed in a price file")

    try:
        return json.loads(data, object_pairs_hook=pairs, parse_float=Decimal, parse_constant=constant)
    except ValueError as exc:
        if isinstance(exc, PricingError):
            raise
        raise PricingError(f"{source}: not valid JSON: {exc}") from exc


def _parse_model(name: object, entry: object, effective_date: str, source: str) -> tuple[ModelRates, tuple[str, ...]]:
    path = f"models.{name}"
    if not isinstance(name, str) or not name.strip():
        raise PricingError(f"{source}: models: model names must be non-empty strings")
    if not isinstance(entry, dict):
        raise PricingError(f"{source}: {path}: must be an object")
    _check_keys(entry, _MODEL_KEYS, path, source)
    realtime = _parse_bool(entry.get("realtime", False), f"{path}.realtime", source)
    listed = _parse_bool(entry.get("listed", True), f"{path}.listed", source)
    kind = _parse_kind(entry.get("kind", ModelKind.REALTIME.value), f"{path}.kind", source)
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise PricingError(f"{source}: {path}.aliases: must be a list of model ids")
    has_tokens, has_minute = "token_rates_per_1m" in entry, "per_minute" in entry
    if has_tokens == has_minute:
        raise PricingError(f"{source}: {path}: give exactly one of token_rates_per_1m or per_minute")
    if kind is ModelKind.TRANSLATION and not has_minute:
        raise PricingError(f"{source}: {path}: a translation model is priced per_minute (of input audio)")
    common = dict(model=name, effective_date=effective_date, kind=kind, realtime=realtime, listed=listed)
    if has_minute:
        per_minute = _parse_per_minute(entry["per_minute"], f"{path}.per_minute", source)
        return ModelRates(**common, per_minute=per_minute), tuple(aliases)
    table = entry["token_rates_per_1m"]
    tpath = f"{path}.token_rates_per_1m"
    if not isinstance(table, dict):
        raise PricingError(f"{source}: {tpath}: must be an object of text/audio/image rates")
    for modality in table:
        if modality not in MODALITIES:
            raise PricingError(f"{source}: {tpath}.{modality}: unknown category (allowed: text, audio, image)")
    by_modality = {m: _parse_token_rates(table[m], f"{tpath}.{m}", source) for m in MODALITIES if m in table}
    return ModelRates(**common, **by_modality), tuple(aliases)


def _parse_snapshot(snapshot: object) -> ModelRates:
    source = "rates snapshot"
    if not isinstance(snapshot, Mapping):
        raise PricingError(f"{source}: must be an object")
    for key in _IDENTITY_KEYS + ("currency", "unit"):
        if key not in snapshot:
            raise PricingError(f"{source}: {key}: missing")
    model = snapshot["model"]
    if not isinstance(model, str) or not model:
        raise PricingError(f"{source}: model: must be a non-empty string")
    common = dict(
        model=model,
        effective_date=_parse_date(snapshot["effective_date"], "effective_date", source),
        kind=_parse_kind(snapshot["kind"], "kind", source),
        realtime=_parse_bool(snapshot["realtime"], "realtime", source),
        listed=_parse_bool(snapshot["listed"], "listed", source),
    )
    if snapshot["currency"] != CURRENCY:
        raise PricingError(f"{source}: currency: must be {CURRENCY!r}")
    unit = snapshot["unit"]
    if unit == UNIT_MINUTE:
        _check_keys(snapshot, {*_IDENTITY_KEYS, "currency", "unit", "per_minute", "audio_per_minute"}, "", source)
        per_minute = _parse_per_minute(snapshot.get("per_minute"), "per_minute", source)
        return ModelRates(**common, per_minute=per_minute)
    if unit != UNIT_TOKENS:
        raise PricingError(f"{source}: unit: must be {UNIT_TOKENS!r} or {UNIT_MINUTE!r}")
    _check_keys(snapshot, {*_IDENTITY_KEYS, "currency", "unit", *MODALITIES}, "", source)
    by_modality = {m: _parse_token_rates(snapshot[m], m, source) for m in MODALITIES if m in snapshot}
    return ModelRates(**common, **by_modality)


def _parse_token_rates(value: object, path: str, source: str) -> TokenRates:
    if not isinstance(value, dict):
        raise PricingError(f"{source}: {path}: must be an object with input, cached_input, output")
    _check_keys(value, set(RATE_FIELDS), path, source)
    rates: dict[str, Money | None] = {}
    for field in RATE_FIELDS:
        if field not in value:
            raise PricingError(f"{source}: {path}.{field}: missing (use null if not offered)")
        raw = value[field]
        if raw is None:
            rates[field] = None
            continue
        per_1m = _parse_usd(raw, f"{path}.{field}", source)
        per_token, rest = divmod(per_1m.picodollars, TOKENS_PER_RATE_UNIT)
        if rest:
            raise PricingError(f"{source}: {path}.{field}: {raw!r} has more than 6 decimals per 1M tokens")
        rates[field] = Money(per_token)
    return TokenRates(**rates)


def _parse_per_minute(value: object, path: str, source: str) -> Money:
    return _parse_usd(value, path, source)


def _parse_usd(value: object, path: str, source: str) -> Money:
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        raise PricingError(
            f'{source}: {path}: is the JSON number {value}; write rates as decimal strings, e.g. "{value}"'
        )
    if not isinstance(value, str):
        raise PricingError(f'{source}: {path}: must be a decimal string such as "4.00"')
    if value.startswith("-"):
        raise PricingError(f"{source}: {path}: negative rate {value!r}")
    if not _DECIMAL_TEXT.fullmatch(value):
        raise PricingError(f'{source}: {path}: {value!r} is not a plain decimal such as "4.00"')
    try:
        return Money.from_usd(value)
    except ValueError as exc:
        raise PricingError(f"{source}: {path}: {exc}") from exc


def _parse_date(value: object, path: str, source: str) -> str:
    if value is None:
        raise PricingError(f'{source}: {path}: missing (a date like "2026-11-01")')
    try:
        if isinstance(value, str) and len(value) == 10:
            date.fromisoformat(value)
            return value
    except ValueError:
        pass
    raise PricingError(f'{source}: {path}: must be a date like "2026-11-01", not {value!r}')


def _parse_bool(value: object, path: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise PricingError(f"{source}: {path}: must be true or false")
    return value


def _parse_kind(value: object, path: str, source: str) -> ModelKind:
    try:
        return ModelKind(value)
    except ValueError:
        allowed = ", ".join(k.value for k in ModelKind)
        raise PricingError(f"{source}: {path}: {value!r} is not one of {allowed}") from None


def _check_keys(obj: Mapping[str, Any], allowed: set[str], path: str, source: str) -> None:
    for key in obj:
        if key not in allowed:
            where = f"{path}.{key}" if path else key
            raise PricingError(f"{source}: {where}: unknown field")


def _per_1m_str(per_token: Money | None) -> str | None:
    if per_token is None:
        return None
    return Money(per_token.picodollars * TOKENS_PER_RATE_UNIT).usd_str(min_decimals=2)
