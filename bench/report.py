"""The report: each headline figure against its target, and the human-readable table."""

from __future__ import annotations

from .timeline import render_timeline
from .translation import render_translation
from .wan import render_wan

TARGETS = {
    "rtt_small_added_p50_us": 40,
    "rtt_small_added_p99_us": 120,
    "setup_added_p50_ms": 2.0,
    "worker_idle_uss_mib": 2.0,
    "worker_streaming_uss_mib": 4.0,
    "capacity_sessions": 1000,
}


def targets_report(doc: dict) -> dict:
    """Each headline figure next to its target (only for the measurements that ran)."""
    rows = {}
    if "rtt" in doc:
        small = doc["rtt"]["small_1k"]["added"]
        rows.update(rtt_small_added_p50_us=small["p50"], rtt_small_added_p99_us=small["p99"])
    if "setup" in doc:
        rows["setup_added_p50_ms"] = doc["setup"]["sequential"]["added"]["p50"]
    if "memory" in doc:
        rows["worker_idle_uss_mib"] = doc["memory"]["worker_idle"]["uss"]["p50"]
        rows["worker_streaming_uss_mib"] = doc["memory"]["worker_streaming"]["uss"]["p50"]
    if "capacity" in doc:
        rows["capacity_sessions"] = doc["capacity"]["max_sessions"]
    out = {}
    for name, value in rows.items():
        target = TARGETS[name]
        met = value >= target if name == "capacity_sessions" else value <= target
        out[name] = {"value": value, "target": target, "met": met}
    return out


def _row(label: str, d: dict, width: int = 44) -> str:
    return f"   {label:<{width}}{d['p50']:>10} {d['p90']:>10} {d['p99']:>10}"


def _comparison(label: str, r: dict, unit: str) -> list[str]:
    return [
        f"  {label}",
        _row(f"  direct, {unit}", r["direct"]),
        _row(f"  gateway, {unit}", r["gateway"]),
        _row(f"  added, {unit}", r["added"])
        + f"   (gateway/direct p50 ×{r['ratio']['p50']}, p99 ×{r['ratio']['p99']})",
    ]


def _render_rtt(r: dict) -> list[str]:
    lines = [f"1. Round trip through a session vs direct (echo){'':<6}{'p50':>10} {'p90':>10} {'p99':>10}"]
    for name, label in (("small_1k", "1 KB text event"), ("large_32k", "32 KB audio append")):
        case = r[name]
        lines += _comparison(f"{label}, {case['pairs']} interleaved pairs", case, "µs")
        if "floor_added" in case:
            lines.append(_row("  floor: byte-copying uvloop relay, added", case["floor_added"]))
        lines.append(
            f"     CPU: gateway worker {case['worker_cpu_us_per_roundtrip']} µs per round trip; "
            f"simulator {case['sim_cpu_us_per_echo']} µs per echo"
        )
    return lines


def _render_setup(s: dict) -> list[str]:
    lines = [f"2. Set-up, connect → session.created{'':<18}{'p50':>10} {'p90':>10} {'p99':>10}"]
    lines += _comparison(f"sequential, {s['sequential']['connections']} each", s["sequential"], "ms")
    lines += _comparison(f"bursts of {s['burst']['size']} concurrent, {s['burst']['rounds']} each", s["burst"], "ms")
    lines.append(
        f"     burst wall time: direct {s['burst']['wall_ms']['direct']} ms, "
        f"gateway {s['burst']['wall_ms']['gateway']} ms"
    )
    for b in s.get("bursts", []):
        if "gateway" not in b:
            lines.append(f"   burst of {b['size']}: refused {b['refused']}")
            continue
        lines.append(
            f"   burst of {b['size']} at once ({b['rounds']} each): wall until all have session.created "
            f"direct {b['wall_ms']['direct']} ms, gateway {b['wall_ms']['gateway']} ms "
            f"(×{round(b['wall_ms']['gateway'] / b['wall_ms']['direct'], 1)}); per session p50 / p99 "
            f"direct {b['direct']['p50']} / {b['direct']['p99']}, gateway {b['gateway']['p50']} / "
            f"{b['gateway']['p99']}; refused {b['refused']['direct']} / {b['refused']['gateway']}"
        )
    if "timeline" in s:
        lines += render_timeline(s["timeline"])
    if "sequential_timeline" in s:
        lines += render_timeline(s["sequential_timeline"], sequential=True)
    return lines


def _cells(*cells) -> str:
    return " ".join(f"{cell:>10}" for cell in cells)


def _memory_row(label: str, *cells) -> str:
    """A table row of the text report: a 44-wide label, then 10-wide cells."""
    return f"   {label:<44}" + _cells(*cells)


def _render_memory(mem: dict) -> list[str]:
    lines = [f"3. Memory, MiB, {mem['sessions']} sessions{'':<24}" + _cells("USS p50", "USS max", "PSS p50", "PSS max")]
    workers = (
        ("worker_idle", "worker, idle"),
        ("worker_streaming", "worker, streaming (peak)"),
        ("warm_worker", f"pre-forked worker without a session ({mem.get('warm_workers', 0)})"),
    )
    for key, label in workers:
        if w := mem.get(key):
            lines.append(_memory_row(label, w["uss"]["p50"], w["uss"]["max"], w["pss"]["p50"], w["pss"]["max"]))
    lines.append(_memory_row("", "USS idle", "streaming", "PSS idle", "streaming"))
    for role, proc in mem["processes_streaming"].items():
        idle = mem["processes_idle"].get(role, proc)
        lines.append(_memory_row(role, *(f"{v:.2f}" for v in (idle["uss"], proc["uss"], idle["pss"], proc["pss"]))))
    return lines


