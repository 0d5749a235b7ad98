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
        work.mkdir(parents=True, exist_ok=True)
        self.engine = db.make_engine(namespaced_url(database_url))
        db.create_schema(self.engine)
        self.sim = start_sim(work, *sim_args)
        self.env = {"MESHRT_WORKER_BACKEND": backend, "MESHRT_IDLE_TIMEOUT_S": "60", **gateway_env}
        self.database_url = namespaced_url(database_url)
        self.gw = start_gateway(work, self.database_url, self.sim.url, **self.env)

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


def mint(gw, key: str, **session) -> httpx.Response:
    """An ephemeral key for a realtime session of `session`, minted with `key` (the tenant's server)."""
    return httpx.post(
        f"{gw.http_url}/v1/realtime/client_secrets",
        json={"session": {"type": "realtime", "model": "gpt-realtime", **session}},
        headers={"Authorization": f"Bearer {key}"},
        timeout=STEP_S,
    )


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
    minted = mint(gw, key, instructions=PIRATE).json()
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
    # the tenant's server joins the call through meshrt with the official SDK and its rsk_ key,
    # and asks for a response
    import openai

    server = openai.AsyncOpenAI(
        api_key=key, base_url=f"{gw.http_url}/v1", websocket_base_url=f"ws://127.0.0.1:{gw.port}/v1"
    )
    async with server.realtime.connect(call_id=call_id) as sideband:
        out["sideband_first"] = (await asyncio.wait_for(sideband.recv(), STEP_S)).type
        await sideband.response.create(response={"instructions": "Say ahoy."})
        while (event := await asyncio.wait_for(sideband.recv(), STEP_S)).type != "response.done":
            pass
        on_channel = (await peer.until("response.done"))[-1]
    out["sideband_response_seen_on_channel"] = event.response.id == on_channel["response"]["id"]
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
    """A tenant's server places the call with the official `openai` SDK (multipart, rsk_), then
    hangs it up through meshrt with the SDK too."""
    import openai
    from aiortc import RTCSessionDescription

    account_id, key = stack.tenant()
    client = openai.AsyncOpenAI(api_key=key, base_url=f"{stack.gw.http_url}/v1", max_retries=0)
    peer = Peer()
    await peer.pc.setLocalDescription(await peer.pc.createOffer())
    session = {"type": "realtime", "model": "gpt-realtime-mini", "instructions": PIRATE}
    response = await client.realtime.calls.with_raw_response.create(sdp=peer.pc.localDescription.sdp, session=session)
    await peer.pc.setRemoteDescription(RTCSessionDescription(sdp=response.text, type="answer"))
    call_id = response.headers["location"].rsplit("/", 1)[1]
    out: dict[str, Any] = {"status": response.status_code, "opened": await wait_event(peer.opened)}
    out["created"] = (await peer.until("session.created"))[-1]["session"]
    await respond(peer)
    _, other_key = stack.tenant()
    other = openai.AsyncOpenAI(api_key=other_key, base_url=f"{stack.gw.http_url}/v1", max_retries=0)
    try:
        await other.realtime.calls.hangup(call_id)
        out["foreign_hangup"] = "accepted"
    except openai.NotFoundError as refused:
        out["foreign_hangup"] = [refused.status_code, refused.code]
    began = time.monotonic()
    out["hangup"] = await client.realtime.calls.hangup(call_id)  # None: 200 with no content of note
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


async def revoked(stack: Stack) -> dict:
    """Revoking the rsk_ key that minted a call's ek_ ends the call."""
    account_id, key = stack.tenant()
    minted = mint(stack.gw, key).json()
    peer = Peer()
    response = await place(peer, stack.gw, minted["value"])
    out: dict[str, Any] = {"status": response.status_code, "opened": await wait_event(peer.opened)}
    await peer.until("session.created")
    await respond(peer)
    parent = accounts.list_keys(stack.engine, account_id)[0]
    accounts.revoke_key(stack.engine, parent.id)
    out["channel_closed_after_s"] = await wait_event(peer.closed)
    out["record"] = record_json(stack.ended(account_id)[0])
    await peer.close()
    return out


