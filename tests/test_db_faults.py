"""Database-fault suite (the reliability issue): the database refuses, drops, times out or is
locked at random moments while many live sessions have usage flowing — including while sessions
are being finalised — a seeded, bounded loop like the kill suite (tests/test_faults.py); then
every usage record equals what the simulator reported on its connection, exactly, balances moved
by exactly the records' costs, no row is left `granted`/`live`, no spool is left behind, no
process is wedged, and new sessions are admitted once the fault clears.

Which faults depend on the database in use (the CI runs the suite once per database):

- SQLite (the default run): `SqliteLock` holds SQLite's write lock for 1.5–4 s from another
  connection, past the gateway's busy timeout (`MESHRT_DB_TIMEOUT_S=1`): every gateway
  transaction (they all `BEGIN IMMEDIATE`, reads included) fails with "database is locked".
- PostgreSQL (`MESHRT_TEST_DATABASE_URL` set): the gateway reaches the server through
  `PgFaultProxy`, which refuses new connections (`refuse`), resets the open ones (`drop`), or
  both (`restart`); and `PgTableLock` holds ACCESS EXCLUSIVE locks on a seeded subset of the
  tables the ledger writes (account, appliedincrement, realtime_session, ledgerentry), so the
  gateway's statements end in lock / statement timeouts.

How "what the simulator reported" is known: tests/simlog.py (shared with the kill suite): every
client connection carries a unique `fault_tag`, the simulator's frame log of that connection is
found by it, and the record must equal its `response.done` events (usage summed field by field,
cost under the record's rates, number of responses).

Reproducing a failure: every run prints its seed and every assertion message starts with
`[seed=N db=D]`; run `MESHRT_DB_FAULT_SEED=N pytest tests/test_db_faults.py` (with
MESHRT_TEST_DATABASE_URL for PostgreSQL). The fault schedule (moments, kinds, lengths, locked
tables), which sessions close when a fault starts, session lengths and which sessions close
mid-response all come from the seed; scheduling jitter still decides which session is in which
state at a given instant.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import time
from collections import Counter
from contextlib import closing
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from conftest import PG_ENV
from conftest import _stop
from conftest import ended_record
from conftest import session_record
from conftest import start_sim
from conftest import wait_for
from dbfaults import PgFaultProxy
from dbfaults import PgTableLock
from dbfaults import SqliteLock
from dbfaults import fault_schedule
from dbfaults import pg_conninfo
from faultclients import Conn
from faultclients import FaultClients
from realtime_client import connect_ws
from realtime_client import expect_refusal
from realtime_client import recv_json
from realtime_client import recv_until
from realtime_client import run
from simlog import balance
from simlog import check_debits
from simlog import check_unbilled_attempts
from simlog import expected_from
from simlog import final_records
from simlog import records_by_request
from simlog import same_usage
from simlog import session_report
from simlog import sim_reports
from sqlalchemy import text
from websockets.exceptions import ConnectionClosed

from meshrt.shared import spool
from meshrt.shared.money import Money

# default: a seed whose PostgreSQL plan has every kind, and locks the session and ledger tables
SEED = int(os.environ.get("MESHRT_DB_FAULT_SEED", "5"))
ON_PG = bool(os.environ.get(PG_ENV))
DB = "postgresql" if ON_PG else "sqlite"
DB_TIMEOUT_S = 1  # MESHRT_DB_TIMEOUT_S: busy timeout / connect, statement and lock timeouts
SLOTS = 10  # concurrent client sessions at any time
RESPONSE_MS = 200  # each response lasts this long upstream (paced): faults land mid-response
WARMUP_S = 2.0  # sessions run this long before the first fault's segment
SEGMENTS = 6  # one fault in each segment, at a seeded moment, with calm before and after it
SEGMENT_S = 7.0
FAULT_MIN_S, FAULT_MAX_S = 1.5, 4.0
LONG_SESSIONS = 0.2  # this fraction of sessions runs 12-25 responses (3-5 s), the rest 2-7
CLOSE_AT_FAULT = (1, 3)  # this many running sessions close the moment a fault starts
CONNECT_TIMEOUT_S = 15.0  # one connect attempt (SQLite admissions queue behind the lock)
CONNECT_RETRY_S = 20.0  # a client keeps retrying its connect this long (outages are shorter)
LIVE_BUDGET_S = 60.0  # hard bound on the live part
RECORD_WAIT_S = 30.0
PG_TABLES = ("account", "appliedincrement", "realtime_session", "ledgerentry")
PG_KINDS = ("refuse", "drop", "restart", "tablelock")
OUTAGES = ("refuse", "restart", "lock", "tablelock")  # the database is down for the fault's length


def _tag(what: str = "") -> str:
    return f"[seed={SEED} db={DB}{' ' + what if what else ''}]"


def _log_tail(gateway, n: int = 25) -> str:
    """The gateway's last warnings and errors, for assertion messages."""
    lines = [
        line
        for line in gateway.log_text().splitlines()
        if '"level": "info"' not in line and '"level":"info"' not in line
    ]
    return "\n".join(lines[-n:]) + f"\n(full log: {gateway.stderr_path})"


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def db_sim(tmp_path):
    sim = start_sim(tmp_path)
    yield sim
    _stop(sim.proc)


