"""Every error code of docs/errors.md the session path can produce: the error frame, its close
code and reason (`<type>.<code>`), on a real gateway. Errors in the worker run on asyncio and
trio."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from realtime_client import connect_ws
from realtime_client import expect_closed
from realtime_client import expect_refusal
from realtime_client import recv_json
from realtime_client import run

from meshrt.shared.errors import ERRORS
from meshrt.storage import accounts


def assert_error(result, code: str) -> None:
    event, close_code, reason = result
    spec = ERRORS[code]
    assert event["type"] == "error"
    assert event["error"]["code"] == code and event["error"]["type"] == spec.type
    assert event["request_id"].startswith("req_")
    assert close_code == spec.close_code
    assert reason == f"{spec.type}.{code}"


def test_missing_api_key(shared_gateway):
    assert_error(run(expect_refusal(shared_gateway.ws_url)), "missing_api_key")


@pytest.mark.parametrize("key", ["rsk_short", "sk-not-ours-" + "a" * 30, "rsk_" + "A" * 40])
def test_invalid_api_key_malformed_or_unknown(shared_gateway, key):
    result = run(expect_refusal(shared_gateway.ws_url, key=key))
    assert_error(result, "invalid_api_key")
    assert key not in json.dumps(result[0])


def test_revoked_key_is_refused_at_once(shared_gateway, tenant, engine):
    async def go():
        async with connect_ws(shared_gateway.ws_url, key=tenant.key) as ws:
            assert (await recv_json(ws))["type"] == "session.created"
        accounts.revoke_key(engine, tenant.key_id)
        return await expect_refusal(shared_gateway.ws_url, key=tenant.key)

    assert_error(run(go()), "invalid_api_key")


def test_missing_model(shared_gateway, tenant):
    assert_error(run(expect_refusal(shared_gateway.ws_url, key=tenant.key, model=None)), "missing_model")


@pytest.mark.parametrize("model", ["gpt-5", "gpt-4o-realtime-preview", "whisper-1", ""])
def test_unknown_or_unlisted_model(shared_gateway, tenant, model):
    code = "missing_model" if model == "" else "model_not_found"
    assert_error(run(expect_refusal(shared_gateway.ws_url, key=tenant.key, model=model)), code)


def test_zero_balance_is_refused_before_anything_goes_upstream(shared_gateway, sim, make_tenant):
    broke = make_tenant(balance="0")
    before = set(sim.logs())
    assert_error(run(expect_refusal(shared_gateway.ws_url, key=broke.key)), "insufficient_quota")
    assert set(sim.logs()) == before


def test_too_many_sessions_for_the_account(shared_gateway, make_tenant):
    limited = make_tenant(max_concurrent_sessions=1)

    async def go():
        async with connect_ws(shared_gateway.ws_url, key=limited.key) as ws:
            await recv_json(ws)
            refused = await expect_refusal(shared_gateway.ws_url, key=limited.key)
        return refused

    assert_error(run(go()), "too_many_sessions")


def test_refusal_selects_realtime_subprotocol_and_never_echoes_the_key(shared_gateway):
    bad = "rsk_" + "Q" * 40

    async def go():
        async with connect_ws(shared_gateway.ws_url, key=bad, how="insecure") as ws:
            assert ws.subprotocol == "realtime"
            assert bad not in str(ws.response.headers.raw_items())
            event = await recv_json(ws)
            await expect_closed(ws)
            return event

    assert run(go())["error"]["code"] == "invalid_api_key"


def test_upgrade_to_another_path_is_404(shared_gateway, tenant):
    from websockets.exceptions import InvalidStatus

    async def go():
        with pytest.raises(InvalidStatus) as info:
            async with connect_ws(f"ws://127.0.0.1:{shared_gateway.port}/v1/elsewhere", key=tenant.key):
                pass
        return info.value.response.status_code

    assert run(go()) == 404


def test_tls_required_unless_a_trusted_proxy_says_https(gateway_factory, tenant):
    gw = gateway_factory(MESHRT_ALLOW_PLAIN_WS="0")
    assert_error(run(expect_refusal(gw.ws_url, key=tenant.key)), "tls_required")

    async def via_proxy():
        async with connect_ws(gw.ws_url, key=tenant.key, headers={"X-Forwarded-Proto": "https"}) as ws:
            return await recv_json(ws)

    assert run(via_proxy())["type"] == "session.created"
    untrusted = gateway_factory(MESHRT_ALLOW_PLAIN_WS="0", MESHRT_FORWARDED_ALLOW_IPS="10.9.9.9")
    result = run(expect_refusal(untrusted.ws_url, key=tenant.key, headers={"X-Forwarded-Proto": "https"}))
    assert_error(result, "tls_required")


def test_server_at_capacity(gateway_factory, tenant):
    gw = gateway_factory(MESHRT_MAX_SESSIONS="1")

    async def go():
        async with connect_ws(gw.ws_url, key=tenant.key) as ws:
            await recv_json(ws)
            return await expect_refusal(gw.ws_url, key=tenant.key)

    assert_error(run(go()), "server_at_capacity")


def test_upstream_rejection_is_upstream_error(gateway_factory, tenant, worker_backend):
    gw = gateway_factory(MESHRT_WORKER_BACKEND=worker_backend)
    result = run(expect_refusal(gw.ws_url, key=tenant.key, query="sim_fault=reject_401"))
    assert_error(result, "upstream_error")
    assert "401" in result[0]["error"]["message"]


def test_unreachable_upstream_is_upstream_unavailable_after_bounded_retries(gateway_factory, tenant, worker_backend):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    gw = gateway_factory(f"ws://127.0.0.1:{dead_port}/v1/realtime", MESHRT_WORKER_BACKEND=worker_backend)
    assert_error(run(expect_refusal(gw.ws_url, key=tenant.key)), "upstream_unavailable")
    busy = gateway_factory(MESHRT_WORKER_BACKEND=worker_backend)
    assert_error(run(expect_refusal(busy.ws_url, key=tenant.key, query="sim_fault=reject_429")), "upstream_unavailable")


def test_message_too_large(gateway_factory, tenant, worker_backend):
    gw = gateway_factory(MESHRT_MAX_MESSAGE_BYTES="1024", MESHRT_WORKER_BACKEND=worker_backend)

    async def go():
        async with connect_ws(gw.ws_url, key=tenant.key) as ws:
            await recv_json(ws)
            await ws.send(json.dumps({"type": "session.update", "pad": "x" * 2000}))
            event = await recv_json(ws)
            await expect_closed(ws)
            return event, ws.close_code, ws.close_reason

    assert_error(run(go()), "message_too_large")


def test_idle_timeout_counts_only_client_messages(gateway_factory, tenant, worker_backend):
    gw = gateway_factory(MESHRT_IDLE_TIMEOUT_S="1.5", MESHRT_WORKER_BACKEND=worker_backend)

    async def go():
        async with connect_ws(gw.ws_url, key=tenant.key, ping_interval=0.2) as ws:
            await recv_json(ws)
            for _ in range(4):  # messages keep it alive past the timeout
                await asyncio.sleep(0.5)
                await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime"}}))
            events = await expect_closed(ws, 10)  # then pings alone do not
            return events[-1], ws.close_code, ws.close_reason

    assert_error(run(go()), "session_idle_timeout")


def test_max_session_length(gateway_factory, tenant, worker_backend):
    gw = gateway_factory(MESHRT_MAX_SESSION_S="1.5", MESHRT_WORKER_BACKEND=worker_backend)

    async def go():
        async with connect_ws(gw.ws_url, key=tenant.key) as ws:
            await recv_json(ws)
            events = await expect_closed(ws, 10)
            return events[-1], ws.close_code, ws.close_reason

    assert_error(run(go()), "session_expired")


def test_a_request_head_that_never_completes_is_cut_off(gateway_factory):
    import time

    gw = gateway_factory(MESHRT_HEADER_TIMEOUT_S="1")
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: a\r\n")  # and nothing more
        began = time.monotonic()
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - began < 5
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:  # complete heads are unaffected
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")


def test_every_way_a_session_ends_is_an_end_reason():
    from meshrt.shared.errors import EndReason

    assert {r.value for r in EndReason} == set(ERRORS) | {"client_closed", "upstream_closed"}
    assert EndReason.of("no_such_reason") is EndReason.INTERNAL_ERROR
    assert EndReason.of(None) is EndReason.INTERNAL_ERROR
