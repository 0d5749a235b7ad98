"""The price catalog the front door serves and grants from (rates are data: shared/data/prices.json,
or MESHRT_PRICING_FILE). A grant carries a snapshot of every rate its session may be billed at,
so the worker needs no file and a later price change never rewrites a session's cost."""

from __future__ import annotations

from meshrt.shared.pricing import PriceTable
from meshrt.shared.pricing import load_price_table

# What a transcription session's grant and record start with (docs/billing.md, Transcription sessions).
TRANSCRIPTION_SESSION_MODEL = "gpt-4o-transcribe"


class Catalog:
    def __init__(self, table: PriceTable):
        self.table = table

    def get(self, model: str):
        """A connectable realtime model's rates, or None (unknown, unlisted, not realtime)."""
        return self.table.realtime(model)

    def grant_rates(self, model: str) -> dict:
        rates = self.table.realtime(model) or self.table.transcription(model)
        return self.table.grant_rates(rates)

    def transcription_session_model(self):
        """The rates a transcription session (`?intent=transcription`) is granted with before it
        configures its model: gpt-4o-transcribe, else the first listed transcription model of
        the price file; None when the file prices none (the session is refused)."""
        listed = [r for r in self.table.models if r.kind == "transcription" and r.listed]
        preferred = self.table.transcription(TRANSCRIPTION_SESSION_MODEL)
        if preferred is not None and preferred.listed:
            return preferred
        return listed[0] if listed else None

    def priced_transcription(self, model: object):
        """A transcription model `/v1/models` lists (a transcription session may be billed at it)."""
        rates = self.table.transcription(model)
        return rates if rates is not None and rates.listed else None

    def listed_models(self) -> dict:
        """What /v1/models shows: connectable realtime models (with their aliases), then the
        transcription models a session can be billed for, so clients can estimate both."""
        models = dict(self.table.realtime_models())
        for rates in self.table.models:
            if rates.kind == "transcription" and rates.listed:
                models.setdefault(rates.model, rates)
        return models

    def models_json(self) -> list[dict]:
        return [
            {"id": m, "object": "model", "realtime": r.realtime, "pricing": r.pricing_json()}
            for m, r in self.listed_models().items()
        ]


def load_catalog(settings) -> Catalog:
    return Catalog(load_price_table(settings.pricing_file or None))