@pytest.fixture
def pg_proxy(database_url):
    """On PostgreSQL, a fault proxy the gateway reaches the server through; None on SQLite."""
    if not database_url.startswith("postgresql"):
        yield None
        return
    parts = urlsplit(database_url)
    with PgFaultProxy((parts.hostname or "127.0.0.1", parts.port or 5432)) as proxy:
        yield proxy


@pytest.fixture
def db_gateway(pg_proxy, gateway_factory, db_sim, database_url):
    """A gateway with short database timeouts, through the proxy on PostgreSQL. (pg_proxy comes
    first: torn down last, after the gateway has stopped.)"""
    env = {"MESHRT_DB_TIMEOUT_S": DB_TIMEOUT_S}
    if pg_proxy is not None:
        env["MESHRT_DATABASE_URL"] = pg_proxy.url(database_url)
    return gateway_factory(db_sim.url, **env)


def _sqlite_path(database_url: str) -> str:
    assert database_url.startswith("sqlite:///"), database_url
    return database_url[len("sqlite:///") :]


@contextmanager
def outage(database_url: str, proxy: PgFaultProxy | None):
    """The database out of reach for the gateway until the block ends: SQLite's write lock held
    (every gateway transaction begins IMMEDIATE, so reads wait too); on PostgreSQL the proxy
    refusing new connections and resetting the open ones (a restart held: `refuse` alone leaves
    the gateway's pooled connections working, as with a real server that only stops accepting)."""
    if proxy is None:
        with SqliteLock(_sqlite_path(database_url)).hold(60):
            yield "sqlite lock"
    else:
        proxy.restart()
        try:
            yield "postgresql refused + dropped"
        finally:
            proxy.heal()


def row_state_direct(database_url: str, session_id: str) -> tuple[str, int]:
    """(state, increments applied) of a session, read past the fault: a WAL reader on SQLite
    (it reads while the write lock is held), a direct connection on PostgreSQL (not the proxy)."""
    if database_url.startswith("sqlite"):
        with closing(sqlite3.connect(f"file:{_sqlite_path(database_url)}?mode=ro", uri=True, timeout=2)) as conn:
            state = conn.execute("SELECT state FROM realtime_session WHERE id = ?", (session_id,)).fetchone()[0]
            n = conn.execute("SELECT count(*) FROM appliedincrement WHERE session_id = ?", (session_id,)).fetchone()[0]
            return state, n
    with psycopg.connect(pg_conninfo(database_url), connect_timeout=2, autocommit=True) as conn:
        state = conn.execute("SELECT state FROM realtime_session WHERE id = %s", (session_id,)).fetchone()[0]
        n = conn.execute("SELECT count(*) FROM appliedincrement WHERE session_id = %s", (session_id,)).fetchone()[0]
        return state, n


