"""The price catalog the front door serves and grants from (rates are data: shared/data/prices.json,
or MESHRT_PRICING_FILE). A grant carries a snapshot of every rate its session may be billed at,
so the worker needs no file and a later price change never rewrites a session's cost."""

from __future__ import annotations

from meshrt.shared.pricing import PriceTable, load_price_table


class Catalog:
    def __init__(self, table: PriceTable):
        self.table = table

    def get(self, model: str):
        """A connectable realtime model's rates, or None (unknown, unlisted, not realtime)."""
        return self.table.realtime(model)

    def grant_rates(self, model: str) -> dict:
        rates = self.table.realtime(model)
        transcription = {m.model: m.snapshot() for m in self.table.models if m.kind == "transcription"}
        return {"effective_date": self.table.effective_date, "model": rates.snapshot(),
                "transcription": transcription}


def load_catalog(settings) -> Catalog:
    return Catalog(load_price_table(settings.pricing_file or None))
