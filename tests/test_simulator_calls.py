"""The simulator's WebRTC calls (simulator/calls.py, docs/simulator.md "WebRTC calls"): the calls
REST routes on the WebSocket port, the aiortc peer, sidebands, hangup, faults, the call frame log.

Every test that sets up a peer connection runs a scenario of tests/calls_scenario.py in a network
namespace of its own (tests/netns.py) — WebRTC gathers candidates on every interface — and
asserts here on what the scenario observed. The rest drive the simulator subprocess over plain
HTTP on loopback: no peer connection is made (a malformed offer fails before ICE gathering).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
from pathlib import Path
from typing import Any

import httpx
import netns
import pytest
from conftest import OPERATOR_KEY
from conftest import _stop
from conftest import start_sim
from netns import run_in_netns
from simlog import add_usage
from simlog import sim_reports
from test_simulator import Sim
from test_simulator import running_sim
from test_simulator import validated
from test_simulator import ws_connect
from websockets.exceptions import InvalidStatus

from meshrt.simulator.driver import FAULT_AFTER_TICKS

SCENARIO = Path(__file__).resolve().parent / "calls_scenario.py"
AUTH = {"Authorization": "Bearer sk-test"}
CALL_ID = re.compile(r"^rtc_[0-9a-f]+$")
INSTRUCTIONS = "You are a terse call assistant."  # calls_scenario.INSTRUCTIONS: 31 chars, 8 tokens


def scenario(name: str, *args: str) -> Any:
    return run_in_netns(SCENARIO, name, *args, timeout=90)


def assert_openai_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error


# --- peer connections, each in a network namespace of its own -----------------------------------


def test_the_namespace_holds_only_loopback_and_the_veth_pair() -> None:
    expected = {
        "interfaces": ["lo", "veth-a", "veth-b"],
        "ipv4": {"lo": ["127.0.0.1"], "veth-a": [netns.VETH_A], "veth-b": [netns.VETH_B]},
        "outside": "ENETUNREACH",
    }
    assert run_in_netns(Path(netns.__file__), timeout=30) == expected
    assert run_in_netns("netns", timeout=30, cwd=Path(netns.__file__).parent) == expected  # as a module


def test_a_missing_tool_fails_with_a_message_not_a_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "ip" else f"/usr/bin/{tool}")
    with pytest.raises(netns.NetnsError, match="`ip` is not installed"):
        run_in_netns(Path(netns.__file__))


def test_call_runs_the_session_on_the_data_channel_and_sidebands_see_the_same_events(tmp_path: Path) -> None:
    out = scenario("conversation", str(tmp_path))
    assert out["status"] == 201
    assert out["content_type"] == "application/sdp"
    assert CALL_ID.match(out["call_id"]) and out["location"] == f"/v1/realtime/calls/{out['call_id']}"
    assert out["audio_direction"] == "sendrecv" and out["tracks"] == ["audio"], "a silent track answers the mic"
    assert out["opened"]
    # the multipart `session` part is applied like a session.update, its model included
    assert out["created"]["model"] == "gpt-realtime-mini"
    assert out["created"]["instructions"] == INSTRUCTIONS
    assert out["sideband_created"]["id"] == out["created"]["id"]
    for event in out["dc_events"]:
        validated(json.dumps(event))
    # a sideband joined before session.update: it got every later event, same ids, same order,
    # including the response its own response.create started
    assert out["dc"] == out["sideband"]
    types = [t for t, _ in out["dc"]]
    assert types[0] == "session.updated" and types.count("response.done") == 2
    first, second = out["usage"]
    assert first["input_tokens"] == 8 and first["output_token_details"]["audio_tokens"] == 10  # 500 ms
    assert second["input_token_details"]["audio_tokens"] == 5  # the first reply, 500 ms
    assert second["input_token_details"]["cached_tokens"] == 8 and second["output_token_details"]["audio_tokens"] == 0
    assert out["hangup"] == {"status": 200, "body": {}}
    assert out["sideband_close"] == 1000 and out["channel_closed"]

    log = out["log"]
    head = log[0]
    assert head["kind"] == "call" and head["call_id"] == out["call_id"]
    assert head["query"] == "sim_response_ms=500&fault_tag=conv"
    assert head["session"] == {"type": "realtime", "model": "gpt-realtime-mini", "instructions": INSTRUCTIONS}
    assert any(name.lower() == "content-type" and "multipart/form-data" in value for name, value in head["headers"])
    assert all(line["opcode"] == "text" and line["fin"] for line in log[1:])
    sent = [line["event"] for line in log[1:] if line["dir"] == "out"]
    seen = [e["event_id"] for e in out["dc_events"]]
    assert [e["event_id"] for e in sent[: len(seen)]] == seen, "every data-channel message, in order"
    assert [e["type"] for e in sent[len(seen) :]] == ["rate_limits.updated"]  # after the last response.done
    received = [line["event"]["type"] for line in log[1:] if line["dir"] == "in"]
    assert received == ["session.update", "response.create"], "the sideband's own message is in its own log"
    assert f"{out['call_id']}.jsonl" in out["log_files"] and len(out["log_files"]) == 2  # + the sideband's

    # the fault suites' helper sums usage from the call log as from a socket's
    class Logs:
        def logs(self) -> list[Path]:
            return sorted(tmp_path.glob("*.jsonl"))

    (reported,) = sim_reports(Logs())["conv"]
    total: dict = {}
    for payload in reported:
        add_usage(total, json.loads(payload)["response"]["usage"])
    assert total["total_tokens"] == first["total_tokens"] + second["total_tokens"]


def test_hangup_ends_the_call_and_closes_every_sideband_with_1000() -> None:
    out = scenario("hangup_ends_the_call")
    assert out["status"] == 201 and out["opened"]
    assert out["model"] == "gpt-realtime-2025-08-28", "an application/sdp offer takes ?model="
    assert out["hangup"] == {"status": 200, "body": {}}
    assert out["sideband_closes"] == [1000, 1000]
    assert out["channel_closed"]
    assert out["second_hangup"]["status"] == 404
    assert out["second_hangup"]["body"]["error"]["code"] == "call_not_found"
    assert out["sideband_after"] == {"status": 404, "code": "call_not_found"}


def test_a_chromium_style_offer_is_answered_with_audio_both_ways() -> None:
    out = scenario("chromium_offer")
    assert out["status"] == 201, out["answer"]
    answer = out["answer"].replace("\r\n", "\n")
    audio, application = answer.split("\nm=audio ", 1)[1].split("\nm=application ", 1)
    assert "a=sendrecv" in audio and "a=rtpmap:111 opus/48000/2" in audio and "a=mid:0" in audio
    assert "webrtc-datachannel" in application and "a=sctp-port:5000" in application and "a=mid:1" in application
    assert "a=group:BUNDLE 0 1" in answer and "a=setup:active" in answer
    assert "a=end-of-candidates" in answer, "the answer is sent once ICE gathering is complete"
    assert out["hangup"]["status"] == 200


def test_the_peer_closing_ends_the_call() -> None:
    out = scenario("peer_closes")
    assert out["opened"] and out["sideband_close"] == 1000
    assert out["hangup_after"]["status"] == 404


def test_a_call_without_data_channel_is_driven_by_its_sideband() -> None:
    out = scenario("sideband_only")
    assert out["status"] == 201 and out["connected"]
    assert out["created"] == "session.created" and out["done"] == "completed"
    assert out["hangup"]["status"] == 200 and out["sideband_close"] == 1000
    assert out["peer_closed"], "hangup closes the peer connection"


def test_session_expiry_and_mid_response_fault_end_the_call() -> None:
    out = scenario("expiry_and_mid_response_fault")
    assert out["expiry"] == {"code": "session_expired", "closed": True, "hangup_after": 404}
    assert out["mid_response"] == {"closed": True, "deltas": FAULT_AFTER_TICKS, "done": False, "sideband_close": 1000}


def test_slow_accept_delays_the_answer() -> None:
    out = scenario("slow_accept")
    assert out["status"] == 201 and out["opened"] and out["hangup"] == 200
    assert 0.6 <= out["answered_after_s"] < 5, out["answered_after_s"]


def test_sigterm_ends_live_calls_cleanly() -> None:
    out = scenario("cli_shutdown")
    assert out["opened"] and out["sideband_close"] == 1000 and out["channel_closed"]
    assert out["returncode"] == 0 and out["stderr"] == ""


def test_fault_sideband_refused() -> None:
    out = scenario("sideband_refused")
    assert out["opened"]
    assert out["sideband"] == {"status": 503, "code": "service_unavailable"}
    assert out["done"] == "completed", "the call itself carries on"
    assert out["hangup"]["status"] == 200


def test_global_fault_refuses_sidebands_unless_a_call_opts_out() -> None:
    out = scenario("global_sideband_refused")
    assert out["default"] == {"status": 503, "code": "service_unavailable"}
    assert out["sim_fault=none"] == {"status": 101}


def test_fault_call_ended() -> None:
    out = scenario("call_ended")
    assert out["opened"] and out["sideband_close"] == 1000 and out["channel_closed"]
    assert 0.6 <= out["ended_after_s"] < 5, out["ended_after_s"]  # sim_delay_ms=700 after the channel opened
    assert out["hangup_after"]["status"] == 404


# --- plain HTTP on the WebSocket port, no peer connection ---------------------------------------


@pytest.fixture(scope="module")
def keyed() -> Any:
    with running_sim("--api-key", "sk-test") as running:
        yield running


def post(sim: Sim, path: str, **kwargs: Any) -> httpx.Response:
    kwargs.setdefault("headers", AUTH)
    return httpx.post(f"http://127.0.0.1:{sim.port}{path}", timeout=10, **kwargs)


def test_unknown_calls_get_404_call_not_found(keyed: Sim) -> None:
    assert_openai_error(post(keyed, "/v1/realtime/calls/rtc_0123/hangup"), 404, "call_not_found")

    async def sideband() -> None:
        with pytest.raises(InvalidStatus) as caught:
            async with ws_connect(keyed.url("call_id=rtc_0123"), headers=AUTH):
                pass
        assert caught.value.response.status_code == 404
        assert json.loads(caught.value.response.body)["error"]["code"] == "call_not_found"

    asyncio.run(sideband())


def test_bad_offers_get_400(keyed: Sim) -> None:
    sdp = {**AUTH, "Content-Type": "application/sdp"}
    assert_openai_error(post(keyed, "/v1/realtime/calls", content=b"not an offer", headers=sdp), 400, "invalid_offer")
    assert_openai_error(post(keyed, "/v1/realtime/calls", content=b"", headers=sdp), 400, "invalid_offer")
    no_sdp = {"session": (None, json.dumps({"type": "realtime"}))}
    assert_openai_error(post(keyed, "/v1/realtime/calls", files=no_sdp), 400, "missing_required_parameter")
    bad_session = {"sdp": (None, "v=0"), "session": (None, "{nope")}
    assert_openai_error(post(keyed, "/v1/realtime/calls", files=bad_session), 400, "invalid_value")
    text = {**AUTH, "Content-Type": "text/plain"}
    assert_openai_error(post(keyed, "/v1/realtime/calls", content=b"v=0", headers=text), 400, "invalid_request")
    assert_openai_error(
        post(keyed, "/v1/realtime/calls?sim_fault=bogus", content=b"v=0", headers=sdp), 400, "invalid_value"
    )
    assert_openai_error(
        post(keyed, "/v1/realtime/calls?sim_fault=reject_429", content=b"v=0", headers=sdp), 429, "rate_limit_exceeded"
    )


def test_the_api_key_guards_every_route(keyed: Sim) -> None:
    for path in ("/v1/realtime/calls", "/v1/realtime/calls/rtc_1/hangup", "/v1/realtime/client_secrets"):
        assert_openai_error(post(keyed, path, headers={}), 401, "missing_api_key")
        assert_openai_error(post(keyed, path, headers={"Authorization": "Bearer sk-wrong"}), 401, "invalid_api_key")


def test_client_secrets(keyed: Sim) -> None:
    body = {"session": {"type": "realtime", "model": "gpt-realtime-mini", "instructions": "Hi."}}
    response = post(keyed, "/v1/realtime/client_secrets", json=body)
    assert response.status_code == 200, response.text
    secret = response.json()
    assert re.match(r"^ek_sim_[0-9a-f]+$", secret["value"])
    assert isinstance(secret["expires_at"], int)
    assert secret["session"]["model"] == "gpt-realtime-mini" and secret["session"]["instructions"] == "Hi."


def test_plain_http_limits_and_routes(keyed: Sim) -> None:
    too_big = b"x" * (1024 * 1024 + 1)
    sdp = {**AUTH, "Content-Type": "application/sdp"}
    assert_openai_error(post(keyed, "/v1/realtime/calls", content=too_big, headers=sdp), 413, "request_too_large")
    assert_openai_error(post(keyed, "/v1/nothing"), 404, "not_found")
    response = httpx.get(f"http://127.0.0.1:{keyed.port}/v1/realtime/calls", headers=AUTH, timeout=10)
    assert_openai_error(response, 405, "method_not_allowed")


def _raw_exchange(port: int, chunks: list[bytes]) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for chunk in chunks:
            sock.sendall(chunk)
            sock.settimeout(0.05)
            try:
                sock.recv(1, socket.MSG_PEEK)
            except TimeoutError:
                pass
            sock.settimeout(10)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and b"Upgrade: websocket" in data:
                break
        return data


def test_requests_split_across_packets(keyed: Sim) -> None:
    """The head is buffered until complete, whichever way it arrives: a plain POST and a WebSocket
    upgrade, each sent in pieces."""
    post_chunks = [
        b"POST /v1/realtime/client_secrets HTTP/1.1\r\nHost: x\r\nAuthorization: Bea",
        b"rer sk-test\r\nContent-Length: 2\r\n\r",
        b"\n{",
        b"}",
    ]
    answer = _raw_exchange(keyed.port, post_chunks)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b'"value": "ek_sim_' in answer
    upgrade_chunks = [
        b"GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
        b"Authorization: Bearer sk-test\r\n\r\n",
    ]
    assert _raw_exchange(keyed.port, upgrade_chunks).startswith(b"HTTP/1.1 101 Switching Protocols\r\n")


def test_expect_100_continue_is_answered(keyed: Sim) -> None:
    head = (
        b"POST /v1/realtime/client_secrets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test\r\n"
        b"Content-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", keyed.port), timeout=10) as sock:
        sock.sendall(head)
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"{}")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in answer


def test_plain_http_on_the_tls_port(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    sim = start_sim(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        assert sim.scheme == "wss"
        context = ssl.create_default_context()
        ca.configure_trust(context)
        auth = {"Authorization": f"Bearer {OPERATOR_KEY}"}
        with httpx.Client(verify=context, timeout=10) as http:
            url = f"https://127.0.0.1:{sim.port}/v1/realtime"
            assert http.post(f"{url}/client_secrets", headers=auth).status_code == 200
            assert_openai_error(http.post(f"{url}/calls/rtc_1/hangup", headers=auth), 404, "call_not_found")
    finally:
        _stop(sim.proc)
