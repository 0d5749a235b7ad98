"""WebRTC call scenarios against the simulator, run by tests/test_simulator_calls.py inside a
network namespace of their own (tests/netns.py): ``python calls_scenario.py NAME [LOG_DIR]``.

The simulator runs in this process (``serve`` on 127.0.0.1, port 0); the client peer is aiortc
(an ``oai-events`` data channel and a sendrecv audio track, as a browser sends), the HTTP calls go
through httpx, the sideband through a ``websockets`` client. The last stdout line is what the
scenario observed, as JSON; the test asserts on it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
from aiortc import RTCConfiguration
from aiortc import RTCPeerConnection
from aiortc import RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack
from aiortc.mediastreams import MediaStreamError
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.exceptions import InvalidStatus

from meshrt.dev.children import wait_for_line
from meshrt.simulator import serve

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
STEP_S = 10
INSTRUCTIONS = "You are a terse call assistant."


class Peer:
    """The client side of a call: aiortc with the data channel and an audio track."""

    def __init__(self, channel: bool = True) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.events: asyncio.Queue[dict] = asyncio.Queue()
        self.opened, self.closed = asyncio.Event(), asyncio.Event()
        self.connected = asyncio.Event()
        self.pc.on("connectionstatechange", self._on_state)
        if channel:
            self.channel = self.pc.createDataChannel("oai-events")
            self.channel.on("open", self.opened.set)
            self.channel.on("close", self.closed.set)
            self.channel.on("message", lambda message: self.events.put_nowait(json.loads(message)))
        self.pc.addTrack(AudioStreamTrack())  # silence, sendrecv: what a browser with a microphone offers
        self.tracks: list[str] = []
        self._drains: list[asyncio.Task] = []
        self.pc.on("track", self._on_track)

    def _on_state(self) -> None:
        if self.pc.connectionState == "connected":
            self.connected.set()
        elif self.pc.connectionState in ("failed", "closed"):
            self.closed.set()

    def _on_track(self, track: Any) -> None:
        self.tracks.append(track.kind)
        self._drains.append(asyncio.ensure_future(self._drain(track)))

    async def _drain(self, track: Any) -> None:
        try:
            while True:
                await track.recv()
        except MediaStreamError:
            pass

    async def call(self, port: int, query: str = "", session: dict | None = None) -> httpx.Response:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = self.pc.localDescription.sdp
        url = f"http://127.0.0.1:{port}/v1/realtime/calls" + (f"?{query}" if query else "")
        async with httpx.AsyncClient(timeout=STEP_S) as http:
            if session is None:
                headers = {**AUTH, "Content-Type": "application/sdp"}
                response = await http.post(url, content=offer, headers=headers)
            else:
                files = {"sdp": (None, offer), "session": (None, json.dumps(session))}
                response = await http.post(url, files=files, headers=AUTH)
        if response.status_code == 201:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=response.text, type="answer"))
        return response

    def send(self, event: dict) -> None:
        self.channel.send(json.dumps(event))

    async def until(self, event_type: str) -> list[dict]:
        events = []
        while True:
            events.append(await asyncio.wait_for(self.events.get(), STEP_S))
            if events[-1]["type"] == event_type:
                return events

    async def close(self) -> None:
        await self.pc.close()
        for task in self._drains:
            task.cancel()


async def ws_until(ws: Any, event_type: str) -> list[dict]:
    events = []
    while True:
        events.append(json.loads(await asyncio.wait_for(ws.recv(), STEP_S)))
        if events[-1]["type"] == event_type:
            return events


def sideband(port: int, call_id: str) -> Any:
    url = f"ws://127.0.0.1:{port}/v1/realtime?call_id={call_id}"
    return connect(url, additional_headers=AUTH, compression=None, ping_interval=None, open_timeout=STEP_S)


async def sideband_status(port: int, call_id: str) -> dict:
    """The HTTP refusal of a sideband handshake (status and error code), or accepted."""
    try:
        async with sideband(port, call_id):
            return {"status": 101}
    except InvalidStatus as exc:
        body = json.loads(exc.response.body)
        return {"status": exc.response.status_code, "code": body["error"]["code"]}


async def hangup(port: int, call_id: str) -> dict:
    async with httpx.AsyncClient(timeout=STEP_S) as http:
        response = await http.post(f"http://127.0.0.1:{port}/v1/realtime/calls/{call_id}/hangup", headers=AUTH)
    return {"status": response.status_code, "body": response.json()}


async def closed_code(ws: Any) -> int | None:
    """Wait for the server to close the sideband; its close code."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), STEP_S)
    except ConnectionClosed:
        pass
    return ws.close_code


async def wait_set(event: asyncio.Event) -> bool:
    try:
        await asyncio.wait_for(event.wait(), STEP_S)
    except TimeoutError:
        return False
    return True


