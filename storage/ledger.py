"""The ledger: every database write the supervisor makes about sessions and money, and the one
task that makes them.

Invariants: an increment is applied at most once — its (session_id, seq) row, the balance
debit and the ledger entry are one unit; the final session record is written in the same
transaction as every spooled increment the database lacks, from all the increments applied for
it, so a record written after a crash or an outage (from the spool) equals one written live.
Every write here is safe to repeat, so a write that failed (or whose outcome is unknown) is
simply retried — an increment retried after its session's finalisation is a no-op.

The write functions take an open `Session` and run inside the writer's transaction.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime

import anyio
from sqlalchemy import bindparam
from sqlalchemy import func
from sqlalchemy import or_
from sqlalchemy import update
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite
from sqlmodel import Session
from sqlmodel import select

from meshrt.shared.increments import Increment
from meshrt.shared.logs import one_line

from .db import Account
from .db import ApiKey
from .db import AppliedIncrement
from .db import LedgerEntry
from .db import Node
from .db import NodeState
from .db import SessionRecord
from .db import SessionState
from .db import db_now
from .db import utcnow
from .summary import summarize

log = logging.getLogger("meshrt.supervisor")

MAX_BATCH = 256


_sessions = SessionRecord.__table__
# One per session set-up, so a Core statement built once rather than an ORM load and flush.
_MARK_LIVE = (
    update(_sessions)
    .where(_sessions.c.id == bindparam("session_id"), _sessions.c.state != SessionState.ENDED)
    .values(state=SessionState.LIVE, pid=bindparam("live_pid"))
)


def mark_live(db: Session, session_id: str, pid: int) -> None:
    db.connection().execute(_MARK_LIVE, {"session_id": session_id, "live_pid": pid})


_RECORD_CALL_ID = update(_sessions).where(_sessions.c.id == bindparam("session_id")).values(call_id=bindparam("cid"))


def record_call_id(db: Session, session_id: str, call_id: str) -> None:
    """A WebRTC call's id upstream, on its session's row: its tenant's sideband and hangup find
    the call by it, and a supervisor started after a crash hangs the call up by it."""
    db.connection().execute(_RECORD_CALL_ID, {"session_id": session_id, "cid": call_id})


_applied, _accounts, _entries = AppliedIncrement.__table__, Account.__table__, LedgerEntry.__table__
_keys = ApiKey.__table__
# One per billed response, so Core statements built once rather than ORM loads and flushes.
_DEBIT = (
    update(_accounts)
    .where(_accounts.c.id == bindparam("debit_account"))
    .values(balance_pico=_accounts.c.balance_pico - bindparam("cost"))
    .returning(_accounts.c.balance_pico)
)
# The (session_id, seq) primary key makes a replayed increment a no-op, never a second debit:
# INSERT … ON CONFLICT DO NOTHING RETURNING, in each dialect's spelling (SQLite's and PostgreSQL's).
_APPLY = {
    module.dialect.name: module.insert(_applied)
    .on_conflict_do_nothing(index_elements=["session_id", "seq"])
    .returning(_applied.c.seq)
    for module in (postgresql, sqlite)
}
_LEDGER_ENTRY = _entries.insert()


def apply_increment(
    db: Session, session_id: str, account_id: str, increment: Increment, settle: ReserveChange | None = None
) -> int | None:
    """Debit the account for one increment, once. Returns the new balance (picodollars), or
    None when this (session_id, seq) was applied before. `settle`, the session's reservation
    after this usage (lower: the response it covered is done), changes in the same transaction
    as the debit, so the cost is never counted neither as spent nor as reserved."""
    connection = db.connection()
    seq, cost = increment.seq, increment.cost.picodollars
    now = utcnow()
    first = connection.execute(
        _APPLY[connection.dialect.name],
        {
            "session_id": session_id,
            "seq": seq,
            "account_id": account_id,
            "cost_pico": cost,
            "body": increment.to_json(),
            "applied_at": now,
        },
    ).first()
    if first is None:  # a replay (not rowcount: psycopg did not report 0 for it)
        return None
    balance = connection.execute(_DEBIT, {"debit_account": account_id, "cost": cost}).scalar_one()
    if settle is not None:
        reserve(db, session_id, account_id, settle)
    connection.execute(
        _LEDGER_ENTRY,
        {
            "account_id": account_id,
            "amount_pico": -cost,
            "kind": "usage",
            "ref": f"{session_id}:{seq}",
            "note": "",
            "created_at": now,
        },
    )
    return balance


_FINALIZE = (
    update(_sessions)
    .where(_sessions.c.id == bindparam("final_id"), _sessions.c.state != SessionState.ENDED)
    .values(
        state=SessionState.ENDED,
        ended_at=bindparam("final_ended_at"),
        end_reason=bindparam("final_reason"),
        close_code=bindparam("final_code"),
        responses=bindparam("final_responses"),
        usage=bindparam("final_usage"),
        cost_pico=bindparam("final_cost"),
        by_category=bindparam("final_by_category"),
        audio_seconds=bindparam("final_audio_seconds"),
    )
)
# A record already final (another node ended it when this one lost its lease) that gets usage
# from this node's spool later: the totals are recomputed and the amendment dated.
_AMEND = (
    update(_sessions)
    .where(_sessions.c.id == bindparam("final_id"))
    .values(
        responses=bindparam("final_responses"),
        usage=bindparam("final_usage"),
        cost_pico=bindparam("final_cost"),
        by_category=bindparam("final_by_category"),
        audio_seconds=bindparam("final_audio_seconds"),
        amended_at=bindparam("final_ended_at"),
    )
)


@dataclass(frozen=True)
class ReserveChange:
    """A worker's wish for its session's reservation (absolute picodollars): at most `want`, and
    granted only if at least `least` can be held. `version` orders a session's changes."""

    version: int
    want: int
    least: int


