"""WebRTC calls at the HTTP level, with no media: every refusal of `POST /v1/realtime/calls`
(OpenAI's error shape, the code's status, nothing billed, no row left open), CORS for a
browser's cross-origin call, and `call_not_found` for hangups and sidebands of calls that are
not the caller's. The calls themselves, with real WebRTC peers, are in tests/test_calls.py."""

from __future__ import annotations

import time

import httpx
import pytest
from conftest import wait_for
from realtime_client import expect_refusal
from realtime_client import run
from sqlmodel import Session
from sqlmodel import select

from meshrt.shared.errors import ERRORS
from meshrt.storage import accounts
from meshrt.storage.db import SessionRecord

OFFER = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


def post_call(gw, key: str | None, body, content_type: str | None = "application/sdp", **kwargs):
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    if content_type:
        headers["Content-Type"] = content_type
    return httpx.post(f"{gw.http_url}/v1/realtime/calls", content=body, headers=headers, timeout=30, **kwargs)


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code, body
    assert body["request_id"] == response.headers["x-request-id"]
    return body["error"]


def open_rows(engine, account_id: str) -> list:
    with Session(engine) as db:
        rows = db.exec(select(SessionRecord).where(SessionRecord.account_id == account_id)).all()
        return [r for r in rows if r.state != "ended"]


def test_refusals_are_openai_shaped_and_leave_nothing_open(shared_gateway, make_tenant, engine):
    tenant = make_tenant()
    gw = shared_gateway
    assert_error(post_call(gw, None, OFFER), 401, "missing_api_key")
    assert_error(post_call(gw, "rsk_" + "x" * 40, OFFER), 401, "invalid_api_key")
    refused = assert_error(post_call(gw, "sk-proj-" + "y" * 40, OFFER), 401, "invalid_api_key")
    assert "OpenAI key" in refused["message"] and "sk-proj" not in refused["message"]
    assert_error(post_call(gw, tenant.key, OFFER, "text/plain"), 415, "invalid_parameter")
    assert_error(post_call(gw, tenant.key, OFFER, None), 415, "invalid_parameter")
    not_sdp = assert_error(post_call(gw, tenant.key, b"hello"), 400, "invalid_parameter")
    assert "SDP" in not_sdp["message"]
    assert_error(post_call(gw, tenant.key, "v=0\r\n" + "a=x\r\n" * 20000), 400, "invalid_parameter")
    # the application/sdp form with an rsk_ key: the model comes from ?model=
    assert_error(post_call(gw, tenant.key, OFFER), 400, "missing_model")
    assert_error(post_call(gw, tenant.key, OFFER, params={"model": "gpt-nope"}), 404, "model_not_found")
    # the multipart form: its parts are checked
    url = f"{gw.http_url}/v1/realtime/calls"
    auth = {"Authorization": f"Bearer {tenant.key}"}
    for files, what in (
        ({"session": (None, '{"model":"gpt-realtime"}')}, "sdp"),
        ({"sdp": (None, OFFER), "session": (None, "{not json")}, "session"),
        ({"sdp": (None, OFFER), "session": (None, '["a"]')}, "session"),
        ({"sdp": (None, OFFER), "session": (None, '{"type":"transcription"}')}, "session.type"),
        ({"sdp": (None, OFFER), "session": (None, '{"model":7}')}, "session.model"),
    ):
        error = assert_error(httpx.post(url, files=files, headers=auth, timeout=30), 400, "invalid_parameter")
        assert error["message"].startswith(what), error
    assert_error(
        httpx.post(url, files={"sdp": (None, OFFER), "session": (None, '{"model":"gpt-nope"}')}, headers=auth),
        404,
        "model_not_found",
    )
    poor = make_tenant(balance="0")
    assert_error(post_call(gw, poor.key, OFFER, params={"model": "gpt-realtime"}), 429, "insufficient_quota")
    assert open_rows(engine, tenant.account_id) == [] and open_rows(engine, poor.account_id) == []


def test_a_call_upstream_refuses_is_not_billed_and_its_row_ends(shared_gateway, make_tenant, engine):
    """The simulator refuses an offer that is SDP in name only: upstream_error, upstream's words
    quoted, the session row ended with it, nothing debited."""
    tenant = make_tenant()
    response = post_call(shared_gateway, tenant.key, OFFER, params={"model": "gpt-realtime"})
    error = assert_error(response, 502, "upstream_error")
    assert "Upstream refused the call (HTTP 400" in error["message"]
    rows = wait_for(lambda: [r for r in _rows(engine, tenant.account_id) if r.state == "ended"], 10)
    assert [(r.surface, r.end_reason, r.cost_pico) for r in rows] == [("webrtc", "upstream_error", 0)]
    assert accounts.get_account(engine, tenant.account_id).balance_pico == 100 * 10**12


def _rows(engine, account_id: str) -> list:
    with Session(engine) as db:
        return list(db.exec(select(SessionRecord).where(SessionRecord.account_id == account_id)).all())


