"""`meshrt dev`, README's first command: it starts the simulator and the gateway, prints a demo
key and an example for the official SDK; that example, run as printed, completes a response; the
usage it prints is then on /v1/usage; SIGTERM stops everything with exit code 0."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import httpx
import psutil
from conftest import wait_for

from meshrt.dev.children import ChildOutput
from meshrt.dev.demo import EXAMPLE_END
from meshrt.dev.demo import EXAMPLE_START


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_meshrt_dev_runs_the_printed_sdk_example(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHRT_") and k != "OPENAI_API_KEY"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshrt.supervisor.cli",
            "dev",
            "--port",
            str(port),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "dev.err", "wb"),
        text=True,
    )
    out = ChildOutput(proc, "meshrt dev")
    try:
        key = out.wait_for(r"demo key \(shown once\): (rsk_\S+)", 60).group(1)
        out.wait_for(r"listening on http://127\.0\.0\.1:(\d+)", 60)
        text = "\n".join(out.lines)
        # printed flush left between two comment lines: pasted with them or without, it runs
        code = text[text.index(EXAMPLE_START) : text.index(EXAMPLE_END) + len(EXAMPLE_END)]
        lines = code.splitlines()
        assert lines[1] == "import asyncio" and lines[-2] == "asyncio.run(main())", lines
        assert key in code and f"127.0.0.1:{port}" in code
        ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, ran.stderr
        events = ran.stdout.splitlines()
        assert events[0] == "session.created" and "response.done" in events, events
        printed_total = int(re.search(r"total_tokens=(\d+)", events[-1]).group(1))  # the usage it prints

        def records():
            page = httpx.get(
                f"http://127.0.0.1:{port}/v1/usage", headers={"Authorization": f"Bearer {key}"}, timeout=10
            ).json()
            return page["data"] or None

        (record,) = wait_for(records, 20, 0.1, "the example's usage record")
        assert record["usage"]["total_tokens"] == printed_total > 0 and record["end_reason"] == "client_closed"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("meshrt.simulator" in " ".join(c.cmdline()) for c in children)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, (tmp_path / "dev.err").read_text()[-2000:]
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, alive


def dev_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHRT_") and k != "OPENAI_API_KEY"}
    return {**env, **settings}


def active_keys(tmp_path, state) -> list[str]:
    listed = subprocess.run(
        [sys.executable, "-m", "meshrt.supervisor.cli", "keys", "list"],
        cwd=tmp_path,
        env=dev_env(MESHRT_STATE_DIR=str(state)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return [line for line in listed.stdout.splitlines() if line.endswith("\tactive")]


def test_meshrt_dev_on_a_taken_port_is_one_line_and_creates_no_key(tmp_path):
    state = tmp_path / "state"
    subprocess.run(
        [sys.executable, "-m", "meshrt.supervisor.cli", "accounts", "create", "demo"],
        env=dev_env(MESHRT_STATE_DIR=str(state)),
        check=True,
        capture_output=True,
    )
    before = active_keys(tmp_path, state)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for how, env in ((["--port", str(port)], {}), ([], {"MESHRT_PORT": str(port)})):
            ran = subprocess.run(
                [sys.executable, "-m", "meshrt.supervisor.cli", "dev", "--state-dir", str(state), *how],
                cwd=tmp_path,
                env=dev_env(**env),
                capture_output=True,
                text=True,
                timeout=60,
            )
            lines = ran.stderr.strip().splitlines()
            assert ran.returncode == 1 and len(lines) == 1, ran.stderr[-3000:]
            assert lines[0].startswith(f"meshrt: cannot listen on 127.0.0.1:{port} (Address already in use)")
            assert re.search(r"pick another port with --port \d+ or MESHRT_PORT=\d+$", lines[0]), lines[0]
            assert "demo key" not in ran.stdout and ran.stdout == ""
    assert active_keys(tmp_path, state) == before  # a failed start leaves no key behind


def test_ctrl_c_drains_sessions_before_the_simulator_stops(tmp_path):
    """A terminal's Ctrl-C reaches the whole foreground process group. The gateway drains (the
    live session ends with `server_shutting_down`, as docs/operations.md, Drain, says); the
    simulator, in a group of its own, stops only after — not first, which would end the session
    with upstream's silent normal close."""
    from realtime_client import connect_ws
    from realtime_client import expect_closed
    from realtime_client import recv_json
    from realtime_client import run

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshrt.supervisor.cli", "dev", "--port", str(port), "--state-dir", str(tmp_path / "s")],
        cwd=tmp_path,
        env=dev_env(MESHRT_DRAIN_S="2"),
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "dev.err", "wb"),
        text=True,
        start_new_session=True,  # its own group, standing in for the terminal's foreground group
    )
    out = ChildOutput(proc, "meshrt dev")
    try:
        key = out.wait_for(r"demo key \(shown once\): (rsk_\S+)", 60).group(1)
        out.wait_for(r"listening on http://", 60)
        simulator = next(c for c in psutil.Process(proc.pid).children() if "meshrt.simulator" in " ".join(c.cmdline()))

        async def session_through_ctrl_c():
            async with connect_ws(f"ws://127.0.0.1:{port}/v1/realtime", key=key) as ws:
                assert (await recv_json(ws))["type"] == "session.created"
                os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
                events = await expect_closed(ws, 20)
                return events, ws.close_code, ws.close_reason

        events, close_code, reason = run(session_through_ctrl_c())
        assert [e["error"]["code"] for e in events if e["type"] == "error"] == ["server_shutting_down"], events
        assert (close_code, reason) == (1012, "server_error.server_shutting_down")
        assert proc.wait(30) == 0, (tmp_path / "dev.err").read_text()[-2000:]
        assert not simulator.is_running() or simulator.status() == psutil.STATUS_ZOMBIE
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