async def supervisor_restart(stack: Stack) -> dict:
    """The supervisor is SIGKILLed mid-call and started again: the call's worker re-attaches to
    the new one, the call goes on (its media and events never went through meshrt), and its
    record has every response."""
    account_id, key = stack.tenant()
    peer = Peer()
    response = await place(peer, stack.gw, key, params={"model": "gpt-realtime"})
    call_id = response.headers["location"].rsplit("/", 1)[1]
    out: dict[str, Any] = {"status": response.status_code, "opened": await wait_event(peer.opened)}
    await peer.until("session.created")
    await respond(peer)
    stack.gw.proc.kill()
    stack.gw.proc.wait(10)
    await respond(peer)  # while no supervisor runs
    stack.gw = start_gateway(stack.work, stack.database_url, stack.sim.url, state=stack.gw.state_dir, **stack.env)
    wait_for(lambda: "worker re-attached" in stack.gw.log_text(), 20, 0.1, "the call's worker to re-attach")
    await respond(peer)
    out["channel_open"] = not peer.closed.is_set()
    await peer.close()
    rows = stack.ended(account_id)
    out["record"] = record_json(rows[0])
    out["report"] = stack.call_report(call_id, rows[0].rates)
    return out


async def ephemeral_sideband(stack: Stack) -> dict:
    """A sideband takes an rsk_ key only."""
    account_id, key = stack.tenant()
    minted = mint(stack.gw, key).json()
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


# The tenant's page: it asks the tenant's server for an ephemeral key, calls meshrt over WebRTC
# (cross-origin: the tenant's server and meshrt are on different ports), then opens a WebSocket
# with another ephemeral key in its subprotocol. What it saw ends up in `window.result`.
PAGE = """<!doctype html><meta charset=utf-8><title>voice</title><script>
const MESHRT = "%(meshrt)s";
const out = {};
const key = async () => (await (await fetch("/token", {method: "POST"})).json()).value;
function until(target, type, wanted = () => true) {
  return new Promise((resolve) => target.addEventListener("message", (m) => {
    const event = JSON.parse(m.data);
    if (event.type === type && wanted(event)) resolve(event);
  }));
}
async function webrtc() {
  const pc = new RTCPeerConnection();
  const mic = await navigator.mediaDevices.getUserMedia({audio: true});
  pc.addTrack(mic.getTracks()[0], mic);
  const channel = pc.createDataChannel("oai-events");
  const opened = new Promise((resolve) => channel.onopen = resolve);
  const created = until(channel, "session.created");
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && resolve();
  });
  const answer = await fetch(MESHRT + "/v1/realtime/calls", {
    method: "POST",
    body: pc.localDescription.sdp,
    headers: {"Authorization": "Bearer " + await key(), "Content-Type": "application/sdp"},
  });
  out.status = answer.status;
  out.location = answer.headers.get("Location");
  await pc.setRemoteDescription({type: "answer", sdp: await answer.text()});
  await opened;
  out.created = (await created).session;
  // the page's own update's answer (the call's worker may update max_output_tokens meanwhile,
  // and every session.updated reaches the data channel)
  const updated = until(channel, "session.updated", (e) => e.session.instructions === "Be brief.");
  channel.send(JSON.stringify({type: "session.update", session: {type: "realtime", instructions: "Be brief."}}));
  out.updated = (await updated).session.instructions;
  const done = until(channel, "response.done");
  channel.send(JSON.stringify({type: "response.create"}));
  out.usage = (await done).response.usage;
  out.connection = pc.connectionState;
  pc.close();
}
async function websocket() {
  const url = MESHRT.replace("http", "ws") + "/v1/realtime?model=gpt-realtime&fault_tag=browser-ws";
  const ws = new WebSocket(url, ["realtime", "openai-insecure-api-key." + await key()]);
  await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = reject; });
  out.ws_protocol = ws.protocol;
  const done = until(ws, "response.done");
  ws.send(JSON.stringify({type: "response.create"}));
  out.ws_usage = (await done).response.usage;
  ws.close(1000);
}
webrtc().then(websocket).then(() => window.result = out, (e) => window.result = {error: String(e), out});
</script>"""