def ledger_totals(engine, account_id: str) -> tuple[int, int, int, int]:
    """(applied increments, their cost, usage ledger entries, their amount) of an account."""
    with engine.connect() as conn:
        applied = conn.execute(
            text("SELECT count(*), coalesce(sum(cost_pico), 0) FROM appliedincrement WHERE account_id = :a"),
            {"a": account_id},
        ).one()
        entries = conn.execute(
            text(
                "SELECT count(*), coalesce(sum(amount_pico), 0) FROM ledgerentry "
                "WHERE account_id = :a AND kind = 'usage'"
            ),
            {"a": account_id},
        ).one()
        return int(applied[0]), int(applied[1]), int(entries[0]), int(entries[1])


def http_status(url: str, **kw) -> int | None:
    try:
        return httpx.get(url, timeout=5, **kw).status_code
    except httpx.HTTPError:
        return None


def live_gauge(gateway) -> int | None:
    try:
        return json.loads((gateway.state_dir / "run" / "metrics.json").read_text())["gauges"]["meshrt_live_sessions"]
    except (OSError, ValueError, KeyError):
        return None


def spool_files(gateway) -> list[str]:
    return sorted(p.name for p in (gateway.state_dir / "spool").iterdir())


# --- the clients ------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    started: float
    ended: float = 0.0
    detail: str = ""
    closed: list = field(default_factory=list)  # tags of the sessions told to close at its start

    @property
    def outage(self) -> bool:
        return self.kind in OUTAGES


class Clients(FaultClients):
    """SLOTS client tasks (tests/faultclients.py): mostly short sessions, some long ones; a few
    close at once when a fault starts (`Conn.close_now`); a refusal is recorded with its close
    code, and a frame after its error frame is a failure."""

    def __init__(self, url: str, key: str):
        super().__init__(
            lambda: url,
            key,
            f"{SEED}-{DB}",
            slots=SLOTS,
            budget_s=LIVE_BUDGET_S,
            response_ms=RESPONSE_MS,
            connect_timeout_s=CONNECT_TIMEOUT_S,
            connect_retry_s=CONNECT_RETRY_S,
            closable=True,
        )

    def plan(self, index: int, n: int) -> tuple[random.Random, int, bool]:
        rng = random.Random(f"{SEED}:{DB}:{index}:{n}")
        # mostly short sessions (finalised often, some during faults), some long ones that
        # live through a whole fault with usage flowing
        responses = rng.randint(12, 25) if rng.random() < LONG_SESSIONS else rng.randint(2, 7)
        cut_short = rng.random() < 0.3
        return rng, responses, cut_short

    async def refused(self, tag: str, first: dict, ws) -> None:
        try:  # the error frame is followed by the close
            extra = await asyncio.wait_for(ws.recv(), 5)
            self.failures.append((tag, f"a frame after the refusal: {extra!r:.200}"))
        except (ConnectionClosed, asyncio.TimeoutError):
            pass
        await ws.close()
        self.refusals.append((tag, first.get("error", {}).get("code", first.get("type")), ws.close_code))

    async def one_session(self, name: str, responses: int) -> Conn | None:
        """One attempt (no retry), `responses` responses, then close."""
        conn = await self.attempt(f"{SEED}-{DB}-{name}")
        if conn is not None:
            await self.converse(conn, random.Random(f"{SEED}:{name}"), responses, False)
        return conn


# --- the seeded suite -------------------------------------------------------------------------


def schedule(kinds: tuple[str, ...]) -> list[tuple[float, str, float]]:
    """SEGMENTS faults [(offset from the live part's start, kind, length)]: one per segment, at a
    seeded moment with at least a second of calm before and after it; kinds dealt from a seeded
    shuffle of `kinds`, so that every kind occurs when SEGMENTS >= len(kinds)."""
    rng = random.Random(f"{SEED}:{DB}:kinds")
    deck: list[str] = []
    while len(deck) < SEGMENTS:
        deck += rng.sample(list(kinds), len(kinds))
    out = []
    for i in range(SEGMENTS):
        found = fault_schedule(
            f"{SEED}:{DB}:{i}",
            SEGMENT_S,
            kinds,
            1,
            min_len_s=FAULT_MIN_S,
            max_len_s=FAULT_MAX_S,
            min_gap_s=1.0,
            busy_fraction=0.6,
        )
        assert len(found) == 1, found
        offset, _, length = found[0]
        out.append((WARMUP_S + i * SEGMENT_S + offset, deck[i], length))
    return out


