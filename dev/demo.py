"""`meshrt dev`: everything on one machine for a first try — SQLite, the simulator (or real
OpenAI when OPENAI_API_KEY is set), a demo account and key, plain ws on loopback only.

Order matters: the port is checked before anything is created (a failed start must not leave a
new key behind), and on Ctrl-C the gateway drains before the simulator stops (a live session
must end with `server_shutting_down`, not with its upstream vanishing)."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from meshrt.shared.money import Money
from meshrt.shared.settings import CommandError
from meshrt.shared.settings import make_state_dir

from .children import ChildStartError
from .children import wait_for_line

EXAMPLE_START = "# ---- example.py: from here ----"
EXAMPLE_END = "# ---- example.py: to here ----"

# Printed flush left: indented, it pastes as an IndentationError. The markers are comments, so
# pasting them along does no harm.
EXAMPLE = """\
Try it with the official OpenAI Python SDK. Install it:  {python} -m pip install "openai[realtime]"
then save the lines below as example.py and run:  {python} example.py

{start}
import asyncio
from openai import AsyncOpenAI

async def main():
    client = AsyncOpenAI(api_key="{key}", websocket_base_url="ws://127.0.0.1:{port}/v1")
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await conn.session.update(session={{"type": "realtime", "output_modalities": ["text"]}})
        await conn.conversation.item.create(item={{"type": "message", "role": "user",
            "content": [{{"type": "input_text", "text": "Say hello"}}]}})
        await conn.response.create()
        async for event in conn:
            print(event.type)
            if event.type == "response.done":
                print(event.response.usage)
                break

asyncio.run(main())
{end}

Then see the usage:  curl -H "Authorization: Bearer {key}" http://127.0.0.1:{port}/v1/usage
"""


def example_text(key: str, port: int) -> str:
    python = sys.executable
    if python.startswith(os.getcwd() + os.sep):  # `.venv/bin/python` reads better than its full path
        python = os.path.relpath(python)
    return EXAMPLE.format(key=key, port=port, python=python, start=EXAMPLE_START, end=EXAMPLE_END)


def _can_bind(host: str, port: int) -> OSError | None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the supervisor binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc
    return None


def claim_port(host: str, port: int) -> int:
    """`port` if it can be listened on, a free one if it is 0 (so the example names the real
    port); else a CommandError naming --port / MESHRT_PORT and a port that is free now."""
    if port == 0:
        with socket.socket() as probe:
            probe.bind((host, 0))
            return probe.getsockname()[1]
    problem = _can_bind(host, port)
    if problem is None:
        return port
    free = next((p for p in range(port + 1, min(port + 50, 65536)) if _can_bind(host, p) is None), None)
    instead = f"--port {free} or MESHRT_PORT={free}" if free else "--port P or MESHRT_PORT=P"
    raise CommandError(f"cannot listen on {host}:{port} ({problem.strerror}): pick another port with {instead}")


def _own_group_dying_with_us() -> None:  # runs in the child between fork and exec
    # Its own process group: a Ctrl-C in the terminal reaches the gateway, which drains, and not
    # the simulator, which must outlive the drain. PDEATHSIG: it still never outlives `meshrt dev`.
    os.setpgid(0, 0)
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start_simulator() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshrt.simulator", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_own_group_dying_with_us,
    )
    try:
        return proc, wait_for_line(proc, r"listening on (ws://\S+)", 20, "the simulator").group(1)
    except ChildStartError as exc:
        proc.kill()
        raise CommandError(f"{exc}; set MESHRT_UPSTREAM_URL to use another upstream") from None


# `serve` drains for up to MESHRT_MAX_SESSION_S (an hour) so that no live call is cut; at a
# terminal, Ctrl-C must not hang that long. MESHRT_DRAIN_S, when set, still wins.
DEV_DRAIN_S = 30.0


def dev_drain_s(settings, environ=None) -> float:
    environ = os.environ if environ is None else environ
    return settings.drain_s if environ.get("MESHRT_DRAIN_S") else min(settings.drain_s, DEV_DRAIN_S)


def run_dev(settings, args) -> int:
    from meshrt.shared import logs
    from meshrt.storage import accounts
    from meshrt.storage import db
    from meshrt.supervisor.supervisor import serve

    state = Path(args.state_dir) if args.state_dir else Path(".meshrt-dev")
    port = claim_port("127.0.0.1", args.port if args.port is not None else settings.port)
    settings = settings.replace(
        state_dir=state, allow_plain_ws=True, host="127.0.0.1", port=port, drain_s=dev_drain_s(settings)
    )
    make_state_dir(settings)
    engine = db.make_engine(settings.db_url, settings.db_timeout_s)
    db.create_schema(engine)
    demo = next((a for a in accounts.list_accounts(engine) if a.name == "demo"), None)
    if demo is None:
        demo = accounts.create_account(engine, "demo", Money.from_usd("10"))
    simulator = None
    try:
        if os.environ.get("MESHRT_UPSTREAM_URL") or settings.openai_api_key:
            upstream = settings.upstream_url
        else:
            simulator, upstream = _start_simulator()
            settings = settings.replace(upstream_url=upstream)
        key = accounts.create_key(engine, demo.id, name="dev").plaintext  # the last step that can fail
        balance = Money(accounts.get_account(engine, demo.id).balance_pico)
        engine.dispose()
        print(f"meshrt dev: upstream {upstream}; state in {state}/", flush=True)
        print("WARNING: dev mode accepts plain ws:// from loopback; production needs TLS at the edge.", flush=True)
        print(f"demo account {demo.id}, balance {balance.display()}")
        print(f"demo key (shown once): {key}\n")
        print(example_text(key, settings.port), flush=True)
        logs.configure("supervisor", settings.log_level)
        return serve(settings)
    finally:
        if simulator is not None:  # last: sessions drained against it
            simulator.terminate()
            simulator.wait(5)