# The same kind of page written with OpenAI's Agents SDK for the browser (@openai/agents-realtime,
# its UMD bundle as published on npm, served by the tenant's server): its WebRTC transport pointed
# at meshrt with `baseUrl`, an ephemeral key from the tenant's server, as OpenAI's voice-agent
# quickstart does it.
SDK_PAGE = """<!doctype html><meta charset=utf-8><title>voice agent</title>
<script src="/agents-realtime.js"></script><script>
const MESHRT = "%(meshrt)s";
const {RealtimeAgent, RealtimeSession, OpenAIRealtimeWebRTC} = OpenAIAgentsRealtime;
async function run() {
  const out = {events: []};
  const secret = await (await fetch("/token", {method: "POST"})).json();
  const mic = await navigator.mediaDevices.getUserMedia({audio: true});
  const transport = new OpenAIRealtimeWebRTC({baseUrl: MESHRT + "/v1/realtime/calls", mediaStream: mic});
  transport.on("*", (event) => out.events.push(event.type));
  const done = new Promise((resolve) => transport.on("*", (e) => e.type === "response.done" && resolve(e)));
  const agent = new RealtimeAgent({name: "Assistant", instructions: "Be brief."});
  const session = new RealtimeSession(agent, {transport, model: "gpt-realtime"});
  await session.connect({apiKey: secret.value});
  out.call_id = transport.callId;
  out.status = transport.status;
  transport.sendEvent({type: "response.create"});
  out.usage = (await done).response.usage;
  session.close();
  return out;
}
run().then((out) => window.result = out, (e) => window.result = {error: String(e && e.stack || e)});
</script>"""


class TenantServer:
    """The tenant's own web server: serves the pages and mints ephemeral keys with its rsk_ key."""

    def __init__(self, gw, key: str, bundle: Path | None = None):
        import threading
        from http.server import BaseHTTPRequestHandler
        from http.server import ThreadingHTTPServer

        pages = {
            "/": ((PAGE % {"meshrt": gw.http_url}).encode(), "text/html"),
            "/sdk": ((SDK_PAGE % {"meshrt": gw.http_url}).encode(), "text/html"),
            "/favicon.ico": (b"", "image/x-icon"),  # asked for by the browser: a 404 is a console error
        }
        if bundle is not None:
            pages["/agents-realtime.js"] = (bundle.read_bytes(), "text/javascript")

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                body, kind = pages.get(self.path, (b"not found", "text/plain"))
                self._send(200 if self.path in pages else 404, body, kind)

            def do_POST(self):
                minted = mint(gw, key, instructions=PIRATE)
                self._send(minted.status_code, minted.content, "application/json")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


async def open_page(stack: Stack, tenant: TenantServer, path: str, name: str) -> dict:
    """Headless Chromium with a fake microphone opens the tenant's page at `path` and waits for
    the `window.result` it sets; the page's console problems beside it."""
    from browser import Browser
    from browser import find_chromium

    flags = (
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
    )
    browser = Browser(find_chromium(), stack.work / f"{name}-profile", stack.work / f"{name}.log", flags)
    try:
        page = browser.page()
        page.call("Page.navigate", url=tenant.url + path)
        result = await asyncio.to_thread(page.wait, "window.result", 60, f"the result of the page at /{path}")
        return {"page": result, "problems": page.problems()}
    finally:
        browser.close()
        tenant.close()


