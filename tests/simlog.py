"""What the simulator reported on each connection, and the records to compare with it: shared by
the fault suites (tests/test_faults.py, tests/test_db_faults.py).

Every client connection carries a unique `fault_tag=<tag>` query parameter; the gateway forwards
the query upstream, so the simulator's frame log of that connection (`--frame-log-dir`, one file
per connection, first line the request with its query) is found by the tag. The simulator's
report for a connection is the list of `response.done` events it sent on it, in order; their
usage, summed field by field, and their cost under the rates stored on the record (the gateway's
meter applied to the simulator's own bytes) are what the record must equal.
"""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from urllib.parse import parse_qs

from sqlmodel import Session
from sqlmodel import select

from meshrt.storage.db import Account
from meshrt.storage.db import SessionRecord
from meshrt.worker.meter import Meter
from meshrt.worker.meter import UsageTotals
from meshrt.worker.session_meter import GrantPriceTable

# --- what the simulator reported --------------------------------------------------------------


def sim_reports(sim) -> dict[str, list[list[bytes]]]:
    """tag -> for each simulator connection with that tag, the payloads of the response.done
    events it sent, in order (exact bytes, as logged at the frame layer)."""
    out: dict[str, list[list[bytes]]] = defaultdict(list)
    for path in sim.logs():
        lines = path.read_text().splitlines()
        if not lines:
            continue
        head = json.loads(lines[0])
        tags = parse_qs(head.get("query", "")).get("fault_tag")
        if not tags:
            continue
        done = []
        for line in lines[1:]:
            try:
                frame = json.loads(line)
            except ValueError:
                continue  # a line the simulator was writing when the test read it
            if frame.get("dir") != "out" or frame.get("opcode") != "text":
                continue
            payload = base64.b64decode(frame["payload_b64"])
            event = json.loads(payload)
            if event.get("type") == "response.done":
                assert frame["fin"], "the simulator fragments no message"
                done.append(payload)
        out[tags[0]].append(done)
    return out


def add_usage(total: dict, usage: dict) -> dict:
    for name, value in usage.items():
        if isinstance(value, dict):
            add_usage(total.setdefault(name, {}), value)
        elif isinstance(value, int) and not isinstance(value, bool):
            total[name] = total.get(name, 0) + value
    return total


def flat(usage: dict, prefix: str = "") -> dict[str, int]:
    out = {}
    for name, value in usage.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{name}."))
        elif isinstance(value, int) and not isinstance(value, bool):
            out[prefix + name] = value
    return out


def same_usage(recorded: dict, expected: dict) -> bool:
    """Field by field, a field missing on one side counting as 0."""
    a, b = flat(recorded), flat(expected)
    return all(a.get(k, 0) == b.get(k, 0) for k in set(a) | set(b))


def expected_from(payloads: list[bytes], rates: dict) -> tuple[dict, int, int]:
    """(usage summed field by field, cost in picodollars under `rates`, responses)."""
    usage: dict = {}
    table = GrantPriceTable(rates)
    meter, totals = Meter(table.model, table), UsageTotals()
    for payload in payloads:
        add_usage(usage, json.loads(payload)["response"]["usage"])
        increment = meter.observe(payload)
        assert increment is not None
        totals.add(increment)
    return usage, totals.cost.picodollars, totals.responses


# --- the records ------------------------------------------------------------------------------


def records_of(engine, account_id: str) -> list[SessionRecord]:
    with Session(engine, expire_on_commit=False) as db:
        return list(db.exec(select(SessionRecord).where(SessionRecord.account_id == account_id)).all())


def balance(engine, account_id: str) -> int:
    with Session(engine) as db:
        return db.get(Account, account_id).balance_pico


def records_by_request(rows) -> dict[str, list[SessionRecord]]:
    out: dict[str, list[SessionRecord]] = defaultdict(list)
    for row in rows:
        out[row.request_id].append(row)
    return out


def session_report(conn, by_request: dict, reports: dict, what: str) -> tuple[SessionRecord, list[bytes]]:
    """A client session's (tests/faultclients.py `Conn`) one record and the response.done payloads
    of its one simulator connection; the usage the client received is the simulator's, in order."""
    assert len(by_request[conn.request_id]) == 1, f"{what}: records {by_request[conn.request_id]}"
    row = by_request[conn.request_id][0]
    assert len(reports[conn.tag]) == 1, f"{what}: simulator connections {len(reports[conn.tag])}"
    sent = reports[conn.tag][0]
    received = [json.dumps(u, sort_keys=True) for u in conn.usages]
    relayed = [json.dumps(json.loads(p)["response"]["usage"], sort_keys=True) for p in sent[: len(received)]]
    assert received == relayed, f"{what}: the client's response.done usage is not the simulator's, in order"
    return row, sent


def final_records(engine, account_id: str, timeout: float, who: str, tail=lambda: "") -> list[SessionRecord]:
    """Every record of the account once all have ended (bounded wait); else fail with the stuck rows."""
    from conftest import wait_for

    def all_ended():
        rows = records_of(engine, account_id)
        return rows if rows and all(r.state == "ended" for r in rows) else None

    try:
        return wait_for(all_ended, timeout, 0.1, "every record")
    except AssertionError:
        stuck = [(r.id, r.request_id, r.state) for r in records_of(engine, account_id) if r.state != "ended"]
        raise AssertionError(f"{who} rows never ended: {stuck}\n{tail()}") from None


def check_unbilled_attempts(rows, sessions: dict[str, str], attempts, reports, who: str, counts: dict) -> None:
    """Attempts that never became a session (no client saw session.created) bill nothing: their
    rows (if any) have no responses and no cost, and the simulator sent no response.done on them.
    `sessions` maps each session's tag to its request id."""
    ours = set(sessions.values())
    for row in rows:
        if row.request_id not in ours:
            counts["records_without_session"] += 1
            reasons = counts.setdefault("their_end_reasons", {})
            reasons[row.end_reason] = reasons.get(row.end_reason, 0) + 1
            assert row.responses == 0 and row.cost_pico == 0, (
                f"{who} a session no client had ({row.id}, {row.end_reason}) was billed {row.cost_pico}"
            )
    for tag in attempts:
        if tag not in sessions:
            assert all(not done for done in reports.get(tag, [])), f"{who} failed attempt {tag} had responses"


def check_debits(engine, account_id: str, start_balance: int, rows, who: str) -> None:
    """The balance moved by exactly the records' costs: nothing lost, nothing counted twice."""
    from meshrt.shared.money import Money

    debit = start_balance - balance(engine, account_id)
    billed = sum(r.cost_pico for r in rows)
    assert debit == billed, f"{who} balance debit {Money(debit)} != sum of records {Money(billed)}"
