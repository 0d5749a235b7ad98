"""The database: tables, the engine, and the few transactions that must be atomic.

SQLite by default (every transaction starts with BEGIN IMMEDIATE, so check-then-insert is
serialised across processes), PostgreSQL for several nodes (row locks with FOR UPDATE).
Money is an integer count of picodollars (1e-12 USD) in BIGINT columns; keys are stored only as
SHA-256 hashes plus a short display prefix.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import math
import re
import secrets
import sqlite3
import string
import time
from dataclasses import dataclass
from datetime import datetime
from datetime import timezone

from sqlalchemy import BigInteger
from sqlalchemy import Column
from sqlalchemy import Enum as SAEnum
from sqlalchemy import Index
from sqlalchemy import String
from sqlalchemy import event
from sqlalchemy import inspect
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlmodel import JSON
from sqlmodel import Field
from sqlmodel import SQLModel
from sqlmodel import create_engine


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


_KEY_ALPHABET = string.ascii_letters + string.digits


def new_key(prefix: str = "rsk_") -> str:
    return prefix + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(40))


def hash_key(key: str) -> str:
    # Keys carry ~238 bits of entropy, so a fast hash is safe; lookup is by this hash.
    return hashlib.sha256(key.encode()).hexdigest()


def key_display(key: str) -> str:
    return f"{key[:8]}…{key[-4:]}"


class SessionState(str, enum.Enum):
    GRANTED = "granted"  # the front door admitted it; no worker yet
    LIVE = "live"  # a worker owns it
    ENDED = "ended"  # the usage record is final


LIVE_STATES = (SessionState.GRANTED, SessionState.LIVE)


class Account(SQLModel, table=True):
    id: str = Field(primary_key=True)
    name: str
    balance_pico: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    # What live sessions' responses may still cost: the sum of their sessions' reserved_pico.
    # A reservation is granted only while balance_pico - reserved_pico covers it (docs/billing.md).
    reserved_pico: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0, server_default="0"))
    max_concurrent_sessions: int | None = None
    session_token_cap: int | None = None
    active: bool = True
    created_at: datetime = Field(default_factory=utcnow)


class ApiKey(SQLModel, table=True):
    id: str = Field(primary_key=True)
    account_id: str = Field(foreign_key="account.id", index=True)
    name: str = ""
    display: str
    key_hash: str = Field(unique=True, index=True)
    token_cap: int | None = None
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None
    # An ephemeral key (ek_, POST /v1/realtime/client_secrets): the rsk_ key that minted it, whose
    # revocation ends it too; when it stops admitting sessions (epoch seconds, not a datetime: no
    # time zone to get wrong across drivers); the session config every session it opens gets.
    parent_key_id: str | None = Field(default=None, index=True)
    expires_at: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    session_config: dict | None = Field(default=None, sa_column=Column(JSON, nullable=True))


class SessionRecord(SQLModel, table=True):
    __tablename__ = "realtime_session"
    # Admission counts an account's live sessions: without (account_id, state) SQLite walks every
    # session the account ever had (the account_id index), so admission slowed as history grew.
    __table_args__ = (Index("ix_realtime_session_account_state", "account_id", "state"),)
    id: str = Field(primary_key=True)
    request_id: str = Field(index=True)
    account_id: str = Field(foreign_key="account.id", index=True)
    api_key_id: str
    model: str
    node: str = ""
    state: SessionState = Field(
        default=SessionState.GRANTED,
        sa_column=Column(
            SAEnum(
                SessionState, native_enum=False, length=16, values_callable=lambda states: [s.value for s in states]
            ),
            nullable=False,
            index=True,
        ),
    )
    pid: int | None = None
    client_addr: str = ""
    started_at: datetime = Field(default_factory=utcnow, index=True)
    ended_at: datetime | None = None
    end_reason: str | None = None
    close_code: int | None = None
    responses: int = 0
    usage: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    cost_pico: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    by_category: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    rates: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # Set when usage reached the record after it was final: a lost node came back with
    # increments in its spools that were not committed when another node ended the session.
    amended_at: datetime | None = None
    # This session's part of its account's reserved_pico, and the worker's number for the last
    # reservation change applied (a late or repeated change never undoes a newer one).
    reserved_pico: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0, server_default="0"))
    reserve_version: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0, server_default="0"))
    # "realtime" (a conversation session) or "transcription" (`?intent=transcription`)
    surface: str = Field(
        default="realtime",
        sa_column=Column(String(16), nullable=False, default="realtime", server_default=text("'realtime'")),
    )
    # surface "webrtc": the call's id upstream, by which its tenant finds it (sideband, hangup);
    # surface "sideband": the call it joined
    call_id: str | None = Field(default=None, sa_column=Column(String(64), nullable=True, index=True))
    # Seconds of input audio billed by time (a translation session: docs/billing.md), a decimal
    # string (exact, or rounded half up to 9 decimals); null for sessions billed by usage events.
    audio_seconds: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))


class NodeState(str, enum.Enum):
    UP = "up"  # holds a lease; its sessions are its own
    LOST = "lost"  # its lease expired; another node ended its sessions
    LEFT = "left"  # shut down cleanly


class Node(SQLModel, table=True):
    """A gateway node's lease. Times are the database's clock in epoch seconds, so nodes with
    skewed clocks still agree on who expired."""

    id: str = Field(primary_key=True)
    hostname: str = ""
    state: str = NodeState.UP.value
    incarnation: int = 0  # bumped at every start: a renewal from an older one fails
    lease_expires: float = 0.0
    renewed_at: float = 0.0
    started_at: datetime = Field(default_factory=utcnow)


class AppliedIncrement(SQLModel, table=True):
    """One usage increment, applied once: the (session_id, seq) key makes replays harmless."""

    session_id: str = Field(primary_key=True)
    seq: int = Field(primary_key=True)
    account_id: str = Field(index=True)
    cost_pico: int = Field(sa_column=Column(BigInteger, nullable=False))
    body: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    applied_at: datetime = Field(default_factory=utcnow)


class LedgerEntry(SQLModel, table=True):
    """Every balance change: top-ups (+), usage debits (-), adjustments."""

    id: int | None = Field(default=None, primary_key=True)
    account_id: str = Field(foreign_key="account.id", index=True)
    amount_pico: int = Field(sa_column=Column(BigInteger, nullable=False))
    kind: str  # "topup" | "usage" | "adjustment"
    ref: str = ""
    note: str = ""
    created_at: datetime = Field(default_factory=utcnow)


# SQLite's own busy handler sleeps 1, 2, 5, 10 … 100 ms between its tries, so a writer behind
# another process's 1 ms transactions can miss window after window (a burst's admissions behind
# the supervisor's writes waited up to 140 ms each). BEGIN IMMEDIATE is polled instead, every
# 0.2 ms doubling to 2 ms, until MESHRT_DB_TIMEOUT_S; inside the transaction the busy handler stays.
_BEGIN_POLL_MIN_S = 0.0002
_BEGIN_POLL_MAX_S = 0.002


def _begin_immediate(conn, timeout_s: float) -> None:
    raw = conn.connection.driver_connection
    deadline = time.monotonic() + timeout_s
    pause = _BEGIN_POLL_MIN_S
    try:
        try:
            raw.execute("PRAGMA busy_timeout=0")
            while time.monotonic() < deadline:
                try:
                    raw.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                        break  # (the primary code: SQLITE_BUSY_RECOVERY, … are busy too)
                time.sleep(pause)
                pause = min(pause * 2, _BEGIN_POLL_MAX_S)
        except sqlite3.Error:
            pass  # not the lock (a broken file, a full disk): the attempt below raises it
        # once more, through SQLAlchemy: a lock still held, or any other error, is raised as its
        # error (the callers retry SQLAlchemyError), not as the driver's
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    finally:
        with contextlib.suppress(sqlite3.Error):
            raw.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")


def make_engine(url: str, timeout_s: float = 10.0, pool_size: int = 5) -> Engine:
    """An engine whose every wait is bounded by `timeout_s`: SQLite's busy timeout; PostgreSQL's
    connect, statement and lock timeouts, so a stuck database surfaces as an error to retry."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": timeout_s},
            pool_size=pool_size,
            max_overflow=2 * pool_size,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
            # WAL + NORMAL survives any process crash; usage is also in the workers' spools
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            _begin_immediate(conn, timeout_s)

        return engine
    ms = int(timeout_s * 1000)
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=2 * pool_size,
        pool_timeout=timeout_s,
        connect_args={
            "connect_timeout": max(1, math.ceil(timeout_s)),
            "options": f"-c statement_timeout={ms} -c lock_timeout={ms}",
        },
    )


