"""Glue between a session's grant and the meter: what the relay calls for usage-carrying frames.

The grant carries a snapshot of every rate the session may be billed at (its model, and the
transcription models a session can announce), so the worker reads no price file and a price
change during the session cannot change its bill.
"""

from __future__ import annotations

import dataclasses

from meshrt.shared.increments import IncrementKind
from meshrt.shared.increments import response_tokens
from meshrt.shared.increments import transcription_tokens
from meshrt.shared.money import Money
from meshrt.shared.pricing import ModelRates

from .meter import Bill
from .meter import Increment
from .meter import Meter
from .meter import UsageTotals
from .meter import bill_response
from .meter import bill_transcription
from .meter import may_carry_usage
from .translation import bill_audio


class SessionMeter:
    """A Meter plus the session's running totals (the relay checks the token cap against them).

    In a transcription session (`transcription_only`) the announced transcription model is all
    it is billed at, so it must be one `/v1/models` lists: `refused_model` names one that is not
    (the relay then ends the session with `model_not_found`, docs/billing.md)."""

    def __init__(self, meter: Meter, transcription_only: bool = False):
        self.meter = meter
        self.totals = UsageTotals()
        self.transcription_only = transcription_only
        self.refused_model: str | None = None

    def observe(self, payload: bytes) -> Increment | None:
        increment = self.meter.observe(payload)
        if increment is not None:
            self.totals.add(increment)
        if self.transcription_only and self.refused_model is None:
            model = self.meter.transcription_model
            if model is not None:
                rates = self.meter.price_table.transcription(model)
                if rates is None or not rates.listed:
                    self.refused_model = model
        return increment

    @property
    def total_tokens(self) -> int:
        return self.totals.total_tokens


class GrantPriceTable:
    """The rates a grant carries, parsed when first asked for: a session that never announces a
    transcription model never pays for parsing those snapshots on its set-up path."""

    def __init__(self, rates: dict):
        self._snapshots = rates.get("transcription", {})
        self.model = ModelRates.from_snapshot(rates["model"])
        self.effective_date = rates.get("effective_date", self.model.effective_date)
        self._parsed: dict[str, ModelRates | None] = {self.model.model: self.model}

    def get(self, name: object) -> ModelRates | None:
        if not isinstance(name, str):
            return None
        if name not in self._parsed:
            snapshot = self._snapshots.get(name)
            self._parsed[name] = ModelRates.from_snapshot(snapshot) if snapshot is not None else None
        return self._parsed[name]

    def transcription(self, name: object) -> ModelRates | None:
        rates = self.get(name)
        return rates if rates is not None and rates.kind == "transcription" else None


def build_meter(grant):
    """Return (meter, may_carry_usage) for the relay of this grant."""
    table = GrantPriceTable(grant.rates)
    transcription_only = getattr(grant, "surface", "realtime") == "transcription"
    return SessionMeter(Meter(table.model, table), transcription_only), may_carry_usage


def bill_again(table: GrantPriceTable, increment: Increment) -> Bill:
    """The bill of `increment`'s usage at the rates of the grant (`table`), by the meter's own
    rules: what the supervisor charges, whatever cost a worker reported. A response is billed at
    the session's model; a transcription at the rates the grant holds for the model named (the
    meter picks that model from the session's events, which only the worker sees)."""
    if increment.kind is IncrementKind.RESPONSE:
        return bill_response(table.model, response_tokens(increment.usage))
    if increment.kind is IncrementKind.AUDIO:  # a translation session's input audio, at its model's rate
        rates = table.get(increment.model)
        per_minute = rates.per_minute if rates is not None and rates.kind == "translation" else None
        return bill_audio(per_minute, increment.usage)
    tokens = transcription_tokens(increment.usage)
    if tokens is None:
        return Bill(Money.ZERO, {}, 0, True)
    rates = table.transcription(increment.model)
    if rates is not None and rates.by_duration != (tokens.usage_type == "duration"):
        rates = None
    return bill_transcription(rates, tokens)


def repriced(table: GrantPriceTable, increment: Increment) -> Increment | None:
    """`increment` as the grant prices it, or None if the worker's figures already agree."""
    bill = bill_again(table, increment)
    if (bill.cost, bill.by_category, bill.total_tokens, bill.unpriced) == (
        increment.cost,
        increment.by_category,
        increment.total_tokens,
        increment.unpriced,
    ):
        return None
    return dataclasses.replace(
        increment, cost=bill.cost, by_category=bill.by_category, total_tokens=bill.total_tokens, unpriced=bill.unpriced
    )