async def drive_faults(clients: Clients, plan, apply, gateway, faults: list[Fault]) -> None:
    """Run `plan`: at each moment apply the fault (`apply(kind, length)` → an async context that
    holds it), close a few running sessions at once (their records are written during the
    fault), hold it for its length, heal. The gateway's supervisor must stay up throughout."""
    rng = random.Random(f"{SEED}:{DB}:driver")
    began = time.monotonic()
    for offset, kind, length in plan:
        await asyncio.sleep(max(0.0, began + offset - time.monotonic()))
        async with apply(kind, length) as detail:
            fault = Fault(kind, time.monotonic(), detail=detail)
            faults.append(fault)
            victims = sorted(clients.running(), key=lambda c: c.tag)
            for victim in rng.sample(victims, min(len(victims), rng.randint(*CLOSE_AT_FAULT))):
                victim.close_now.set()
                fault.closed.append(victim.tag)
            await asyncio.sleep(max(0.0, fault.started + length - time.monotonic()))
        fault.ended = time.monotonic()
        assert gateway.proc.poll() is None, (
            f"{_tag()} the supervisor exited ({gateway.proc.returncode}) during {kind}\n{_log_tail(gateway)}"
        )
    await asyncio.sleep(max(0.0, began + WARMUP_S + SEGMENTS * SEGMENT_S - time.monotonic()))


def sqlite_faults(database_url: str):
    path = _sqlite_path(database_url)

    class Locked:
        def __init__(self, kind: str, length: float):
            self.lock, self.length = SqliteLock(path), length

        async def __aenter__(self) -> str:
            await asyncio.to_thread(self.lock.hold, self.length + 5)  # released below, at `length`
            return f"sqlite write lock {self.length:.2f} s"

        async def __aexit__(self, *exc) -> None:
            await asyncio.to_thread(self.lock.release)

    return Locked


def pg_faults(database_url: str, proxy: PgFaultProxy):
    def tables(kind_rng: random.Random) -> list[str]:
        return sorted(kind_rng.sample(PG_TABLES, kind_rng.randint(1, len(PG_TABLES))))

    counter = iter(range(1000))

    class Pg:
        def __init__(self, kind: str, length: float):
            self.kind, self.length = kind, length
            self.lock: PgTableLock | None = None

        async def __aenter__(self) -> str:
            if self.kind == "tablelock":
                locked = tables(random.Random(f"{SEED}:{DB}:tables:{next(counter)}"))
                self.lock = PgTableLock(pg_conninfo(database_url), locked)
                await asyncio.to_thread(self.lock.hold, self.length + 5)
                return f"ACCESS EXCLUSIVE on {','.join(locked)} {self.length:.2f} s"
            await asyncio.to_thread(getattr(proxy, self.kind))  # refuse / drop / restart
            return f"proxy {self.kind} {self.length:.2f} s ({proxy.stats()})"

        async def __aexit__(self, *exc) -> None:
            if self.lock is not None:
                await asyncio.to_thread(self.lock.release)
            elif self.kind != "drop":
                await asyncio.to_thread(proxy.heal)

    return Pg


