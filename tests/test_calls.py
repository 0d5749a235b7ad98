"""WebRTC calls through meshrt, with real WebRTC peers (aiortc on both ends: the client, and the
simulator answering as OpenAI would), each run in a network namespace of its own
(tests/netns.py, tests/gateway_calls_scenario.py). The records of calls that were billed are
checked against the simulator's own frame log of the call's data channel: usage field by field,
cost to the picodollar, and the balance debit."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from netns import run_in_netns
from simlog import same_usage

from meshrt.shared.money import Money

SCENARIO = Path(__file__).parent / "gateway_calls_scenario.py"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def calls(request, database_url, tmp_path_factory):
    """All the call scenarios, on one stack, per worker backend."""
    names = "browser,server_form,quota,kill,ephemeral_sideband,revoked,supervisor_restart"
    work = tmp_path_factory.mktemp(f"calls-{request.param}")
    return run_in_netns(SCENARIO, names, database_url, str(work), request.param, timeout=400)


@pytest.fixture(scope="module")
def faults(database_url, tmp_path_factory):
    """Calls under the simulator's faults, a stack each."""
    work = tmp_path_factory.mktemp("call-faults")
    return run_in_netns(SCENARIO, "sideband_refused,call_ended,call_id_outage", database_url, str(work), timeout=300)