# pg_advisory_xact_lock's key for schema changes: any constant, the same in every meshrt
_SCHEMA_LOCK = 0x6D657368_73636865  # "meshsche"


@dataclass(frozen=True)
class SchemaChanges:
    """What `create_schema` did: tables created, columns and indexes added to existing tables."""

    tables: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    indexes: tuple[str, ...] = ()

    @property
    def created(self) -> bool:
        """The whole schema was new: every table was created here."""
        return len(self.tables) == len(SQLModel.metadata.tables)

    def summary(self) -> str:
        if self.created:
            return f"created ({len(self.tables)} tables)"
        added = [*self.tables, *self.columns, *(f"index {i}" for i in self.indexes)]
        return f"upgraded (added {', '.join(added)})" if added else "up to date"


def create_schema(engine: Engine) -> SchemaChanges:
    """Create what is missing — tables, columns (nullable, or with a server default), indexes —
    in one transaction.

    On PostgreSQL the transaction first takes an advisory lock: several processes starting on an
    empty database (replicas of `serve`, `db upgrade` run twice) would otherwise all see a table
    missing, and all but one fail on pg_type's unique index when they create it."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
        existing = inspect(conn)
        before = set(existing.get_table_names())
        SQLModel.metadata.create_all(conn)
        columns, indexes = [], []
        # create_all skips a table that exists, and with it any column or index added since
        for table in SQLModel.metadata.sorted_tables:
            if table.name not in before:
                continue
            have = {c["name"] for c in existing.get_columns(table.name)}
            for column in table.columns:
                if column.name in have or not (column.nullable or column.server_default is not None):
                    continue
                kind = column.type.compile(conn.dialect)
                if column.server_default is not None:  # NOT NULL with a default: old rows get it
                    kind += f" NOT NULL DEFAULT {column.server_default.arg}"
                conn.exec_driver_sql(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}')
                columns.append(f"{table.name}.{column.name}")
            have_indexes = {i["name"] for i in existing.get_indexes(table.name)}
            for index in table.indexes:
                if index.name not in have_indexes:
                    index.create(conn)
                    indexes.append(index.name)
    created = tuple(t.name for t in SQLModel.metadata.sorted_tables if t.name not in before)
    return SchemaChanges(created, tuple(columns), tuple(indexes))


_NOW = {  # the database's clock, epoch seconds: leases are judged by one clock, not each node's
    "postgresql": text("SELECT extract(epoch from clock_timestamp())::float8"),
    "sqlite": text("SELECT (julianday('now') - 2440587.5) * 86400.0"),
}


def db_now(connection) -> float:
    return float(connection.execute(_NOW[connection.dialect.name]).scalar_one())


def display_url(url: str) -> str:
    """The database URL to show a person: the scheme they wrote, no password."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return url.rsplit("@", 1)[-1]
    return parsed.set(drivername=parsed.get_backend_name()).render_as_string(hide_password=True)