def test_an_ephemeral_key_places_calls_until_it_expires(shared_gateway, make_tenant, engine):
    tenant = make_tenant()
    minted = httpx.post(
        f"{shared_gateway.http_url}/v1/realtime/client_secrets",
        json={"expires_after": {"seconds": 10}, "session": {"type": "realtime", "model": "gpt-realtime"}},
        headers={"Authorization": f"Bearer {tenant.key}"},
        timeout=10,
    ).json()
    ek = minted["value"]
    # its model binds: another in the URL is refused, its own goes on to upstream (which refuses this offer)
    assert_error(post_call(shared_gateway, ek, OFFER, params={"model": "gpt-realtime-mini"}), 404, "model_not_found")
    assert_error(post_call(shared_gateway, ek, OFFER), 502, "upstream_error")
    time.sleep(max(0.0, minted["expires_at"] - time.time()) + 0.2)
    expired = assert_error(post_call(shared_gateway, ek, OFFER), 401, "invalid_api_key")
    assert "expired" in expired["message"]


def test_cors_lets_a_browser_page_post_its_offer(shared_gateway, make_tenant):
    url = f"{shared_gateway.http_url}/v1/realtime/calls"
    origin = {"Origin": "https://app.example"}
    preflight = httpx.options(
        url,
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            # what OpenAI's Agents SDK (@openai/agents-realtime) sends with its offer
            "Access-Control-Request-Headers": "authorization, content-type, x-openai-agents-sdk",
        },
        timeout=10,
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert all(header in allowed for header in ("authorization", "content-type", "x-openai-agents-sdk")), allowed
    # the answer (here a refusal) is readable cross-origin, Location among the exposed headers
    response = httpx.post(url, content=OFFER, headers={**origin, "Content-Type": "application/sdp"}, timeout=10)
    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == "*"
    assert "location" in response.headers["access-control-expose-headers"].lower()
    # the rest of the API sends no CORS headers: it is for servers
    models = httpx.get(f"{shared_gateway.http_url}/v1/models", headers=origin, timeout=10)
    assert "access-control-allow-origin" not in models.headers


def test_hangups_and_sidebands_of_unknown_or_foreign_calls_are_call_not_found(shared_gateway, make_tenant, engine):
    tenant, other = make_tenant(), make_tenant()
    url = f"{shared_gateway.http_url}/v1/realtime/calls/rtc_nope/hangup"
    assert_error(httpx.post(url, headers={"Authorization": f"Bearer {tenant.key}"}, timeout=10), 404, "call_not_found")
    assert_error(httpx.post(url, timeout=10), 401, "missing_api_key")

    def sideband(call_id: str):
        return expect_refusal(shared_gateway.ws_url, key=tenant.key, model=None, query=f"call_id={call_id}")

    error, code, _ = run(sideband("rtc_nope"))
    assert error["error"]["code"] == "call_not_found" and code == ERRORS["call_not_found"].close_code
    # another account's running call answers exactly as no call: a row stands in for one
    call_row = _fake_live_call(engine, other, "rtc_theirs")
    url = f"{shared_gateway.http_url}/v1/realtime/calls/rtc_theirs/hangup"
    assert_error(httpx.post(url, headers={"Authorization": f"Bearer {tenant.key}"}, timeout=10), 404, "call_not_found")

    error, _, _ = run(sideband("rtc_theirs"))
    assert error["error"]["code"] == "call_not_found"
    _end(engine, call_row)


def _fake_live_call(engine, tenant, call_id: str) -> str:
    from datetime import datetime
    from datetime import timezone

    from meshrt.shared.ids import new_id

    row = SessionRecord(
        id=new_id("sess"),
        request_id=new_id("req"),
        account_id=tenant.account_id,
        api_key_id=tenant.key_id,
        model="gpt-realtime",
        node="elsewhere",
        state="live",
        started_at=datetime.now(timezone.utc),
        surface="webrtc",
        call_id=call_id,
    )
    with Session(engine) as db:
        db.add(row)
        db.commit()
        return row.id


def _end(engine, session_id: str) -> None:
    with Session(engine) as db:
        row = db.get(SessionRecord, session_id)
        row.state = "ended"
        db.add(row)
        db.commit()


@pytest.mark.parametrize("path", ["/v1/realtime/calls", "/v1/realtime/calls/rtc_x/hangup"])
def test_calls_over_plain_http_are_refused_when_tls_is_required(tmp_path, database_url, sim, make_tenant, path):
    from conftest import _stop
    from conftest import start_gateway

    gw = start_gateway(tmp_path, database_url, sim.url, MESHRT_ALLOW_PLAIN_WS="0")
    try:
        tenant = make_tenant()
        response = httpx.post(
            f"{gw.http_url}{path}",
            content=OFFER,
            headers={"Authorization": f"Bearer {tenant.key}", "Content-Type": "application/sdp"},
            timeout=10,
        )
        assert_error(response, 403, "tls_required")
    finally:
        _stop(gw.proc)