def _render_capacity(cap: dict) -> list[str]:
    lines = [
        f"4. Capacity: sessions at audio rate (50 × {cap['append_bytes']} B appends/s, a paced "
        f"{cap['response_ms'] / 1000:g} s response every {cap['response_every_s']:g} s); "
        f"a step passes at probe p99 added < {cap['threshold_p99_added_us'] / 1000:g} ms",
        "   sessions  appends/s  added p50 µs  added p99 µs  direct p99 µs  gateway cores  CPU/session"
        "  sim+loadgen cores  other cores",
    ]
    for st in cap["steps"]:
        probe_us = st["probe_us"]
        lines.append(
            f"   {st['live']:>4}/{st['sessions']:<4}{st['appends_per_session_s']:>10} "
            f"{probe_us['added']['p50']:>13} {probe_us['added']['p99']:>13} {probe_us['direct']['p99']:>14} "
            f"{st['gateway_cpu_cores']:>14} {st['cpu_per_session_pct']:>10} % "
            f"{st['sim_and_loadgen_cpu_cores']:>18} "
            f"{st['foreign_cpu_cores']:>12}  {'pass' if st['pass'] else 'FAIL'}"
        )
    lines.append(
        f"   most sessions held: {cap['max_sessions']} (cap {cap['cap']}; stopped: {cap['stopped']}); "
        f"gateway CPU per session {cap['cpu_per_session_pct']} % of a core → "
        f"{cap['sessions_per_core']} per core"
    )
    if cap["steps"] and cap["steps"][-1].get("cpu_per_session_pct_by_role"):
        last = cap["steps"][-1]
        shares = ", ".join(f"{role} {pct} %" for role, pct in last["cpu_per_session_pct_by_role"].items())
        lines.append(f"   CPU per session by role at {last['live']} sessions: {shares}")
    return lines


def _render_throughput(t: dict) -> list[str]:
    return [
        f"5. Throughput, one session, {t['message_bytes']} B messages one way (best of {t['rounds']})",
        f"   direct {t['direct_mb_s']} MB/s, gateway {t['gateway_mb_s']} MB/s (×{t['ratio']}); CPU per MB: "
        f"simulator {t['sim_cpu_ms_per_mb']} ms, gateway worker {t['worker_cpu_ms_per_mb']} ms "
        f"(worker ceiling ≈ {t['worker_ceiling_mb_s']} MB/s)",
    ]


def _render_pool(pool: dict) -> list[str]:
    lines = [
        f"6. Warm pool under a step in arrivals (each session held {pool['hold_s']:g} s)"
        f"{'':<8}" + _cells("set-up p50", "p99", "idle", "target", "PSS MiB", "forked")
    ]
    for p in pool["phases"]:
        setup = p["setup_ms"] or {"p50": "-", "p99": "-"}
        span = "{min}–{max}"
        lines.append(
            f"   {p['rate_per_s']:>5g}/s for {p['seconds']:g} s, {p['sessions']} sessions"
            f"{' (' + str(p['failed']) + ' failed)' if p['failed'] else '':<20}"
            + _cells(
                setup["p50"],
                setup["p99"],
                span.format(**p["warm_workers"]),
                span.format(**p["target"]),
                span.format(**p["workers_pss_mib"]),
                p.get("forked_on_the_spot", "-"),
            )
        )
    return lines


def render(doc: dict) -> str:
    """The human-readable report (the JSON document holds the same and more)."""
    m, code = doc["machine"], doc["code"]
    lines = [
        f"meshrt bench, {doc['plan']} plan, {doc['duration_s']} s — commit {(code['commit'] or '?')[:10]}"
        f"{' (+ uncommitted changes)' if code['dirty'] else ''}",
        f"machine: {m['cpu_model']}, {m['nproc']} CPUs, {m['memory_gib']} GiB, {m['python']}, {m['kernel']}",
        f"during the run: CPU steal {m.get('cpu_steal_pct_during_run')} %, other processes "
        f"{m.get('foreign_cpu_cores_during_run')} cores, load average {m.get('loadavg_at_start')} → "
        f"{m.get('loadavg_at_end')}",
        f"worker backend {doc['config']['worker_backend']}; pre-authorised responses "
        f"{'on' if doc['config'].get('preauth', True) else 'off'}; load generator on {m['load_generator_loop']}",
    ]
    for key, part in (
        ("rtt", _render_rtt),
        ("setup", _render_setup),
        ("memory", _render_memory),
        ("capacity", _render_capacity),
        ("throughput", _render_throughput),
        ("pool", _render_pool),
        ("translation", render_translation),
        ("wan", render_wan),
    ):
        if key in doc:
            lines += [""] + part(doc[key])
    lines += ["", "Targets"]
    for name, row in doc["targets"].items():
        verdict = "met" if row["met"] else "MISSED"
        lines.append(f"   {name:<28} {row['value']:>10}  target {row['target']:>6}  {verdict}")
    return "\n".join(lines)
