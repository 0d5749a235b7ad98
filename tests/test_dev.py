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
        example = re.search(r"\n(    import asyncio\n.*?\n    asyncio\.run\(main\(\)\))\n", text, re.S).group(1)
        code = "\n".join(line[4:] for line in example.splitlines())
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
