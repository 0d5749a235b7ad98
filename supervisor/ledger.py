"""The ledger: every database write the supervisor makes about sessions and money, and the one
task that makes them.

Invariants: an increment is applied at most once — its (session_id, seq) row, the balance
debit and the ledger entry are one unit; the final session record is computed from the
increments applied for it, so a record written after a crash (from the spool) equals one
written live. Writes run in the order they were enqueued, so a session's increments always
land before its finalisation.

The write functions take an open `Session` and run inside the writer's transaction.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime

import anyio
from sqlalchemy import bindparam, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, select

from .db import Account, AppliedIncrement, LedgerEntry, SessionRecord, SessionState, utcnow
from .usage import summarize

log = logging.getLogger("meshrt.supervisor")

MAX_BATCH = 256


_sessions = SessionRecord.__table__
# One per session set-up, so a Core statement built once rather than an ORM load and flush.
_MARK_LIVE = (update(_sessions)
              .where(_sessions.c.id == bindparam("session_id"), _sessions.c.state != SessionState.ENDED.value)
              .values(state=SessionState.LIVE.value, pid=bindparam("live_pid")))


def mark_live(db: Session, session_id: str, pid: int) -> None:
    db.connection().execute(_MARK_LIVE, {"session_id": session_id, "live_pid": pid})


_applied, _accounts, _entries = AppliedIncrement.__table__, Account.__table__, LedgerEntry.__table__
# One per billed response, so Core statements built once rather than ORM loads and flushes.
_DEBIT = (update(_accounts).where(_accounts.c.id == bindparam("debit_account"))
          .values(balance_pico=_accounts.c.balance_pico - bindparam("cost")).returning(_accounts.c.balance_pico))
# The (session_id, seq) primary key makes a replayed increment a no-op, never a second debit:
# INSERT … ON CONFLICT DO NOTHING RETURNING, in each dialect's spelling (SQLite's and PostgreSQL's).
_APPLY = {module.dialect.name: module.insert(_applied).on_conflict_do_nothing(index_elements=["session_id", "seq"])
          .returning(_applied.c.seq) for module in (postgresql, sqlite)}
_LEDGER_ENTRY = _entries.insert()


def apply_increment(db: Session, session_id: str, account_id: str, seq: int, increment: dict) -> int | None:
    """Debit the account for one increment, once. Returns the new balance (picodollars), or
    None when this (session_id, seq) was applied before."""
    connection = db.connection()
    cost = int(increment["cost_picodollars"])
    now = utcnow()
    first = connection.execute(_APPLY[connection.dialect.name], {
        "session_id": session_id, "seq": seq, "account_id": account_id, "cost_pico": cost, "body": increment,
        "applied_at": now}).first()
    if first is None:  # a replay (not rowcount: psycopg did not report 0 for it)
        return None
    balance = connection.execute(_DEBIT, {"debit_account": account_id, "cost": cost}).scalar_one()
    connection.execute(_LEDGER_ENTRY, {"account_id": account_id, "amount_pico": -cost, "kind": "usage",
                                       "ref": f"{session_id}:{seq}", "note": "", "created_at": now})
    return balance


_FINALIZE = (update(_sessions)
             .where(_sessions.c.id == bindparam("final_id"), _sessions.c.state != SessionState.ENDED.value)
             .values(state=SessionState.ENDED.value, ended_at=bindparam("final_ended_at"),
                     end_reason=bindparam("final_reason"), close_code=bindparam("final_code"),
                     responses=bindparam("final_responses"), usage=bindparam("final_usage"),
                     cost_pico=bindparam("final_cost"), by_category=bindparam("final_by_category")))


def finalize(db: Session, session_id: str, end_reason: str, close_code: int | None,
             ended_at: datetime | None = None) -> bool:
    """Write the session's final record once, from the increments applied for it. Returns
    False if it was already final (or does not exist)."""
    connection = db.connection()
    bodies = connection.execute(select(_applied.c.body).where(_applied.c.session_id == session_id)).scalars()
    summary = summarize(list(bodies))
    written = connection.execute(_FINALIZE, {
        "final_id": session_id, "final_ended_at": ended_at or utcnow(), "final_reason": end_reason,
        "final_code": close_code, "final_responses": summary["responses"], "final_usage": summary["usage"],
        "final_cost": summary["cost_pico"], "final_by_category": summary["by_category"]})
    return written.rowcount == 1


def unfinished_sessions(engine, node: str) -> list[SessionRecord]:
    with Session(engine, expire_on_commit=False) as db:
        return list(db.exec(select(SessionRecord).where(
            SessionRecord.node == node, SessionRecord.state != SessionState.ENDED.value)).all())


def granted_sessions(engine, node: str) -> list[SessionRecord]:
    """This node's sessions admitted by a front door and not (yet) owned by a worker."""
    with Session(engine, expire_on_commit=False) as db:
        return list(db.exec(select(SessionRecord).where(
            SessionRecord.node == node, SessionRecord.state == SessionState.GRANTED.value)).all())


def end_orphaned_grant(db: Session, session_id: str, end_reason: str) -> bool:
    """End a row that is still `granted`: a front door died between admitting the upgrade and
    handing the socket over, so no worker exists and nothing was relayed or billed."""
    row = db.get(SessionRecord, session_id)
    if row is None or row.state != SessionState.GRANTED.value:
        return False
    return finalize(db, session_id, end_reason, None)


@dataclass
class Job:
    call: object
    args: tuple
    done: anyio.Event = field(default_factory=anyio.Event)
    result: object = None
    error: BaseException | None = None

    async def wait(self):
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class LedgerWriter:
    """One task owns the supervisor's writes: FIFO, batched into one transaction per wake-up
    (SQLite has one writer; one commit for many writes), a savepoint per job so one failing
    write fails alone. Callers enqueue without waiting, so a slow database never delays what
    the supervisor sees of its workers."""

    def __init__(self, engine):
        self.engine = engine
        self._send, self._receive = anyio.create_memory_object_stream(math.inf)
        self.queued = 0

    def enqueue(self, call, *args) -> Job:
        job = Job(call, args)
        self.queued += 1
        self._send.send_nowait(job)
        return job

    async def submit(self, call, *args):
        return await self.enqueue(call, *args).wait()

    async def run(self) -> None:
        async for first in self._receive:
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._receive.receive_nowait())
                except anyio.WouldBlock:
                    break
            with anyio.CancelScope(shield=True):  # a started batch always completes
                await anyio.to_thread.run_sync(self._run_batch, batch)
            for job in batch:
                self.queued -= 1
                job.done.set()

    async def idle(self) -> None:
        while self.queued:
            await anyio.sleep(0.01)

    def _run_batch(self, batch: list[Job]) -> None:
        try:
            with Session(self.engine, expire_on_commit=False) as db, db.begin():
                for job in batch:
                    try:
                        with db.begin_nested():
                            job.result = job.call(db, *job.args)
                    except Exception as exc:  # noqa: BLE001 - reported to the job's waiter
                        job.error = exc
                        log.exception("ledger write failed", extra={"fields": {"call": job.call.__name__}})
        except Exception as exc:  # noqa: BLE001 - the commit itself failed: every job failed
            log.exception("ledger batch failed")
            for job in batch:
                job.error = job.error or exc
