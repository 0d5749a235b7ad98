"""`meshrt bench` end to end, with tiny counts (MESHRT_BENCH_SMOKE=1): the harness starts its
own simulator and gateway, and its JSON document has every section with sane numbers. No
performance threshold is asserted: the numbers depend on the machine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from meshrt.bench.profiles import summarize_folded
from meshrt.bench.stats import percentile
from meshrt.bench.stats import summary


def _sane(dist: dict, what: str) -> None:
    for key in ("p50", "p90", "p99"):
        assert isinstance(dist[key], (int, float)) and math.isfinite(dist[key]), (what, dist)
        assert dist[key] > 0, (what, dist)
    assert dist["p50"] <= dist["p90"] <= dist["p99"], (what, dist)


def _sane_comparison(section: dict, what: str) -> None:
    _sane(section["direct"], f"{what} direct")
    _sane(section["gateway"], f"{what} gateway")
    assert set(section["added"]) == {"p50", "p90", "p99"}, what
    assert section["ratio"]["p50"] > 0, what


def test_percentiles_are_nearest_rank():
    values = sorted(float(v) for v in range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    s = summary([3.0, 1.0, 2.0])
    assert (s["p50"], s["p99"], s["n"], s["min"], s["max"]) == (2.0, 3.0, 3, 1.0, 3.0)


def test_folded_profile_summary():
    text = summarize_folded("main (a.py:1);relay (b.py:2) 3\nmain (a.py:1);idle (c.py:3) 1\n")
    assert "4 samples" in text and "100.0%  main (a.py:1)" in text and "75.0%  relay (b.py:2)" in text


def test_quick_bench_json_has_every_section(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHRT_") and k != "OPENAI_API_KEY"}
    env["MESHRT_BENCH_SMOKE"] = "1"
    out = tmp_path / "bench.json"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "meshrt.supervisor.cli", "--json", "bench", "--quick", "--out", str(out)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"meshrt bench did not finish in 240 s; stderr: {exc.stderr!r}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == doc

    machine = doc["machine"]
    assert machine["nproc"] >= 1 and machine["memory_gib"] > 0
    assert machine["cpu_model"] and machine["python"] and machine["kernel"]

    for name, size in (("small_1k", 1024), ("large_32k", 32768)):
        rtt = doc["rtt"][name]
        assert size - 4 <= rtt["bytes"] <= size
        _sane_comparison(rtt, f"rtt {name}")
        assert rtt["direct"]["n"] == rtt["gateway"]["n"] == rtt["pairs"] > 0

    setup = doc["setup"]
    _sane_comparison(setup["sequential"], "setup sequential")
    _sane_comparison(setup["burst"], "setup burst")
    assert setup["burst"]["gateway"]["n"] == setup["burst"]["size"] * setup["burst"]["rounds"]
    assert setup["burst"]["wall_ms"]["direct"] > 0 and setup["burst"]["wall_ms"]["gateway"] > 0
    assert [b["size"] for b in setup["bursts"]] == [5, 10]  # the burst figure (50 and 100 in the real plans)
    for b in setup["bursts"]:
        _sane_comparison(b, f"burst of {b['size']}")
        assert b["refused"] == {"direct": 0, "gateway": 0}
        assert b["gateway"]["n"] == b["direct"]["n"] == b["size"] * b["rounds"]
    timeline = setup["timeline"]  # one more burst, its steps joined from the gateway's logs by session
    assert timeline["sessions"] == 10 and len(timeline["steps"]) == 9
    assert all(step["p50_ms"] >= 0 and step["end_max_ms"] <= timeline["last_live_ms"] for step in timeline["steps"])
    wan = doc["wan"]  # set-up over a WAN-delayed simulator: direct, pre-connected, not
    assert wan["rtt_ms"] == 30
    for path in ("direct", "preconnect_on", "preconnect_off"):
        _sane(wan["sequential"][path], f"wan {path}")
        assert wan["sequential"][path]["n"] == wan["sequential"]["connections"]
        assert wan["burst"][path]["refused"] == 0 and wan["burst"][path]["wall_ms"] > 0
    assert wan["sequential"]["direct"]["p50"] >= 2 * wan["rtt_ms"]  # TCP and the upgrade, each a round trip

    memory = doc["memory"]
    for key in ("worker_idle", "worker_streaming"):
        for kind in ("uss", "pss"):
            _sane(memory[key][kind], f"memory {key} {kind}")
        assert memory[key]["uss"]["n"] == memory["sessions"]
    for role in ("supervisor", "frontdoor", "zygote"):
        assert memory["processes_idle"][role]["uss"] > 0 and memory["processes_idle"][role]["pss"] > 0
        assert memory["processes_streaming"][role]["uss"] > 0

    capacity = doc["capacity"]
    assert capacity["steps"], capacity
    for step in capacity["steps"]:
        assert step["live"] > 0 and step["probe_pairs"] > 0
        _sane_comparison(step["probe_us"], f"capacity {step['sessions']}")
        assert step["gateway_cpu_cores"] > 0 and step["cpu_per_session_pct"] > 0
    assert 0 <= capacity["max_sessions"] <= capacity["cap"]

    throughput = doc["throughput"]
    assert throughput["direct_mb_s"] > 0 and throughput["gateway_mb_s"] > 0

    pool = doc["pool"]
    assert [p["rate_per_s"] for p in pool["phases"]] == [1.0, 10.0, 1.0]
    assert sum(p["sessions"] for p in pool["phases"]) > 0 and not any(p["failed"] for p in pool["phases"])
    assert pool["timeline"] and max(s["idle"] for s in pool["timeline"]) >= 2  # the sized pool's floor
    translation = doc["translation"]  # metering translation appends, per 200 ms chunk (no sockets)
    assert translation["unparsed_relay_us_per_chunk"] > 0 and translation["translation_relay_us_per_chunk"] > 0
    assert 0.1 < translation["increments_per_chunk"] < 0.25  # billed ahead: one increment per 1.2 s of audio

    assert set(doc["targets"]) == {
        "rtt_small_added_p50_us",
        "rtt_small_added_p99_us",
        "setup_added_p50_ms",
        "worker_idle_uss_mib",
        "worker_streaming_uss_mib",
        "capacity_sessions",
    }
    assert all(isinstance(row["met"], bool) for row in doc["targets"].values())
