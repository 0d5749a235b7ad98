"""The stack under test: the simulator, the floor relay and a gateway (`meshrt serve`) as
processes, with an account and a key; the gateway's processes by role; CPU and memory readings.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import closing
from pathlib import Path

import psutil

from meshrt.dev.children import ChildStartError
from meshrt.dev.children import wait_for_line
from meshrt.shared.settings import settings_env

from .clients import Target
from .plans import BenchError
from .plans import Plan


def _read_line(proc: subprocess.Popen, pattern: str, timeout: float, what: str) -> re.Match:
    try:
        return wait_for_line(proc, pattern, timeout, what)
    except ChildStartError as exc:
        raise BenchError(str(exc)) from None


def _stop_process(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class Stack:
    """The simulator and a gateway (`meshrt serve`) as processes, plus an account and a key.
    `direct` and `gateway` are the two targets every measurement compares."""

    def __init__(self, settings, plan: Plan):
        self.settings, self.plan = settings, plan
        self.tmp = Path(tempfile.mkdtemp(prefix="meshrt-bench-"))
        self.operator_key = "sk-bench-" + secrets.token_hex(16)
        self.sim = self.gw = self.floor_relay = None
        self.direct = self.gateway = self.floor = None

    def _start_helper(self, name: str, module: str, *args: str) -> subprocess.Popen:
        """A helper process (`python -m module`): its stdout read for its listening line, its
        stderr kept in the run's temporary directory."""
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=subprocess.PIPE,
            stderr=open(self.tmp / f"{name}.err", "ab"),
            text=True,
            stdin=subprocess.DEVNULL,
        )

    def start(self) -> "Stack":
        self.sim = self._start_helper("sim", "meshrt.simulator", "--port", "0", "--api-key", self.operator_key)
        sim_port = int(_read_line(self.sim, r"listening on ws://[^:]+:(\d+)", 20, "the simulator").group(1))
        self.direct = Target("direct", sim_port, self.operator_key)
        self.floor_relay = self._start_helper("floor", "meshrt.bench.floor", "--upstream-port", str(sim_port))
        floor_port = int(_read_line(self.floor_relay, r"listening on (\d+)", 20, "the floor relay").group(1))
        self.floor = Target("floor", floor_port, self.operator_key)
        db_url = f"sqlite:///{self.tmp / 'meshrt.db'}"
        key = self._tenant_key(db_url)
        self.gw = subprocess.Popen(
            [sys.executable, "-m", "meshrt.supervisor.cli", "serve"],
            env=self._gateway_env(db_url, sim_port),
            stdout=subprocess.PIPE,
            stderr=open(self.tmp / "gateway.err", "ab"),
            text=True,
            stdin=subprocess.DEVNULL,
        )
        port = int(_read_line(self.gw, r"listening on http://[^:]+:(\d+)", 30, "the gateway").group(1))
        self.gateway = Target("gateway", port, key)
        self._wait_ready(port)
        return self

    def _tenant_key(self, db_url: str) -> str:
        from meshrt.shared.money import Money
        from meshrt.storage import accounts
        from meshrt.storage import db

        engine = db.make_engine(db_url)
        try:
            db.create_schema(engine)
            account = accounts.create_account(
                engine, "bench", Money.from_usd("1000000"), max_concurrent_sessions=100_000
            )
            return accounts.create_key(engine, account.id, "bench").plaintext
        finally:
            engine.dispose()

    def _gateway_env(self, db_url: str, sim_port: int) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHRT_") and k != "OPENAI_API_KEY"}
        env.update(
            {
                "MESHRT_STATE_DIR": str(self.tmp / "state"),
                "MESHRT_DATABASE_URL": db_url,
                "MESHRT_UPSTREAM_URL": f"ws://127.0.0.1:{sim_port}/v1/realtime",
                "OPENAI_API_KEY": self.operator_key,
                "MESHRT_ALLOW_PLAIN_WS": "1",
                "MESHRT_HOST": "127.0.0.1",
                "MESHRT_PORT": "0",
                "MESHRT_MAX_SESSIONS": str(max(self.plan.capacity_steps) + 200),
                "MESHRT_MAX_CONCURRENT_SESSIONS": "100000",
                "MESHRT_DRAIN_S": "2",
                "MESHRT_WORKER_BACKEND": self.settings.worker_backend,
                "MESHRT_LOG_LEVEL": self.settings.log_level,
                "MESHRT_PREAUTH": "1" if self.settings.preauth else "0",  # MESHRT_PREAUTH=0 meshrt bench: without
            }
        )
        pool = (
            "MESHRT_WARM_WORKERS",
            "MESHRT_WARM_WORKERS_MIN",
            "MESHRT_WARM_WORKERS_MAX",
            "MESHRT_UPSTREAM_PRECONNECT_S",
        )
        env.update({k: v for k, v in settings_env(self.settings).items() if k in pool})  # unset stays unset
        return env

    def _wait_ready(self, port: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.gw.poll() is not None:
                break
            time.sleep(0.05)
        raise BenchError(f"the gateway did not become ready; see {self.tmp / 'gateway.err'}")

    # processes by role

    def _child(self, marker: str) -> psutil.Process | None:
        for child in psutil.Process(self.gw.pid).children():
            try:
                if marker in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        return None

    def roles(self) -> dict[str, psutil.Process]:
        out = {"supervisor": psutil.Process(self.gw.pid)}
        for role, marker in (("frontdoor", "meshrt.frontdoor"), ("zygote", "meshrt.worker.zygote")):
            proc = self._child(marker)
            if proc is not None:
                out[role] = proc
        return out

    def zygote_children(self) -> list[psutil.Process]:
        """Every worker process: those running a session and any pre-forked idle ones."""
        zygote = self._child("meshrt.worker.zygote")
        if zygote is None:
            return []
        return [p for p in zygote.children() if _alive(p)]

    def _session_rows(self) -> list[tuple[str, int | None]]:
        """(state, pid) of the sessions the gateway has not finalised, from its database."""
        with closing(sqlite3.connect(self.tmp / "meshrt.db", timeout=10)) as conn:
            return conn.execute("SELECT state, pid FROM realtime_session WHERE state != 'ended'").fetchall()

    def workers(self) -> list[psutil.Process]:
        """The processes of live sessions: the pid the supervisor recorded for each (warm,
        pre-forked workers without a session are not counted)."""
        pids = {pid for state, pid in self._session_rows() if state == "live" and pid}
        return [p for p in self.zygote_children() if p.pid in pids]

    def wait_live(self, n: int, timeout: float = 15) -> list[psutil.Process]:
        """Wait until n sessions are recorded live (the record trails session.created a little)."""
        deadline = time.monotonic() + timeout
        while True:
            workers = self.workers()
            if len(workers) >= n or time.monotonic() > deadline:
                return workers
            time.sleep(0.02)

    def wait_sessions_ended(self, timeout: float = 30) -> None:
        """Wait until every session is finalised, so that teardown doesn't overlap what's next."""
        deadline = time.monotonic() + timeout
        while self._session_rows() and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self, keep: bool = False) -> None:
        _stop_process(self.gw)
        _stop_process(self.floor_relay)
        _stop_process(self.sim)
        if not keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def cpu_seconds(procs: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def memory_mib(proc: psutil.Process) -> dict | None:
    try:
        info = proc.memory_full_info()
    except psutil.Error:
        return None
    return {"uss": info.uss / 2**20, "pss": info.pss / 2**20, "rss": info.rss / 2**20}


def alternate(i: int, a, b):
    """Both items, the order flipping every round: drift hits both paths alike."""
    return (a, b) if i % 2 == 0 else (b, a)