@dataclass(frozen=True)
class Reservation:
    held: int  # what the session holds now
    granted: bool  # held >= the change's `least`
    available: int  # the account's balance minus everything reserved, after this change


_SESSION_RESERVE = select(_sessions.c.reserved_pico, _sessions.c.reserve_version, _sessions.c.state).where(
    _sessions.c.id == bindparam("reserve_id")
)
# One or two per response: Core statements built once, like the debit's.
_ACCOUNT_ROOM = (
    select(_accounts.c.balance_pico, _accounts.c.reserved_pico)
    .where(_accounts.c.id == bindparam("reserve_account"))
    .with_for_update()
)
_SET_RESERVED = (
    update(_sessions)
    .where(_sessions.c.id == bindparam("reserve_id"))
    .values(reserved_pico=bindparam("new_reserved"), reserve_version=bindparam("new_version"))
)
_ADD_RESERVED = (
    update(_accounts)
    .where(_accounts.c.id == bindparam("reserve_account"))
    .values(reserved_pico=_accounts.c.reserved_pico + bindparam("reserve_delta"))
)


def reserve(db: Session, session_id: str, account_id: str, change: ReserveChange) -> Reservation:
    """Set a session's reservation toward `change.want`, atomically against every session of the
    account on every node: the account's row is locked (PostgreSQL) or the database is (SQLite,
    one writer), its room read, and both rows written in this transaction. Lowering always
    succeeds; raising takes what the room allows, and nothing unless that reaches `least`. A
    change older than the last applied one, or for an ended session, changes nothing."""
    connection = db.connection()
    room = connection.execute(_ACCOUNT_ROOM, {"reserve_account": account_id}).first()
    row = connection.execute(_SESSION_RESERVE, {"reserve_id": session_id}).first()
    if room is None or row is None:
        return Reservation(0, False, 0)
    available = room.balance_pico - room.reserved_pico
    held = row.reserved_pico
    if row.state == SessionState.ENDED or change.version <= row.reserve_version:
        return Reservation(held, held >= change.least, available)
    if change.want <= held:
        new = change.want
    elif held + available >= change.least:
        new = held + max(0, min(change.want - held, available))
    else:
        new = held
    connection.execute(_SET_RESERVED, {"reserve_id": session_id, "new_reserved": new, "new_version": change.version})
    if new != held:
        connection.execute(_ADD_RESERVED, {"reserve_account": account_id, "reserve_delta": new - held})
    return Reservation(new, new >= change.least, available - (new - held))


def _release(connection, session_id: str, account_id: str) -> None:
    """An ending session's reservation goes back to its account (in the finalising transaction)."""
    # the account's row first, as `reserve` and admission lock it: one lock order, no deadlock
    connection.execute(_ACCOUNT_ROOM, {"reserve_account": account_id})
    held = connection.execute(select(_sessions.c.reserved_pico).where(_sessions.c.id == session_id)).scalar_one()
    if held:
        connection.execute(update(_sessions).where(_sessions.c.id == session_id).values(reserved_pico=0))
        connection.execute(_ADD_RESERVED, {"reserve_account": account_id, "reserve_delta": -held})


