"""Fault suite (the reliability issue): for each of worker, supervisor and front door, SIGKILL at
random moments while many live sessions have usage flowing — a seeded, bounded loop — then the
usage records equal what the simulator reported, exactly, with the expected end reasons.

How "what the simulator reported" is known: every client connection carries a unique
`fault_tag=<tag>` query parameter; the gateway forwards the query upstream, so the simulator's
frame log of that connection (`--frame-log-dir`, one file per connection, first line the request
with its query) is found by the tag. The simulator's report for a connection is the list of
`response.done` events it sent on it, in order; their usage, summed field by field, and their
cost under the rates stored on the record (the gateway's meter applied to the simulator's own
bytes) are what the record must equal (tests/simlog.py; the clients are tests/faultclients.py, both
shared with tests/test_db_faults.py).

Reproducing a failure: every run prints its seed and every assertion message starts with
`[seed=N role=R]`; run `MESHRT_FAULT_SEED=N pytest tests/test_faults.py -k worker` (or
`-k supervisor`, `-k front_door`). All choices (kill delays, victims, session lengths, which
sessions close mid-response) come from that seed; scheduling jitter can still change which
session is live at a given instant.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import httpx
import pytest
from conftest import _stop
from conftest import start_sim
from conftest import wait_for
from faultclients import Conn
from faultclients import FaultClients
from realtime_client import connect_ws
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
from sqlmodel import Session
from sqlmodel import select
from websockets.exceptions import ConnectionClosed
from websockets.exceptions import InvalidHandshake

from meshrt.storage.db import SessionRecord

SEED = int(os.environ.get("MESHRT_FAULT_SEED", "20260611"))
SLOTS = 10  # concurrent client sessions at any time
RESPONSE_MS = 200  # each response lasts this long upstream (paced): kills land mid-response too
CONNECT_RETRY_S = 25.0  # a client keeps retrying its connect this long (supervisor restarts)
RECORD_WAIT_S = 30.0
TEST_BUDGET_S = 75.0  # hard bound on the live part of one test


def _tag(role: str) -> str:
    return f"[seed={SEED} role={role}]"


@pytest.fixture
def fault_sim(tmp_path):
    sim = start_sim(tmp_path)
    yield sim
    _stop(sim.proc)


# --- the clients ------------------------------------------------------------------------------


class Harness(FaultClients):
    """SLOTS client tasks (tests/faultclients.py), sessions of 2-7 responses, plus the killer's
    seeded choices and its kills; with `find_pid`, each session's worker is looked up once it is
    live (the worker role's victims)."""

    def __init__(self, role: str, url, key: str, engine, *, find_pid: bool = False):
        super().__init__(
            url,
            key,
            f"{SEED}-{role}",
            slots=SLOTS,
            budget_s=TEST_BUDGET_S,
            response_ms=RESPONSE_MS,
            connect_timeout_s=10,
            connect_retry_s=CONNECT_RETRY_S,
        )
        self.role, self.engine, self.find_pid = role, engine, find_pid
        self.rng = random.Random(f"{SEED}:{role}")  # the killer's choices
        self.kills: list[float] = []  # when each kill happened

    def spanning(self) -> int:
        """Sessions that were live across at least one kill."""
        return sum(any(c.connected_at < t < c.ended_at for t in self.kills) for c in self.conns if not c.killed)

    def plan(self, index: int, n: int) -> tuple[random.Random, int, bool]:
        rng = random.Random(f"{SEED}:{self.role}:{index}:{n}")
        return rng, rng.randint(2, 7), rng.random() < 0.3

    async def started(self, conn: Conn) -> None:
        if self.find_pid:
            conn.pid = await asyncio.to_thread(_live_pid, self.engine, conn.request_id)

    async def burst(self, name: str, n: int) -> None:
        """n connects at once, each closed as soon as it opens (no response): a crowd in the gate."""

        async def one(i: int) -> None:
            tag = f"{SEED}-{self.role}-{name}-{i}"
            self.attempts.append(tag)
            try:
                ws = await asyncio.wait_for(connect_ws(self.url(), key=self.key, query=f"fault_tag={tag}"), 10)
                await ws.close()
            except (OSError, asyncio.TimeoutError, InvalidHandshake, ConnectionClosed):
                pass

        await asyncio.gather(*(one(i) for i in range(n)))


def _live_pid(engine, request_id: str) -> int:
    def find():
        with Session(engine) as db:
            row = db.exec(select(SessionRecord).where(SessionRecord.request_id == request_id)).first()
            return row.pid if row is not None and row.state == "live" and row.pid else None

    return wait_for(find, 10, 0.02, f"the live worker of {request_id}")


# --- the checks -------------------------------------------------------------------------------


def check(h: Harness, sim, engine, tenant, start_balance: int, *, expect_killed: bool = False) -> dict:
    """Every record against the simulator; returns counts for the summary line."""
    who = _tag(h.role)
    lost = [(c.tag, c.lost) for c in h.conns if c.lost]
    assert not lost, f"{who} connections broke though nothing killed their worker: {lost}"

    rows = final_records(engine, tenant.account_id, RECORD_WAIT_S, who)
    by_request = records_by_request(rows)
    reports = sim_reports(sim)
    counts = {
        "sessions": len(h.conns),
        "attempts": len(h.attempts),
        "spanning_a_kill": h.spanning(),
        "killed": 0,
        "billed_not_delivered": 0,
        "sent_not_billed": 0,
        "cut_short": 0,
        "responses": 0,
        "records_without_session": 0,
    }

    for conn in h.conns:
        what = f"{who} session {conn.tag} ({conn.request_id})"
        row, sent = session_report(conn, by_request, reports, what)
        counts["responses"] += row.responses
        if conn.killed:
            # bill before deliver: the worker billed every response the client got, plus at most
            # the one in flight whose frame it had not delivered (or had not read) when it died
            counts["killed"] += 1
            assert (row.end_reason, row.close_code) == ("internal_error", 1011), f"{what}: {row.end_reason}"
            k = len(conn.usages)
            assert row.responses in (k, k + 1) and row.responses <= len(sent), (
                f"{what}: billed {row.responses} responses; client got {k}, simulator sent {len(sent)}"
            )
            billed = sent[: row.responses]
            counts["billed_not_delivered"] += row.responses - k
            counts["sent_not_billed"] += len(sent) - row.responses
        else:
            counts["cut_short"] += conn.cut_short
            assert (row.end_reason, row.close_code) == ("client_closed", 1000), (
                f"{what}: end {row.end_reason}/{row.close_code}"
            )
            billed = sent
        usage, cost, responses = expected_from(billed, row.rates)
        assert row.responses == responses == len(billed), f"{what}: {row.responses} responses, expected {responses}"
        assert same_usage(row.usage, usage), f"{what}: record usage {row.usage} != simulator's {usage}"
        assert row.cost_pico == cost, f"{what}: record cost {row.cost_pico} != simulator's {cost}"
        if not conn.killed:
            assert row.cost_pico > 0 or not sent, f"{what}: nothing billed"

    check_unbilled_attempts(rows, {c.tag: c.request_id for c in h.conns}, h.attempts, reports, who, counts)
    check_debits(engine, tenant.account_id, start_balance, rows, who)
    if expect_killed:
        assert counts["killed"] > 0, f"{who} no worker was killed"
    assert counts["sessions"] >= SLOTS and counts["responses"] > 0, f"{who} too little traffic: {counts}"
    print(f"{who} {counts} refusals={h.refusals}")
    return counts


# --- the three roles --------------------------------------------------------------------------


WORKER_KILLS = 8
SUPERVISOR_CYCLES = 3
FRONTDOOR_KILLS = 4
FRONTDOOR_CROWD = 40


def test_workers_killed_at_random_bill_exactly_what_they_spooled(gateway_factory, fault_sim, make_tenant, engine):
    """Worker role. WORKER_KILLS times: after a random delay, SIGKILL the worker of a random
    running session. A killed session's record has end_reason internal_error (1011) and bills
    exactly what its worker spooled, which the test pins down as: the first m response.done
    events the simulator sent on that connection, where m is k or k + 1 and k the number the
    client received (bill before deliver: every delivered response was billed; the one in flight
    may have been billed and not delivered, or sent by the simulator and never read) — usage and
    cost equal those m events exactly. A response.done the simulator sent that the dead worker
    never read cannot be billed, so a killed session's record may be less than the simulator's
    total, by at most that one response. Every other session ends client_closed and its record
    equals the simulator's report exactly."""
    print(f"fault seed {SEED} (MESHRT_FAULT_SEED)")
    tenant = make_tenant(max_concurrent_sessions=100)
    gateway = gateway_factory(fault_sim.url)
    start = balance(engine, tenant.account_id)
    h = Harness("worker", lambda: gateway.ws_url, tenant.key, engine, find_pid=True)

    async def killer(h: Harness) -> None:
        await asyncio.sleep(1.0)
        kills = 0
        while kills < WORKER_KILLS and time.monotonic() < h.deadline - 20:
            await asyncio.sleep(h.rng.uniform(0.2, 1.2))
            victims = sorted((c for c in h.running() if c.pid), key=lambda c: c.tag)
            if not victims:
                continue
            victim = h.rng.choice(victims)
            victim.killed = True  # no await between the choice and the kill
            os.kill(victim.pid, signal.SIGKILL)
            h.kills.append(time.monotonic())
            kills += 1
        await asyncio.sleep(h.rng.uniform(1.0, 2.0))

    run(h.run(killer), TEST_BUDGET_S + 45)
    counts = check(h, fault_sim, engine, tenant, start, expect_killed=True)
    assert counts["killed"] == WORKER_KILLS, f"{_tag('worker')} {counts}"


def test_supervisor_killed_at_random_and_restarted_loses_and_doubles_nothing(
    gateway_factory, fault_sim, make_tenant, engine
):
    """Supervisor role. SUPERVISOR_CYCLES times: after a random delay, SIGKILL the supervisor
    (its front door and zygote follow), stay down a random while, restart it on the same state
    dir. Clients keep relaying through their workers, and connect anew (retrying) to whichever
    supervisor is up. Every session ends client_closed, has exactly one record, equal to what the
    simulator reported; the balance debit equals the sum of the records (nothing counted twice);
    attempts that never became a session bill nothing."""
    print(f"fault seed {SEED} (MESHRT_FAULT_SEED)")
    tenant = make_tenant(max_concurrent_sessions=100)
    gateways = [gateway_factory(fault_sim.url)]
    start = balance(engine, tenant.account_id)
    h = Harness("supervisor", lambda: gateways[-1].ws_url, tenant.key, engine)

    async def killer(h: Harness) -> None:
        for _ in range(SUPERVISOR_CYCLES):
            await asyncio.sleep(h.rng.uniform(0.8, 3.0))
            first = gateways[-1]
            os.kill(first.proc.pid, signal.SIGKILL)
            h.kills.append(time.monotonic())
            await asyncio.to_thread(first.proc.wait, 10)
            await asyncio.sleep(h.rng.uniform(0.0, 1.5))
            gateways.append(await asyncio.to_thread(gateway_factory, fault_sim.url, first.state_dir))
        await asyncio.sleep(h.rng.uniform(2.0, 3.0))

    run(h.run(killer), TEST_BUDGET_S + 45)
    counts = check(h, fault_sim, engine, tenant, start)
    assert counts["spanning_a_kill"] > 0, f"{_tag('supervisor')} no session outlived a supervisor: {counts}"
    assert "worker re-attached" in gateways[-1].log_text() or any(
        "worker re-attached" in g.log_text() for g in gateways[1:]
    ), _tag("supervisor")


def test_front_door_killed_at_random_is_restarted_and_sessions_go_on(gateway_factory, fault_sim, make_tenant, engine):
    """Front-door role. FRONTDOOR_KILLS times: after a random delay, SIGKILL the front door (the
    supervisor restarts it; the listening socket stays open). Live sessions go on, new connects
    (retried for a bounded time) succeed during and after its restarts; every session ends
    client_closed with a record equal to what the simulator reported; connections cut in the
    front door bill nothing. Some kills land while a crowd of upgrades is between admission (row
    inserted, `granted`) and handoff: those rows must still end (the supervisor ends what its dead
    front door never handed over), not stay `granted` and count against the account's limit."""
    print(f"fault seed {SEED} (MESHRT_FAULT_SEED)")
    tenant = make_tenant(max_concurrent_sessions=100)
    gateway = gateway_factory(fault_sim.url)
    start = balance(engine, tenant.account_id)
    h = Harness("frontdoor", lambda: gateway.ws_url, tenant.key, engine)

    def new_frontdoor():
        pid = gateway.frontdoor_pid()
        return pid if pid is not None and pid not in pids else None

    async def killer(h: Harness) -> None:
        for n in range(FRONTDOOR_KILLS):
            pid = await asyncio.to_thread(wait_for, new_frontdoor, 15, 0.05, "a (restarted) front door")
            pids.append(pid)
            await asyncio.sleep(h.rng.uniform(0.2, 2.5))
            crowd = None
            if n == 0 or h.rng.random() < 0.5:  # kill it with upgrades between admission and handoff
                crowd = asyncio.create_task(h.burst(f"crowd{n}", FRONTDOOR_CROWD))
                await asyncio.sleep(h.rng.uniform(0.03, 0.15))
            os.kill(pid, signal.SIGKILL)
            h.kills.append(time.monotonic())
            if crowd is not None:
                await crowd
        await asyncio.to_thread(wait_for, lambda: _ready(gateway), 20, 0.1, "the front door back")
        await asyncio.sleep(h.rng.uniform(2.0, 3.0))

    pids: list[int] = []
    run(h.run(killer), TEST_BUDGET_S + 45)
    counts = check(h, fault_sim, engine, tenant, start)
    assert counts["spanning_a_kill"] > 0, f"{_tag('frontdoor')} no session outlived a front door: {counts}"
    after = [c for c in h.conns if c.connected_at > h.kills[-1]]
    assert after, f"{_tag('frontdoor')} no session connected after the last front-door kill"
    assert gateway.proc.poll() is None, f"{_tag('frontdoor')} the supervisor died"


def _ready(gateway) -> bool:
    try:
        return httpx.get(f"{gateway.http_url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
