"""The database fault harness (tests/dbfaults.py) does what it claims, against a real PostgreSQL
and real SQLite files. What each fault imitates in production:

- refuse: PostgreSQL restarting (or down): new connects get ECONNREFUSED at once, while
  connections already open are left alone.
- drop: a failover or a cut network path: every open connection is reset; new ones work.
- restart: both at once, as a real restart does.
- stall: a hung server or a partition: sockets stay open, nothing flows either way, so only the
  client's own timeouts notice (a server-side statement_timeout never sees the query).
- PgTableLock: a long migration holding ACCESS EXCLUSIVE locks: statements on those tables wait
  until lock_timeout / statement_timeout.
- SqliteLock: another process in a write transaction: writers wait out their busy timeout and get
  "database is locked" (in WAL mode, the gateway's, readers still read).

PostgreSQL tests run when it answers (MESHRT_TEST_DATABASE_URL, else 127.0.0.1:5432/test); they
skip when it does not, except that with MESHRT_TEST_DATABASE_URL set they fail instead.
"""

from __future__ import annotations

import os
import secrets
import socket
import sqlite3
import threading
import time
from contextlib import closing
from urllib.parse import urlsplit

import psycopg
import pytest
from conftest import PG_ENV
from conftest import wait_for
from dbfaults import PgFaultProxy
from dbfaults import PgTableLock
from dbfaults import SqliteLock
from dbfaults import fault_schedule
from dbfaults import pg_conninfo
from psycopg import errors

PG_URL = pg_conninfo(os.environ.get(PG_ENV) or "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="module")
def pg_url() -> str:
    try:
        psycopg.connect(PG_URL, connect_timeout=2).close()
    except psycopg.OperationalError as exc:
        if os.environ.get(PG_ENV):
            pytest.fail(f"{PG_ENV} is set but PostgreSQL does not answer: {exc}")
        pytest.skip(f"PostgreSQL does not answer at {PG_URL}: {exc}")
    return PG_URL


@pytest.fixture
def proxy(pg_url):
    parts = urlsplit(pg_url)
    with PgFaultProxy((parts.hostname or "127.0.0.1", parts.port or 5432)) as p:
        yield p


@pytest.fixture
def connect():
    """psycopg.connect (autocommit, connect_timeout=2), every connection closed at teardown."""
    conns = []

    def open_(url: str, **kw) -> psycopg.Connection:
        conn = psycopg.connect(url, connect_timeout=2, autocommit=True, **kw)
        conns.append(conn)
        return conn

    yield open_
    for conn in conns:
        conn.close()


def one(conn, query: str = "SELECT 1"):
    return conn.execute(query).fetchone()[0]


# --- PgFaultProxy -----------------------------------------------------------------------


def test_refuse_fails_new_connects_at_once_keeps_open_ones_and_heals_on_the_same_port(proxy, pg_url, connect):
    url = proxy.url(pg_url)
    assert f"@127.0.0.1:{proxy.port}/" in url
    existing = connect(url)
    assert one(existing) == 1
    port = proxy.port

    proxy.refuse()
    proxy.refuse()  # idempotent
    assert proxy.mode == "refuse"
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="refused"):
        connect(url)
    assert time.monotonic() - started < 1, proxy.log
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert one(existing, "SELECT 2") == 2, proxy.log

    proxy.heal()
    proxy.heal()
    assert proxy.port == port and proxy.mode == "forward"
    assert one(connect(url), "SELECT 3") == 3, proxy.log
    assert one(existing, "SELECT 4") == 4
    assert proxy.accepted == 2 and proxy.active == 2, proxy.stats()
    assert proxy.bytes_up > 0 and proxy.bytes_down > 0


def test_drop_resets_open_connections_and_accepts_new_ones(proxy, pg_url, connect):
    url = proxy.url(pg_url)
    existing = connect(url)
    assert one(existing) == 1
    with closing(socket.create_connection(("127.0.0.1", proxy.port), timeout=2)) as raw:
        wait_for(lambda: proxy.active == 2, 2, what="the proxy to accept the raw socket")
        proxy.drop()
        with pytest.raises(ConnectionResetError):  # a reset (RST), not an orderly close
            raw.recv(1)
    with pytest.raises(psycopg.OperationalError, match="closed the connection unexpectedly"):
        existing.execute("SELECT 1")
    assert existing.broken
    assert one(connect(url), "SELECT 5") == 5
    assert proxy.reset == 2 and proxy.mode == "forward", proxy.stats()
    proxy.drop()  # idempotent: resets what is open now
    assert proxy.reset == 3