def run_suite(gateway, sim, engine, tenant, apply, kinds: tuple[str, ...]) -> None:
    print(f"db fault seed {SEED} (MESHRT_DB_FAULT_SEED), database {DB}")
    who = _tag()
    plan = schedule(kinds)
    print(f"{who} plan: {[(round(o, 2), k, round(n, 2)) for o, k, n in plan]}")
    start = balance(engine, tenant.account_id)
    ledger_before = ledger_totals(engine, tenant.account_id)
    clients = Clients(gateway.ws_url, tenant.key)
    faults: list[Fault] = []
    began = time.monotonic()

    run(clients.run(lambda c: drive_faults(c, plan, apply, gateway, faults)), LIVE_BUDGET_S + 45)
    live_s = time.monotonic() - began
    for fault in faults:
        print(
            f"{who}   +{fault.started - began:5.1f}..{fault.ended - began:5.1f} s {fault.detail} "
            f"closed {len(fault.closed)}"
        )
    assert gateway.proc.poll() is None, f"{who} the supervisor exited ({gateway.proc.returncode})\n{_log_tail(gateway)}"

    # healed: ready again, and a new session is admitted at once and billed
    wait_for(lambda: http_status(f"{gateway.http_url}/readyz") == 200, 20, 0.1, f"{who} /readyz 200 after the faults")
    clients.stopping = False
    after = run(clients.one_session("after-heal", 2), 40)
    assert after is not None and not after.lost, (
        f"{who} no session admitted after the faults healed: refusals {clients.refusals[-3:]}, "
        f"failures {clients.failures[-3:]}\n{_log_tail(gateway)}"
    )

    counts = check(clients, sim, engine, tenant, start, gateway)
    applied_n, applied_cost, entries_n, entries_amount = (
        now - before for now, before in zip(ledger_totals(engine, tenant.account_id), ledger_before)
    )
    debit = start - balance(engine, tenant.account_id)
    assert applied_cost == debit and entries_amount == -debit and entries_n == applied_n, (
        f"{who} ledger: {applied_n} increments costing {Money(applied_cost)}, {entries_n} entries of "
        f"{Money(-entries_amount)}, balance moved {Money(debit)}"
    )

    # what the faults hit
    outages = [f for f in faults if f.outage]
    counts["faults"] = Counter(f.kind for f in faults)
    counts["ended_during_an_outage"] = sum(
        any(f.started <= c.ended_at <= f.ended for f in outages) for c in clients.conns
    )
    counts["spanning_a_fault"] = sum(
        any(c.connected_at < f.started and c.ended_at > f.ended for f in faults) for c in clients.conns
    )
    counts["responses_during_an_outage"] = sum(
        f.started < t < f.ended for c in clients.conns for t in c.done_at for f in outages
    )
    log_text = gateway.log_text()
    counts["ledger_write_failures"] = sum(
        log_text.count(f'"{m}') for m in ("ledger write failed", "ledger batch failed", "ledger batch abandoned")
    )
    counts["told_to_close"] = sum(c.told_to_close for c in clients.conns)
    counts["refusals"] = Counter(code for _, code, _ in clients.refusals)
    counts["live_s"] = round(live_s, 1)
    assert len(faults) == SEGMENTS, f"{who} faults {faults}"
    assert counts["responses_during_an_outage"] > 0, f"{who} no usage flowed while the database was out: {counts}"
    assert counts["ledger_write_failures"] > 0, f"{who} the faults never failed a ledger write: {counts}"
    assert clients.refusals, f"{who} the faults never refused an admission: {counts}"
    assert counts["ended_during_an_outage"] > 0, f"{who} no session ended while the database was out: {counts}"
    assert counts["told_to_close"] > 0, f"{who} no session closed as a fault started: {counts}"
    # admissions resume after every fault: some session got in before the next one began
    for i, fault in enumerate(faults):
        until = faults[i + 1].started if i + 1 < len(faults) else fault.ended + 10
        assert any(fault.ended < c.connected_at < until for c in clients.conns), (
            f"{who} no session admitted between the end of fault {i} ({fault.kind}, {fault.detail}) and "
            f"{'the next' if i + 1 < len(faults) else 'the end'}\n{_log_tail(gateway)}"
        )

    # no wedge: nothing left live in the supervisor, and SIGTERM still ends it cleanly
    wait_for(lambda: live_gauge(gateway) == 0, 10, 0.1, f"{who} the supervisor's live sessions to reach 0")
    log_text = gateway.log_text()
    for bad in ("supervisor failed", "front door exited", "Traceback"):
        assert bad not in log_text, f"{who} the gateway's log has {bad!r}\n{_log_tail(gateway)}"
    stopped = time.monotonic()
    code = _stop(gateway.proc, timeout=20)
    assert code == 0, f"{who} SIGTERM after the faults: exit {code}\n{_log_tail(gateway)}"
    print(f"{who} {counts} stop {time.monotonic() - stopped:.1f} s")


