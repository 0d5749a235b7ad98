"""The supervisor treats workers as untrusted (#16): a re-attaching worker is matched against its
session's row and its grant rebuilt from that row; every increment is billed at the rates of the
grant the supervisor issued, whatever cost the worker put on it."""

from __future__ import annotations

import dataclasses
import os
import socket

from conftest import wait_for
from realtime_client import connect_ws
from realtime_client import recv_json
from realtime_client import run
from sqlmodel import Session
from sqlmodel import select

from meshrt.shared import control
from meshrt.shared.control import Grant
from meshrt.shared.control import Reattach
from meshrt.shared.increments import Increment
from meshrt.shared.increments import IncrementKind
from meshrt.shared.money import Money
from meshrt.shared.pricing import load_price_table
from meshrt.storage.db import SessionRecord
from meshrt.storage.db import SessionState
from meshrt.supervisor.supervisor import grant_from_row
from meshrt.supervisor.supervisor import reattach_refusal
from meshrt.worker.session_meter import GrantPriceTable
from meshrt.worker.session_meter import bill_again
from meshrt.worker.session_meter import repriced

TABLE = load_price_table()
MODEL = "gpt-realtime"
RATES = TABLE.grant_rates(TABLE.get(MODEL))


def _row(**changes) -> SessionRecord:
    values = dict(
        id="sess_1",
        request_id="req_1",
        account_id="acct_1",
        api_key_id="key_1",
        model=MODEL,
        node="node-a",
        state=SessionState.LIVE,
        pid=4242,
        rates=RATES,
    )
    values.update(changes)
    return SessionRecord(**values)


def _reattach(pid: int = 4242, **grant_changes) -> Reattach:
    grant = Grant("sess_1", "req_1", "acct_1", "key_1", MODEL, 1000, RATES)
    return Reattach(dataclasses.replace(grant, **grant_changes), pid, True)


# --- re-attach: matched against the row ----------------------------------------------------------


def test_a_worker_re_attaches_only_as_the_process_its_session_row_names():
    assert reattach_refusal(_row(), _reattach(), 4242, "node-a") is None
    assert reattach_refusal(None, _reattach(), 4242, "node-a") == "no such session"
    assert "node" in reattach_refusal(_row(node="node-b"), _reattach(), 4242, "node-a")
    # the pid it claims must be the pid the kernel saw connect, and the row's
    assert "kernel says 999" in reattach_refusal(_row(), _reattach(), 999, "node-a")
    assert "worker is pid 4242" in reattach_refusal(_row(), _reattach(pid=999), 999, "node-a")
    # a session that went live has a pid on its row; only one still granted may lack it
    assert reattach_refusal(_row(pid=None, state=SessionState.GRANTED), _reattach(), 4242, "node-a") is None
    assert "without a worker pid" in reattach_refusal(_row(pid=None), _reattach(), 4242, "node-a")
    # a grant naming another account, key or model is not this session's
    for change in ({"account_id": "acct_rich"}, {"api_key_id": "key_2"}, {"model": "gpt-realtime-mini"}):
        assert reattach_refusal(_row(), _reattach(**change), 4242, "node-a") == "the grant sent is not the session's"


def test_the_grant_of_a_re_attached_session_is_the_rows_not_the_workers():
    free = {"effective_date": RATES["effective_date"], "model": {**RATES["model"]}, "transcription": {}}
    claimed = _reattach(rates=free, account_id="acct_other", balance_pico=10**18).grant
    grant = grant_from_row(_row(), claimed)
    assert grant.rates == RATES and grant.account_id == "acct_1" and grant.balance_pico == 0
    assert grant.token_cap == claimed.token_cap  # not money: the worker's copy is kept


# --- re-pricing: the grant's rates, not the worker's cost ----------------------------------------

USAGE = {
    "total_tokens": 1700,
    "input_tokens": 1200,
    "output_tokens": 500,
    "input_token_details": {"text_tokens": 200, "audio_tokens": 1000, "cached_tokens": 0},
    "output_token_details": {"text_tokens": 100, "audio_tokens": 400},
}


def _increment(cost: Money, by_category: dict, **changes) -> Increment:
    values = dict(
        seq=1,
        kind=IncrementKind.RESPONSE,
        model=MODEL,
        usage=USAGE,
        cost=cost,
        by_category=by_category,
        total_tokens=1700,
        response_id="resp_1",
    )
    values.update(changes)
    return Increment(**values)


def test_an_increment_priced_right_is_left_as_it_is():
    table = GrantPriceTable(RATES)
    bill = bill_again(table, _increment(Money.ZERO, {}))
    assert bill.cost > Money.ZERO
    honest = _increment(bill.cost, bill.by_category)
    assert repriced(table, honest) is None


def test_an_increment_the_worker_under_priced_is_billed_at_the_grants_rates():
    table = GrantPriceTable(RATES)
    right = bill_again(table, _increment(Money.ZERO, {}))
    cheap = _increment(Money(1), {"text_input": Money(1)})
    fixed = repriced(table, cheap)
    assert fixed.cost == right.cost and fixed.by_category == right.by_category
    assert (fixed.seq, fixed.usage, fixed.response_id) == (1, USAGE, "resp_1")
    # a response billed as another (cheaper) model is still billed at the session's model
    assert repriced(table, _increment(right.cost, right.by_category, model="gpt-realtime-mini")) is None
    # under-stated tokens are corrected too (the token cap and the record count them)
    assert repriced(table, _increment(right.cost, right.by_category, total_tokens=1)).total_tokens == 1700


