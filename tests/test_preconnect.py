"""Pre-connected upstream (worker/preconnect.py, MESHRT_UPSTREAM_PRECONNECT_S): a pool worker
opens its upstream connection before its session arrives; kept fresh; a stale one gives way to a
fresh connect; over a WAN-delayed simulator only the upgrade's round trip is left on set-up."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time

import anyio
import pytest
from conftest import OPERATOR_KEY
from conftest import _stop
from conftest import ended_record
from conftest import start_gateway
from conftest import start_sim
from conftest import wait_for
from realtime_client import connect_ws
from realtime_client import recv_until
from realtime_client import run
from sqlmodel import Session
from sqlmodel import select

from meshrt.storage.db import SessionRecord
from meshrt.worker import preconnect
from meshrt.worker.upstream import connect_upstream
from meshrt.worker.upstream import send_upgrade_ahead

RTT_MS = 50


def _drive(connector: preconnect.Preconnector, seconds: float) -> None:
    """The worker's select loop without a channel: advance the connector for `seconds`."""
    import select

    end = time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        readable, writable, timeout = connector.plan(now)
        r, w, _ = select.select(readable, writable, [], min(timeout, end - now))
        connector.step(r, w, time.monotonic())


class _Listener:
    """A TCP server that accepts and keeps (or closes) what it accepted."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self):
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def test_the_connection_is_renewed_when_old_and_when_upstream_closes_it():
    listener = _Listener()
    try:
        connector = preconnect.Preconnector(f"ws://127.0.0.1:{listener.port}/v1/realtime", max_age_s=0.2)
        _drive(connector, 0.75)
        assert 3 <= connector.opened <= 5  # one at start, then one per 0.2 s
        assert connector.state == "ready"

        connector = preconnect.Preconnector(f"ws://127.0.0.1:{listener.port}/v1/realtime", max_age_s=60)
        _drive(connector, 1.1)  # lived past SHORT_LIVED_S: reopened at once when closed
        assert connector.opened == 1
        listener.accepted[-1].close()
        _drive(connector, 0.3)
        assert connector.opened == 2 and connector.state == "ready"
        conn = connector.take()
        assert conn is not None and conn.serves(f"ws://127.0.0.1:{listener.port}/v1/realtime?model=m")
        assert not conn.serves(f"wss://127.0.0.1:{listener.port}/v1/realtime")
        conn.close()
    finally:
        listener.close()


def test_an_unreachable_upstream_is_retried_with_a_backoff():
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there: connects are refused
    connector = preconnect.Preconnector(f"ws://127.0.0.1:{port}/v1/realtime", max_age_s=20)
    _drive(connector, 0.5)
    assert connector.state == "idle" and connector.backoff >= 2 * preconnect.BACKOFF_MIN_S
    assert connector.take() is None


@pytest.fixture(scope="module")
def wan_sim(tmp_path_factory):
    sim = start_sim(tmp_path_factory.mktemp("preconnect-sim"), "--handshake-delay-ms", str(RTT_MS))
    yield sim
    _stop(sim.proc)


def test_a_stale_preconnection_gives_way_to_a_fresh_connect_uncounted(wan_sim):
    url = f"ws://127.0.0.1:{wan_sim.port}/v1/realtime?model=gpt-realtime"
    ours, theirs = socket.socketpair()
    theirs.close()  # upstream closed it while the worker waited: not noticed until used
    stale = preconnect.Preconnected(ours, "ws", "127.0.0.1", wan_sim.port, time.monotonic())

    async def connect():
        began = time.monotonic()
        conn = await connect_upstream(url, [], OPERATOR_KEY, 5.0, 1, stale)  # one attempt only
        elapsed = time.monotonic() - began
        conn.stream.close()
        return conn.response.status_code, elapsed

    status, elapsed = anyio.run(connect)
    assert status == 101
    assert elapsed >= 2 * RTT_MS / 1000  # a fresh connect: TCP and the upgrade


def test_an_upgrade_sent_ahead_is_answered_while_the_worker_gets_ready(wan_sim):
    """The worker writes its upgrade on the pre-opened connection before building its meter and
    event loop: by the time it reads, upstream's answer (one round trip) has arrived."""
    url = f"ws://127.0.0.1:{wan_sim.port}/v1/realtime?model=gpt-realtime"
    sock = socket.create_connection(("127.0.0.1", wan_sim.port))
    time.sleep(RTT_MS / 1000 + 0.02)  # the simulator's delayed accept is behind us, as in a pool worker
    sock.setblocking(False)
    conn = preconnect.Preconnected(sock, "ws", "127.0.0.1", wan_sim.port, time.monotonic())
    assert send_upgrade_ahead(conn, url, [], OPERATOR_KEY)
    time.sleep(RTT_MS / 1000 + 0.03)  # the worker's own set-up, meanwhile

    async def connect():
        began = time.monotonic()
        upstream = await connect_upstream(url, [], OPERATOR_KEY, 5.0, 1, conn)
        elapsed = time.monotonic() - began
        upstream.stream.close()
        return upstream.response.status_code, elapsed

    status, elapsed = anyio.run(connect)
    assert status == 101
    assert elapsed < RTT_MS / 1000 / 2  # nothing left to wait for: the answer was there