# A driver's message (first match wins) -> what to tell the person who ran the command.
_FAILURES = (
    (r'database "(?P<name>[^"]+)" does not exist',
     "the database {name!r} does not exist at {where}: create it (createdb {name}; docs/postgresql.md) "
     "or point MESHRT_DATABASE_URL at another"),
    (r"Connection refused",
     "nothing accepts connections at {where}: is PostgreSQL running there? Check MESHRT_DATABASE_URL"),
    (r"password authentication failed|no password supplied|role \S+ does not exist",
     "PostgreSQL refused the login at {where} ({reason}): check the user and password in MESHRT_DATABASE_URL"),
    (r"could not translate host name|Name or service not known|nodename nor servname",
     "unknown host in MESHRT_DATABASE_URL ({where})"),
    (r"timeout expired|timed out|canceling statement due to (statement|lock) timeout",
     "no answer from the database at {where} within MESHRT_DB_TIMEOUT_S: is it reachable and not overloaded?"),
    (r"permission denied",
     "the database at {where} refused: {reason}; the role in MESHRT_DATABASE_URL must own the database "
     "(createdb -O ROLE NAME)"),
    (r"unable to open database file",
     "cannot open the SQLite database {where}: its directory does not exist or is not writable; "
     "set MESHRT_STATE_DIR (or MESHRT_DATABASE_URL) to a writable place"),
    (r"database is locked",
     "the SQLite database {where} stayed locked by another process for MESHRT_DB_TIMEOUT_S"),
)  # fmt: skip


def explain_failure(url: str, error: BaseException) -> str:
    """One line for a person, not a traceback: which database failed, why, and what to do."""
    reason = " ".join(str(getattr(error, "orig", None) or error).split())
    reason = re.sub(r"^\(\S+\) ", "", reason).split(" (Background on this error")[0]
    where = display_url(url)
    if url.startswith("sqlite") and make_url(url).database:
        where = make_url(url).database
    for pattern, advice in _FAILURES:
        match = re.search(pattern, reason)
        if match:
            short = reason[reason.rfind("FATAL:") + 6 :].strip() if "FATAL:" in reason else match.group(0)
            return advice.format(where=where, reason=short, **match.groupdict())
    return f"the database at {where} failed: {reason[:300]}"


def ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