@pytest.fixture(scope="module")
def browser(database_url, tmp_path_factory):
    """Headless Chromium, a fake microphone, the tenant's pages and server: one page written by
    hand, one with OpenAI's Agents SDK for the browser (installed from npm, outside the
    namespace, which has no route to the registry)."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.fail(f"`{tool}` is not installed: the browser test runs OpenAI's Agents SDK (apt-get install npm)")
    work = tmp_path_factory.mktemp("call-chromium")
    done = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--silent", "@openai/agents-realtime@0.20"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"npm install failed:\n{done.stdout}\n{done.stderr}"
    umd = work / "node_modules/@openai/agents-realtime/dist/bundle/openai-realtime-agents.umd.js"
    shutil.copy(umd, work / "agents-realtime.umd.js")
    return run_in_netns(SCENARIO, "chromium,chromium_sdk", database_url, str(work), timeout=400)


def scenario(calls, name: str) -> dict:
    result = calls[name]
    assert "error" not in result, f"{name} failed in its namespace:\n{result['error']}\n{result['log']}"
    return result


def assert_exact(out: dict) -> None:
    record, report = out["record"], out["report"]
    assert record["cost_pico"] == report["cost_pico"], (Money(record["cost_pico"]), Money(report["cost_pico"]))
    assert record["responses"] == report["responses"]
    assert same_usage(record["usage"], report["usage"]), (record["usage"], report["usage"])


def test_a_browser_call_with_an_ephemeral_key_is_billed_exactly_once(calls):
    out = scenario(calls, "browser")
    assert out["status"] == 201 and out["headers"]["content-type"].startswith("application/sdp")
    assert out["headers"]["location"] == f"/v1/realtime/calls/{out['call_id']}"
    assert out["opened"] is not None, "the data channel never opened"
    # the ephemeral key's config reached upstream with the offer
    assert out["created"]["instructions"].startswith("Answer like a pirate")
    assert out["created"]["model"] == "gpt-realtime"
    assert out["sideband_response_seen_on_channel"], "the tenant's sideband response did not reach the call"
    record = out["record"]
    assert record["surface"] == "webrtc" and record["call_id"] == out["call_id"]
    assert record["end_reason"] == "upstream_closed" and record["api_key_id"] == out["ek_id"]
    assert_exact(out)
    assert record["responses"] == 3 and record["cost_pico"] > 0
    # the usage the page received is what was billed; the sideband billed nothing of it again
    assert out["debited"] == record["cost_pico"]
    side = out["sideband_record"]
    assert side["surface"] == "sideband" and side["cost_pico"] == 0 and side["responses"] == 0
    assert side["call_id"] == out["call_id"]
    print(f"browser call: 3 responses, {Money(record['cost_pico']).display()}, record == simulator's log")


def test_a_tenant_server_places_a_call_and_hangs_it_up_with_the_official_sdk(calls):
    out = scenario(calls, "server_form")
    assert out["status"] == 201 and out["opened"] is not None
    assert out["created"]["model"] == "gpt-realtime-mini" and out["created"]["instructions"].startswith("Answer")
    assert out["foreign_hangup"] == [404, "call_not_found"]
    assert out["hangup"] is None  # the SDK's hangup returned without raising: 200
    assert out["channel_closed_after_s"] is not None, "the call was not ended upstream"
    assert out["record"]["end_reason"] == "upstream_closed" and out["record"]["responses"] == 1
    assert_exact(out)
    print(f"hangup: data channel closed {out['channel_closed_after_s']} s, record {out['record_after_s']} s after it")


def test_a_call_whose_balance_runs_out_is_hung_up(calls):
    out = scenario(calls, "quota")
    assert out["status"] == 201
    record = out["record"]
    assert record["end_reason"] == "insufficient_quota"
    assert out["channel_closed"], "the call ran on after its balance ran out"
    assert_exact(out)
    # the call's output was capped through the sideband at MESHRT_MAX_RESPONSE_OUTPUT_TOKENS
    assert 300 in out["max_output_tokens_seen"]
    # ended when the next response could not be reserved: the balance never went below zero
    assert out["balance"] == out["start_balance"] - record["cost_pico"]
    assert out["balance"] >= 0, Money(out["balance"])
    print(
        f"quota: {record['responses']} responses on $0.05, ended with {Money(out['balance']).display()} left "
        f"(the next response's reservation did not fit)"
    )


def test_a_killed_call_worker_gets_its_call_hung_up_and_billed_from_its_spool(calls):
    out = scenario(calls, "kill")
    assert out["channel_closed_after_s"] is not None, "the call ran on with its worker dead"
    assert out["record"]["end_reason"] == "internal_error"
    assert out["hangup_logged"]
    assert_exact(out)
    assert out["record"]["responses"] == 1
    print(f"worker SIGKILL: the call closed {out['channel_closed_after_s']} s later, its response billed")


def test_revoking_the_key_behind_a_calls_ephemeral_key_ends_the_call(calls):
    out = scenario(calls, "revoked")
    assert out["channel_closed_after_s"] is not None and out["record"]["end_reason"] == "key_revoked"
    assert out["record"]["responses"] == 1
    print(f"revocation: the call closed {out['channel_closed_after_s']} s after its parent key was revoked")


def test_a_call_outlives_a_supervisor_crash_and_stays_metered(calls):
    out = scenario(calls, "supervisor_restart")
    assert out["channel_open"], "the call did not go on across the supervisor's restart"
    assert out["record"]["responses"] == 3  # before, during and after the restart
    assert_exact(out)


def test_a_sideband_takes_no_ephemeral_key(calls):
    out = scenario(calls, "ephemeral_sideband")
    assert out["refusal"] == "invalid_api_key" and out["close"] == 1008


def test_a_call_whose_sideband_is_refused_is_refused_to_its_caller_and_hung_up_unbilled(faults):
    out = scenario(faults, "sideband_refused")
    # placed upstream, but its worker could not join the sideband: the caller gets no answer to
    # connect with (a call nobody meters never starts), and upstream's call is hung up
    assert out["status"] == 502 and out["refusal"]["code"] == "upstream_unavailable", out
    assert out["record"]["end_reason"] == "upstream_unavailable" and out["record"]["cost_pico"] == 0
    assert out["debited"] == 0 and 200 in out["hung_up"]


def test_a_call_upstream_ends_is_finalised(faults):
    out = scenario(faults, "call_ended")
    assert out["status"] == 201 and out["opened"] is not None
    assert out["channel_closed_after_s"] is not None
    assert out["record"]["end_reason"] == "upstream_closed" and out["record"]["surface"] == "webrtc"
    assert out["debited"] == out["record"]["cost_pico"] == 0
    # the supervisor hangs up every call it finalises; upstream had ended this one already
    assert out["hung_up"] == [404]


def test_a_call_placed_while_the_database_is_out_is_still_hung_up_after_a_supervisor_crash(faults):
    out = scenario(faults, "call_id_outage")
    assert out["status"] == 201 and out["opened"] is not None
    assert out["answered_while_locked"], "the database came back before upstream answered: no outage was tested"
    assert out["retried_logged"] and out["row_call_id"], "the call's id never reached its row"
    # the supervisor started after the crash knew the call by its row: it hung it up when the worker died
    assert out["channel_closed_after_s"] is not None, "the call ran on with its worker dead"
    assert 200 in out["hung_up"], out["hung_up"]
    assert out["record"]["end_reason"] == "internal_error" and out["record"]["responses"] == 1
    assert_exact(out)


def test_a_real_browser_calls_through_meshrt_with_an_ephemeral_key(browser):
    out = scenario(browser, "chromium")
    page = out["page"]
    assert "error" not in page, page
    assert out["problems"] == [], out["problems"]
    assert page["status"] == 201 and page["location"] == f"/v1/realtime/calls/{out['call_id']}"
    assert page["connection"] == "connected"  # ICE and DTLS with the simulator's peer, not only the HTTP
    assert page["created"]["instructions"].startswith("Answer like a pirate")  # the ek_'s config
    assert page["updated"] == "Be brief."
    assert_exact(out)
    assert out["record"]["usage"] == page["usage"] and out["record"]["end_reason"] == "upstream_closed"
    # the same page over a WebSocket, its ephemeral key in the subprotocol
    assert page["ws_protocol"] == "realtime"
    ws_record, ws_report = out["ws_record"], out["ws_report"]
    assert ws_record["cost_pico"] == ws_report["cost_pico"] and ws_record["responses"] == ws_report["responses"] == 1
    assert same_usage(ws_record["usage"], page["ws_usage"])
    assert out["debited"] == out["record"]["cost_pico"] + ws_record["cost_pico"]
    call_cost, socket_cost = Money(out["record"]["cost_pico"]).display(), Money(ws_record["cost_pico"]).display()
    print(f"Chromium: the call {call_cost}, the socket {socket_cost}, each equal to the simulator's log")


def test_a_voice_agent_written_with_openais_agents_sdk_calls_through_meshrt(browser):
    """@openai/agents-realtime's WebRTC transport in Chromium, pointed at meshrt by `baseUrl`."""
    out = scenario(browser, "chromium_sdk")
    page = out["page"]
    assert "error" not in page, page
    assert out["problems"] == [], out["problems"]
    assert page["status"] == "connected" and page["call_id"].startswith("rtc_")
    assert "session.updated" in page["events"]  # the SDK waits for its config to be acknowledged
    record = out["record"]
    assert record["surface"] == "webrtc" and record["call_id"] == page["call_id"] and record["responses"] == 1
    assert_exact(out)
    assert record["usage"] == page["usage"] and out["debited"] == record["cost_pico"] > 0
    print(f"Agents SDK in Chromium: the call {Money(record['cost_pico']).display()}, equal to the simulator's log")
