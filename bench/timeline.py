"""Where a burst's set-up time goes: a per-session timeline from the gateway's own log lines.

Every process logs its steps of a session's set-up in epoch seconds: the front door's "handed off"
(`t_accept`, `t_head`, `t_thread`: the admission thread started, `t_grant`: the admission
transaction's time, `t_admitted`, `t_ack`), the supervisor's "spawn sent" (`t_handoff`,
`t_spawn`), the worker's "session live" (`t_run`: its session began, `t_loop`, `t_upstream`,
`t_live`, and `pooled`). Joined by session id, each session's steps become durations, and each
step's p50/p99 over the burst says where it waits. Also each step's end as an offset from the
burst's start (the first accept), which shows what is serial: a step whose end grows with the
session's place in the burst.
"""

from __future__ import annotations

import json
from pathlib import Path

from .stats import percentile

# (label, from, to): consecutive steps of one session's set-up
STEPS = (
    ("accept → request head read (front door)", "t_accept", "t_head"),
    ("head → admission thread running", "t_head", "t_thread"),
    ("admission: lock wait + transaction", "t_thread", "t_admitted"),
    ("grant → handoff read by the supervisor", "t_admitted", "t_handoff"),
    ("supervisor: spool, channel, Spawn sent", "t_handoff", "t_spawn"),
    ("Spawn → the worker's session begins (zygote, fork or pool)", "t_spawn", "t_run"),
    ("worker: meter, event loop started", "t_run", "t_loop"),
    ("worker: upstream connect + upgrade", "t_loop", "t_upstream"),
    ("worker: filter, client's 101, WorkerLive", "t_upstream", "t_live"),
)


def read_sessions(log_path: Path, since: float) -> dict[str, dict]:
    """session id → its step times, from the lines logged since `since` (epoch seconds)."""
    sessions: dict[str, dict] = {}
    with open(log_path, errors="replace") as f:
        for line in f:
            if '"t_' not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") not in ("handed off", "spawn sent", "session live"):
                continue
            sid = entry.get("session_id")
            if not sid:
                continue
            times = {k: v for k, v in entry.items() if k.startswith("t_") or k == "pooled"}
            sessions.setdefault(sid, {}).update(times)
    return {sid: t for sid, t in sessions.items() if t.get("t_accept", since) >= since - 0.001}


def summarize(sessions: dict[str, dict]) -> dict:
    complete = [t for t in sessions.values() if all(k in t for _, a, b in STEPS for k in (a, b))]
    if not complete:
        return {"sessions": 0, "steps": []}
    start = min(t["t_accept"] for t in complete)
    steps = []
    for label, a, b in STEPS:
        durations = sorted((t[b] - t[a]) * 1000 for t in complete)
        ends = sorted((t[b] - start) * 1000 for t in complete)
        steps.append(
            {
                "step": label,
                "p50_ms": round(percentile(durations, 50), 2),
                "p99_ms": round(percentile(durations, 99), 2),
                "max_ms": round(durations[-1], 2),
                "end_p50_ms": round(percentile(ends, 50), 1),
                "end_max_ms": round(ends[-1], 1),
            }
        )
    totals = sorted((t["t_live"] - t["t_accept"]) * 1000 for t in complete)
    return {
        "sessions": len(complete),
        "pooled": sum(1 for t in complete if t.get("pooled")),
        "accepts_span_ms": round((max(t["t_accept"] for t in complete) - start) * 1000, 1),
        "accept_to_live_ms": {"p50": round(percentile(totals, 50), 1), "p99": round(percentile(totals, 99), 1)},
        "last_live_ms": round((max(t["t_live"] for t in complete) - start) * 1000, 1),
        "steps": steps,
    }


def render_timeline(t: dict, sequential: bool = False) -> list[str]:
    """A burst's timeline (each step's p50/p99/max and when it ended), or, `sequential`, the
    steps of set-ups one at a time (their ends say nothing there)."""
    if not t.get("sessions"):
        return ["   (no timeline: the gateway's log had no complete session)"]
    if sequential:
        head = f"   timeline of {t['sessions']} sequential set-ups ({t['pooled']} found a pool worker; accept → live"
        head += f" p50 {t['accept_to_live_ms']['p50']} ms, p99 {t['accept_to_live_ms']['p99']} ms)"
    else:
        head = f"   timeline of one burst of {t['sessions']} (from the gateway's logs; {t['pooled']} found a pool "
        head += f"worker; accepts spread over {t['accepts_span_ms']} ms, last live at {t['last_live_ms']} ms)"
    ends = "" if sequential else f"{'ends p50':>10}{'ends max':>10}"
    lines = [head, f"     {'step':<60}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{ends}"]
    for s in t["steps"]:
        cells = f"{s['p50_ms']:>9}{s['p99_ms']:>9}{s['max_ms']:>9}"
        if not sequential:
            cells += f"{s['end_p50_ms']:>10}{s['end_max_ms']:>10}"
        lines.append(f"     {s['step']:<60}{cells}")
    return lines
