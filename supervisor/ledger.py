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
from sqlalchemy import update
from sqlmodel import Session, select

from .db import Account, AppliedIncrement, LedgerEntry, SessionRecord, SessionState, utcnow
from .usage import summarize

log = logging.getLogger("meshrt.supervisor")

MAX_BATCH = 256


def mark_live(db: Session, session_id: str, pid: int) -> None:
    row = db.get(SessionRecord, session_id)
    if row is not None and row.state != SessionState.ENDED.value:
        row.state, row.pid = SessionState.LIVE.value, pid


def apply_increment(db: Session, session_id: str, account_id: str, seq: int, increment: dict) -> int | None:
    """Debit the account for one increment, once. Returns the new balance (picodollars), or
    None when this (session_id, seq) was applied before."""
    if db.get(AppliedIncrement, (session_id, seq)) is not None:
        return None
    cost = int(increment["cost_picodollars"])
    db.add(AppliedIncrement(session_id=session_id, seq=seq, account_id=account_id, cost_pico=cost,
                            body=increment))
    db.flush()  # the (session_id, seq) primary key rejects a concurrent duplicate here
    balance = db.exec(update(Account).where(Account.id == account_id)
                      .values(balance_pico=Account.balance_pico - cost).returning(Account.balance_pico)).scalar_one()
    db.add(LedgerEntry(account_id=account_id, amount_pico=-cost, kind="usage", ref=f"{session_id}:{seq}"))
    return balance


def finalize(db: Session, session_id: str, end_reason: str, close_code: int | None,
             ended_at: datetime | None = None) -> bool:
    """Write the session's final record once, from the increments applied for it. Returns
    False if it was already final."""
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