def call_id_of(response: httpx.Response) -> str:
    return response.headers["Location"].rsplit("/", 1)[1]


def answer_audio_direction(sdp: str) -> str | None:
    in_audio = False
    for line in sdp.splitlines():
        if line.startswith("m="):
            in_audio = line.startswith("m=audio")
        elif in_audio and line in ("a=sendrecv", "a=sendonly", "a=recvonly", "a=inactive"):
            return line[2:]
    return None


def read_log(path: Path) -> list[dict]:
    """The call's frame log: its head line, then each message with the payload decoded."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines[1:]:
        line["event"] = json.loads(base64.b64decode(line["payload_b64"]))
    return lines


# --- scenarios --------------------------------------------------------------------------------


async def conversation(port: int, log_dir: str | None) -> dict:
    """Multipart offer with a session; data channel and a sideband see the same events; the
    sideband's own response.create; then hangup; and the call's frame log."""
    peer = Peer()
    session = {"type": "realtime", "model": "gpt-realtime-mini", "instructions": INSTRUCTIONS}
    response = await peer.call(port, "sim_response_ms=500&fault_tag=conv", session)
    call_id = call_id_of(response)
    out: dict[str, Any] = {
        "status": response.status_code,
        "content_type": response.headers["Content-Type"],
        "location": response.headers["Location"],
        "audio_direction": answer_audio_direction(response.text),
        "opened": await wait_set(peer.opened),
    }
    created = (await peer.until("session.created"))[-1]
    out["created"] = created["session"]
    async with sideband(port, call_id) as ws:
        out["sideband_created"] = json.loads(await asyncio.wait_for(ws.recv(), STEP_S))["session"]
        peer.send({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["audio"]}})
        peer.send({"type": "response.create"})
        dc_first = await peer.until("session.updated") + await peer.until("response.done")
        sb_first = await ws_until(ws, "response.done")
        await ws.send(json.dumps({"type": "response.create", "response": {"output_modalities": ["text"]}}))
        dc_second = await peer.until("response.done")
        sb_second = await ws_until(ws, "response.done")
        out["dc_events"] = [created] + dc_first + dc_second
        out["dc"] = [[e["type"], e["event_id"]] for e in dc_first + dc_second]
        out["sideband"] = [[e["type"], e["event_id"]] for e in sb_first + sb_second]
        out["usage"] = [dc_first[-1]["response"]["usage"], dc_second[-1]["response"]["usage"]]
        out["tracks"] = peer.tracks
        out["hangup"] = await hangup(port, call_id)
        out["sideband_close"] = await closed_code(ws)
    out["channel_closed"] = await wait_set(peer.closed)
    if log_dir:
        out["log"] = read_log(Path(log_dir) / f"{call_id}.jsonl")
        out["log_files"] = sorted(p.name for p in Path(log_dir).iterdir())
    out["call_id"] = call_id
    await peer.close()
    return out


async def hangup_ends_the_call(port: int, log_dir: str | None) -> dict:
    """An application/sdp offer (model from the query); two sidebands; hangup ends it all."""
    peer = Peer()
    response = await peer.call(port, "model=gpt-realtime-2025-08-28")
    call_id = call_id_of(response)
    out: dict[str, Any] = {"status": response.status_code, "opened": await wait_set(peer.opened)}
    out["model"] = (await peer.until("session.created"))[-1]["session"]["model"]
    async with sideband(port, call_id) as one, sideband(port, call_id) as two:
        await ws_until(one, "session.created")
        await ws_until(two, "session.created")
        out["hangup"] = await hangup(port, call_id)
        out["sideband_closes"] = [await closed_code(one), await closed_code(two)]
    out["channel_closed"] = await wait_set(peer.closed)
    out["second_hangup"] = await hangup(port, call_id)
    out["sideband_after"] = await sideband_status(port, call_id)
    await peer.close()
    return out


async def peer_closes(port: int, log_dir: str | None) -> dict:
    """The client closes its peer connection: the call ends, its sideband gets close 1000."""
    peer = Peer()
    response = await peer.call(port)
    call_id = call_id_of(response)
    out: dict[str, Any] = {"opened": await wait_set(peer.opened)}
    await peer.until("session.created")
    async with sideband(port, call_id) as ws:
        await ws_until(ws, "session.created")
        await peer.close()
        out["sideband_close"] = await closed_code(ws)
    out["hangup_after"] = await hangup(port, call_id)
    return out


async def sideband_refused(port: int, log_dir: str | None) -> dict:
    peer = Peer()
    response = await peer.call(port, "sim_fault=sideband_refused")
    call_id = call_id_of(response)
    out: dict[str, Any] = {"opened": await wait_set(peer.opened)}
    await peer.until("session.created")
    out["sideband"] = await sideband_status(port, call_id)
    peer.send({"type": "response.create"})
    out["done"] = (await peer.until("response.done"))[-1]["response"]["status"]
    out["hangup"] = await hangup(port, call_id)
    await peer.close()
    return out


async def call_ended(port: int, log_dir: str | None) -> dict:
    peer = Peer()
    response = await peer.call(port, "sim_fault=call_ended&sim_delay_ms=700")
    call_id = call_id_of(response)
    out: dict[str, Any] = {"opened": await wait_set(peer.opened)}
    loop = asyncio.get_running_loop()
    opened_at = loop.time()
    await peer.until("session.created")
    async with sideband(port, call_id) as ws:
        await ws_until(ws, "session.created")
        out["sideband_close"] = await closed_code(ws)
        out["ended_after_s"] = loop.time() - opened_at
    out["channel_closed"] = await wait_set(peer.closed)
    out["hangup_after"] = await hangup(port, call_id)
    await peer.close()
    return out


async def sideband_only(port: int, log_dir: str | None) -> dict:
    """A call with audio and no data channel, driven from a sideband alone (server-side control)."""
    peer = Peer(channel=False)
    response = await peer.call(port, "sim_response_ms=200")
    call_id = call_id_of(response)
    out: dict[str, Any] = {"status": response.status_code, "connected": await wait_set(peer.connected)}
    async with sideband(port, call_id) as ws:
        out["created"] = json.loads(await asyncio.wait_for(ws.recv(), STEP_S))["type"]
        await ws.send(json.dumps({"type": "response.create"}))
        out["done"] = (await ws_until(ws, "response.done"))[-1]["response"]["status"]
        out["hangup"] = await hangup(port, call_id)
        out["sideband_close"] = await closed_code(ws)
    out["peer_closed"] = await wait_set(peer.closed)
    await peer.close()
    return out


async def expiry_and_mid_response_fault(port: int, log_dir: str | None) -> dict:
    """``sim_max_session_s`` and ``close_mid_response`` end a call as they close a socket."""
    out: dict[str, Any] = {}
    peer = Peer()
    call_id = call_id_of(await peer.call(port, "sim_max_session_s=0.5"))
    await wait_set(peer.opened)
    last = (await peer.until("error"))[-1]
    out["expiry"] = {"code": last["error"]["code"], "closed": await wait_set(peer.closed)}
    out["expiry"]["hangup_after"] = (await hangup(port, call_id))["status"]
    await peer.close()
    peer = Peer()
    call_id = call_id_of(await peer.call(port, "sim_fault=close_mid_response&sim_response_ms=2000&sim_pace=1"))
    await wait_set(peer.opened)
    await peer.until("session.created")
    async with sideband(port, call_id) as ws:
        await ws_until(ws, "session.created")
        peer.send({"type": "response.create"})
        events = []  # the sideband's: its TCP close is orderly, so every event sent arrives
        try:
            while True:
                events.append(json.loads(await asyncio.wait_for(ws.recv(), STEP_S))["type"])
        except ConnectionClosed:
            pass
        out["mid_response"] = {
            "closed": await wait_set(peer.closed),
            "deltas": events.count("response.output_audio.delta"),
            "done": "response.done" in events,
            "sideband_close": ws.close_code,
        }
    await peer.close()
    return out


async def slow_accept(port: int, log_dir: str | None) -> dict:
    peer = Peer()
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await peer.call(port, "sim_fault=slow_accept&sim_delay_ms=600")
    out: dict[str, Any] = {"status": response.status_code, "answered_after_s": loop.time() - started}
    out["opened"] = await wait_set(peer.opened)
    out["hangup"] = (await hangup(port, call_id_of(response)))["status"]
    await peer.close()
    return out


def chromium_style_offer() -> str:
    """An offer shaped like Chromium's for a microphone and a data channel: BUNDLE, opus/red/G722/
    PCMU/PCMA/CN/telephone-event, header extensions, ``extmap-allow-mixed``, ``actpass``, trickle,
    one host candidate (on veth-b, where nothing answers: the call is never connected)."""
    fingerprint = ":".join(f"{b:02X}" for b in bytes(range(32)))
    common = [
        "c=IN IP4 0.0.0.0",
        "a=candidate:3098175849 1 udp 2122260223 10.201.0.2 50000 typ host generation 0 network-id 1",
        "a=ice-ufrag:Ch6x",
        "a=ice-pwd:p7XW3q0oXcFk0qGJ6v8bQmZr",
        "a=ice-options:trickle",
        f"a=fingerprint:sha-256 {fingerprint}",
        "a=setup:actpass",
    ]
    lines = [
        "v=0",
        "o=- 4215775240449105457 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "a=extmap-allow-mixed",
        "a=msid-semantic: WMS 5d2f1c1e-mic",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126",
        *common,
        "a=rtcp:9 IN IP4 0.0.0.0",
        "a=mid:0",
        "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
        "a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
        "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
        "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
        "a=sendrecv",
        "a=msid:5d2f1c1e-mic 0c6f3f4e-track",
        "a=rtcp-mux",
        "a=rtpmap:111 opus/48000/2",
        "a=rtcp-fb:111 transport-cc",
        "a=fmtp:111 minptime=10;useinbandfec=1",
        "a=rtpmap:63 red/48000/2",
        "a=fmtp:63 111/111",
        "a=rtpmap:9 G722/8000",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        "a=rtpmap:13 CN/8000",
        "a=rtpmap:110 telephone-event/48000",
        "a=rtpmap:126 telephone-event/8000",
        "a=ssrc:2990162543 cname:Zk1m4Zc0aS1mA2Xq",
        "a=ssrc:2990162543 msid:5d2f1c1e-mic 0c6f3f4e-track",
        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
        *common,
        "a=mid:1",
        "a=sctp-port:5000",
        "a=max-message-size:262144",
    ]
    return "\r\n".join(lines) + "\r\n"


async def chromium_offer(port: int, log_dir: str | None) -> dict:
    url = f"http://127.0.0.1:{port}/v1/realtime/calls?model=gpt-realtime"
    headers = {**AUTH, "Content-Type": "application/sdp"}
    async with httpx.AsyncClient(timeout=STEP_S) as http:
        response = await http.post(url, content=chromium_style_offer(), headers=headers)
    out: dict[str, Any] = {"status": response.status_code, "answer": response.text}
    if response.status_code == 201:
        out["hangup"] = await hangup(port, call_id_of(response))
    return out


async def cli_shutdown(port: int, log_dir: str | None) -> dict:
    """``meshrt sim`` (the CLI, a subprocess) gets SIGTERM mid-response with a call up: the call
    ends cleanly (sideband close 1000, the peer sees its channel close), exit 0, nothing on stderr."""
    with tempfile.TemporaryFile("w+") as stderr:
        argv = [sys.executable, "-m", "meshrt.simulator", "--port", "0", "--api-key", KEY]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            match = wait_for_line(proc, r"listening on ws://127\.0\.0\.1:(\d+)/", STEP_S, "the simulator")
            cli_port = int(match.group(1))
            peer = Peer()
            call_id = call_id_of(await peer.call(cli_port, "sim_response_ms=3000&sim_pace=1"))
            out: dict[str, Any] = {"opened": await wait_set(peer.opened)}
            await peer.until("session.created")
            async with sideband(cli_port, call_id) as ws:
                await ws_until(ws, "session.created")
                peer.send({"type": "response.create"})
                await peer.until("response.output_audio.delta")
                proc.send_signal(signal.SIGTERM)
                out["sideband_close"] = await closed_code(ws)
            out["channel_closed"] = await wait_set(peer.closed)
            out["returncode"] = await asyncio.to_thread(proc.wait, STEP_S)
            await peer.close()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stderr.seek(0)
        out["stderr"] = stderr.read()
    return out


async def global_sideband_refused(port: int, log_dir: str | None) -> dict:
    """Under ``serve(fault="sideband_refused")``: every call refuses sidebands, unless its
    POST says ``sim_fault=none``."""
    out: dict[str, Any] = {}
    for query in ("", "sim_fault=none"):
        peer = Peer()
        call_id = call_id_of(await peer.call(port, query))
        await wait_set(peer.opened)
        await peer.until("session.created")
        out[query or "default"] = await sideband_status(port, call_id)
        await hangup(port, call_id)
        await peer.close()
    return out


SCENARIOS = {
    f.__name__: f
    for f in (
        conversation,
        hangup_ends_the_call,
        peer_closes,
        sideband_refused,
        call_ended,
        sideband_only,
        chromium_offer,
        cli_shutdown,
        expiry_and_mid_response_fault,
        slow_accept,
        global_sideband_refused,
    )
}
GLOBAL_FAULTS = {"global_sideband_refused": "sideband_refused"}


async def main(name: str, log_dir: str | None) -> dict:
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    fault = GLOBAL_FAULTS.get(name)
    server = asyncio.create_task(
        serve("127.0.0.1", 0, api_key=KEY, frame_log_dir=log_dir, ready=ready.set_result, fault=fault)
    )
    try:
        port = await asyncio.wait_for(ready, STEP_S)
        return await asyncio.wait_for(SCENARIOS[name](port, log_dir), 6 * STEP_S)
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)


if __name__ == "__main__":
    result = asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
    print(json.dumps(result))