def test_a_transcription_is_billed_only_at_rates_the_grant_holds():
    table = GrantPriceTable(RATES)
    usage = {"type": "tokens", "total_tokens": 100, "input_tokens": 80, "output_tokens": 20}
    model = next(iter(RATES["transcription"]))
    free = Increment(1, IncrementKind.TRANSCRIPTION, model, usage, Money.ZERO, {}, 100)
    fixed = repriced(table, free)
    expected = bill_again(table, free)
    if expected.unpriced:  # that model is billed by duration: token usage is unpriced there
        assert fixed is None or fixed.unpriced
    else:
        assert fixed is not None and fixed.cost == expected.cost > Money.ZERO
    # a model the grant has no rates for is unpriced (0), whatever the worker charged
    made_up = Increment(1, IncrementKind.TRANSCRIPTION, "made-up", usage, Money(5), {"x": Money(5)}, 100)
    assert repriced(table, made_up).cost == Money.ZERO


# --- live: a forged re-attach is refused and changes nothing ---------------------------------------


def _live_row(engine, request_id: str) -> SessionRecord | None:
    with Session(engine) as db:
        row = db.exec(select(SessionRecord).where(SessionRecord.request_id == request_id)).first()
        return row if row is not None and row.state == "live" else None


def test_a_forged_re_attach_is_refused_and_logged(gateway_factory, tenant, engine):
    gw = gateway_factory()

    async def go():
        async with connect_ws(gw.ws_url, key=tenant.key) as ws:
            await recv_json(ws)
            request_id = ws.response.headers["x-request-id"]
            row = wait_for(lambda: _live_row(engine, request_id), 10, 0.05, "the session row")
            grant = Grant(row.id, row.request_id, row.account_id, row.api_key_id, row.model, 10**9, {}, balance_pico=1)
            answers = []
            for pid in (row.pid, os.getpid()):  # its worker's pid (a lie), then our own
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                sock.connect(str(gw.state_dir / "run" / "control.sock"))
                control.send(sock, Reattach(grant, pid, True))
                sock.settimeout(5)
                answers.append(sock.recv(100))  # b"": the supervisor closed it
                sock.close()
            await ws.send('{"type": "response.create"}')  # the real session relays on
            while (await recv_json(ws))["type"] != "response.done":
                pass
            return row, answers

    row, answers = run(go())
    assert answers == [b"", b""]
    log = gw.log_text()
    wait_for(lambda: gw.log_text().count("re-attach refused") >= 2, 5, 0.05, "the refusals' log lines")
    log = gw.log_text()
    assert f"the worker says it is pid {row.pid}, the kernel says {os.getpid()}" in log
    assert "worker re-attached" not in log


def test_a_spooled_increment_is_billed_at_the_grants_rates_not_the_workers(gateway_factory, tenant, engine):
    """The worker writes its spool: an increment it under-priced there (here appended by hand,
    as a compromised worker could) is billed at the grant's rates when the session is finalised
    from that spool, and the difference is logged."""
    from realtime_client import expect_closed
    from test_recovery import balance
    from test_recovery import live_pid
    from test_recovery import respond

    from meshrt.shared import spool

    gw = gateway_factory()
    start = balance(engine, tenant.account_id)
    forged = _increment(Money(1), {"text_input": Money(1)}, seq=50, response_id="resp_forged")

    async def go():
        async with connect_ws(gw.ws_url, key=tenant.key) as ws:
            await recv_json(ws)
            await respond(ws)
            request_id = ws.response.headers["x-request-id"]
            row = wait_for(lambda: _live_row(engine, request_id), 10, 0.05, "the session row")
            fd = os.open(spool.path(gw.state_dir / "spool", row.id), os.O_WRONLY | os.O_APPEND)
            spool.append_increment(fd, forged)
            os.close(fd)
            os.kill(live_pid(engine, request_id), 9)
            await expect_closed(ws, 10)
            return request_id, row

    request_id, row = run(go())
    from conftest import ended_record

    record = ended_record(engine, request_id)
    price = bill_again(GrantPriceTable(row.rates), forged).cost
    assert price > Money(1000)
    assert record.responses == 2 and Money(record.cost_pico) > price
    assert start - balance(engine, tenant.account_id) == Money(record.cost_pico)
    wait_for(lambda: "billed at the supervisor's" in gw.log_text(), 5, 0.05, "the re-pricing log line")
    assert f'"worker_picodollars": 1, "picodollars": {price.picodollars}' in gw.log_text()


def test_a_handoff_from_a_process_other_than_the_front_door_is_refused(gateway_factory, tenant, engine):
    """A grant names the account billed and its rates: a worker (same uid, and allowed to connect
    to the control socket to re-attach) or any other process must not hand off a session."""
    gw = gateway_factory()
    grant = Grant("sess_forged", "req_forged", tenant.account_id, tenant.key_id, MODEL, 10**9, {}, balance_pico=1)
    ours, theirs = socket.socketpair()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(str(gw.state_dir / "run" / "control.sock"))
    control.send(sock, control.Handoff(grant, b"GET /v1/realtime HTTP/1.1\r\n\r\n"), [theirs.fileno()])
    sock.settimeout(5)
    assert sock.recv(1000) == b""  # closed, no HandoffAck
    sock.close()
    wait_for(lambda: "not this node's front door refused" in gw.log_text(), 5, 0.05, "the refusal")
    assert "sess_forged" not in gw.log_text()
    ours.close()
    theirs.close()
