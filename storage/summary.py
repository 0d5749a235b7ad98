"""A session's usage summary from its applied increments: what the final record stores."""

from __future__ import annotations

from meshrt.shared.increments import Increment
from meshrt.shared.increments import UsageTotals


def summarize(increments: list[Increment]) -> dict:
    """Sum increments (order-independent, idempotent by seq) into the record's fields."""
    totals = UsageTotals.from_increments(increments)
    return {
        "usage": totals.as_record_usage(),
        "responses": totals.responses,
        "cost_pico": totals.cost.picodollars,
        "by_category": {k: v.picodollars for k, v in totals.by_category.items()},
        "audio_seconds": totals.audio_seconds,
    }
