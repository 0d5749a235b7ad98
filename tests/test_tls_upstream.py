"""The upstream leg over TLS, as with the real API (wss://api.openai.com): the simulator serves
wss:// with a certificate from a private CA that the gateway is told to trust via SSL_CERT_FILE
(the standard OpenSSL variable, kept in the workers' scrubbed environment)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from conftest import _stop
from conftest import ended_record
from conftest import start_gateway
from conftest import start_sim
from realtime_client import connect_ws
from realtime_client import expect_refusal
from realtime_client import recv_json
from realtime_client import recv_until
from realtime_client import run

from meshrt.shared.errors import ERRORS


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def tls_sim(tmp_path_factory, tls_files):
    cert, key = tls_files
    sim = start_sim(tmp_path_factory.mktemp("tls-sim"), "--tls-cert", str(cert), "--tls-key", str(key))
    assert sim.url.startswith("wss://")
    yield sim
    _stop(sim.proc)


@pytest.mark.parametrize("backend", ["uvloop", "trio"])
def test_session_over_a_tls_upstream_relays_and_bills(
    tmp_path, database_url, tls_sim, tls_files, tenant, engine, backend
):
    gw = start_gateway(
        tmp_path, database_url, tls_sim.url, SSL_CERT_FILE=str(tls_files[0]), MESHRT_WORKER_BACKEND=backend
    )
    big = json.dumps(
        {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x" * 3_000_000}]},
        }
    )

    async def go():
        async with connect_ws(gw.ws_url, key=tenant.key, query="sim_echo=1") as ws:
            assert (await recv_json(ws))["type"] == "session.created"
            await ws.send(big)  # many TLS records each way, and partial socket writes
            echoed = await ws.recv()
            return ws.response.headers["x-request-id"], echoed

    async def respond():
        async with connect_ws(gw.ws_url, key=tenant.key, query="sim_response_ms=50") as ws:
            await recv_json(ws)
            await ws.send(json.dumps({"type": "response.create"}))
            usage = (await recv_until(ws, "response.done"))[-1]["response"]["usage"]
            return ws.response.headers["x-request-id"], usage

    try:
        time.sleep(1.0)  # the pool workers' TLS sessions opened ahead
        _, echoed = run(go(), 60)
        assert echoed == big
        request_id, usage = run(respond(), 60)
        row = ended_record(engine, request_id)
        assert row.end_reason == "client_closed" and row.responses == 1
        assert row.usage["total_tokens"] == usage["total_tokens"] and row.cost_pico > 0
        live = [json.loads(line) for line in gw.log_text().splitlines() if '"session live"' in line]
        # both sessions went through a TLS session begun ahead, the upgrade written on it first
        assert [entry.get("upgrade_ahead") for entry in live] == [True, True], live
    finally:
        _stop(gw.proc)


def test_an_untrusted_upstream_certificate_is_refused_at_once(tmp_path, database_url, tls_sim, tenant):
    gw = start_gateway(tmp_path, database_url, tls_sim.url, MESHRT_UPSTREAM_ATTEMPTS="3")
    try:
        event, code, _ = run(expect_refusal(gw.ws_url, key=tenant.key), 60)
        assert event["error"]["code"] == "upstream_error" and code == ERRORS["upstream_error"].close_code == 1014
        assert "certificate" in event["error"]["message"].lower()
        assert gw.log_text().count("upstream connect failed") == 1
    finally:
        _stop(gw.proc)
