"""Set-up before/after in one run: gateways of several source trees side by side, alternating.

    python -m meshrt.bench.setup_ab base=/path/to/tree new=/path/to/other-tree
    python -m meshrt.bench.setup_ab small=/tree deep=/tree+MESHRT_WARM_WORKERS=110

Each tree needs its own `.venv` (its `meshrt` installed editable); `+VAR=value` after a tree
sets a gateway setting for that one (the same tree twice compares settings). One simulator and
one gateway per entry; then ROUNDS rounds (env, default 4) of a burst of SIZE (default 100)
connects direct and through every gateway (order flipping each round; every session's record
waited for between bursts, then PAUSE seconds, default 1), then SEQ (default 60) sequential
opens per path, rotating. Prints JSON: burst wall times, per-session p50/p99, CPU per burst of
each gateway process (psutil; "workers" = the zygote's children, the reaped included),
sequential added p50 and the other processes' CPU (cores) during the run. Machines vary 3×
between runs: compare trees only within one run."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import psutil

from meshrt.shared.settings import load_settings

from .clients import Conn
from .clients import open_burst_counted
from .clients import run_async
from .machine import busy_seconds
from .machine import tree_cpu_seconds
from .plans import QUICK
from .stack import Stack


def _cpu(stack: Stack) -> dict[str, float]:
    out = {}
    for role, proc in stack.roles().items():
        t = proc.cpu_times()
        out[role] = t.user + t.system
        if role == "zygote":
            live = 0.0
            for child in proc.children():
                try:
                    ct = child.cpu_times()
                    live += ct.user + ct.system
                except psutil.Error:
                    pass
            out["workers"] = t.children_user + t.children_system + live
    return out


def _admit_ms(stack: Stack) -> list[float]:
    """The front door's `admit_ms` (lock wait + admission transaction) of every session so far."""
    out = []
    for line in (stack.tmp / "gateway.err").read_text(errors="replace").splitlines():
        if '"admitted"' in line and "admit_ms" in line:
            try:
                out.append(float(json.loads(line)["admit_ms"]))
            except (ValueError, KeyError, TypeError):
                pass
    return out


def _pct(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 2) if values else None


def main(argv: list[str]) -> int:
    rounds, size, seq = (int(os.environ.get(k, d)) for k, d in (("ROUNDS", 4), ("SIZE", 100), ("SEQ", 60)))
    pause = float(os.environ.get("PAUSE", 1.0))  # after each burst: the exits reaped, the pool refilled
    settings = load_settings()
    stacks: dict[str, Stack] = {}
    own = sys.executable
    try:
        for arg in argv:
            name, spec = arg.split("=", 1)
            tree, *overrides = spec.split("+")
            extra = dict(o.split("=", 1) for o in overrides)
            own_settings = load_settings({**os.environ, **extra}) if extra else settings
            sys.executable = f"{tree}/.venv/bin/python"  # the gateway and its simulator run from that tree
            stacks[name] = Stack(own_settings, QUICK).start()
    finally:
        sys.executable = own
    direct = next(iter(stacks.values())).direct
    res = {n: {"walls": [], "times": [], "refused": 0, "cpu": [], "seq": []} for n in (*stacks, "direct")}
    t0, busy0, ours0 = time.time(), busy_seconds(), tree_cpu_seconds()
    try:
        for r in range(rounds):
            got, wall, _ = run_async(open_burst_counted(direct, size))
            res["direct"]["walls"].append(wall)
            res["direct"]["times"] += got
            time.sleep(0.3)
            order = list(stacks.items()) if r % 2 == 0 else list(stacks.items())[::-1]
            for name, stack in order:
                before = _cpu(stack)
                got, wall, failed = run_async(open_burst_counted(stack.gateway, size))
                stack.wait_sessions_ended()
                time.sleep(pause)
                after = _cpu(stack)
                res[name]["walls"].append(wall)
                res[name]["times"] += got
                res[name]["refused"] += failed
                res[name]["cpu"].append({k: after[k] - before.get(k, 0.0) for k in after})
                time.sleep(0.3)
        admit_ms = {n: _admit_ms(s) for n, s in stacks.items()}  # the bursts' admissions
        seq_before = {n: _cpu(s) for n, s in stacks.items()}
        for _ in range(seq):
            for name, stack in [("direct", None), *stacks.items()]:
                conn = Conn(direct if stack is None else stack.gateway)
                res[name]["seq"].append(conn.setup_ns / 1e6)
                conn.close()
                time.sleep(0.02)
        seq_cpu = {}
        for name, stack in stacks.items():
            stack.wait_sessions_ended()
            time.sleep(1.0)
            after = _cpu(stack)
            seq_cpu[name] = {k: round((after[k] - seq_before[name].get(k, 0.0)) / max(1, seq) * 1000, 2) for k in after}
        wall_s = time.time() - t0
        out: dict = {
            "other_cores": round(max(0.0, (busy_seconds() - busy0) - (tree_cpu_seconds() - ours0)) / wall_s, 2),
            "size": size,
            "rounds": rounds,
        }
        for name, d in res.items():
            o = {
                "wall_ms": [round(w) for w in d["walls"]],
                "wall_med": round(statistics.median(d["walls"])) if d["walls"] else None,
                "p50": _pct(d["times"], 0.5),
                "p99": _pct(d["times"], 0.99),
                "seq_p50": _pct(d["seq"], 0.5),
                "seq_p99": _pct(d["seq"], 0.99),
            }
            if name != "direct":
                o["seq_added_p50"] = round(o["seq_p50"] - _pct(res["direct"]["seq"], 0.5), 2)
                o["refused"] = d["refused"]
                if d["cpu"]:
                    o["cpu_s_per_burst"] = {k: round(statistics.median(c[k] for c in d["cpu"]), 3) for k in d["cpu"][0]}
                    o["cpu_ms_per_burst_session"] = round(sum(o["cpu_s_per_burst"].values()) / size * 1000, 1)
                o["seq_cpu_ms_per_session"] = seq_cpu[name]
                o["burst_admit_ms"] = {"p50": _pct(admit_ms[name], 0.5), "p99": _pct(admit_ms[name], 0.99)}
            out[name] = o
        print(json.dumps(out, indent=1))
    finally:
        for stack in stacks.values():
            stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