async def chromium(stack: Stack) -> dict:
    """Headless Chromium with a fake microphone: the tenant's page calls meshrt over WebRTC, then
    over a WebSocket, each with an ephemeral key from the tenant's server."""
    from simlog import sim_reports

    account_id, key = stack.tenant()
    before = stack.balance(account_id)
    out = await open_page(stack, TenantServer(stack.gw, key), "", "chromium")
    if "error" in out["page"]:
        return out
    result = out["page"]
    call_id = result["location"].rsplit("/", 1)[1]
    rows = stack.ended(account_id, count=2)
    call = next(r for r in rows if r.surface == "webrtc")
    socket = next(r for r in rows if r.surface == "realtime")
    out["record"] = record_json(call)
    out["report"] = stack.call_report(call_id, call.rates)
    out["ws_record"] = record_json(socket)
    sent = [p for done in sim_reports(stack.sim).get("browser-ws", []) for p in done]
    usage, cost, responses = expected_from(sent, socket.rates)
    out["ws_report"] = {"usage": usage, "cost_pico": cost, "responses": responses}
    out["debited"] = before - stack.balance(account_id)
    out["call_id"] = call_id
    return out


async def chromium_sdk(stack: Stack) -> dict:
    """Headless Chromium runs a voice agent written with OpenAI's Agents SDK (SDK_PAGE): its
    WebRTC transport calls meshrt with an ephemeral key, asks for a response, hangs up."""
    bundle = stack.work / "agents-realtime.umd.js"  # put there by the test, from npm
    account_id, key = stack.tenant()
    before = stack.balance(account_id)
    out = await open_page(stack, TenantServer(stack.gw, key, bundle), "sdk", "chromium-sdk")
    if "error" in out["page"]:
        return out
    call = stack.ended(account_id)[0]
    out["record"] = record_json(call)
    out["report"] = stack.call_report(call.call_id, call.rates)
    out["debited"] = before - stack.balance(account_id)
    return out


async def upstream_fault(stack: Stack) -> dict:
    """Under the simulator's fault (its stack's): a call whose sideband is refused (refused to
    its caller, hung up upstream), or that upstream ends by itself. Either way nothing runs
    unmetered and the record says why."""
    account_id, key = stack.tenant()
    before = stack.balance(account_id)
    peer = Peer()
    response = await place(peer, stack.gw, key, params={"model": "gpt-realtime"})
    out: dict[str, Any] = {"status": response.status_code}
    if response.status_code == 201:
        out["opened"] = await wait_event(peer.opened)
        out["channel_closed_after_s"] = await wait_event(peer.closed, 20)
    else:
        out["refusal"] = response.json().get("error", {})  # not "error": that key says the scenario failed
    rows = stack.ended(account_id)
    out["record"] = record_json(rows[0])
    out["debited"] = before - stack.balance(account_id)

    def hangups() -> list:
        lines = stack.gw.log_text().splitlines()
        return [json.loads(line).get("status") for line in lines if '"call hung up"' in line] or None

    out["hung_up"] = wait_for(hangups, 10, 0.1, "the call's hangup")
    await peer.close()
    return out


def database_lock(database_url: str):
    """A lock that stops the gateway's writes: SQLite's write lock, or on PostgreSQL ACCESS
    EXCLUSIVE on the session rows (statements on them wait, then time out)."""
    from dbfaults import PgTableLock
    from dbfaults import SqliteLock
    from dbfaults import pg_conninfo

    if database_url.startswith("sqlite"):
        return SqliteLock(database_url.split(":///", 1)[1])
    return PgTableLock(pg_conninfo(database_url.replace("postgresql+psycopg", "postgresql")), ["realtime_session"])


