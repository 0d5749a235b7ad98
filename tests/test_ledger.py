"""The ledger's writes on the real database (SQLite, or PostgreSQL when its URL is given): an
increment debits once however often it is applied, in one transaction or across several, and a
record is finalised once, from exactly the increments applied for it."""

from __future__ import annotations

import secrets

from sqlmodel import Session, select

from meshrt.shared.money import Money
from meshrt.supervisor import ledger
from meshrt.supervisor.db import Account, LedgerEntry, SessionRecord


def increment(seq: int, cost: int, tokens: int) -> dict:
    return {"seq": seq, "kind": "response", "model": "gpt-realtime",
            "usage": {"total_tokens": tokens, "input_tokens": tokens, "output_tokens": 0},
            "cost_picodollars": cost, "by_category_picodollars": {"text_in": cost}, "total_tokens": tokens,
            "response_id": f"resp_{seq}", "item_id": None, "unpriced": False}


def write(engine, call, *args):
    """As the LedgerWriter runs a job: a savepoint inside the batch's transaction."""
    with Session(engine) as db:
        with db.begin_nested():
            result = call(db, *args)
        db.commit()
    return result


def test_an_increment_debits_once_and_the_record_is_final_once(engine, tenant):
    session_id = f"sess_{secrets.token_hex(6)}"
    with Session(engine) as db:
        db.add(SessionRecord(id=session_id, request_id="req_l", account_id=tenant.account_id, api_key_id=tenant.key_id,
                             model="gpt-realtime", node="n", state="live"))
        db.commit()
        start = db.get(Account, tenant.account_id).balance_pico

    first = write(engine, ledger.apply_increment, session_id, tenant.account_id, 1, increment(1, 700, 7))
    assert first == start - 700
    with Session(engine) as db:  # a replay inside one transaction, twice
        for _ in range(2):
            with db.begin_nested():
                assert ledger.apply_increment(db, session_id, tenant.account_id, 1, increment(1, 700, 7)) is None
        db.commit()
    assert write(engine, ledger.apply_increment, session_id, tenant.account_id, 2, increment(2, 300, 3)) == start - 1000
    assert write(engine, ledger.apply_increment, session_id, tenant.account_id, 2, increment(2, 300, 3)) is None

    assert write(engine, ledger.finalize, session_id, "client_closed", 1000) is True
    assert write(engine, ledger.finalize, session_id, "internal_error", 1011) is False
    assert write(engine, ledger.finalize, "sess_missing", "client_closed", 1000) is False
    with Session(engine) as db:
        row = db.get(SessionRecord, session_id)
        assert (row.state, row.end_reason, row.close_code, row.responses) == ("ended", "client_closed", 1000, 2)
        assert row.cost_pico == 1000 and row.usage["total_tokens"] == 10 and row.by_category == {"text_in": 1000}
        assert Money(start - db.get(Account, tenant.account_id).balance_pico) == Money(1000)
        entries = db.exec(select(LedgerEntry).where(LedgerEntry.ref.startswith(session_id))).all()
        assert sorted((e.ref, e.amount_pico) for e in entries) == [(f"{session_id}:1", -700), (f"{session_id}:2", -300)]
