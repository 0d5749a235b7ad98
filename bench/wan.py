"""7. Set-up over a WAN: a simulator whose handshakes pay a round trip each (`--handshake-delay-ms`,
30 ms: TCP, then the upgrade; docs/simulator.md), reached directly and through two gateways on
loopback (a gateway near its clients): one whose pool workers open their upstream connection
ahead (the default, MESHRT_UPSTREAM_PRECONNECT_S) and one without (`=0`). Sequential opens, the
three paths rotating; then bursts of `burst_size`, the paths' order rotating, each gateway's sessions ended before the
next burst. Connect → `session.created`, ms.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from contextlib import closing

from .clients import Conn
from .clients import Target
from .clients import open_burst_counted
from .clients import run_async
from .plans import Plan
from .plans import log
from .stack import Stack
from .stack import _read_line
from .stack import _stop_process
from .stats import summary

PATHS = ("direct", "preconnect_on", "preconnect_off")


class WanStack(Stack):
    """A WAN-delayed simulator and two gateways to it (pre-connect on and off)."""

    def __init__(self, settings, plan: Plan):
        super().__init__(settings, plan)
        self.gateways: dict[str, subprocess.Popen] = {}
        self.targets: dict[str, Target] = {}

    def start(self) -> "WanStack":
        self.sim = self._start_helper(
            "wan-sim",
            "meshrt.simulator",
            "--port",
            "0",
            "--api-key",
            self.operator_key,
            "--handshake-delay-ms",
            str(self.plan.wan_rtt_ms),
        )
        sim_port = int(_read_line(self.sim, r"listening on ws://[^:]+:(\d+)", 20, "the WAN simulator").group(1))
        self.targets["direct"] = Target("direct", sim_port, self.operator_key)
        for name, extra in (("preconnect_on", {}), ("preconnect_off", {"MESHRT_UPSTREAM_PRECONNECT_S": "0"})):
            db_url = f"sqlite:///{self.tmp / (name + '.db')}"
            key = self._tenant_key(db_url)
            env = self._gateway_env(db_url, sim_port)
            env["MESHRT_STATE_DIR"] = str(self.tmp / f"state-{name}")
            env.setdefault("MESHRT_UPSTREAM_PRECONNECT_S", "20")
            env.update(extra)
            self.gw = proc = subprocess.Popen(
                [sys.executable, "-m", "meshrt.supervisor.cli", "serve"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=open(self.tmp / f"gateway-{name}.err", "ab"),
                text=True,
                stdin=subprocess.DEVNULL,
            )
            self.gateways[name] = proc
            port = int(_read_line(proc, r"listening on http://[^:]+:(\d+)", 30, f"the gateway ({name})").group(1))
            self.targets[name] = Target("gateway", port, key)
            self._wait_ready(port)
        return self

    def wait_ended(self, name: str, timeout: float = 30) -> None:
        """Wait until gateway `name` (not the direct path) has finalised every session."""
        if name not in self.gateways:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with closing(sqlite3.connect(self.tmp / f"{name}.db", timeout=10)) as conn:
                if not conn.execute("SELECT count(*) FROM realtime_session WHERE state != 'ended'").fetchone()[0]:
                    return
            time.sleep(0.05)

    def stop(self, keep: bool = False) -> None:
        for proc in self.gateways.values():
            _stop_process(proc)
        self.gw = None
        super().stop(keep)


def measure_wan(settings, plan: Plan) -> dict:
    stack = WanStack(settings, plan)
    ok = False
    try:
        stack.start()
        time.sleep(1.0)  # the pools forked and (on) their connections opened
        out = _measure(stack, plan)
        ok = True
        return out
    finally:
        stack.stop(keep=not ok)
        if not ok:
            log(f"WAN stack logs kept in {stack.tmp}")


def _measure(stack: WanStack, plan: Plan) -> dict:
    seq = {name: [] for name in PATHS}
    for i in range(plan.wan_sequential):
        order = PATHS[i % 3 :] + PATHS[: i % 3]  # each path first, second and third alike
        for name in order:
            conn = Conn(stack.targets[name])
            seq[name].append(conn.setup_ns / 1e6)
            conn.close()
        time.sleep(0.05)  # the gateways' pools refill (and reconnect) between opens
    times = {name: [] for name in PATHS}
    walls = {name: [] for name in PATHS}
    refused = dict.fromkeys(PATHS, 0)
    for r in range(plan.wan_burst_rounds):
        for name in PATHS[r % 3 :] + PATHS[: r % 3]:
            got, wall, failed = run_async(open_burst_counted(stack.targets[name], plan.burst_size))
            times[name] += got
            walls[name].append(wall)
            refused[name] += failed
            stack.wait_ended(name)  # a gateway's teardown must not overlap the next burst
            time.sleep(0.5)  # the pool refills (and reconnects)
    burst = {
        name: {
            **(summary(times[name], 2) if times[name] else {}),
            "wall_ms": round(sum(walls[name]) / len(walls[name]), 1),
            "wall_ms_each": [round(w, 1) for w in walls[name]],
            "refused": refused[name],
        }
        for name in PATHS
    }
    sequential = {name: summary(values, 2) for name, values in seq.items()}
    direct = sequential["direct"]
    out = {
        "unit": "ms",
        "rtt_ms": plan.wan_rtt_ms,
        "sequential": {
            "connections": plan.wan_sequential,
            **sequential,
            "added": {
                name: {p: round(sequential[name][p] - direct[p], 2) for p in ("p50", "p90", "p99")}
                for name in ("preconnect_on", "preconnect_off")
            },
        },
        "burst": {"size": plan.burst_size, "rounds": plan.wan_burst_rounds, **burst},
    }
    log(
        f"wan ({plan.wan_rtt_ms:g} ms RTT): sequential p50 direct {direct['p50']} ms, "
        f"meshrt pre-connected {sequential['preconnect_on']['p50']} ms, "
        f"without {sequential['preconnect_off']['p50']} ms"
    )
    return out


def render_wan(w: dict) -> list[str]:
    seq = w["sequential"]
    lines = [
        f"7. Set-up over a WAN ({w['rtt_ms']:g} ms RTT on the upstream's TCP and upgrade), "
        f"connect → session.created, ms{'':<2}" + " ".join(f"{c:>10}" for c in ("p50", "p90", "p99")),
        f"   sequential, {seq['connections']} each",
    ]
    labels = {
        "direct": "direct",
        "preconnect_on": "meshrt, upstream pre-connected",
        "preconnect_off": "meshrt, MESHRT_UPSTREAM_PRECONNECT_S=0",
    }
    for name in PATHS:
        d = seq[name]
        lines.append(f"     {labels[name]:<42}" + " ".join(f"{d[p]:>10}" for p in ("p50", "p90", "p99")))
    b = w["burst"]
    lines.append(f"   bursts of {b['size']} concurrent, {b['rounds']} each: wall ms, per session p50 / p99, refused")
    for name in PATHS:
        d = b[name]
        lines.append(
            f"     {labels[name]:<42}{d['wall_ms']:>10} {d.get('p50', '-'):>10} {d.get('p99', '-'):>10}"
            f"   refused {d['refused']}"
        )
    return lines