def check(clients: Clients, sim, engine, tenant, start_balance: int, gateway) -> dict:
    """Every record against the simulator; returns counts for the summary line."""
    who = _tag()
    lost = [(c.tag, c.lost) for c in clients.conns if c.lost]
    assert not lost, f"{who} connections broke during database faults: {lost}\n{_log_tail(gateway)}"
    odd = [r for r in clients.refusals if r[1:] != ("service_unavailable", 1013)]
    assert not odd, f"{who} refusals other than service_unavailable/1013: {odd}\n{_log_tail(gateway)}"
    handshakes = [
        f
        for f in clients.failures
        if "InvalidHandshake" in f[1] or "InvalidStatus" in f[1] or "after the refusal" in f[1]
    ]
    assert not handshakes, f"{who} upgrades answered without the error frame: {handshakes}"

    rows = final_records(engine, tenant.account_id, RECORD_WAIT_S, who, lambda: _log_tail(gateway))
    by_request = records_by_request(rows)
    reports = sim_reports(sim)
    counts = {
        "sessions": len(clients.conns),
        "attempts": len(clients.attempts),
        "cut_short": 0,
        "responses": 0,
        "records_without_session": 0,
        "attempt_failures": len(clients.failures),
    }

    for conn in clients.conns:
        what = f"{who} session {conn.tag} ({conn.request_id})"
        row, sent = session_report(conn, by_request, reports, what)
        counts["responses"] += row.responses
        counts["cut_short"] += conn.cut_short
        assert (row.end_reason, row.close_code) == ("client_closed", 1000), (
            f"{what}: end {row.end_reason}/{row.close_code}"
        )
        usage, cost, responses = expected_from(sent, row.rates)
        assert row.responses == responses == len(sent), (
            f"{what}: record has {row.responses} responses, the simulator sent {len(sent)}\n{_log_tail(gateway)}"
        )
        assert same_usage(row.usage, usage), f"{what}: record usage {row.usage} != simulator's {usage}"
        assert row.cost_pico == cost, f"{what}: record cost {row.cost_pico} != simulator's {cost}"
        assert row.cost_pico > 0 or not sent, f"{what}: nothing billed"
        assert row.amended_at is None, f"{what}: amended at {row.amended_at} (no node was lost)"

    check_unbilled_attempts(rows, {c.tag: c.request_id for c in clients.conns}, clients.attempts, reports, who, counts)
    check_debits(engine, tenant.account_id, start_balance, rows, who)
    wait_for(lambda: not spool_files(gateway), 10, 0.1, f"{who} the spool dir to empty: {spool_files(gateway)}")
    assert counts["sessions"] >= SLOTS and counts["responses"] > 0, f"{who} too little traffic: {counts}"
    return counts


@pytest.mark.slow
@pytest.mark.skipif(ON_PG, reason=f"the database in use is PostgreSQL ({PG_ENV}): its faults are another test")
def test_sqlite_locked_at_random_bills_exactly_and_nothing_sticks(
    db_gateway, db_sim, make_tenant, engine, database_url
):
    """SQLite: SEGMENTS times, at a seeded moment, another connection holds SQLite's write lock
    for 1.5–4 s (past the 1 s busy timeout), and a few running sessions close as it is taken.
    Admissions during a lock are refused with service_unavailable (1013) and retried by the
    clients; live sessions go on and spool; every failed ledger write is retried. Afterwards
    every session's record equals the simulator's report exactly, the balance moved by the sum of
    the records, the ledger has one entry per applied increment, no row is left granted/live, the
    spool dir is empty, /readyz is 200, a new session is admitted at once and billed, the
    supervisor never exited and SIGTERM still ends it with 0."""
    tenant = make_tenant(max_concurrent_sessions=100)
    run_suite(db_gateway, db_sim, engine, tenant, sqlite_faults(database_url), ("lock",))


@pytest.mark.slow
@pytest.mark.skipif(not ON_PG, reason=f"PostgreSQL faults need {PG_ENV} (the SQLite run has its own test)")
def test_postgresql_refused_dropped_and_locked_at_random_bills_exactly_and_nothing_sticks(
    db_gateway, db_sim, make_tenant, engine, database_url, pg_proxy
):
    """PostgreSQL: SEGMENTS times, at a seeded moment, one of: the proxy refuses new connections
    (`refuse`), resets every open one (`drop`), both (`restart`) for 1.5–4 s, or ACCESS EXCLUSIVE
    locks on a seeded subset of account / appliedincrement / realtime_session / ledgerentry are
    held that long (lock and statement timeouts of 1 s); a few running sessions close as it
    starts. The same checks as on SQLite."""
    tenant = make_tenant(max_concurrent_sessions=100)
    run_suite(db_gateway, db_sim, engine, tenant, pg_faults(database_url, pg_proxy), PG_KINDS)


