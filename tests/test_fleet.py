"""A fleet: two `meshrt serve` nodes on one database behind the shipped deploy/nginx.conf (real
nginx, a certificate made for the test), as an operator runs them (on the PostgreSQL run of the
suite, exactly the multi-node deployment). The official SDKs — Python, and Node's
OpenAIRealtimeWS, which always dials wss:// — complete sessions through the edge; the
account's session limit holds across both nodes; a node told to stop (SIGTERM) gets no new
session while its live one runs to its end and is billed; nothing of a key reaches nginx's logs.

Node and npm are the machine's (Debian's nodejs on this machine kind); the SDK comes from the
npm registry into the test's own directory."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import _stop
from conftest import ended_record
from conftest import start_gateway
from conftest import wait_for
from realtime_client import connect_ws
from realtime_client import expect_refusal
from realtime_client import recv_json
from realtime_client import recv_until
from realtime_client import run
from simlog import records_of
from test_nginx import NGINX
from test_nginx import assert_no_key_in_logs
from test_nginx import sdk_session
from test_nginx import start_edge

NODE_SCRIPT = Path(__file__).parent / "node" / "realtime_session.js"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NGINX is None, reason="no nginx (apt-get install nginx; scripts/test.sh does)"),
]


def node_id(gateway) -> str:
    return (gateway.state_dir / "node_id").read_text().strip()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, database_url, sim):
    tmp = tmp_path_factory.mktemp("fleet")
    env = {"MESHRT_ALLOW_PLAIN_WS": "0", "MESHRT_DRAIN_S": "60"}
    nodes = [start_gateway(tmp, database_url, sim.url, **env) for _ in range(2)]
    edge = None
    try:
        edge = start_edge(tmp, [gw.port for gw in nodes])
        yield nodes, edge
    finally:
        if edge is not None:
            _stop(edge.proc, signal.SIGTERM, 10)
        for gw in nodes:
            _stop(gw.proc)


@pytest.fixture(scope="module")
def node_sdk(tmp_path_factory) -> Path:
    """A directory with the official `openai` Node SDK (and `ws`, its WebSocket) installed."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.fail(
                f"`{tool}` is not installed: the fleet test runs the official Node SDK (apt-get install nodejs npm)"
            )
    where = tmp_path_factory.mktemp("node-sdk")
    shutil.copy(NODE_SCRIPT, where / NODE_SCRIPT.name)
    done = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--silent", "openai@6", "ws@8"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"npm install failed:\n{done.stdout}\n{done.stderr}"
    return where


def session_row(engine, account_id: str, request_id: str):
    def row():
        return next((r for r in records_of(engine, account_id) if r.request_id == request_id), None)

    return wait_for(row, 5, 0.05, "the session's row")


def python_sdk_session(edge, key: str) -> int:
    return sdk_session(edge, key)[1]


def node_sdk_session(node_sdk: Path, edge, key: str) -> dict:
    ca = node_sdk / "ca.pem"
    edge.ca.cert_pem.write_to_path(ca)
    done = subprocess.run(
        ["node", NODE_SCRIPT.name, f"https://localhost:{edge.tls_port}/v1", key, "gpt-realtime"],
        cwd=node_sdk,
        env={**os.environ, "NODE_EXTRA_CA_CERTS": str(ca)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = done.stdout.strip().splitlines()
    assert lines, f"the Node SDK printed nothing:\n{done.stderr}"
    return json.loads(lines[-1])


def test_the_official_sdks_complete_sessions_through_the_edge_on_both_nodes(fleet, node_sdk, make_tenant, engine):
    nodes, edge = fleet
    tenant = make_tenant()
    assert python_sdk_session(edge, tenant.key) > 0
    from_node = node_sdk_session(node_sdk, edge, tenant.key)
    assert "usage" in from_node, from_node
    assert from_node["usage"]["total_tokens"] > 0
    for _ in range(2):  # round robin: four sessions, both nodes
        assert python_sdk_session(edge, tenant.key) > 0
    rows = wait_for(
        lambda: (
            (r := records_of(engine, tenant.account_id)) and len(r) == 4 and all(x.state == "ended" for x in r) and r
        ),
        20,
        0.1,
        "four records",
    )
    assert {row.node for row in rows} == {node_id(gw) for gw in nodes}, [row.node for row in rows]
    assert all(row.responses == 1 and row.cost_pico > 0 for row in rows)
    assert_no_key_in_logs(edge, tenant.key)


def test_the_accounts_session_limit_holds_across_the_nodes(fleet, make_tenant, engine):
    nodes, edge = fleet
    tenant = make_tenant(max_concurrent_sessions=3)
    url = f"wss://localhost:{edge.tls_port}/v1/realtime"

    async def go():
        held = []
        try:
            for _ in range(3):
                ws = await connect_ws(url, key=tenant.key, ssl=edge.client_ssl())
                await recv_json(ws)  # session.created: it runs
                held.append(ws)
            refusal, code, _ = await expect_refusal(url, key=tenant.key, ssl=edge.client_ssl())
            live_nodes = {row.node for row in records_of(engine, tenant.account_id) if row.state == "live"}
            return refusal["error"]["code"], code, live_nodes
        finally:
            for ws in held:
                await ws.close()

    code, close, live_nodes = run(go(), 30)
    assert (code, close) == ("too_many_sessions", 1008)
    assert live_nodes == {node_id(gw) for gw in nodes}  # the three ran on both nodes, and counted as one account's
    assert_no_key_in_logs(edge, tenant.key)


def test_a_draining_node_gets_no_new_session_and_finishes_its_own(fleet, make_tenant, engine):
    """Last in the module: node A is told to stop."""
    nodes, edge = fleet
    a, b = nodes
    tenant = make_tenant()
    url = f"wss://localhost:{edge.tls_port}/v1/realtime"

    async def go():
        # a session that lands on A (the edge alternates: at most a few tries)
        held = None
        for _ in range(6):
            ws = await connect_ws(url, key=tenant.key, ssl=edge.client_ssl())
            await recv_json(ws)
            request_id = ws.response.headers["x-request-id"]
            row = session_row(engine, tenant.account_id, request_id)
            if row.node == node_id(a):
                held = (ws, request_id)
                break
            await ws.close()
        assert held is not None, "no session landed on node A"
        ws, held_id = held
        a.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)  # A has begun to drain
        new_nodes = []
        for _ in range(4):
            async with connect_ws(url, key=tenant.key, ssl=edge.client_ssl()) as other:
                await recv_json(other)
                request_id = other.response.headers["x-request-id"]
            new_nodes.append(ended_record(engine, request_id).node)
        # A's own session runs on through the drain and is billed
        await ws.send(json.dumps({"type": "response.create"}))
        await recv_until(ws, "response.done")
        await ws.close()
        return held_id, new_nodes

    held_id, new_nodes = run(go(), 60)
    assert new_nodes == [node_id(b)] * 4, new_nodes
    held = ended_record(engine, held_id)
    assert held.node == node_id(a) and held.end_reason == "client_closed" and held.responses == 1 and held.cost_pico > 0
    assert a.proc.wait(30) == 0  # its last session over, A stopped by itself
    logs = assert_no_key_in_logs(edge, tenant.key)
    retried = logs["meshrt.access.log"].count("/503, ")  # upstream_status "503, 101": A refused, B took it
    print(f"drain: 4 new sessions, all on node B ({retried} retried by nginx after A's 503)")
