"""The ledger's writes on the real database (SQLite, or PostgreSQL when its URL is given): an
increment debits once however often it is applied, in one transaction or across several, and a
record is finalised once, from exactly the increments applied for it."""

from __future__ import annotations

import secrets

from sqlmodel import Session
from sqlmodel import select

from meshrt.shared.increments import Increment
from meshrt.shared.money import Money
from meshrt.storage import ledger
from meshrt.storage.db import Account
from meshrt.storage.db import LedgerEntry
from meshrt.storage.db import SessionRecord


def increment(seq: int, cost: int, tokens: int) -> Increment:
    return Increment.from_json(
        {
            "seq": seq,
            "kind": "response",
            "model": "gpt-realtime",
            "usage": {"total_tokens": tokens, "input_tokens": tokens, "output_tokens": 0},
            "cost_picodollars": cost,
            "by_category_picodollars": {"text_in": cost},
            "total_tokens": tokens,
            "response_id": f"resp_{seq}",
            "item_id": None,
            "unpriced": False,
        }
    )


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
        db.add(
            SessionRecord(
                id=session_id,
                request_id="req_l",
                account_id=tenant.account_id,
                api_key_id=tenant.key_id,
                model="gpt-realtime",
                node="n",
                state="live",
            )
        )
        db.commit()
        start = db.get(Account, tenant.account_id).balance_pico

    first = write(engine, ledger.apply_increment, session_id, tenant.account_id, increment(1, 700, 7))
    assert first == start - 700
    with Session(engine) as db:  # a replay inside one transaction, twice
        for _ in range(2):
            with db.begin_nested():
                assert ledger.apply_increment(db, session_id, tenant.account_id, increment(1, 700, 7)) is None
        db.commit()
    assert write(engine, ledger.apply_increment, session_id, tenant.account_id, increment(2, 300, 3)) == start - 1000
    assert write(engine, ledger.apply_increment, session_id, tenant.account_id, increment(2, 300, 3)) is None

    assert write(engine, ledger.finalize, session_id, "client_closed", 1000) is ledger.Finalized.WRITTEN
    assert write(engine, ledger.finalize, session_id, "internal_error", 1011) is ledger.Finalized.ALREADY
    assert write(engine, ledger.finalize, "sess_missing", "client_closed", 1000) is ledger.Finalized.MISSING
    with Session(engine) as db:
        row = db.get(SessionRecord, session_id)
        assert (row.state, row.end_reason, row.close_code, row.responses) == ("ended", "client_closed", 1000, 2)
        assert row.cost_pico == 1000 and row.usage["total_tokens"] == 10 and row.by_category == {"text_in": 1000}
        assert Money(start - db.get(Account, tenant.account_id).balance_pico) == Money(1000)
        entries = db.exec(select(LedgerEntry).where(LedgerEntry.ref.startswith(session_id))).all()
        assert sorted((e.ref, e.amount_pico) for e in entries) == [(f"{session_id}:1", -700), (f"{session_id}:2", -300)]


def new_session(engine, tenant, node: str = "n", state: str = "live") -> str:
    session_id = f"sess_{secrets.token_hex(6)}"
    with Session(engine) as db:
        db.add(
            SessionRecord(
                id=session_id,
                request_id=f"req_{session_id}",
                account_id=tenant.account_id,
                api_key_id=tenant.key_id,
                model="gpt-realtime",
                node=node,
                state=state,
            )
        )
        db.commit()
    return session_id


def balance_of(engine, account_id: str) -> int:
    with Session(engine) as db:
        return db.get(Account, account_id).balance_pico


def test_finalize_applies_the_spool_once_whatever_the_database_already_had(engine, tenant):
    session_id = new_session(engine, tenant)
    start = balance_of(engine, tenant.account_id)
    write(engine, ledger.apply_increment, session_id, tenant.account_id, increment(1, 700, 7))  # live, committed
    spooled = {1: increment(1, 700, 7), 2: increment(2, 300, 3), 3: increment(3, 50, 1)}  # 2, 3 never committed
    applied_here = [99]  # what a retried transaction's first try left is cleared
    finalized = write(engine, ledger.finalize, session_id, "client_closed", 1000, spooled, None, applied_here)
    assert finalized is ledger.Finalized.WRITTEN and applied_here == [2, 3]  # 1 was already in: not counted again
    assert write(engine, ledger.finalize, session_id, "client_closed", 1000, spooled, None, applied_here) is (
        ledger.Finalized.ALREADY
    )
    assert applied_here == []
    with Session(engine) as db:
        row = db.get(SessionRecord, session_id)
        assert (row.responses, row.cost_pico, row.amended_at) == (3, 1050, None)
    assert start - balance_of(engine, tenant.account_id) == 1050


def test_a_record_ended_by_another_node_is_amended_late_with_the_spool(engine, tenant):
    session_id = new_session(engine, tenant)
    write(engine, ledger.apply_increment, session_id, tenant.account_id, increment(1, 700, 7))
    assert write(engine, ledger.finalize, session_id, "node_lost", None) is ledger.Finalized.WRITTEN
    start = balance_of(engine, tenant.account_id)
    spooled = {1: increment(1, 700, 7), 2: increment(2, 300, 3)}
    assert write(engine, ledger.finalize, session_id, "client_closed", 1000, spooled) is ledger.Finalized.AMENDED
    with Session(engine) as db:
        row = db.get(SessionRecord, session_id)
        assert (row.end_reason, row.responses, row.cost_pico) == ("node_lost", 2, 1000)
        assert row.amended_at is not None
    assert start - balance_of(engine, tenant.account_id) == 300


def test_a_lease_is_renewed_by_its_holder_only_and_an_expired_node_is_reaped(engine, tenant):
    a, b = f"node-a-{secrets.token_hex(3)}", f"node-b-{secrets.token_hex(3)}"
    lease_a = write(engine, ledger.join_node, a, "host", 0.2)
    lease_b = write(engine, ledger.join_node, b, "host", 30)
    live, granted = new_session(engine, tenant, node=a), new_session(engine, tenant, node=a, state="granted")
    write(engine, ledger.apply_increment, live, tenant.account_id, increment(1, 700, 7))
    mine = new_session(engine, tenant, node=b)
    # b has not held its lease a full ttl: it judges nobody yet (after an outage all leases look expired)
    assert write(engine, ledger.reap_lost_nodes, b, lease_b.now, 30) == []
    import time

    time.sleep(0.3)
    reaped = write(engine, ledger.reap_lost_nodes, b, lease_b.now - 60, 30)
    assert [(r.node_id, sorted(r.sessions)) for r in reaped] == [(a, sorted([live, granted]))]
    assert write(engine, ledger.reap_lost_nodes, b, lease_b.now - 60, 30) == []  # once
    with Session(engine) as db:
        rows = {s: db.get(SessionRecord, s) for s in (live, granted, mine)}
        assert [rows[s].end_reason for s in (live, granted)] == ["node_lost", "node_lost"]
        assert rows[live].cost_pico == 700 and rows[mine].state == "live"
    assert write(engine, ledger.renew_lease, a, lease_a.incarnation, 30) is None  # a's lease is gone
    again = write(engine, ledger.join_node, a, "host", 30)
    assert again.was_lost and again.incarnation == lease_a.incarnation + 1
    assert write(engine, ledger.renew_lease, a, lease_a.incarnation, 30) is None  # the old incarnation's
    assert write(engine, ledger.renew_lease, a, again.incarnation, 30).expires > again.now
