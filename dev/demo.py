"""`meshrt dev`: everything on one machine for a first try — SQLite, the simulator (or real
OpenAI when OPENAI_API_KEY is set), a demo account and key, plain ws on loopback only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from meshrt.shared.money import Money

from .children import ChildStartError
from .children import wait_for_line

EXAMPLE = """\
Try it with the official OpenAI Python SDK (pip install "openai[realtime]"):

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

Then see the usage:  curl -H "Authorization: Bearer {key}" http://127.0.0.1:{port}/v1/usage
"""


def _start_simulator() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshrt.simulator", "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        return proc, wait_for_line(proc, r"listening on (ws://\S+)", 20, "the simulator").group(1)
    except ChildStartError:
        proc.kill()
        raise


def run_dev(settings, args) -> int:
    from meshrt.shared import logs
    from meshrt.storage import accounts
    from meshrt.storage import db
    from meshrt.supervisor.supervisor import serve

    state = Path(args.state_dir) if args.state_dir else Path(".meshrt-dev")
    settings = settings.replace(
        state_dir=state,
        allow_plain_ws=True,
        host="127.0.0.1",
        port=args.port if args.port is not None else settings.port,
    )
    simulator = None
    if os.environ.get("MESHRT_UPSTREAM_URL"):
        upstream = settings.upstream_url
    elif settings.openai_api_key:
        upstream = settings.upstream_url
    else:
        simulator, upstream = _start_simulator()
        settings = settings.replace(upstream_url=upstream)
    state.mkdir(parents=True, exist_ok=True)
    engine = db.make_engine(settings.db_url)
    db.create_schema(engine)
    demo = next((a for a in accounts.list_accounts(engine) if a.name == "demo"), None)
    if demo is None:
        demo = accounts.create_account(engine, "demo", Money.from_usd("10"))
    key = accounts.create_key(engine, demo.id, name="dev").plaintext
    engine.dispose()
    print(f"meshrt dev: upstream {upstream}; state in {state}/", flush=True)
    print("WARNING: dev mode accepts plain ws:// from loopback; production needs TLS at the edge.", flush=True)
    balance = Money(accounts.get_account(db.make_engine(settings.db_url), demo.id).balance_pico)
    print(f"demo account {demo.id}, balance ${balance.usd_str()}")
    print(f"demo key (shown once): {key}\n")
    print(EXAMPLE.format(key=key, port=settings.port), flush=True)
    logs.configure("supervisor", settings.log_level)
    try:
        return serve(settings)
    finally:
        if simulator is not None:
            simulator.terminate()
            simulator.wait(5)
