"""Isolation and secrets: what each process may hold, who may reach the control socket, and
that keys never show up where they could be read."""

from __future__ import annotations

import hashlib
import json
import os
import stat

from conftest import OPERATOR_KEY
from conftest import ended_record
from conftest import wait_for
from realtime_client import connect_ws
from realtime_client import recv_json
from realtime_client import run
from sqlalchemy import text
from sqlmodel import Session
from sqlmodel import select

from meshrt.storage.db import SessionRecord

SECRET_VARS = ("OPENAI_API_KEY", "MESHRT_DATABASE_URL", "MESHRT_ADMIN_TOKEN")


def _processes(gateway, worker_pid: int) -> dict:
    procs = {"frontdoor": None, "zygote": None, "worker": None}
    for child in gateway.children():
        cmd = " ".join(child.cmdline())
        if "meshrt.frontdoor" in cmd:
            procs["frontdoor"] = child
        elif "meshrt.worker.zygote" in cmd and child.ppid() == gateway.proc.pid:
            procs["zygote"] = child
        elif child.pid == worker_pid:
            procs["worker"] = child
    return procs


def _session_pid(engine, request_id: str) -> int | None:
    with Session(engine) as db:
        row = db.exec(select(SessionRecord).where(SessionRecord.request_id == request_id)).first()
        return row.pid if row is not None and row.state == "live" else None


def test_zygote_and_workers_hold_no_secret_and_no_database(gateway_factory, tenant, engine):
    gw = gateway_factory(MESHRT_ADMIN_TOKEN="admin-secret-token")

    async def go():
        async with connect_ws(gw.ws_url, key=tenant.key) as ws:
            await recv_json(ws)
            request_id = ws.response.headers["x-request-id"]
            pid = wait_for(lambda: _session_pid(engine, request_id), 10, 0.05, "the session's worker")
            procs = _processes(gw, pid)
            checks = {}
            for role, proc in (
                ("zygote", procs["zygote"]),
                ("worker", procs["worker"]),
                ("frontdoor", procs["frontdoor"]),
            ):
                checks[role] = (
                    proc.environ(),
                    [f.path for f in proc.open_files()],
                    [c.raddr for c in proc.net_connections(kind="inet") if c.raddr],
                )
            worker = procs["worker"]
            limits = _limits(worker.pid, "Max open files"), _limits(worker.pid, "Max address space")
            return checks, limits

    checks, (nofile, address_space) = run(go())
    for role in ("zygote", "worker"):
        environ, files, peers = checks[role]
        assert not any(var in environ for var in SECRET_VARS), role
        assert not any(str(v).startswith("rsk_") or OPERATOR_KEY in str(v) for v in environ.values())
        assert not any(f.endswith(".db") or f.endswith("-wal") for f in files), (role, files)
        assert not any(peer.port == 5432 for peer in peers), role
    frontdoor_env = checks["frontdoor"][0]
    assert "OPENAI_API_KEY" not in frontdoor_env and OPERATOR_KEY not in json.dumps(frontdoor_env)
    assert nofile[0] <= 64 and address_space[0] > 0  # per-worker fd and memory limits


def test_control_socket_and_state_are_private(gateway):
    control = gateway.state_dir / "run" / "control.sock"
    assert stat.S_IMODE(control.stat().st_mode) == 0o600
    assert stat.S_IMODE(gateway.state_dir.stat().st_mode) == 0o700
    pid = os.fork()
    if pid == 0:  # another user must not be able to hand off or re-attach
        import socket

        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                s.connect(str(control))
            except PermissionError:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_keys_are_stored_hashed_and_query_keys_are_redacted_everywhere(gateway, tenant, engine):
    async def go():
        async with connect_ws(gateway.ws_url, key=tenant.key, how="query") as ws:
            await recv_json(ws)
            return ws.response.headers["x-request-id"]

    request_id = run(go())
    assert ended_record(engine, request_id).end_reason == "client_closed"
    wait_for(lambda: "session finalised" in gateway.log_text(), 10)
    log = gateway.log_text()
    assert tenant.key not in log
    assert "api_key=rsk_…REDACTED" in log
    with Session(engine) as db:
        dump = json.dumps([list(r) for r in db.exec(text("SELECT * FROM apikey")).all()], default=str)
        dump += json.dumps([r.model_dump() for r in db.exec(select(SessionRecord)).all()], default=str)
    assert tenant.key not in dump
    assert hashlib.sha256(tenant.key.encode()).hexdigest() in dump


def test_the_upstream_key_never_reaches_a_client(gateway, tenant):
    async def go():
        async with connect_ws(gateway.ws_url, key=tenant.key, query="sim_fault=invalid_key_after_accept") as ws:
            seen = [str(ws.response.headers.raw_items())]
            try:
                while True:
                    seen.append(await ws.recv())
            except Exception:
                pass
            return seen

    seen = run(go())
    assert not any(OPERATOR_KEY in item for item in seen)


def _limits(pid: int, name: str) -> tuple[int, int]:
    """(soft, hard) of one limit from /proc/<pid>/limits: prlimit() on a worker under a uid of its
    own needs CAP_SYS_RESOURCE, which a container's root may lack; the file needs none."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith(name):
                soft, hard = line[len(name) :].split()[:2]
                return tuple(-1 if v == "unlimited" else int(v) for v in (soft, hard))
    raise AssertionError(f"no {name!r} in /proc/{pid}/limits")
