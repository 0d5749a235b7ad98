"""Fixtures that start the real thing: the simulator and `meshrt serve` as processes, on
loopback ports, against a fresh database (SQLite, or PostgreSQL when MESHRT_TEST_DATABASE_URL
is set: the same tests then run there). Waits poll a condition against a deadline."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine
from sqlalchemy import text

from meshrt.dev.children import wait_for_line
from meshrt.shared.money import Money
from meshrt.storage import accounts
from meshrt.storage import db

OPERATOR_KEY = "sk-operator-" + "x" * 24
PG_ENV = "MESHRT_TEST_DATABASE_URL"


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 15) -> int | None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


# --- database -----------------------------------------------------------------------------


def session_record(engine, request_id: str):
    from sqlmodel import Session
    from sqlmodel import select

    from meshrt.storage.db import SessionRecord

    with Session(engine) as db:
        return db.exec(select(SessionRecord).where(SessionRecord.request_id == request_id)).first()


def ended_record(engine, request_id: str, timeout: float = 20):
    """The session's final usage record, waiting (with a deadline) for the supervisor to write it."""

    def ended():
        row = session_record(engine, request_id)
        return row if row is not None and row.state == "ended" else None

    return wait_for(ended, timeout, 0.05, f"the record of {request_id}")


@pytest.fixture(scope="session")
def database_url(tmp_path_factory):
    base = os.environ.get(PG_ENV)
    if not base:
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'meshrt.db'}"
        return
    base = base.replace("postgresql://", "postgresql+psycopg://", 1)
    name = f"meshrt_test_{secrets.token_hex(4)}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield base.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def engine(database_url):
    engine = db.make_engine(database_url)
    db.create_schema(engine)
    yield engine
    engine.dispose()


@dataclass
class Tenant:
    account_id: str
    key: str
    key_id: str


@pytest.fixture
def make_tenant(engine):
    def make(
        balance: str = "100",
        max_concurrent_sessions: int | None = None,
        token_cap: int | None = None,
        session_token_cap: int | None = None,
    ) -> Tenant:
        account = accounts.create_account(
            engine, f"t-{secrets.token_hex(3)}", Money.from_usd(balance), max_concurrent_sessions, session_token_cap
        )
        created = accounts.create_key(engine, account.id, "test", token_cap)
        return Tenant(account.id, created.plaintext, created.key.id)

    return make


@pytest.fixture
def tenant(make_tenant) -> Tenant:
    return make_tenant()


# --- the simulator ------------------------------------------------------------------------


@dataclass
class Sim:
    proc: subprocess.Popen
    port: int
    log_dir: Path
    scheme: str = "ws"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/v1/realtime"

    def logs(self) -> list[Path]:
        return sorted(self.log_dir.glob("*.jsonl"), key=lambda p: p.stat().st_mtime)


def start_sim(tmp: Path, *extra: str) -> Sim:
    log_dir = tmp / "sim-frames"
    log_dir.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshrt.simulator",
            "--port",
            "0",
            "--api-key",
            OPERATOR_KEY,
            "--frame-log-dir",
            str(log_dir),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=open(tmp / "sim.err", "ab"),
        text=True,
    )
    match = wait_for_line(proc, r"listening on (wss?)://[^:]+:(\d+)", 20, "the simulator")
    return Sim(proc, int(match.group(2)), log_dir, match.group(1))


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    s = start_sim(tmp_path_factory.mktemp("sim"))
    yield s
    _stop(s.proc)


# --- the gateway --------------------------------------------------------------------------


@dataclass
class Gateway:
    proc: subprocess.Popen
    port: int
    state_dir: Path
    stderr_path: Path
    env: dict = field(default_factory=dict)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def children(self):
        import psutil

        return psutil.Process(self.proc.pid).children(recursive=True)

    def frontdoor_pid(self) -> int | None:
        import psutil

        for child in psutil.Process(self.proc.pid).children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE and "meshrt.frontdoor" in " ".join(child.cmdline()):
                    return child.pid
            except psutil.Error:
                continue
        return None


def start_gateway(
    tmp: Path, database_url: str, upstream_url: str, state: Path | None = None, command=("serve",), **env_overrides
) -> Gateway:
    state = state or tmp / f"state-{secrets.token_hex(3)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHRT_") and k != "OPENAI_API_KEY"}
    env.update(
        {
            "MESHRT_STATE_DIR": str(state),
            "MESHRT_DATABASE_URL": database_url,
            "MESHRT_UPSTREAM_URL": upstream_url,
            "OPENAI_API_KEY": OPERATOR_KEY,
            "MESHRT_ALLOW_PLAIN_WS": "1",
            "MESHRT_PORT": "0",
            "MESHRT_HOST": "127.0.0.1",
            "MESHRT_UPSTREAM_ATTEMPTS": "2",
            "MESHRT_UPSTREAM_CONNECT_TIMEOUT_S": "3",
            "MESHRT_DRAIN_S": "5",
            "MESHRT_LOG_LEVEL": "info",
        }
    )
    env.update({k: str(v) for k, v in env_overrides.items()})
    stderr_path = tmp / f"gateway-{secrets.token_hex(3)}.err"
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshrt.supervisor.cli", *command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=open(stderr_path, "ab"),
        text=True,
    )
    port = int(wait_for_line(proc, r"listening on http://[^:]+:(\d+)", 30, "the gateway").group(1))
    gateway = Gateway(proc, port, state, stderr_path, env)

    def ready():
        try:
            return httpx.get(f"{gateway.http_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 30, 0.05, "gateway readiness")
    return gateway


@pytest.fixture(scope="module")
def shared_gateway(tmp_path_factory, database_url, sim):
    """One gateway for a whole module, for tests that only read from it or make their own tenants."""
    gw = start_gateway(tmp_path_factory.mktemp("gw"), database_url, sim.url)
    yield gw
    _stop(gw.proc)


@pytest.fixture(params=["asyncio", "trio"])
def worker_backend(request) -> str:
    return request.param


@pytest.fixture
def gateway_factory(tmp_path, database_url, sim):
    started: list[Gateway] = []

    def factory(upstream_url: str | None = None, state: Path | None = None, **env) -> Gateway:
        gw = start_gateway(tmp_path, database_url, upstream_url or sim.url, state, **env)
        started.append(gw)
        return gw

    yield factory
    for gw in started:
        _stop(gw.proc)


@pytest.fixture
def gateway(gateway_factory, worker_backend) -> Gateway:
    return gateway_factory(MESHRT_WORKER_BACKEND=worker_backend)
