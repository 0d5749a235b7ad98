"""Usage records as the API shows them (docs/protocol.md, Usage records), and the paginated
query behind `GET /v1/usage`, the admin API and `meshrt usage` (docs/protocol.md, Pagination).
Newest first; `after` is a record id."""

from __future__ import annotations

import json
from datetime import datetime
from datetime import timezone

from sqlalchemy import and_
from sqlalchemy import or_
from sqlmodel import Session
from sqlmodel import select

from meshrt.shared.money import Money
from meshrt.storage.db import SessionRecord
from meshrt.storage.db import SessionState

MAX_LIMIT = 100


def _ts(dt: datetime | None) -> int | None:
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp())


def _seconds(start: datetime, end: datetime | None) -> float:
    if end is None:
        return 0.0
    if start.tzinfo is None:
        start = start.replace(tzinfo=timezone.utc)
    if end.tzinfo is None:
        end = end.replace(tzinfo=timezone.utc)
    return round((end - start).total_seconds(), 3)


def record_json(row: SessionRecord) -> dict:
    return {
        "object": "realtime.session.usage",
        "id": row.id,
        "request_id": row.request_id,
        "model": row.model,
        "surface": row.surface,
        "audio_seconds": row.audio_seconds,
        "api_key_id": row.api_key_id,
        "started_at": _ts(row.started_at),
        "ended_at": _ts(row.ended_at),
        "duration_s": _seconds(row.started_at, row.ended_at),
        "end_reason": row.end_reason,
        "close_code": row.close_code,
        "responses": row.responses,
        "usage": row.usage,
        "cost": {
            "currency": "usd",
            "amount": Money(row.cost_pico).usd_str(),
            "by_category": {k: Money(v).usd_str() for k, v in sorted(row.by_category.items())},
        },
        "rates": row.rates,
        # set when usage reached the record after it was final (its node was declared lost)
        "amended_at": _ts(row.amended_at),
    }


def query_usage(
    engine,
    account_id: str | None,
    *,
    start_time: int | None = None,
    end_time: int | None = None,
    model: str | None = None,
    limit: int = 20,
    after: str | None = None,
) -> dict:
    """One page of ended sessions, newest first. Raises LookupError for an unknown cursor."""
    with Session(engine) as db:
        query = select(SessionRecord).where(SessionRecord.state == SessionState.ENDED)
        if account_id is not None:
            query = query.where(SessionRecord.account_id == account_id)
        if start_time is not None:
            query = query.where(SessionRecord.ended_at >= datetime.fromtimestamp(start_time, timezone.utc))
        if end_time is not None:
            query = query.where(SessionRecord.ended_at < datetime.fromtimestamp(end_time, timezone.utc))
        if model:
            query = query.where(SessionRecord.model == model)
        if after:
            cursor = db.get(SessionRecord, after)
            if (
                cursor is None
                or (account_id is not None and cursor.account_id != account_id)
                or cursor.ended_at is None
            ):
                raise LookupError(f"unknown cursor {after!r}")
            query = query.where(
                or_(
                    SessionRecord.ended_at < cursor.ended_at,
                    and_(SessionRecord.ended_at == cursor.ended_at, SessionRecord.id < cursor.id),
                )
            )
        query = query.order_by(SessionRecord.ended_at.desc(), SessionRecord.id.desc()).limit(limit + 1)
        rows = list(db.exec(query).all())
    page = rows[:limit]
    return {
        "object": "list",
        "data": [record_json(r) for r in page],
        "has_more": len(rows) > limit,
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
    }


def list_usage_cli(engine, args) -> int:
    page = query_usage(engine, args.account, limit=min(args.limit, MAX_LIMIT))
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    for r in page["data"]:
        print(
            f"{r['id']}\t{r['model']}\t{r['duration_s']:.1f}s\t{r['usage'].get('total_tokens', 0)} tok\t"
            f"{Money.from_usd(r['cost']['amount']).display()}\t{r['end_reason']}"
        )
    if not page["data"]:
        print("(no usage records)")
    return 0
