"""Nodes and leases with real processes: two gateways ("nodes" A and B) on one host, one
database and one simulator, each with its own state dir (so its own node id and lease).

Records are checked the way tests/test_faults.py checks them: every client connection carries a
unique `fault_tag` query parameter that the gateway forwards upstream, so the simulator's own
frame log of that connection is found by the tag, and a record must equal the `response.done`
events the simulator sent on it (usage field by field, cost under the record's rates) — all of
them, or, for a session whose usage was only partly committed when its node died and never came
back, exactly the first `responses` of them.

Leases are short here (MESHRT_NODE_LEASE_S 2 s; 16 s where a supervisor must be back within half of it, which
costs no time; renewed every quarter of the lease).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime
from datetime import timezone
from typing import NamedTuple

import psutil
import pytest
from conftest import session_record
from conftest import wait_for
from realtime_client import connect_ws
from realtime_client import recv_json
from realtime_client import run
from simlog import balance
from simlog import expected_from
from simlog import same_usage
from simlog import sim_reports
from sqlalchemy import create_engine
from sqlalchemy import func
from sqlmodel import Session
from sqlmodel import select
from websockets.exceptions import ConnectionClosed
from websockets.exceptions import InvalidHandshake

from meshrt.shared import spool
from meshrt.shared.errors import ERRORS
from meshrt.shared.money import Money
from meshrt.storage import accounts
from meshrt.storage.db import AppliedIncrement
from meshrt.storage.db import Node
from meshrt.storage.db import SessionRecord

LEASE_S = 2.0  # node lease for the tests where a node is lost
RESTART_LEASE_S = 16  # workers wait half of it for their supervisor: a restart under load takes up to ~4 s
PACED = "sim_pace=1&sim_response_ms=200"  # usage flows for a while: kills land mid-response
QUICK = "sim_response_ms=100"  # a response is over in a few ms


# --- clients ----------------------------------------------------------------------------------


class Refused(Exception):
    def __init__(self, tag: str, code: str | None):
        super().__init__(f"{tag}: refused with {code}")
        self.tag, self.code = tag, code


@dataclass
class Client:
    """One admitted session. A reader task takes every event as it arrives (so an error event is
    seen when it comes even while a send waits on a closing connection); `respond` sends."""

    tag: str
    node: str  # "A" or "B": where it was admitted
    ws: object = field(repr=False)
    request_id: str
    opened_at: float  # session.created received
    usages: list = field(default_factory=list)  # usage of each response.done received, in order
    done_at: list = field(default_factory=list)  # when each response.done arrived (monotonic)
    errors: list = field(default_factory=list)  # error events received
    error_at: float | None = None  # the first error event
    closed_at: float | None = None  # the connection closed (websockets: the close handshake and TCP)
    close_code: int | None = None
    close_reason: str | None = None
    closed_by_us: bool = False
    recent: deque = field(default_factory=lambda: deque(maxlen=8), repr=False)  # (monotonic, what)
    changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    reader: asyncio.Task | None = field(default=None, repr=False)

    @property
    def connected(self) -> bool:
        """The session is open for the client: no error event (the gateway's last word), no close."""
        return self.error_at is None and self.closed_at is None

    @property
    def ended_at(self) -> float | None:
        return min((t for t in (self.error_at, self.closed_at) if t is not None), default=None)

    def history(self, since: float) -> list[tuple[float, str]]:
        return [(round(t - since, 3), what) for t, what in self.recent]

    async def read(self) -> None:
        try:
            while True:
                event = json.loads(await self.ws.recv())
                now = time.monotonic()
                self.recent.append((now, event["type"]))
                if event["type"] == "response.done":
                    self.usages.append(event["response"]["usage"])
                    self.done_at.append(now)
                elif event["type"] == "error":
                    self.errors.append(event)
                    self.error_at = self.error_at or now
                self.changed.set()
        except ConnectionClosed:
            self.closed_at = time.monotonic()
            self.close_code, self.close_reason = self.ws.close_code, self.ws.close_reason
            self.recent.append((self.closed_at, f"closed {self.close_code}"))
            self.changed.set()


def new_run_id() -> str:
    return secrets.token_hex(4)


async def open_client(gw, key: str, tag: str, node: str, query: str = PACED) -> Client:
    """Connect and read session.created; raises Refused with the error code otherwise."""
    try:
        ws = await asyncio.wait_for(connect_ws(gw.ws_url, key=key, query=f"{query}&fault_tag={tag}"), 10)
    except (OSError, asyncio.TimeoutError, InvalidHandshake) as exc:
        raise Refused(tag, f"connect failed: {type(exc).__name__}") from exc
    try:
        first = await recv_json(ws, 10)
    except (ConnectionClosed, asyncio.TimeoutError) as exc:
        await ws.close()
        raise Refused(tag, f"no first event: {type(exc).__name__}") from exc
    if first.get("type") != "session.created":
        await ws.close()
        raise Refused(tag, first.get("error", {}).get("code", first.get("type")))
    c = Client(tag, node, ws, ws.response.headers["x-request-id"], time.monotonic())
    c.reader = asyncio.create_task(c.read())
    return c


async def respond(c: Client, timeout: float = 20) -> bool:
    """One response.create → its response.done; False if the session ended or an error event
    (a refusal) answered instead."""
    before, errors = len(c.usages), len(c.errors)
    if not c.connected:
        return False
    try:
        await c.ws.send(json.dumps({"type": "response.create"}))
    except ConnectionClosed:
        return False
    async with asyncio.timeout(timeout):
        while len(c.usages) == before and len(c.errors) == errors and c.connected:
            c.changed.clear()
            await c.changed.wait()
    return len(c.usages) > before


async def drive(c: Client, stop: asyncio.Event, pause: float = 0.05) -> None:
    """Responses one after another until told to stop or the session ends."""
    while not stop.is_set() and c.connected:
        if not await respond(c):
            return
        await asyncio.sleep(pause)


async def wait_end(c: Client, timeout: float) -> None:
    """Wait (bounded) until the connection has closed."""
    await asyncio.wait({c.reader}, timeout=timeout)


async def close(c: Client) -> None:
    if c.closed_at is None:  # open, even after an error event (an in-band refusal keeps it open)
        c.closed_by_us = True
        await c.ws.close()
    await asyncio.wait({c.reader}, timeout=10)


async def until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# --- database ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reads(database_url, engine):
    """The engine for the tests' polling reads. On SQLite a plain one: the gateway's engine
    begins every transaction IMMEDIATE (the write lock), and a test polling through it every few
    ms would compete with the gateways' writers; a plain WAL reader never blocks them."""
    if not database_url.startswith("sqlite"):
        yield engine
        return
    plain = create_engine(database_url, connect_args={"check_same_thread": False})
    yield plain
    plain.dispose()


def row_of(engine, c: Client) -> SessionRecord:
    row = session_record(engine, c.request_id)
    assert row is not None, f"{c.tag}: no record"
    return row


def applied(engine, session_id: str) -> int:
    with Session(engine) as db:
        return db.exec(
            select(func.count()).select_from(AppliedIncrement).where(AppliedIncrement.session_id == session_id)
        ).one()


def node_row(engine, node_id: str) -> Node:
    with Session(engine, expire_on_commit=False) as db:
        row = db.get(Node, node_id)
        assert row is not None, f"no node row {node_id}"
        db.expunge(row)
        return row


def open_rows(engine, account_id: str) -> int:
    """The account's sessions that count against its limit (granted/live, any node)."""
    return accounts.open_sessions(engine, account_id)


def wait_committed(engine, clients: list[Client], timeout: float = 15) -> None:
    """Every response each client received has its increment committed in the database."""
    for c in clients:
        session_id = row_of(engine, c).id
        wait_for(
            lambda session_id=session_id, c=c: applied(engine, session_id) >= len(c.usages),
            timeout,
            0.05,
            f"{c.tag}: {len(c.usages)} increments committed",
        )


def wait_ended(engine, clients: list[Client], timeout: float = 30) -> dict[str, SessionRecord]:
    def ended():
        rows = {c.tag: session_record(engine, c.request_id) for c in clients}
        return rows if all(r is not None and r.state == "ended" for r in rows.values()) else None

    return wait_for(ended, timeout, 0.1, f"the records of {[c.tag for c in clients]}")


def node_id_of(gw) -> str:
    return (gw.state_dir / "node_id").read_text().strip()


class TwoNodes(NamedTuple):
    """Node B started first (so it is the one eligible to judge A), then node A; an account."""

    tenant: object
    a: object
    b: object
    b_started: float  # monotonic: B may judge A a full lease after this
    node_a: str
    start_balance: int
    rid: str


def two_nodes(gateway_factory, make_tenant, engine, limit: int, lease: float) -> TwoNodes:
    tenant = make_tenant(max_concurrent_sessions=limit)
    b = gateway_factory(MESHRT_NODE_LEASE_S=lease)
    b_started = time.monotonic()
    a = gateway_factory(MESHRT_NODE_LEASE_S=lease)
    return TwoNodes(tenant, a, b, b_started, node_id_of(a), balance(engine, tenant.account_id), new_run_id())


# --- the simulator's report -------------------------------------------------------------------


def sent_by_sim(sim, tag: str) -> list[bytes]:
    """The response.done payloads the simulator sent on the one connection with this tag."""
    found = sim_reports(sim).get(tag, [])
    assert len(found) == 1, f"{tag}: {len(found)} simulator connections"
    return found[0]


def assert_record_is(row: SessionRecord, payloads: list[bytes], what: str) -> None:
    usage, cost, responses = expected_from(payloads, row.rates)
    assert row.responses == responses == len(payloads), f"{what}: {row.responses} responses, expected {responses}"
    assert same_usage(row.usage, usage), f"{what}: record usage {row.usage} != simulator's {usage}"
    assert row.cost_pico == cost, f"{what}: record cost {row.cost_pico} != simulator's {cost}"


def assert_exact(sim, row: SessionRecord, c: Client, *, committed_only: bool = False) -> list[bytes]:
    """The record equals what the simulator sent on c's connection (or, committed_only, the first
    row.responses of it), and the client got the simulator's usage, in order."""
    sent = sent_by_sim(sim, c.tag)
    relayed = [json.loads(p)["response"]["usage"] for p in sent[: len(c.usages)]]
    assert c.usages == relayed, f"{c.tag}: the client's response.done usage is not the simulator's, in order"
    if committed_only:
        assert row.responses <= len(sent), f"{c.tag}: billed {row.responses}, the simulator sent {len(sent)}"
        sent = sent[: row.responses]
    assert_record_is(row, sent, c.tag)
    return sent


# --- processes --------------------------------------------------------------------------------


def kill_supervisor(gw) -> float:
    os.kill(gw.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    gw.proc.wait(10)
    return killed_at


def kill_node(gw) -> tuple[float, list]:
    """SIGKILL the supervisor and every process under it (front door, zygote, workers). Returns
    when, and the processes under it: not ours to reap, so waiting for them to be gone takes a
    while (their new parent reaps them) and is left to the caller, off the event loop."""
    children = gw.children()
    os.kill(gw.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    gw.proc.wait(10)
    return killed_at, children


def log_events(gw, event: str) -> list[dict]:
    out = []
    for line in gw.log_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == event:
            out.append(entry)
    return out


def log_time(entry: dict) -> float:
    """A log line's time (epoch seconds)."""
    return datetime.strptime(entry["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def wait_eligible_to_judge(gw_started_at: float, lease: float) -> None:
    """A node judges others only after holding its own lease a full period (+ one renewal)."""
    left = gw_started_at + lease + lease / 4 + 0.2 - time.monotonic()
    if left > 0:
        time.sleep(left)


# --- 1. supervisor killed and back within the lease ------------------------------------------


def test_supervisor_killed_and_back_within_the_lease_loses_nothing_and_keeps_its_node(
    gateway_factory, make_tenant, engine, reads, sim
):
    """SIGKILL A's supervisor while A and B have live sessions with usage flowing; restart A on
    its state dir at once (well within the lease). A's workers re-attach and their sessions go
    on, B's sessions never notice; no row is ended node_lost; every record equals the
    simulator's frame log; the balance moved by the sum of the records' costs; A keeps its
    node id (state dir file and rows) and its lease row (a new incarnation, still up)."""
    lease = RESTART_LEASE_S
    tenant = make_tenant(max_concurrent_sessions=10)
    a = gateway_factory(MESHRT_NODE_LEASE_S=lease)
    b = gateway_factory(MESHRT_NODE_LEASE_S=lease)
    node_a, node_b = node_id_of(a), node_id_of(b)
    assert node_a != node_b
    incarnation = node_row(engine, node_a).incarnation
    start = balance(engine, tenant.account_id)
    rid = new_run_id()
    timings = {}

    async def go():
        clients = [
            await open_client(gw, tenant.key, f"n1-{rid}-{name}{i}", name)
            for gw, name in ((a, "A"), (b, "B"))
            for i in range(2)
        ]
        stop = asyncio.Event()
        drivers = [asyncio.create_task(drive(c, stop)) for c in clients]
        await until(lambda: all(len(c.usages) >= 2 for c in clients), 20, "usage on every session")
        timings["killed_wall"] = time.time()
        killed_at = timings["killed_at"] = kill_supervisor(a)
        before = {c.tag: len(c.usages) for c in clients}
        a2 = await asyncio.to_thread(gateway_factory, None, a.state_dir, MESHRT_NODE_LEASE_S=lease)
        timings["ready_s"] = round(time.monotonic() - killed_at, 2)
        # A's sessions went on while unsupervised and go on now; B's never stopped
        await until(lambda: all(len(c.usages) >= before[c.tag] + 3 for c in clients), 30, "usage after the restart")
        stop.set()
        await asyncio.wait_for(asyncio.gather(*drivers), 25)
        for c in clients:
            await close(c)
        return clients, a2

    clients, a2 = run(go(), 55)
    reattached = {
        e.get("session_id"): log_time(e) - timings["killed_wall"] for e in log_events(a2, "worker re-attached")
    }
    print(
        f"A's supervisor back and ready {timings['ready_s']} s after the SIGKILL; its workers re-attached after "
        f"{sorted(round(t, 2) for t in reattached.values())} s (lease {lease} s)"
    )
    for c in clients:
        assert c.closed_by_us and not c.errors, f"{c.tag}: ended by the gateway: {c.errors} {c.close_code}"
    rows = wait_ended(reads, clients)
    total = 0
    for c in clients:
        row = rows[c.tag]
        assert (row.end_reason, row.close_code, row.amended_at) == ("client_closed", 1000, None), (
            f"{c.tag}: {row.end_reason}/{row.close_code} amended {row.amended_at}"
        )
        assert row.node == {"A": node_a, "B": node_b}[c.node], f"{c.tag}: node {row.node}"
        assert_exact(sim, row, c)
        total += row.cost_pico
    assert start - balance(engine, tenant.account_id) == total > 0
    # A is the same node, back: same id in its state dir, same lease row, a newer incarnation
    assert node_id_of(a2) == node_a
    after = node_row(engine, node_a)
    assert (after.state, after.incarnation) == ("up", incarnation + 1)
    assert node_row(engine, node_b).state == "up"
    ids_a = {rows[c.tag].id for c in clients if c.node == "A"}
    assert ids_a <= set(reattached), f"not re-attached: {ids_a - set(reattached)}"
    assert all(reattached[i] < lease for i in ids_a), f"re-attached after the lease: {reattached}"
    back = timings["killed_at"] + min(reattached[i] for i in ids_a)  # usage that only the spools had
    unsupervised = {c.tag: sum(timings["killed_at"] < t < back for t in c.done_at) for c in clients if c.node == "A"}
    print(f"responses completed on A while it had no supervisor: {unsupervised}")
    assert sum(unsupervised.values()) > 0, "no usage flowed on A while its supervisor was down"
    judged = [
        e for e in log_events(b, "node lost: its lease expired; its sessions were ended") if e.get("node") == node_a
    ]
    assert not judged, f"B judged A lost: {judged}"


# --- 2. a whole node dies: its account's slots are freed within about a lease -----------------


def test_a_dead_node_frees_its_sessions_slots_within_about_a_lease(gateway_factory, make_tenant, engine, reads, sim):
    """An account at its limit (2) with both sessions on A, each with committed usage. B refuses
    the account (too_many_sessions). SIGKILL every process of node A; it never comes back.
    B declares A lost just after A's lease expired (B judges then, not only every lease/4): B
    then admits the account again. The lock-out, from the kill to B's admission, stays under the
    lease plus slack for the judging transaction and the client's retries. A's rows end node_lost
    with exactly the committed usage (the simulator's log of each connection: no response was in
    flight at the kill)."""
    lease, limit = LEASE_S, 2
    tenant, a, b, b_started, node_a, start, rid = two_nodes(gateway_factory, make_tenant, engine, limit, lease)
    bound = lease + 0.5  # A's lease ends at most a lease after the kill; slack: a transaction, retries, 2 CPUs

    async def go():
        on_a = [await open_client(a, tenant.key, f"n2-{rid}-A{i}", "A", QUICK) for i in range(limit)]
        for c in on_a:
            assert await respond(c) and await respond(c)
        await asyncio.to_thread(wait_committed, reads, on_a)
        try:
            await open_client(b, tenant.key, f"n2-{rid}-before", "B", QUICK)
            raise AssertionError("B admitted a session over the account's limit")
        except Refused as refused:
            assert refused.code == "too_many_sessions", refused
        await asyncio.to_thread(wait_eligible_to_judge, b_started, lease)
        killed_at, killed = kill_node(a)
        refusals, attempt = [], 0
        while True:
            attempt += 1
            try:
                c = await open_client(b, tenant.key, f"n2-{rid}-B{attempt}", "B", QUICK)
                break
            except Refused as refused:
                refusals.append(refused.code)
            assert time.monotonic() - killed_at < bound + 5, f"still locked out; refusals {refusals}"
            await asyncio.sleep(0.05)
        lockout = c.opened_at - killed_at
        _, alive = await asyncio.to_thread(psutil.wait_procs, killed, 10)
        assert not alive, f"node A's processes still running: {alive}"
        assert await respond(c)
        await close(c)
        for old in on_a:
            await wait_end(old, 10)
        return on_a, c, lockout, refusals

    on_a, on_b, lockout, refusals = run(go(), 55)
    print(
        f"account locked out {lockout:.2f} s after node A died (lease {lease} s, bound {bound} s); "
        f"{len(refusals)} refusals"
    )
    assert refusals and set(refusals) == {"too_many_sessions"}, refusals
    assert lockout <= bound, f"locked out {lockout:.2f} s > {bound} s"
    rows = wait_ended(reads, [*on_a, on_b])
    for c in on_a:
        row = rows[c.tag]
        assert (row.end_reason, row.node, row.amended_at) == ("node_lost", node_a, None), (
            f"{c.tag}: {row.end_reason} on {row.node}, amended {row.amended_at}"
        )
        assert row.responses == 2
        assert_exact(sim, row, c)
    assert (rows[on_b.tag].end_reason, rows[on_b.tag].close_code) == ("client_closed", 1000)
    assert_exact(sim, rows[on_b.tag], on_b)
    assert node_row(engine, node_a).state == "lost"
    assert start - balance(engine, tenant.account_id) == sum(r.cost_pico for r in rows.values())
    lost = [
        e for e in log_events(b, "node lost: its lease expired; its sessions were ended") if e.get("node") == node_a
    ]
    assert [e.get("sessions") for e in lost] == [limit], lost


# --- 3. a lost node comes back with usage only its spools hold --------------------------------


def test_a_lost_node_back_amends_the_records_with_its_spools(gateway_factory, make_tenant, engine, reads, sim):
    """A's supervisor is SIGKILLed; its workers go on and their responses are billed to the
    spools only; then the workers are SIGKILLed too (spools stay on disk). B declares A lost:
    the rows end node_lost with only what was committed. A restarts on its state dir: its spools
    amend those records (amended_at set, end_reason kept), which then equal the simulator's
    logs exactly, and the balance moved by exactly the records' costs (nothing twice)."""
    lease = LEASE_S
    tenant, a, _b, b_started, node_a, start, rid = two_nodes(
        gateway_factory, make_tenant, engine, 10, lease
    )  # B reaps A

    async def go():
        on_a = [await open_client(a, tenant.key, f"n3-{rid}-A{i}", "A", QUICK) for i in range(2)]
        for c in on_a:
            assert await respond(c)
        await asyncio.to_thread(wait_committed, reads, on_a)
        sessions = {c.tag: row_of(engine, c) for c in on_a}
        workers = {p.pid: p for p in a.children()}
        victims = [workers[sessions[c.tag].pid] for c in on_a]  # the rows' pids, checked to be A's
        await asyncio.to_thread(wait_eligible_to_judge, b_started, lease)
        killed_at = kill_supervisor(a)
        for c in on_a:  # unsupervised: billed to the spool only
            assert await respond(c) and await respond(c)
        spent = time.monotonic() - killed_at
        assert spent < lease, f"the unsupervised responses took {spent:.2f} s, past the workers' fence"
        for victim in victims:
            victim.kill()
        psutil.wait_procs(victims, 10)
        for c in on_a:
            await wait_end(c, 10)
        return on_a, sessions

    on_a, sessions = run(go(), 40)
    for c in on_a:  # the spools hold all three responses; the database one
        held = spool.read(spool.path(a.state_dir / "spool", sessions[c.tag].id))
        assert len(held.increments) == 3 and held.end is None, (c.tag, held)
    lost = wait_ended(reads, on_a, 15)
    for c in on_a:
        row = lost[c.tag]
        assert (row.end_reason, row.amended_at, row.responses) == ("node_lost", None, 1), (
            f"{c.tag}: {row.end_reason} amended {row.amended_at}, {row.responses} responses"
        )
        assert_record_is(row, sent_by_sim(sim, c.tag)[:1], c.tag)
    assert node_row(engine, node_a).state == "lost"
    debit_when_lost = start - balance(engine, tenant.account_id)
    assert debit_when_lost == sum(r.cost_pico for r in lost.values())

    a2 = gateway_factory(state=a.state_dir, MESHRT_NODE_LEASE_S=lease)
    assert node_id_of(a2) == node_a

    def amended():
        rows = {c.tag: row_of(reads, c) for c in on_a}
        return rows if all(r.amended_at is not None for r in rows.values()) else None

    rows = wait_for(amended, 20, 0.1, "the records amended from A's spools")
    for c in on_a:
        row = rows[c.tag]
        assert (row.state, row.end_reason, row.node) == ("ended", "node_lost", node_a), c.tag
        assert row.responses == 3
        assert_exact(sim, row, c)
        assert not spool.path(a.state_dir / "spool", row.id).exists(), f"{c.tag}: spool kept after the amendment"
    assert start - balance(engine, tenant.account_id) == sum(r.cost_pico for r in rows.values())
    assert node_row(engine, node_a).state == "up"


# --- 4. a supervisor gone past the lease: its workers stop; the limit always holds -----------


@pytest.mark.slow
def test_workers_without_a_supervisor_stop_by_the_lease_and_the_limit_always_holds(
    gateway_factory, make_tenant, engine, reads, sim
):
    """An account at its limit (2), both sessions on A with usage flowing; two clients keep
    trying to get in through B (refused too_many_sessions). A's supervisor is SIGKILLed and not
    restarted; its workers keep relaying, then end their sessions with node_lost (error event,
    close 1012) about a lease after losing their supervisor. B declares A lost (rows node_lost,
    with exactly what was committed) and admits the two contenders. At every sample the account
    runs at most its limit: in the database (its granted/live rows, polled every 30 ms) and at
    the clients (sessions open: from session.created to the gateway's error event or the close,
    sampled every 10 ms and at each admission)."""
    lease, limit = LEASE_S, 2
    tenant, a, b, b_started, node_a, start, rid = two_nodes(gateway_factory, make_tenant, engine, limit, lease)
    db_samples: list[tuple[float, int]] = []
    sampling = threading.Event()

    def sample_db():
        while not sampling.is_set():
            db_samples.append((time.monotonic(), open_rows(reads, tenant.account_id)))
            time.sleep(0.03)

    sampler = threading.Thread(target=sample_db, daemon=True)
    sampler.start()
    client_samples: list[tuple[float, int, list[str]]] = []

    async def go():
        everyone: list[Client] = []

        def sample():
            live = [c.tag for c in everyone if c.connected]
            client_samples.append((time.monotonic(), len(live), live))

        on_a = [await open_client(a, tenant.key, f"n4-{rid}-A{i}", "A") for i in range(limit)]
        everyone += on_a
        stop = asyncio.Event()
        drivers = [asyncio.create_task(drive(c, stop)) for c in on_a]
        await until(lambda: all(len(c.usages) >= 1 for c in on_a), 15, "usage on A's sessions")
        await asyncio.to_thread(wait_committed, reads, on_a)
        await asyncio.to_thread(wait_eligible_to_judge, b_started, lease)

        refusals: list[str] = []
        admitted: list[Client] = []

        async def contend(index: int) -> None:
            attempt = 0
            while not stop.is_set():
                attempt += 1
                try:
                    c = await open_client(b, tenant.key, f"n4-{rid}-B{index}-{attempt}", "B")
                except Refused as refused:
                    refusals.append(refused.code)
                    await asyncio.sleep(0.03)
                    continue
                everyone.append(c)
                sample()  # the moment a contender is in
                admitted.append(c)
                await drive(c, stop)
                return

        async def sampler_task():
            while not stop.is_set():
                sample()
                await asyncio.sleep(0.01)

        sampling_task = asyncio.create_task(sampler_task())
        contenders = [asyncio.create_task(contend(i)) for i in range(limit)]
        await asyncio.sleep(0.5)
        assert not admitted, "B admitted a session over the account's limit while A was up"
        killed_wall = time.time()
        killed_at = kill_supervisor(a)
        await until(lambda: not any(c.connected for c in on_a), lease + 8, "A's sessions ended")
        await until(lambda: len(admitted) == limit, lease + 8, "B admitting the account's sessions")
        for c in admitted:  # some usage through B too
            await until(lambda c=c: len(c.usages) >= 1, 10, f"usage on {c.tag}")
        stop.set()
        await asyncio.wait_for(asyncio.gather(*drivers, *contenders, sampling_task), 25)
        for c in on_a:  # the close (bounded: a worker with no supervisor may hold the socket a while)
            await wait_end(c, lease + 12)
        for c in admitted:
            await close(c)
        return on_a, admitted, refusals, killed_at, killed_wall

    try:
        on_a, admitted, refusals, killed_at, killed_wall = run(go(), 58)
    finally:
        sampling.set()
        sampler.join(5)
    spec = ERRORS["node_lost"]

    def after(t):
        return None if t is None else round(t - killed_at, 2)

    error_after = {c.tag: after(c.error_at) for c in on_a}
    closed_after = {c.tag: after(c.closed_at) for c in on_a}
    admitted_after = {c.tag: after(c.opened_at) for c in admitted}
    lost_a = node_row(engine, node_a)  # its last renewal and lease expiry, on the database's clock
    print(
        f"A's supervisor SIGKILLed at 0; A's last lease renewal {lost_a.renewed_at - killed_wall:+.2f} s, "
        f"its expiry {lost_a.lease_expires - killed_wall:+.2f} s (lease {lease} s); B admitted {admitted_after}; "
        f"A's clients got node_lost at {error_after} and the close at {closed_after}"
    )
    for c in on_a:
        assert [e["error"]["code"] for e in c.errors] == ["node_lost"], f"{c.tag}: {c.errors}"
        assert (
            (c.close_code, c.close_reason)
            == (spec.close_code, "server_error.node_lost")
            == (1012, "server_error.node_lost")
        ), f"{c.tag}: close {c.close_code} {c.close_reason}"
    assert set(refusals) == {"too_many_sessions"}, refusals
    rows = wait_ended(reads, [*on_a, *admitted])
    for c in on_a:
        row = rows[c.tag]
        assert (row.end_reason, row.node, row.amended_at) == ("node_lost", node_a, None), c.tag
        assert row.responses >= 1
        assert_exact(sim, row, c, committed_only=True)  # what A's supervisor committed, no more
    for c in admitted:
        assert (rows[c.tag].end_reason, rows[c.tag].close_code) == ("client_closed", 1000), c.tag
        assert_exact(sim, rows[c.tag], c)
    assert node_row(engine, node_a).state == "lost"
    assert start - balance(engine, tenant.account_id) == sum(r.cost_pico for r in rows.values())

    over_db = [(round(t - killed_at, 2), n) for t, n in db_samples if n > limit]
    over_clients = [(round(t - killed_at, 2), n, tags) for t, n, tags in client_samples if n > limit]
    print(
        f"{len(db_samples)} database samples (max {max(n for _, n in db_samples)}), "
        f"{len(client_samples)} client samples (max {max(n for _, n, _ in client_samples)})"
    )
    problems = []
    if over_db:
        problems.append(f"granted/live rows over the limit {limit} at (s, count): {over_db[:5]}")
    if over_clients:
        problems.append(
            f"sessions open over the limit {limit} from {over_clients[0][0]} to {over_clients[-1][0]} s "
            f"(B admitted at {admitted_after}, A's sessions ended at {error_after}); "
            f"first samples (s, count, who): {over_clients[:2]}"
        )
    late_error = {tag: t for tag, t in error_after.items() if t is None or t > lease + 1.5}
    if late_error:
        problems.append(f"node_lost error events later than lease + 1.5 s: {late_error}")
    # the error frame and the close frame go out together; the client's close completes when the
    # worker has its close reply (at most MESHRT_DRAIN_USAGE_S, 2 s, for a cancelled response)
    late_close = {tag: t for tag, t in closed_after.items() if t is None or t > lease + 3.5}
    if late_close:
        problems.append(
            f"closes (TCP closed) later than lease + 3.5 s: {late_close}; their last events "
            f"(s): {[c.history(killed_at) for c in on_a if c.tag in late_close]}"
        )
    assert not problems, "; ".join(problems)


# --- 5. a top-up seen before a quota stop, across a supervisor restart -------------------------


def test_a_top_up_prevents_a_quota_stop_also_after_a_supervisor_restart(
    gateway_factory, make_tenant, engine, reads, sim
):
    """An account with $0.0001 (less than one response costs) is admitted and topped up to
        $10 at once; responses follow (the supervisor's estimate starts from the admission-time
        balance, and must re-read before stopping anything). Its supervisor is SIGKILLed, a response
        is made unsupervised (spool only), the supervisor is restarted on the same state dir (the
        spool is replayed), more responses: the sessions are never stopped for insufficient_quota,
        records are exact, and the balance moved by exactly the records' costs. A control account with
    the same $0.0001, not topped up, has its first response refused in-band (insufficient_quota:
    the balance cannot cover its reservation) and stays open until it closes."""
    lease = RESTART_LEASE_S
    tiny, topup = Money.from_usd("0.0001"), Money.from_usd("10")
    tenant = make_tenant(balance="0.0001", max_concurrent_sessions=10)
    control = make_tenant(balance="0.0001")  # the same, never topped up: it is stopped
    gw = gateway_factory(MESHRT_NODE_LEASE_S=lease)
    rid = new_run_id()

    async def go():
        clients = [await open_client(gw, tenant.key, f"n5-{rid}-{i}", "A", QUICK) for i in range(2)]
        stopped = await open_client(gw, control.key, f"n5-{rid}-control", "A", QUICK)
        await asyncio.to_thread(accounts.topup, engine, tenant.account_id, topup)
        assert not await respond(stopped)  # refused in-band; the session stays open
        await close(stopped)
        for _ in range(3):
            for c in clients:
                assert await respond(c), f"{c.tag}: {c.errors}"
        assert clients[0].usages[0]["total_tokens"] > 0
        killed_wall = time.time()
        kill_supervisor(gw)
        for c in clients:  # unsupervised: the spool only
            assert await respond(c), f"{c.tag}: {c.errors}"
        gw2 = await asyncio.to_thread(gateway_factory, None, gw.state_dir, MESHRT_NODE_LEASE_S=lease)
        await until(lambda: len(log_events(gw2, "worker re-attached")) >= len(clients), 10, "re-attachment")
        reattached = [round(log_time(e) - killed_wall, 2) for e in log_events(gw2, "worker re-attached")]
        print(f"workers re-attached {reattached} s after the SIGKILL (lease {lease} s)")
        assert all(t < lease for t in reattached), f"re-attached {reattached} s after the kill: past the lease"
        for _ in range(3):
            for c in clients:
                assert await respond(c), f"{c.tag}: {c.errors}"
            await asyncio.sleep(0.6)  # let balance refreshes and quota checks run in between
        for c in clients:
            await close(c)
        return clients, gw2, stopped

    clients, gw2, stopped = run(go(), 50)
    assert [e["error"]["code"] for e in stopped.errors] == ["insufficient_quota"], stopped.errors
    assert stopped.closed_by_us, (stopped.close_code, stopped.close_reason)
    control_row = wait_ended(reads, [stopped])[stopped.tag]
    assert (control_row.end_reason, control_row.responses, control_row.cost_pico) == ("client_closed", 0, 0)
    assert balance(engine, control.account_id) == tiny.picodollars
    assert_exact(sim, control_row, stopped)
    for c in clients:
        assert not c.errors and c.closed_by_us, f"{c.tag}: {c.errors} close {c.close_code} {c.close_reason}"
    rows = wait_ended(reads, clients)
    for c in clients:
        row = rows[c.tag]
        assert (row.end_reason, row.close_code) == ("client_closed", 1000), f"{c.tag}: {row.end_reason}"
        assert row.responses == 7
        assert_exact(sim, row, c)
        first_cost = expected_from(sent_by_sim(sim, c.tag)[:1], row.rates)[1]
        assert first_cost > tiny.picodollars, f"{c.tag}: one response should cost more than the initial balance"
    cost = sum(r.cost_pico for r in rows.values())
    assert balance(engine, tenant.account_id) == tiny.picodollars + topup.picodollars - cost
    stops = [
        line
        for line in gw.log_text().splitlines() + gw2.log_text().splitlines()
        if "insufficient_quota" in line and stopped.request_id not in line and control_row.id not in line
    ]
    assert not stops, stops[:5]


# --- 6. revocation reaches live sessions on every node ---------------------------------------


def test_revoking_a_key_or_deactivating_an_account_ends_its_live_sessions_on_both_nodes(
    gateway_factory, make_tenant, engine, reads, sim
):
    """Sessions with responses flowing on two nodes: revoking their key ends them on both nodes
    within a second or two (key_revoked, error frame and close 1008), billed exactly as the
    simulator sent, while a session of another key of the same account runs on. Deactivating the
    account then ends that one too (account_deactivated). A new connection with the key is refused."""
    tenant = make_tenant(max_concurrent_sessions=10)
    other = accounts.create_key(engine, tenant.account_id, "other")
    a, b = gateway_factory(), gateway_factory()
    start = balance(engine, tenant.account_id)
    rid = new_run_id()

    async def go():
        doomed = [
            await open_client(gw, tenant.key, f"r-{rid}-{n}{i}", n) for gw, n in ((a, "A"), (b, "B")) for i in range(2)
        ]
        kept = await open_client(a, other.plaintext, f"r-{rid}-kept", "A")
        stop = asyncio.Event()
        drivers = [asyncio.create_task(drive(c, stop)) for c in (*doomed, kept)]
        await until(lambda: all(len(c.usages) >= 2 for c in (*doomed, kept)), 20, "usage on every session")
        revoked_at = time.monotonic()
        await asyncio.to_thread(accounts.revoke_key, engine, tenant.key_id)
        await until(lambda: all(c.closed_at for c in doomed), 10, "the revoked key's sessions to close")
        took = [round(c.closed_at - revoked_at, 2) for c in doomed]
        served_after = len(kept.usages)
        await until(lambda: len(kept.usages) >= served_after + 2, 10, "the other key's session to go on")
        deactivated_at = time.monotonic()
        await asyncio.to_thread(accounts.set_active, engine, tenant.account_id, False)
        await until(lambda: kept.closed_at, 10, "the deactivated account's session to close")
        took_kept = round(kept.closed_at - deactivated_at, 2)
        stop.set()
        await asyncio.gather(*drivers, return_exceptions=True)
        return doomed, kept, took, took_kept

    doomed, kept, took, took_kept = run(go(), 60)
    print(f"revoked key's sessions closed {took} s after the revocation; deactivated account's {took_kept} s after")
    assert max(took) < 3 and took_kept < 3, (took, took_kept)
    for c, code in [*((c, "key_revoked") for c in doomed), (kept, "account_deactivated")]:
        assert [e["error"]["code"] for e in c.errors] == [code], c.errors
        assert (c.close_code, c.close_reason) == (1008, f"invalid_request_error.{code}")
    rows = wait_ended(reads, [*doomed, kept])
    assert {rows[c.tag].node for c in doomed} == {node_id_of(a), node_id_of(b)}
    for c in (*doomed, kept):
        assert rows[c.tag].end_reason == ("account_deactivated" if c is kept else "key_revoked")
        assert_exact(sim, rows[c.tag], c)
    assert balance(engine, tenant.account_id) == start - sum(r.cost_pico for r in rows.values())

    async def refused():  # a new connection with the revoked key: refused at the front door
        async with connect_ws(a.ws_url, key=tenant.key) as ws:
            return (await recv_json(ws))["error"]["code"]

    assert run(refused(), 15) == "invalid_api_key"