def test_stall_holds_queries_and_connects_until_heal(proxy, pg_url, connect):
    url = proxy.url(pg_url)
    existing = connect(url)
    proxy.stall()
    result: list = []
    query = threading.Thread(target=lambda: result.append(one(existing, "SELECT 42")), daemon=True)
    try:
        query.start()
        query.join(0.5)
        assert query.is_alive() and not result, "a query went through a stalled proxy"
        started = time.monotonic()
        with pytest.raises(errors.ConnectionTimeout):  # psycopg rounds connect_timeout up to 2 s
            psycopg.connect(url, connect_timeout=2)
        assert 1.8 < time.monotonic() - started < 4
        assert query.is_alive()
    finally:
        proxy.heal()
        query.join(3)
    assert result == [42], proxy.log
    assert one(connect(url)) == 1


def test_outage_heals_by_itself_and_an_explicit_mode_cancels_it(proxy, pg_url, connect):
    url = proxy.url(pg_url)
    existing = connect(url)
    healed = proxy.outage("restart", 0.3)  # refuse + drop at once
    with pytest.raises(psycopg.OperationalError, match="refused"):
        connect(url)
    with pytest.raises(psycopg.OperationalError):
        existing.execute("SELECT 1")
    assert healed.wait(3), proxy.log
    assert proxy.mode == "forward" and one(connect(url)) == 1
    assert any("end of outage" in event for _, event in proxy.log)

    pending = proxy.outage("refuse", 0.2)
    proxy.stall()
    time.sleep(0.4)
    assert proxy.mode == "stall" and not pending.is_set(), proxy.log
    with pytest.raises(ValueError):
        proxy.outage("refuse", 0)
    with pytest.raises(ValueError):
        proxy.outage("melt", 1)


def test_url_keeps_user_password_database_and_query():
    p = PgFaultProxy()
    p.port = 4321
    assert (
        p.url("postgresql+psycopg://u:pw@db.example:5433/app?sslmode=disable")
        == "postgresql+psycopg://u:pw@127.0.0.1:4321/app?sslmode=disable"
    )
    assert p.url("postgresql://db/app") == "postgresql://127.0.0.1:4321/app"
    with pytest.raises(ValueError):
        p.url("sqlite:///x.db")


# --- SqliteLock -------------------------------------------------------------------------


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_sqlite_lock_makes_writers_busy_until_released(tmp_path, journal):
    path = tmp_path / "x.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as setup:
        assert setup.execute(f"PRAGMA journal_mode={journal}").fetchone()[0] == journal
        setup.execute("CREATE TABLE t (x)")
        setup.execute("INSERT INTO t VALUES (1)")
    with closing(sqlite3.connect(path, timeout=0.2, isolation_level=None)) as other:
        with SqliteLock(path).hold(5) as lock:
            assert lock.held
            for statement in ("INSERT INTO t VALUES (2)", "BEGIN IMMEDIATE"):  # the gateway's BEGIN
                started = time.monotonic()
                with pytest.raises(sqlite3.OperationalError, match="database is locked"):
                    other.execute(statement)
                assert 0.15 < time.monotonic() - started < 2  # the busy timeout was waited out
            if journal == "wal":  # WAL readers read past a writer
                assert other.execute("SELECT count(*) FROM t").fetchone()[0] == 1
            else:  # an EXCLUSIVE lock in rollback-journal mode locks readers out too
                with pytest.raises(sqlite3.OperationalError, match="database is locked"):
                    other.execute("SELECT count(*) FROM t")
        assert not lock.held
        other.execute("INSERT INTO t VALUES (2)")
        assert other.execute("SELECT count(*) FROM t").fetchone()[0] == 2


def test_sqlite_lock_goes_by_itself_and_hold_is_bounded(tmp_path):
    path = tmp_path / "x.db"
    with closing(sqlite3.connect(path, timeout=0.2, isolation_level=None)) as other:
        other.execute("PRAGMA journal_mode=wal")
        other.execute("CREATE TABLE t (x)")
        lock = SqliteLock(path).hold(0.3)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("INSERT INTO t VALUES (1)")
        assert lock.wait_released(3) and not lock.held
        other.execute("INSERT INTO t VALUES (1)")

        # hold() cannot take a lock someone else has: it fails after acquire_timeout_s, not never
        other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            SqliteLock(path, acquire_timeout_s=0.3).hold(1)
        assert time.monotonic() - started < 2
        other.execute("ROLLBACK")


# --- PgTableLock ------------------------------------------------------------------------