# --- focused tests ----------------------------------------------------------------------------


def test_outage_refuses_upgrades_and_api_with_service_unavailable_then_recovers(
    db_gateway, db_sim, make_tenant, engine, database_url, pg_proxy
):
    """With the database out of reach (SQLite: write lock held; PostgreSQL: refused and dropped),
    an upgrade gets the `service_unavailable` error event and close 1013 (and no row, no upstream
    connection), `/v1/usage` 503 JSON `service_unavailable` with Retry-After, `/readyz` 503 naming
    the database; once it returns, all three recover and a session is billed exactly."""
    who = _tag("focused=refusal")
    gateway, tenant = db_gateway, make_tenant()
    start = balance(engine, tenant.account_id)
    auth = {"Authorization": f"Bearer {tenant.key}"}
    assert http_status(f"{gateway.http_url}/v1/usage", headers=auth) == 200
    down_tag = f"{SEED}-{DB}-down"
    with outage(database_url, pg_proxy) as what:
        event, code, reason = run(expect_refusal(gateway.ws_url, key=tenant.key, query=f"fault_tag={down_tag}"), 30)
        assert event["type"] == "error" and event["error"]["code"] == "service_unavailable", f"{who} {what}: {event}"
        assert event["error"]["type"] == "server_error", f"{who} {event}"
        assert (code, reason) == (1013, "server_error.service_unavailable"), f"{who} {what}: close {code} {reason!r}"
        refused_request = event["request_id"]

        usage = httpx.get(f"{gateway.http_url}/v1/usage", headers=auth, timeout=15)
        assert usage.status_code == 503, f"{who} {what}: /v1/usage {usage.status_code} {usage.text[:300]}"
        assert usage.json()["error"]["code"] == "service_unavailable", f"{who} {usage.text[:300]}"
        assert usage.headers.get("retry-after"), f"{who} /v1/usage 503 without Retry-After: {dict(usage.headers)}"

        ready = httpx.get(f"{gateway.http_url}/readyz", timeout=15)
        assert ready.status_code == 503, f"{who} {what}: /readyz {ready.status_code} {ready.text[:300]}"
        assert "database" in ready.json()["error"]["message"], f"{who} /readyz {ready.text[:300]}"
        assert gateway.proc.poll() is None, f"{who} the supervisor exited\n{_log_tail(gateway)}"

    wait_for(lambda: http_status(f"{gateway.http_url}/readyz") == 200, 20, 0.1, f"{who} /readyz 200 after the outage")
    assert http_status(f"{gateway.http_url}/v1/usage", headers=auth) == 200, f"{who} /v1/usage after the outage"
    assert session_record(engine, refused_request) is None, f"{who} the refused upgrade left a row"

    clients = Clients(gateway.ws_url, tenant.key)
    conn = run(clients.one_session("after", 2), 40)
    assert conn is not None and not conn.lost, (
        f"{who} not admitted after the outage: {clients.refusals} {clients.failures}\n{_log_tail(gateway)}"
    )
    row = ended_record(engine, conn.request_id, RECORD_WAIT_S)
    reports = sim_reports(db_sim)
    assert down_tag not in reports, f"{who} the refused upgrade reached the simulator"
    usage, cost, responses = expected_from(reports[conn.tag][0], row.rates)
    assert (row.end_reason, row.close_code) == ("client_closed", 1000), f"{who} end {row.end_reason}/{row.close_code}"
    assert row.responses == responses == 2, f"{who} record {row.responses} responses, simulator {responses}"
    assert same_usage(row.usage, usage) and row.cost_pico == cost > 0, f"{who} record {row.usage} {row.cost_pico}"
    assert start - balance(engine, tenant.account_id) == cost, f"{who} balance moved by other than the record"