class Finalized(str, enum.Enum):
    WRITTEN = "written"  # the record is final now
    AMENDED = "amended"  # it was final already; late usage was added to it
    ALREADY = "already"  # it was final already, with everything the spool holds
    MISSING = "missing"  # no such session row


def finalize(
    db: Session,
    session_id: str,
    end_reason: str,
    close_code: int | None,
    increments: dict[int, Increment] | None = None,
    ended_at: datetime | None = None,
    applied_here: list[int] | None = None,
) -> Finalized:
    """Apply what the session's spool holds (each increment once, whenever it arrives), then
    write the final record from every increment applied for it — one transaction, so a record
    is never final without all of its spool. Safe to repeat. `applied_here` gets the seqs this
    call applied (those no earlier write had), for the caller's counters."""
    connection = db.connection()
    if applied_here is not None:
        applied_here.clear()  # a retried transaction starts again
    exists = connection.execute(
        select(_sessions.c.state, _sessions.c.account_id, _sessions.c.surface).where(_sessions.c.id == session_id)
    ).first()
    if exists is None:
        return Finalized.MISSING
    added = [
        seq
        for seq, increment in sorted((increments or {}).items())
        if apply_increment(db, session_id, exists.account_id, increment) is not None
    ]
    if applied_here is not None:
        applied_here.extend(added)
    if exists.state == SessionState.ENDED and not added:
        return Finalized.ALREADY
    bodies = connection.execute(select(_applied.c.body).where(_applied.c.session_id == session_id)).scalars()
    applied = [Increment.from_json(body) for body in bodies]
    summary = summarize(applied)
    if exists.surface == "transcription" and applied:
        # a transcription session's record names the model it was billed at (the last one, if
        # it changed models), not the one it was granted with before it configured one
        billed = max(applied, key=lambda increment: increment.seq).model
        connection.execute(update(_sessions).where(_sessions.c.id == session_id).values(model=billed))
    values = {
        "final_id": session_id,
        "final_ended_at": ended_at or utcnow(),
        "final_reason": end_reason,
        "final_code": close_code,
        "final_responses": summary["responses"],
        "final_usage": summary["usage"],
        "final_cost": summary["cost_pico"],
        "final_by_category": summary["by_category"],
        "final_audio_seconds": summary["audio_seconds"],
    }
    if exists.state != SessionState.ENDED:
        _release(connection, session_id, exists.account_id)
        connection.execute(_FINALIZE, values)
        return Finalized.WRITTEN
    connection.execute(_AMEND, values)
    return Finalized.AMENDED


def committed_seqs(db: Session, session_id: str) -> set[int]:
    """The increments of a session the database has: what a replay need not count again."""
    return set(db.connection().execute(select(_applied.c.seq).where(_applied.c.session_id == session_id)).scalars())


@dataclass(frozen=True)
class Standing:
    """What a node's live sessions stand on, read afresh: each account's balance, reservations
    (top-ups and reservations from any node included) and whether it is still active, and
    which of the sessions' keys have been revoked since."""

    accounts: dict[str, tuple[int, int, bool]]  # id -> (balance, reserved, active)
    revoked_keys: frozenset[str] = frozenset()


def standing(db: Session, account_ids: list[str], key_ids: list[str] = ()) -> Standing:
    connection = db.connection()
    rows = connection.execute(
        select(_accounts.c.id, _accounts.c.balance_pico, _accounts.c.reserved_pico, _accounts.c.active).where(
            _accounts.c.id.in_(account_ids)
        )
    )
    found = {row.id: (row.balance_pico, row.reserved_pico, bool(row.active)) for row in rows}
    revoked = frozenset()
    if key_ids:
        # an ephemeral key whose parent was revoked counts as revoked: its sessions end too
        parent = _keys.alias("parent_key")
        revoked = frozenset(
            connection.execute(
                select(_keys.c.id)
                .select_from(_keys.outerjoin(parent, parent.c.id == _keys.c.parent_key_id))
                .where(
                    _keys.c.id.in_(list(key_ids)),
                    or_(_keys.c.revoked_at.is_not(None), parent.c.revoked_at.is_not(None)),
                )
            ).scalars()
        )
    return Standing(found, revoked)


def unfinished_sessions(engine, node: str) -> list[SessionRecord]:
    with Session(engine, expire_on_commit=False) as db:
        return list(
            db.exec(
                select(SessionRecord).where(SessionRecord.node == node, SessionRecord.state != SessionState.ENDED)
            ).all()
        )


def session_rows(engine, session_ids: list[str]) -> dict[str, SessionRecord]:
    with Session(engine, expire_on_commit=False) as db:
        rows = db.exec(select(SessionRecord).where(SessionRecord.id.in_(session_ids))).all()
        return {row.id: row for row in rows}


