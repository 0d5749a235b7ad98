"""The ledger writer: every database write the supervisor makes about sessions and money.

Invariants: an increment is applied at most once — its (session_id, seq) row and the balance
debit are one transaction; the final session record is computed from the increments applied
for it, so a record written after a crash (from the spool) equals one written live.
All functions are blocking; the supervisor runs them in worker threads.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from .usage import summarize
from .db import (
    Account, AppliedIncrement, LedgerEntry, SessionRecord, SessionState, utcnow,
)


def mark_live(engine, session_id: str, pid: int) -> None:
    with Session(engine, expire_on_commit=False) as db, db.begin():
        row = db.get(SessionRecord, session_id)
        if row is not None and row.state != SessionState.ENDED.value:
            row.state, row.pid = SessionState.LIVE.value, pid


def apply_increment(engine, session_id: str, account_id: str, seq: int, increment: dict) -> int | None:
    """Debit the account for one increment, once. Returns the new balance (picodollars), or
    None when this (session_id, seq) was applied before."""
    cost = int(increment["cost_picodollars"])
    try:
        with Session(engine, expire_on_commit=False) as db, db.begin():
            db.add(AppliedIncrement(session_id=session_id, seq=seq, account_id=account_id,
                                    cost_pico=cost, body=increment))
            db.flush()
            balance = db.exec(
                update(Account).where(Account.id == account_id)
                .values(balance_pico=Account.balance_pico - cost).returning(Account.balance_pico)
            ).scalar_one()
            db.add(LedgerEntry(account_id=account_id, amount_pico=-cost, kind="usage",
                               ref=f"{session_id}:{seq}"))
            return balance
    except IntegrityError:
        return None


def finalize(engine, session_id: str, end_reason: str, close_code: int | None,
             ended_at: datetime | None = None) -> bool:
    """Write the session's final record once, from the increments applied for it, in one
    transaction. Returns False if it was already final."""
    with Session(engine, expire_on_commit=False) as db, db.begin():
        row = db.get(SessionRecord, session_id)
        if row is None or row.state == SessionState.ENDED.value:
            return False
        applied = db.exec(select(AppliedIncrement.body).where(AppliedIncrement.session_id == session_id)).all()
        summary = summarize(list(applied))
        row.state = SessionState.ENDED.value
        row.ended_at = ended_at or utcnow()
        row.end_reason, row.close_code = end_reason, close_code
        row.responses = summary["responses"]
        row.usage = summary["usage"]
        row.cost_pico = summary["cost_pico"]
        row.by_category = summary["by_category"]
        return True


def unfinished_sessions(engine, node: str) -> list[SessionRecord]:
    with Session(engine, expire_on_commit=False) as db:
        return list(db.exec(select(SessionRecord).where(
            SessionRecord.node == node, SessionRecord.state != SessionState.ENDED.value)).all())


def as_utc(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
