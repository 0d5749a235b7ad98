"""Versioned control messages (shared/control.py): every message carries the protocol version;
one of another version is refused, never read as this version's. A worker of another version
re-attaching to a supervisor is answered `VersionRefused`, logged, and ends its session as on
supervisor loss (`node_lost`) at once, rather than being adopted and misread."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import httpx
import pytest
from conftest import ended_record
from conftest import wait_for
from realtime_client import connect_ws
from realtime_client import expect_closed
from realtime_client import recv_json
from realtime_client import run

from meshrt.shared import control


def reencoded(message, version) -> bytes:
    body = json.loads(control.encode(message))
    if version is None:
        del body["v"]
    else:
        body["v"] = version
    return json.dumps(body).encode()


def test_every_message_carries_the_version_and_another_is_refused():
    ping = control.Ping()
    assert json.loads(control.encode(ping))["v"] == control.PROTOCOL_VERSION == 1
    assert control.decode(control.encode(ping)) == ping
    for version in (None, 0, 2, "1"):  # None: a peer from before messages were versioned
        with pytest.raises(control.VersionMismatch) as refused:
            control.decode(reencoded(ping, version))
        assert refused.value.kind == "ping" and refused.value.version == (0 if version is None else version)
        assert isinstance(refused.value, control.ControlError)
    # the refusal itself is read whatever version sent it: it is what two versions can say to each other
    answer = control.VersionRefused(speaks=1, got=2)
    assert control.decode(reencoded(answer, 7)) == answer


def test_supervisor_answers_a_message_of_another_version_with_a_refusal(gateway_factory):
    gw = gateway_factory()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(5)
    sock.connect(str(gw.state_dir / "run" / "control.sock"))
    sock.send(reencoded(control.Ping(), 2))
    answer, fds = control.recv(sock)
    assert answer == control.VersionRefused(speaks=1, got=2) and fds == []
    assert sock.recv(100) == b""  # and closed
    sock.close()
    wait_for(lambda: "protocol version 2" in gw.log_text(), 5, 0.05, "the refusal logged")


SITECUSTOMIZE = """\
import meshrt.shared.control as control
control.PROTOCOL_VERSION = 2  # this node's processes speak another version of the control protocol
"""


def test_a_worker_of_another_version_is_refused_and_ends_its_session(gateway_factory, tenant, engine, tmp_path):
    other = tmp_path / "other-version"
    other.mkdir()
    (other / "sitecustomize.py").write_text(SITECUSTOMIZE)
    first = gateway_factory(PYTHONPATH=str(other))  # supervisor, zygote and workers at version 2

    async def go():
        ws = await connect_ws(first.ws_url, key=tenant.key).__aenter__()
        await recv_json(ws)
        os.kill(first.proc.pid, signal.SIGKILL)  # its worker relays on, and looks for a supervisor
        first.proc.wait(10)
        started = time.monotonic()
        second = gateway_factory(state=first.state_dir)  # version 1, on the same state dir
        events = await expect_closed(ws, 20)
        return ws, events, time.monotonic() - started, second

    ws, events, ended_after, second = run(go(), 90)
    refusals = second.log_text().count("refused a worker's re-attach")
    print(f"\nsession ended {ended_after * 1000:.0f} ms after the other version's supervisor was started")
    assert events[-1]["error"]["code"] == "node_lost"
    assert ended_after < 5.0  # its start-up, then at once: not the node's lease / 2 without a supervisor
    record = ended_record(engine, ws.response.headers["x-request-id"], 30)
    assert record.end_reason == "node_lost"
    logs = first.log_text()  # the worker writes to the stderr it inherited from its first node
    assert "refused" in logs and "control protocol version 1" in logs
    assert "protocol version 2" in second.log_text() and "worker re-attached" not in second.log_text()
    assert refusals == 1  # the first refusal reached it (nothing it sent after made its socket reset)


FRONT_DOOR_UPGRADED = """\
import pathlib, sys
if "meshrt.frontdoor" in sys.orig_argv and pathlib.Path({flag!r}).exists():
    import meshrt.shared.control as control
    control.PROTOCOL_VERSION = 2  # a front door started from a release installed after its supervisor
"""


def test_a_front_door_of_another_version_is_not_ready_and_says_why(gateway_factory, tmp_path):
    flag = tmp_path / "upgraded"
    other = tmp_path / "other-version"
    other.mkdir()
    (other / "sitecustomize.py").write_text(FRONT_DOOR_UPGRADED.format(flag=str(flag)))
    gw = gateway_factory(PYTHONPATH=str(other))
    assert httpx.get(f"{gw.http_url}/readyz", timeout=5).status_code == 200
    flag.touch()  # the release on disk changes; then the front door dies and is restarted from it
    old = gw.frontdoor_pid()
    os.kill(old, signal.SIGKILL)

    def answer():
        try:
            response = httpx.get(f"{gw.http_url}/readyz", timeout=5)
        except httpx.HTTPError:
            return None
        return response if gw.frontdoor_pid() not in (None, old) and response.status_code == 503 else None

    response = wait_for(answer, 20, 0.1, "the restarted front door's answer")
    assert response.json()["error"]["message"] == "supervisor speaks control protocol version 1, this front door 2"
    assert "refused a 'ping' message of control protocol version 2" in gw.log_text()