def test_session_ending_during_outage_is_billed_once_the_database_returns(
    db_gateway, db_sim, make_tenant, engine, database_url, pg_proxy
):
    """A session whose last responses happen, and whose client closes, while the database is out
    of reach (SQLite: write lock; PostgreSQL: refused and dropped): its spool (under
    `<state_dir>/spool/`) keeps every increment and the end while the outage lasts and its row
    stays live with only what was committed before; once the database returns its record is
    written exactly (the simulator's report, once) and the spool file is removed."""
    who = _tag("focused=end-in-outage")
    gateway, tenant = db_gateway, make_tenant()
    start = balance(engine, tenant.account_id)
    tag = f"{SEED}-{DB}-ends-down"

    async def before() -> tuple:
        ws = await connect_ws(
            gateway.ws_url, key=tenant.key, query=f"sim_pace=1&sim_response_ms={RESPONSE_MS}&fault_tag={tag}"
        )
        assert (await recv_json(ws))["type"] == "session.created"
        for _ in range(2):
            await ws.send(json.dumps({"type": "response.create"}))
            await recv_until(ws, "response.done", 20)
        return ws, ws.response.headers["x-request-id"]

    async def during(ws) -> None:
        await ws.send(json.dumps({"type": "response.create"}))
        await recv_until(ws, "response.done", 20)
        await ws.send(json.dumps({"type": "response.create"}))  # closed with this one in flight
        await asyncio.sleep(RESPONSE_MS / 1000 / 2)
        await ws.close()

    loop = asyncio.new_event_loop()
    try:
        ws, request_id = loop.run_until_complete(asyncio.wait_for(before(), 30))
        session_id = wait_for(
            lambda: (
                (r := session_record(engine, request_id)) is not None
                and r.state == "live"
                and row_state_direct(database_url, r.id)[1] == 2
                and r.id
            ),
            10,
            0.05,
            f"{who} the first two increments committed",
        )
        file = spool.path(gateway.state_dir / "spool", session_id)
        with outage(database_url, pg_proxy) as what:
            loop.run_until_complete(asyncio.wait_for(during(ws), 30))
            wait_for(lambda: spool.read(file).end is not None, 10, 0.05, f"{who} the end in the spool")
            time.sleep(2.5)  # a few of the supervisor's retries fail meanwhile
            held = spool.read(file)
            assert file.exists() and held.end == spool.SpoolEnd("client_closed", 1000), f"{who} {what}: {held}"
            assert len(held.increments) >= 3, f"{who} {what}: spool {sorted(held.increments)}"
            state, applied = row_state_direct(database_url, session_id)
            assert (state, applied) == ("live", 2), f"{who} {what}: row {state} with {applied} increments"
            assert gateway.proc.poll() is None, f"{who} the supervisor exited\n{_log_tail(gateway)}"
    finally:
        loop.close()

    row = ended_record(engine, request_id, RECORD_WAIT_S)
    wait_for(lambda: not file.exists(), 10, 0.05, f"{who} the spool file removed after the record")
    sent = sim_reports(db_sim)[tag]
    assert len(sent) == 1, f"{who} simulator connections {len(sent)}"
    usage, cost, responses = expected_from(sent[0], row.rates)
    assert (row.end_reason, row.close_code) == ("client_closed", 1000), f"{who} end {row.end_reason}/{row.close_code}"
    assert row.responses == responses == len(held.increments), (
        f"{who} record {row.responses} responses, simulator {responses}, spool {len(held.increments)}"
    )
    assert same_usage(row.usage, usage), f"{who} record usage {row.usage} != simulator's {usage}"
    assert row.cost_pico == cost, f"{who} record cost {row.cost_pico} != simulator's {cost}"
    assert start - balance(engine, tenant.account_id) == cost, f"{who} balance moved by other than the record"
    applied, applied_cost, entries, amount = ledger_totals(engine, tenant.account_id)
    assert (applied, applied_cost, entries, amount) == (responses, cost, responses, -cost), (
        f"{who} ledger {applied} increments {applied_cost}, {entries} entries {amount}"
    )
    assert spool_files(gateway) == [], f"{who} spools left: {spool_files(gateway)}"
    wait_for(lambda: http_status(f"{gateway.http_url}/readyz") == 200, 20, 0.1, f"{who} /readyz 200 after the outage")