@pytest.fixture
def pg_table(pg_url):
    name = f"dbfaults_{secrets.token_hex(4)}"
    with psycopg.connect(pg_url, connect_timeout=2, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (x int)")
        conn.execute(f"INSERT INTO {name} VALUES (1)")
    yield name
    with psycopg.connect(pg_url, connect_timeout=2, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '5s'")
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def test_pg_table_lock_blocks_statements_until_released(pg_url, pg_table, connect):
    other = connect(pg_url)
    other.execute("SET lock_timeout = '200ms'")
    with PgTableLock(pg_url, [f"public.{pg_table}"]).hold(5) as lock:
        assert lock.held
        started = time.monotonic()
        with pytest.raises(errors.LockNotAvailable):
            other.execute(f"SELECT x FROM {pg_table}")
        assert 0.15 < time.monotonic() - started < 2
        # with statement_timeout instead, the same wait ends as QueryCanceled
        other.execute("SET lock_timeout = 0; SET statement_timeout = '200ms'")
        with pytest.raises(errors.QueryCanceled):
            other.execute(f"INSERT INTO {pg_table} VALUES (2)")
        other.execute("SET lock_timeout = '200ms'; SET statement_timeout = 0")
    assert not lock.held
    assert one(other, f"SELECT count(*) FROM {pg_table}") == 1


def test_pg_table_lock_goes_by_itself(pg_url, pg_table, connect):
    other = connect(pg_url)
    other.execute("SET lock_timeout = '200ms'")
    lock = PgTableLock(pg_url, [pg_table]).hold(0.3)
    with pytest.raises(errors.LockNotAvailable):
        other.execute(f"SELECT x FROM {pg_table}")
    assert lock.wait_released(3) and not lock.held
    assert one(other, f"SELECT x FROM {pg_table}") == 1


def test_pg_table_lock_survives_a_deadlock_with_a_writer(pg_url, pg_table, connect):
    """LOCK TABLE a, b takes a, then waits for b; a writer holding b's row lock that then writes
    a is a deadlock. The server ends the side whose deadlock_timeout runs out first: here the
    holder's (1 s, against the writer's 5 s), as in the CI run where the gateway's transaction
    was the other side. The holder takes both locks again once the writer has committed."""
    second = f"{pg_table}_b"
    setup = connect(pg_url)
    setup.execute(f"CREATE TABLE {second} (x int)")
    try:
        writer = connect(pg_url)
        writer.execute("SET deadlock_timeout = '5s'")
        writer.execute("BEGIN")
        writer.execute(f"INSERT INTO {second} VALUES (1)")  # RowExclusive on b
        outcome: list[str] = []

        def write_first_table():
            time.sleep(0.3)  # the holder has a and waits for b by now
            try:
                writer.execute(f"INSERT INTO {pg_table} VALUES (3)")  # waits for a: deadlock
                writer.execute("COMMIT")
                outcome.append("writer committed")
            except errors.DeadlockDetected:
                writer.execute("ROLLBACK")
                outcome.append("writer was the victim")

        thread = threading.Thread(target=write_first_table)
        thread.start()
        with PgTableLock(pg_url, [pg_table, second], acquire_timeout_s=5).hold(1) as lock:
            assert lock.held
            thread.join(5)
        assert outcome == ["writer committed"]
        assert any("deadlock broken" in line for _, line in lock.log), lock.log
        assert not lock.held
        assert one(setup, f"SELECT count(*) FROM {pg_table}") == 2
    finally:
        setup.execute(f"DROP TABLE IF EXISTS {second}")


# --- fault_schedule ---------------------------------------------------------------------


def test_fault_schedule_is_seeded_non_overlapping_and_bounded():
    kinds = ["refuse", "drop", "stall"]
    assert fault_schedule(7, 30, kinds, 5) == fault_schedule(7, 30, kinds, 5)
    assert len({tuple(fault_schedule(seed, 30, kinds, 5)) for seed in range(20)}) > 10
    for seed in range(300):
        duration, max_faults = 5 + seed % 40, seed % 7
        schedule = fault_schedule(seed, duration, kinds, max_faults, min_gap_s=0.5)
        assert len(schedule) <= max_faults
        assert sum(length for _, _, length in schedule) <= duration * 0.5 + 1e-9
        end = 0.0
        for start, kind, length in schedule:
            assert kind in kinds and 0.5 <= length <= 3.0
            assert start >= end + 0.5 - 1e-9, schedule  # calm before each fault
            end = start + length
        assert end <= duration - 0.5 + 1e-9, schedule  # and after the last one
    assert fault_schedule(1, 30, kinds, 0) == []
    assert fault_schedule(1, 1.0, kinds, 5) == []  # nothing fits
    with pytest.raises(ValueError):
        fault_schedule(1, 30, [], 3)