def test_an_upgrade_sent_ahead_on_a_stale_connection_gives_way_to_a_fresh_connect(wan_sim):
    url = f"ws://127.0.0.1:{wan_sim.port}/v1/realtime?model=gpt-realtime"
    # closed before the send: the send fails, the connection is dropped, nothing is left half-sent
    ours, theirs = socket.socketpair()
    theirs.close()
    gone = preconnect.Preconnected(ours, "ws", "127.0.0.1", wan_sim.port, time.monotonic())
    assert not send_upgrade_ahead(gone, url, [], OPERATOR_KEY)
    assert gone.closed
    # closed after the send, without an answer: read as stale, then a fresh connect, uncounted
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    late = preconnect.Preconnected(ours, "ws", "127.0.0.1", wan_sim.port, time.monotonic())
    assert send_upgrade_ahead(late, url, [], OPERATOR_KEY)
    assert theirs.recv(65536).startswith(b"GET /v1/realtime?model=gpt-realtime HTTP/1.1")
    theirs.close()
    # another endpoint's connection is not written to
    elsewhere = preconnect.Preconnected(socket.socketpair()[0], "ws", "127.0.0.1", 1, time.monotonic())
    assert not send_upgrade_ahead(elsewhere, url, [], OPERATOR_KEY)
    assert not elsewhere.closed and elsewhere.upgrade is None
    elsewhere.close()

    async def connect():
        upstream = await connect_upstream(url, [], OPERATOR_KEY, 5.0, 1, late)  # one attempt only
        upstream.stream.close()
        return upstream.response.status_code

    assert anyio.run(connect) == 101
    assert late.closed


def _setup_ms(url: str, key: str) -> float:
    async def once():
        began = time.monotonic()
        async with connect_ws(url, key=key) as ws:
            await recv_until(ws, "session.created")
            return (time.monotonic() - began) * 1000

    return run(once())


def _live_fields(gw) -> list[dict]:
    lines = [json.loads(line) for line in gw.log_text().splitlines() if '"session live"' in line]
    return [line.get("fields", line) for line in lines]


def test_pool_workers_connect_ahead_and_set_up_beats_direct(tmp_path, database_url, wan_sim, tenant, engine):
    on = start_gateway(tmp_path, database_url, wan_sim.url, MESHRT_WARM_WORKERS="2")
    off = start_gateway(tmp_path, database_url, wan_sim.url, MESHRT_WARM_WORKERS="2", MESHRT_UPSTREAM_PRECONNECT_S="0")
    try:
        time.sleep(1.0)  # the pools forked, their connections opened
        direct, with_pre, without = [], [], []
        for _ in range(4):
            direct.append(_setup_ms(wan_sim.url, OPERATOR_KEY))
            with_pre.append(_setup_ms(on.ws_url, tenant.key))
            without.append(_setup_ms(off.ws_url, tenant.key))
            time.sleep(0.2)  # the pool refilled (its new worker's connection opened)
        wait_for(lambda: len(_live_fields(on)) >= 4 and len(_live_fields(off)) >= 4, 10, 0.05, "session live logs")
        pre_fields, plain_fields = _live_fields(on), _live_fields(off)
        assert all("preconnected_s" in f for f in pre_fields), pre_fields
        assert all(f.get("upgrade_ahead") is True for f in pre_fields), pre_fields
        assert not any("preconnected_s" in f for f in plain_fields)
        # the worker's upstream part: one round trip (the upgrade) against two (TCP + upgrade)
        assert statistics.median(f["upstream_ms"] for f in pre_fields) < 2 * RTT_MS
        assert statistics.median(f["upstream_ms"] for f in plain_fields) >= 2 * RTT_MS
        # the client's whole set-up through meshrt is below a direct connect's
        assert statistics.median(with_pre) < statistics.median(direct), (with_pre, direct)
        assert statistics.median(direct) >= 2 * RTT_MS
        with Session(engine) as db:
            rows = db.exec(select(SessionRecord).where(SessionRecord.account_id == tenant.account_id)).all()
        assert len(rows) == 8
        for row in rows:  # every session ended and recorded
            assert ended_record(engine, row.request_id).ended_at is not None
    finally:
        _stop(on.proc)
        _stop(off.proc)
