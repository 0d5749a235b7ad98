"""The simulator's WAN delay (`--handshake-delay-ms`, docs/simulator.md): one round trip on TCP
connect, one for TLS, one for the upgrade; a connection opened ahead pays only the upgrade's."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import time

import pytest
import trustme
from conftest import OPERATOR_KEY
from conftest import _stop
from conftest import start_sim

RTT_MS = 60


def _upgrade_request(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        "GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {OPERATOR_KEY}\r\n\r\n"
    ).encode()


def _read_head(sock: socket.socket) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, "closed before the response head"
        buf += data
    return buf


@pytest.fixture(scope="module")
def delayed_sim(tmp_path_factory):
    sim = start_sim(tmp_path_factory.mktemp("wan-sim"), "--handshake-delay-ms", str(RTT_MS))
    yield sim
    _stop(sim.proc)


@pytest.fixture(scope="module")
def tls_ca(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wan-tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return ca, cert_path, key_path


@pytest.fixture(scope="module")
def delayed_tls_sim(tmp_path_factory, tls_ca):
    _, cert, key = tls_ca
    sim = start_sim(
        tmp_path_factory.mktemp("wan-tls-sim"),
        "--handshake-delay-ms",
        str(RTT_MS),
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
    )
    yield sim
    _stop(sim.proc)


def test_a_direct_connect_pays_two_round_trips_and_a_preopened_one_only_the_upgrade(delayed_sim):
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", delayed_sim.port)) as sock:
        sock.sendall(_upgrade_request(delayed_sim.port))
        head = _read_head(sock)
        direct_ms = (time.monotonic() - began) * 1000
    assert head.startswith(b"HTTP/1.1 101")
    assert 2 * RTT_MS <= direct_ms < 2 * RTT_MS + 150

    with socket.create_connection(("127.0.0.1", delayed_sim.port)) as sock:
        time.sleep(RTT_MS * 1.5 / 1000)  # the TCP round trip is behind us
        began = time.monotonic()
        sock.sendall(_upgrade_request(delayed_sim.port))
        head = _read_head(sock)
        upgrade_ms = (time.monotonic() - began) * 1000
    assert head.startswith(b"HTTP/1.1 101")
    assert RTT_MS <= upgrade_ms < 2 * RTT_MS


def test_concurrent_connections_wait_in_parallel(delayed_sim):
    socks = [socket.create_connection(("127.0.0.1", delayed_sim.port)) for _ in range(10)]
    began = time.monotonic()
    try:
        for sock in socks:
            sock.sendall(_upgrade_request(delayed_sim.port))
        for sock in socks:
            assert _read_head(sock).startswith(b"HTTP/1.1 101")
    finally:
        for sock in socks:
            sock.close()
    assert (time.monotonic() - began) * 1000 < 2 * RTT_MS + 250  # not 10 × 2 round trips


def test_tls_adds_a_round_trip_and_frames_flow_after_it(delayed_tls_sim, tls_ca):
    ca = tls_ca[0]
    context = ssl.create_default_context()
    ca.configure_trust(context)
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", delayed_tls_sim.port)) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            tls_ms = (time.monotonic() - began) * 1000
            sock.sendall(_upgrade_request(delayed_tls_sim.port))
            head = _read_head(sock)
            total_ms = (time.monotonic() - began) * 1000
            assert head.startswith(b"HTTP/1.1 101")
            # the simulator's first frame (session.created) follows without more delay
            data = head.partition(b"\r\n\r\n")[2]
            while b"session.created" not in data:
                chunk = sock.recv(65536)
                assert chunk
                data += chunk
    assert 2 * RTT_MS <= tls_ms < 2 * RTT_MS + 150
    assert 3 * RTT_MS <= total_ms < 3 * RTT_MS + 200


def test_the_delay_is_bounded_on_the_command_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "meshrt.simulator", "--port", "0", "--handshake-delay-ms", "-1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "--handshake-delay-ms" in proc.stderr