def granted_sessions(engine, node: str) -> list[SessionRecord]:
    """This node's sessions admitted by a front door and not (yet) owned by a worker."""
    with Session(engine, expire_on_commit=False) as db:
        return list(
            db.exec(
                select(SessionRecord).where(SessionRecord.node == node, SessionRecord.state == SessionState.GRANTED)
            ).all()
        )


def end_orphaned_grant(db: Session, session_id: str, end_reason: str) -> bool:
    """End a row that is still `granted`: a front door died between admitting the upgrade and
    handing the socket over, so no worker exists and nothing was relayed or billed."""
    row = db.get(SessionRecord, session_id)
    if row is None or row.state != SessionState.GRANTED:
        return False
    return finalize(db, session_id, end_reason, None) is Finalized.WRITTEN


# --- node leases ---------------------------------------------------------------------------
# A node acts only on its own rows while it holds its lease; a node whose lease expired is lost:
# a live node ends its sessions (`node_lost`), which frees their account slots and bills what
# was committed; the lost node, back later, replays its spools into those records.

_nodes = Node.__table__


@dataclass(frozen=True)
class Lease:
    incarnation: int
    expires: float  # the database's clock
    now: float
    was_lost: bool = False  # joining: the previous incarnation had been declared lost


def join_node(db: Session, node_id: str, hostname: str, ttl: float) -> Lease:
    """Take this node's lease for a new incarnation (a restart of the same node included)."""
    connection = db.connection()
    now = db_now(connection)
    row = connection.execute(select(_nodes).where(_nodes.c.id == node_id).with_for_update()).first()
    if row is None:
        connection.execute(
            _nodes.insert().values(
                id=node_id,
                hostname=hostname,
                state=NodeState.UP.value,
                incarnation=1,
                lease_expires=now + ttl,
                renewed_at=now,
                started_at=utcnow(),
            )
        )
        return Lease(1, now + ttl, now)
    incarnation = row.incarnation + 1
    connection.execute(
        update(_nodes)
        .where(_nodes.c.id == node_id)
        .values(
            hostname=hostname,
            state=NodeState.UP.value,
            incarnation=incarnation,
            lease_expires=now + ttl,
            renewed_at=now,
            started_at=utcnow(),
        )
    )
    return Lease(incarnation, now + ttl, now, was_lost=row.state == NodeState.LOST.value)


def renew_lease(db: Session, node_id: str, incarnation: int, ttl: float) -> Lease | None:
    """Extend the lease; None when it is no longer ours (declared lost, or a newer incarnation)."""
    connection = db.connection()
    now = db_now(connection)
    renewed = connection.execute(
        update(_nodes)
        .where(_nodes.c.id == node_id, _nodes.c.incarnation == incarnation, _nodes.c.state == NodeState.UP.value)
        .values(lease_expires=now + ttl, renewed_at=now)
        .returning(_nodes.c.lease_expires)
    ).first()
    return None if renewed is None else Lease(incarnation, renewed.lease_expires, now)


def leave_node(db: Session, node_id: str, incarnation: int) -> None:
    db.connection().execute(
        update(_nodes)
        .where(_nodes.c.id == node_id, _nodes.c.incarnation == incarnation)
        .values(state=NodeState.LEFT.value)
    )


@dataclass(frozen=True)
class Reaped:
    node_id: str
    sessions: list[str]


def reap_lost_nodes(db: Session, reaper_id: str, held_since: float, ttl: float) -> list[Reaped]:
    """End the sessions of every node whose lease expired. A node is judged only by a reaper that
    has held its own lease for a full `ttl` (`held_since`, the database's clock): after an outage
    every lease looks expired, and each node gets that long to renew before anyone is reaped."""
    connection = db.connection()
    now = db_now(connection)
    if now < held_since + ttl:
        return []
    expired = (
        connection.execute(
            update(_nodes)
            .where(_nodes.c.state == NodeState.UP.value, _nodes.c.id != reaper_id, _nodes.c.lease_expires < now)
            .values(state=NodeState.LOST.value)
            .returning(_nodes.c.id)
        )
        .scalars()
        .all()
    )
    reaped = []
    for node_id in expired:
        sessions = (
            connection.execute(
                select(_sessions.c.id).where(_sessions.c.node == node_id, _sessions.c.state != SessionState.ENDED)
            )
            .scalars()
            .all()
        )
        for session_id in sessions:
            finalize(db, session_id, "node_lost", None)
        reaped.append(Reaped(node_id, list(sessions)))
    return reaped