async def call_id_outage(stack: Stack) -> dict:
    """The database stops answering between the call's admission and upstream's answer (the
    simulator answers 2 s late; the gateway's database timeout is 1 s): the call's id reaches
    its row once the database is back, so its tenant's hangup finds it, and a supervisor
    started after a crash hangs the call up when its worker dies."""
    account_id, key = stack.tenant()
    peer = Peer()
    placing = asyncio.ensure_future(place(peer, stack.gw, key, params={"model": "gpt-realtime"}))
    await asyncio.to_thread(wait_for, lambda: stack.rows(account_id), STEP_S, 0.02, "the call's admission")
    lock = database_lock(stack.database_url)
    lock.hold(8)  # past upstream's answer (2 s late) and the 2 s the answer waits for the write
    response = await placing
    call_id = response.headers["location"].rsplit("/", 1)[1]
    out: dict[str, Any] = {"status": response.status_code, "answered_while_locked": lock.held}
    out["opened"] = await wait_event(peer.opened)
    await peer.until("session.created")
    lock.wait_released(15)
    row = await asyncio.to_thread(
        wait_for, lambda: next((r for r in stack.rows(account_id) if r.call_id and r.pid), None), 20, 0.1, "call id"
    )
    out["row_call_id"] = row.call_id == call_id
    out["retried_logged"] = "call id not recorded yet; retrying" in stack.gw.log_text()
    await respond(peer)
    stack.gw.proc.kill()
    stack.gw.proc.wait(10)
    stack.gw = start_gateway(stack.work, stack.database_url, stack.sim.url, state=stack.gw.state_dir, **stack.env)
    wait_for(lambda: "worker re-attached" in stack.gw.log_text(), 20, 0.1, "the call's worker to re-attach")
    os.kill(row.pid, signal.SIGKILL)
    out["channel_closed_after_s"] = await wait_event(peer.closed)
    rows = stack.ended(account_id)
    out["record"] = record_json(rows[0])
    out["report"] = stack.call_report(call_id, rows[0].rates)
    out["hung_up"] = [
        json.loads(line).get("status")
        for line in stack.gw.log_text().splitlines()
        if '"call hung up"' in line and call_id in line
    ]
    await peer.close()
    return out


SCENARIOS = {
    "browser": browser,
    "server_form": server_form,
    "quota": quota,
    "kill": kill,
    "ephemeral_sideband": ephemeral_sideband,
    "revoked": revoked,
    "supervisor_restart": supervisor_restart,
    "chromium": chromium,
    "chromium_sdk": chromium_sdk,
}


# scenarios that need the simulator to fail every call in one way: a stack of their own each,
# (the simulator's arguments, the gateway's settings, the scenario)
FAULTED = {
    "sideband_refused": (("--fault", "sideband_refused"), {}, upstream_fault),
    "call_ended": (("--fault", "call_ended"), {}, upstream_fault),
    "call_id_outage": (("--fault", "slow_accept"), {"MESHRT_DB_TIMEOUT_S": "1"}, call_id_outage),
}


async def run_named(stack: Stack, name: str, scenario) -> dict:
    try:
        return await asyncio.wait_for(scenario(stack), 90)
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
        import traceback

        return {"error": traceback.format_exc(), "type": type(exc).__name__, "log": stack.gw.log_text()[-4000:]}


async def main(names: list[str], database_url: str, work: Path, backend: str) -> dict:
    results: dict[str, Any] = {}
    for name in [n for n in names if n in FAULTED]:
        sim_args, gateway_env, faulted = FAULTED[name]
        stack = Stack(database_url, work / name, backend, *sim_args, **gateway_env)
        try:
            results[name] = await run_named(stack, name, faulted)
        finally:
            stack.close()
    plain = [n for n in names if n not in FAULTED]
    if plain:
        stack = Stack(database_url, work, backend, MESHRT_MAX_RESPONSE_OUTPUT_TOKENS="300")
        try:
            for name in plain:
                results[name] = await run_named(stack, name, SCENARIOS[name])
        finally:
            stack.close()
    return results


if __name__ == "__main__":
    names, database_url, work = sys.argv[1].split(","), sys.argv[2], Path(sys.argv[3])
    backend = sys.argv[4] if len(sys.argv) > 4 else "asyncio"
    work.mkdir(parents=True, exist_ok=True)
    print(json.dumps(asyncio.run(main(names, database_url, work, backend)), default=str))
