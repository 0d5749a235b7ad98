"""WebRTC calls through meshrt, run by tests/test_calls.py inside a network namespace of its own
(tests/netns.py): ``python gateway_calls_scenario.py NAME DATABASE_URL WORK_DIR [BACKEND]``.

Everything runs in the namespace: the simulator (`meshrt sim`, an aiortc peer answering each
call) and `meshrt serve` as processes on 127.0.0.1, and the client peer (aiortc, an
`oai-events` data channel and a microphone-like audio track, as a browser offers). The database
is the test's: SQLite by file, PostgreSQL by its unix socket (the namespace has a loopback of its
own). The last stdout line is what the scenario saw, as JSON, with what the simulator's own
frame logs say the calls cost; the test asserts on it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from calls_scenario import Peer  # noqa: E402
from calls_scenario import closed_code  # noqa: E402
from calls_scenario import ws_until  # noqa: E402
from conftest import _stop  # noqa: E402
from conftest import start_gateway  # noqa: E402
from conftest import start_sim  # noqa: E402
from conftest import wait_for  # noqa: E402
from realtime_client import connect_ws  # noqa: E402
from simlog import expected_from  # noqa: E402
from sqlmodel import Session  # noqa: E402
from sqlmodel import select  # noqa: E402

from meshrt.shared.money import Money  # noqa: E402
from meshrt.storage import accounts  # noqa: E402
from meshrt.storage import db  # noqa: E402
from meshrt.storage.db import Account  # noqa: E402
from meshrt.storage.db import SessionRecord  # noqa: E402

STEP_S = 15
PIRATE = "Answer like a pirate, in one short sentence."
# about 2.5 reservations of a gpt-realtime response capped at 300 output tokens: a few responses
# fit before the next one's reservation does not
QUOTA_BALANCE = "0.05"


def namespaced_url(url: str) -> str:
    """The test's database from inside the namespace: PostgreSQL's TCP port on the host's
    loopback is out of reach here, its unix socket is not."""
    if "127.0.0.1" in url or "localhost" in url:
        head, _, name = url.rpartition("/")
        user = head.split("://", 1)[1].split("@", 1)[0] if "@" in head else "postgres"
        scheme = head.split("://", 1)[0]
        return f"{scheme}://{user}@/{name}?host=/var/run/postgresql"
    return url


class Stack:
    def __init__(self, database_url: str, work: Path, backend: str, *sim_args: str, **gateway_env):
        self.work = work
        self.engine = db.make_engine(namespaced_url(database_url))
        db.create_schema(self.engine)
        self.sim = start_sim(work, *sim_args)
        env = {"MESHRT_WORKER_BACKEND": backend, "MESHRT_IDLE_TIMEOUT_S": "60", **gateway_env}
        self.gw = start_gateway(work, namespaced_url(database_url), self.sim.url, **env)

    def close(self) -> None:
        _stop(self.gw.proc)
        _stop(self.sim.proc)
        self.engine.dispose()

    def tenant(self, balance: str = "100", limit: int | None = None) -> tuple[str, str]:
        account = accounts.create_account(self.engine, f"calls-{os.urandom(3).hex()}", Money.from_usd(balance), limit)
        return account.id, accounts.create_key(self.engine, account.id, "calls").plaintext

    def balance(self, account_id: str) -> int:
        with Session(self.engine) as s:
            return s.get(Account, account_id).balance_pico

    def rows(self, account_id: str) -> list[SessionRecord]:
        with Session(self.engine, expire_on_commit=False) as s:
            return list(s.exec(select(SessionRecord).where(SessionRecord.account_id == account_id)).all())

    def ended(self, account_id: str, count: int = 1, timeout: float = 30) -> list[SessionRecord]:
        def done():
            rows = self.rows(account_id)
            return rows if len(rows) >= count and all(r.state == "ended" for r in rows) else None

        return wait_for(done, timeout, 0.1, "the call's record")

    def call_log(self, call_id: str) -> list[dict]:
        """The simulator's frame log of the call's data channel, payloads decoded."""
        path = self.sim.log_dir / f"{call_id}.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        for line in lines[1:]:
            line["event"] = json.loads(base64.b64decode(line["payload_b64"]))
        return lines

    def call_report(self, call_id: str, rates: dict) -> dict:
        """What the simulator says the call cost: its response.done events, priced at `rates`."""
        done = [
            base64.b64decode(line["payload_b64"])
            for line in self.call_log(call_id)[1:]
            if line["event"]["type"] == "response.done"
        ]
        usage, cost, responses = expected_from(done, rates)
        return {"usage": usage, "cost_pico": cost, "responses": responses}


def record_json(row: SessionRecord) -> dict:
    return {
        "surface": row.surface,
        "call_id": row.call_id,
        "end_reason": row.end_reason,
        "cost_pico": row.cost_pico,
        "responses": row.responses,
        "usage": row.usage,
        "model": row.model,
        "api_key_id": row.api_key_id,
        "pid": row.pid,
    }


async def place(peer: Peer, gw, key: str, session: dict | None = None, params: dict | None = None) -> httpx.Response:
    """The offer, posted to meshrt: application/sdp (a browser's form), or multipart with a
    session (a tenant server's form)."""
    await peer.pc.setLocalDescription(await peer.pc.createOffer())
    offer = peer.pc.localDescription.sdp
    url = f"{gw.http_url}/v1/realtime/calls"
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=STEP_S) as http:
        if session is None:
            response = await http.post(
                url, content=offer, headers={**auth, "Content-Type": "application/sdp"}, params=params
            )
        else:
            files = {"sdp": (None, offer), "session": (None, json.dumps(session))}
            response = await http.post(url, files=files, headers=auth)
    if response.status_code == 201:
        from aiortc import RTCSessionDescription

        await peer.pc.setRemoteDescription(RTCSessionDescription(sdp=response.text, type="answer"))
    return response


async def respond(peer: Peer) -> dict:
    peer.send({"type": "response.create"})
    return (await peer.until("response.done"))[-1]


async def wait_event(event: asyncio.Event, timeout: float = STEP_S) -> float | None:
    """Seconds until `event` was set, or None."""
    began = time.monotonic()
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return None
    return round(time.monotonic() - began, 3)


# --- scenarios --------------------------------------------------------------------------------


async def browser(stack: Stack) -> dict:
    """A browser's call: an ek_ minted by the tenant's server, the offer as application/sdp,
    two responses over the data channel, one asked by the tenant's own sideband; the page leaves."""
    account_id, key = stack.tenant()
    gw = stack.gw
    minted = httpx.post(
        f"{gw.http_url}/v1/realtime/client_secrets",
        json={"session": {"type": "realtime", "model": "gpt-realtime", "instructions": PIRATE}},
        headers={"Authorization": f"Bearer {key}"},
        timeout=STEP_S,
    ).json()
    before = stack.balance(account_id)
    peer = Peer()
    response = await place(peer, gw, minted["value"])
    out: dict[str, Any] = {"status": response.status_code, "headers": dict(response.headers)}
    if response.status_code != 201:
        out["body"] = response.text
        return out
    call_id = response.headers["location"].rsplit("/", 1)[1]
    out["call_id"] = call_id
    out["opened"] = await wait_event(peer.opened)
    out["created"] = (await peer.until("session.created"))[-1]["session"]
    first = await respond(peer)
    # the tenant's server joins the call through meshrt, with its rsk_ key, and asks for a response
    async with connect_ws(gw.ws_url, key=key, model=None, query=f"call_id={call_id}") as ws:
        out["sideband_first"] = json.loads(await asyncio.wait_for(ws.recv(), STEP_S))["type"]
        await ws.send(json.dumps({"type": "response.create", "response": {"instructions": "Say ahoy."}}))
        sideband_done = (await ws_until(ws, "response.done"))[-1]
        on_channel = (await peer.until("response.done"))[-1]
    out["sideband_response_seen_on_channel"] = sideband_done["response"]["id"] == on_channel["response"]["id"]
    second = await respond(peer)
    out["usages_received"] = [e["response"]["usage"] for e in (first, on_channel, second)]
    await peer.close()  # the page leaves: upstream ends the call, the sideband closes
    rows = stack.ended(account_id, count=2)
    call = next(r for r in rows if r.surface == "webrtc")
    side = next(r for r in rows if r.surface == "sideband")
    out["record"] = record_json(call)
    out["sideband_record"] = record_json(side)
    out["report"] = stack.call_report(call_id, call.rates)
    out["debited"] = before - stack.balance(account_id)
    out["ek_id"] = minted["session"]["id"]
    return out


async def server_form(stack: Stack) -> dict:
    """A tenant's server places the call (multipart, rsk_), then hangs it up through meshrt."""
    account_id, key = stack.tenant()
    peer = Peer()
    session = {"type": "realtime", "model": "gpt-realtime-mini", "instructions": PIRATE}
    response = await place(peer, stack.gw, key, session=session)
    call_id = response.headers["location"].rsplit("/", 1)[1]
    out: dict[str, Any] = {"status": response.status_code, "opened": await wait_event(peer.opened)}
    out["created"] = (await peer.until("session.created"))[-1]["session"]
    await respond(peer)
    other_id, other_key = stack.tenant()
    async with httpx.AsyncClient(timeout=STEP_S) as http:
        hangup = f"{stack.gw.http_url}/v1/realtime/calls/{call_id}/hangup"
        foreign = await http.post(hangup, headers={"Authorization": f"Bearer {other_key}"})
        out["foreign_hangup"] = [foreign.status_code, foreign.json()["error"]["code"]]
        began = time.monotonic()
        own = await http.post(hangup, headers={"Authorization": f"Bearer {key}"})
        out["hangup"] = [own.status_code, own.json()]
    out["channel_closed_after_s"] = await wait_event(peer.closed)
    rows = stack.ended(account_id)
    out["record_after_s"] = round(time.monotonic() - began, 3)
    out["record"] = record_json(rows[0])
    out["report"] = stack.call_report(call_id, rows[0].rates)
    await peer.close()
    return out


async def quota(stack: Stack) -> dict:
    """A call whose balance runs out: responses until meshrt ends it."""
    account_id, key = stack.tenant(balance=QUOTA_BALANCE)
    peer = Peer()
    response = await place(peer, stack.gw, key, params={"model": "gpt-realtime"})
    call_id = response.headers["location"].rsplit("/", 1)[1]
    out: dict[str, Any] = {"status": response.status_code, "opened": await wait_event(peer.opened)}
    events: list[dict] = await peer.until("session.created")
    done = 0
    try:
        for _ in range(40):
            peer.send({"type": "response.create"})
            while True:
                event = await asyncio.wait_for(peer.events.get(), STEP_S)
                events.append(event)
                if event["type"] == "response.done":
                    done += 1
                    break
            if peer.closed.is_set():
                break
    except (TimeoutError, Exception) as exc:  # noqa: BLE001 - the channel closing mid-loop is the point
        out["loop_ended_by"] = type(exc).__name__
    out["responses_seen"] = done
    out["channel_closed"] = await wait_event(peer.closed) is not None
    out["max_output_tokens_seen"] = [
        e["session"].get("max_output_tokens") for e in events if e["type"] in ("session.created", "session.updated")
    ]
    rows = stack.ended(account_id)
    out["record"] = record_json(rows[0])
    out["report"] = stack.call_report(call_id, rows[0].rates)
    out["start_balance"] = Money.from_usd(QUOTA_BALANCE).picodollars
    out["balance"] = stack.balance(account_id)
    await peer.close()
    return out


async def kill(stack: Stack) -> dict:
    """The call's worker is SIGKILLed mid-call: the call is hung up and billed from the spool."""
    account_id, key = stack.tenant()
    peer = Peer()
    response = await place(peer, stack.gw, key, params={"model": "gpt-realtime"})
    call_id = response.headers["location"].rsplit("/", 1)[1]
    out: dict[str, Any] = {"status": response.status_code, "opened": await wait_event(peer.opened)}
    await peer.until("session.created")
    await respond(peer)
    row = wait_for(lambda: next((r for r in stack.rows(account_id) if r.pid), None), STEP_S, 0.05, "the worker's pid")
    os.kill(row.pid, signal.SIGKILL)
    out["channel_closed_after_s"] = await wait_event(peer.closed)
    rows = stack.ended(account_id)
    out["record"] = record_json(rows[0])
    out["report"] = stack.call_report(call_id, rows[0].rates)
    out["hangup_logged"] = f'"call_id": "{call_id}"' in stack.gw.log_text() and "call hung up" in stack.gw.log_text()
    await peer.close()
    return out


async def ephemeral_sideband(stack: Stack) -> dict:
    """A sideband takes an rsk_ key only."""
    account_id, key = stack.tenant()
    minted = httpx.post(
        f"{stack.gw.http_url}/v1/realtime/client_secrets",
        json={"session": {"type": "realtime", "model": "gpt-realtime"}},
        headers={"Authorization": f"Bearer {key}"},
        timeout=STEP_S,
    ).json()
    peer = Peer()
    response = await place(peer, stack.gw, minted["value"])
    call_id = response.headers["location"].rsplit("/", 1)[1]
    await wait_event(peer.opened)
    async with connect_ws(stack.gw.ws_url, key=minted["value"], model=None, query=f"call_id={call_id}") as ws:
        refusal = json.loads(await asyncio.wait_for(ws.recv(), STEP_S))
        code = await closed_code(ws)
    await peer.close()
    stack.ended(account_id)
    return {"refusal": refusal["error"]["code"], "close": code}


SCENARIOS = {
    "browser": browser,
    "server_form": server_form,
    "quota": quota,
    "kill": kill,
    "ephemeral_sideband": ephemeral_sideband,
}


async def main(names: list[str], database_url: str, work: Path, backend: str) -> dict:
    stack = Stack(database_url, work, backend, MESHRT_MAX_RESPONSE_OUTPUT_TOKENS="300")
    results: dict[str, Any] = {}
    try:
        for name in names:
            try:
                results[name] = await asyncio.wait_for(SCENARIOS[name](stack), 90)
            except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
                import traceback

                results[name] = {"error": traceback.format_exc(), "type": type(exc).__name__}
    finally:
        stack.close()
    results["gateway_log_tail"] = stack.gw.log_text()[-4000:]
    return results


if __name__ == "__main__":
    names, database_url, work = sys.argv[1].split(","), sys.argv[2], Path(sys.argv[3])
    backend = sys.argv[4] if len(sys.argv) > 4 else "asyncio"
    work.mkdir(parents=True, exist_ok=True)
    print(json.dumps(asyncio.run(main(names, database_url, work, backend)), default=str))