def next_lease_expiry(db: Session, reaper_id: str) -> float | None:
    """Seconds (the database's clock) until the first lease of another live node runs out, or
    None: when to judge next, so that a node that stopped renewing is declared lost as soon as
    its lease ends rather than up to a renewal period later."""
    connection = db.connection()
    first = connection.execute(
        select(func.min(_nodes.c.lease_expires)).where(_nodes.c.state == NodeState.UP.value, _nodes.c.id != reaper_id)
    ).scalar()
    return None if first is None else max(0.0, first - db_now(connection))


@dataclass
class Job:
    call: object
    args: tuple
    number: int  # FIFO position: a balance read by job n includes every commit of jobs < n
    done: anyio.Event = field(default_factory=anyio.Event)
    result: object = None
    error: BaseException | None = None

    async def wait(self):
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class BatchAbandoned(TimeoutError):
    """A batch outlived its deadline (a database that stopped answering); its outcome is
    unknown, so its jobs fail and their callers retry — every write here is safe to repeat."""


class WriterStopped(RuntimeError):
    pass


class LedgerWriter:
    """One task owns the supervisor's writes: FIFO, batched into one transaction per wake-up
    (SQLite has one writer; one commit for many writes), a savepoint per job so one failing
    write fails alone. Callers enqueue without waiting, so a slow database never delays what
    the supervisor sees of its workers. A job that fails is the caller's to retry: the writer
    never retries by itself, so one bad write cannot hold up the queue behind it."""

    def __init__(self, engine, batch_deadline_s: float = 30.0):
        self.engine = engine
        self.batch_deadline_s = batch_deadline_s
        self._send, self._receive = anyio.create_memory_object_stream(math.inf)
        self.queued = 0
        self.enqueued = 0
        self._idle = anyio.Event()
        self._idle.set()
        self.last_failure: float | None = None  # monotonic time of the last failed batch or job
        self.last_success: float | None = None
        self.stopped = False

    def enqueue(self, call, *args) -> Job:
        self.enqueued += 1
        job = Job(call, args, self.enqueued)
        if self.stopped:
            job.error = WriterStopped("the ledger writer has stopped")
            job.done.set()
            return job
        self.queued += 1
        if self._idle.is_set():
            self._idle = anyio.Event()
        self._send.send_nowait(job)
        return job

    async def submit(self, call, *args):
        return await self.enqueue(call, *args).wait()

    async def run(self) -> None:
        try:
            await self._serve()
        finally:  # cancelled (the supervisor stops): nothing queued may wait for ever
            self.stopped = True
            while True:
                try:
                    job = self._receive.receive_nowait()
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
                job.error = WriterStopped("the ledger writer has stopped")
                job.done.set()

    async def _serve(self) -> None:
        async for first in self._receive:
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._receive.receive_nowait())
                except anyio.WouldBlock:
                    break
            with anyio.CancelScope(shield=True):  # a started batch always completes (or is abandoned)
                with anyio.move_on_after(self.batch_deadline_s) as deadline:
                    await anyio.to_thread.run_sync(self._run_batch, batch, abandon_on_cancel=True)
            if deadline.cancelled_caught:
                log.error(
                    "ledger batch abandoned: the database did not answer",
                    extra={"fields": {"jobs": len(batch), "deadline_s": self.batch_deadline_s}},
                )
                for job in batch:
                    job.error = BatchAbandoned(f"no answer from the database in {self.batch_deadline_s} s")
            failed = any(job.error is not None for job in batch)
            if failed:
                self.last_failure = time.monotonic()
            else:
                self.last_success = time.monotonic()
            for job in batch:
                self.queued -= 1
                job.done.set()
            if not self.queued:
                self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()

    def _run_batch(self, batch: list[Job]) -> None:
        try:
            with Session(self.engine, expire_on_commit=False) as db, db.begin():
                for job in batch:
                    try:
                        with db.begin_nested():
                            job.result = job.call(db, *job.args)
                    except Exception as exc:  # noqa: BLE001 - reported to the job's waiter
                        job.error = exc
                        log.warning(
                            "ledger write failed", extra={"fields": {"call": job.call.__name__, "error": one_line(exc)}}
                        )
        except Exception as exc:  # noqa: BLE001 - the commit itself failed: every job failed
            log.warning("ledger batch failed", extra={"fields": {"jobs": len(batch), "error": one_line(exc)}})
            for job in batch:
                job.error = job.error or exc
                job.result = None
