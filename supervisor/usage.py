"""A session's usage summary from its applied increments: what the final record stores."""

from __future__ import annotations


def summarize(increments: list[dict]) -> dict:
    """Sum increments (order-independent) into the record's usage, cost and response count."""
    from meshrt.worker.meter import Increment, UsageTotals

    totals = UsageTotals()
    for body in increments:
        totals.add(Increment.from_json(body))
    return {
        "usage": totals.as_record_usage(),
        "responses": totals.responses,
        "cost_pico": totals.cost.picodollars if hasattr(totals.cost, "picodollars") else int(totals.cost),
        "by_category": {k: (v.picodollars if hasattr(v, "picodollars") else int(v)) for k, v in totals.by_category.items()},
    }
