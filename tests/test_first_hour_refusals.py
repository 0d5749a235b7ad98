"""The first hour as the official `openai` SDK shows it (issue #14): each refusal a newcomer meets
says what to do — an OpenAI key where an `rsk_` key belongs, an unknown model, a base URL without
`/v1` — on the realtime socket and on the HTTP API alike; and the tenant API follows the realtime
socket's TLS rule."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from realtime_client import expect_refusal
from realtime_client import run
from websockets.exceptions import ConnectionClosed
from websockets.exceptions import InvalidStatus

from meshrt.shared.errors import ERRORS

ROOT = Path(__file__).resolve().parent.parent
OPENAI_LOOKING_KEY = "sk-proj-" + "Q" * 40
UNKNOWN_RSK_KEY = "rsk_" + "Z" * 40


def sdk(gw, key: str, *, v1: bool = True) -> AsyncOpenAI:
    """The SDK pointed at the gateway the way README says, or with the common mistake (no /v1)."""
    suffix = "/v1" if v1 else ""
    return AsyncOpenAI(
        api_key=key,
        base_url=f"http://127.0.0.1:{gw.port}{suffix}",
        websocket_base_url=f"ws://127.0.0.1:{gw.port}{suffix}",
        max_retries=0,
    )


async def first_event_and_close(client: AsyncOpenAI, model: str = "gpt-realtime"):
    """What the SDK's `async for event in conn` yields before the socket closes, and how it ends."""
    events = []
    async with client.realtime.connect(model=model) as conn:
        try:
            async for event in conn:
                events.append(event)
        except ConnectionClosed as closed:
            return events, closed.rcvd.code if closed.rcvd else None
    return events, None


def rest_error(call) -> openai.APIStatusError:
    async def go():
        with pytest.raises(openai.APIStatusError) as info:
            await call
        return info.value

    return run(go())


# --- a key that is not this gateway's ----------------------------------------------------------


def test_an_openai_key_on_the_socket_is_named_as_one(shared_gateway):
    events, close_code = run(first_event_and_close(sdk(shared_gateway, OPENAI_LOOKING_KEY)))
    (error,) = events
    assert error.type == "error" and error.error.code == "invalid_api_key" and close_code == 1008
    assert "rsk_ key issued by this gateway" in error.error.message
    assert "looks like an OpenAI key (sk-…)" in error.error.message
    assert OPENAI_LOOKING_KEY not in error.error.message and "QQQQ" not in error.error.message


def test_an_unknown_rsk_key_on_the_socket_asks_for_this_gateways_key(shared_gateway):
    events, _ = run(first_event_and_close(sdk(shared_gateway, UNKNOWN_RSK_KEY)))
    assert [e.error.code for e in events] == ["invalid_api_key"]
    assert events[0].error.message == ERRORS["invalid_api_key"].message  # one message for unknown and revoked


def test_an_openai_key_on_the_http_api_is_named_as_one(shared_gateway):
    refused = rest_error(sdk(shared_gateway, OPENAI_LOOKING_KEY).models.list())
    assert isinstance(refused, openai.AuthenticationError) and refused.status_code == 401
    assert "rsk_ key issued by this gateway" in str(refused) and "looks like an OpenAI key" in str(refused)
    assert refused.code == "invalid_api_key"  # the SDK reads the error object of docs/protocol.md, HTTP errors
    plain = rest_error(sdk(shared_gateway, UNKNOWN_RSK_KEY).models.list())
    assert "rsk_ key issued by this gateway" in str(plain) and "OpenAI key" not in str(plain)


# --- a model that is not this gateway's -----------------------------------------------------


def test_an_unknown_model_is_named_back_with_where_to_look(shared_gateway, tenant):
    events, close_code = run(first_event_and_close(sdk(shared_gateway, tenant.key), model="gpt-5-imaginary"))
    (error,) = events
    assert error.error.code == "model_not_found" and close_code == 1008
    assert "'gpt-5-imaginary'" in error.error.message and "GET /v1/models" in error.error.message
    retrieved = rest_error(sdk(shared_gateway, tenant.key).models.retrieve("gpt-5-imaginary"))
    assert isinstance(retrieved, openai.NotFoundError)
    assert "'gpt-5-imaginary'" in str(retrieved) and "GET /v1/models" in str(retrieved)


def test_a_model_name_echoed_back_is_bounded_and_never_a_key(shared_gateway, tenant):
    secret = "rsk_" + "S" * 40
    event, _, _ = run(expect_refusal(shared_gateway.ws_url, key=tenant.key, model=f"{secret}{'x' * 200}"))
    message = event["error"]["message"]
    assert secret not in message and "rsk_…REDACTED" in message and len(message) < 300


# --- a base URL without /v1 -----------------------------------------------------------------


def test_a_socket_base_url_without_v1_gets_a_404_naming_the_path(shared_gateway, tenant):
    async def go():
        with pytest.raises(InvalidStatus) as info:
            await first_event_and_close(sdk(shared_gateway, tenant.key, v1=False))
        return info.value.response

    response = run(go())
    body = json.loads(response.body)
    assert response.status_code == 404 and body["error"]["code"] == "not_found"
    assert "the realtime endpoint is /v1/realtime" in body["error"]["message"]
    assert "No WebSocket endpoint at /realtime" in body["error"]["message"]


def test_an_http_base_url_without_v1_gets_a_404_naming_the_path(shared_gateway, tenant):
    refused = rest_error(sdk(shared_gateway, tenant.key, v1=False).models.list())
    assert isinstance(refused, openai.NotFoundError)
    assert "Did you mean /v1/models?" in str(refused) and "base URL ends in /v1" in str(refused)
    elsewhere = httpx.get(f"{shared_gateway.http_url}/v1/nothing-here", timeout=10).json()["error"]
    assert elsewhere["code"] == "not_found" and "Did you mean" not in elsewhere["message"]


# --- the tenant API follows the socket's TLS rule -----------------------------------------------


TENANT_ROUTES = ["/v1/models", "/v1/usage", "/v1/account", "/v1/models/gpt-realtime"]


def test_tenant_routes_refuse_plain_http_as_the_socket_refuses_plain_ws(gateway_factory, tenant):
    gw = gateway_factory(MESHRT_ALLOW_PLAIN_WS="0")
    auth = {"Authorization": f"Bearer {tenant.key}"}
    socket_refusal, _, _ = run(expect_refusal(gw.ws_url, key=tenant.key))
    assert socket_refusal["error"]["code"] == "tls_required"
    for path in TENANT_ROUTES:
        plain = httpx.get(gw.http_url + path, headers=auth, timeout=10)
        assert plain.status_code == 403, (path, plain.text)
        assert plain.json()["error"] == socket_refusal["error"], path  # the same code, type, message
        # behind the edge (127.0.0.1 trusted): https, even with the client's address forwarded
        edge = {**auth, "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
        assert httpx.get(gw.http_url + path, headers=edge, timeout=10).status_code == 200, path
    sdk_view = rest_error(sdk(gw, tenant.key).models.list())
    assert isinstance(sdk_view, openai.PermissionDeniedError) and "TLS is required" in str(sdk_view)
    assert httpx.get(f"{gw.http_url}/healthz", timeout=10).status_code == 200  # no key, no rule


def test_an_untrusted_peers_forwarded_proto_counts_for_nothing(gateway_factory, tenant):
    gw = gateway_factory(MESHRT_ALLOW_PLAIN_WS="0", MESHRT_FORWARDED_ALLOW_IPS="10.9.9.9")
    lie = {"Authorization": f"Bearer {tenant.key}", "X-Forwarded-Proto": "https"}
    for path in TENANT_ROUTES:
        answer = httpx.get(gw.http_url + path, headers=lie, timeout=10)
        assert answer.status_code == 403 and answer.json()["error"]["code"] == "tls_required", path


# --- the admin API's bodies are documented ----------------------------------------------------


def documented_body(endpoint: str) -> list[str]:
    """The fields docs/protocol.md's HTTP API table lists for an endpoint's body, in order."""
    page = (ROOT / "docs" / "protocol.md").read_text()
    row = next(line for line in page.splitlines() if line.startswith(f"| `{endpoint}` |"))
    return re.findall(r"`(\w+)` \(", row.split("|")[3])


@pytest.mark.parametrize(
    ("endpoint", "path"),
    [
        ("POST /admin/v1/accounts", "/admin/v1/accounts"),
        ("POST /admin/v1/accounts/{id}/topups", "/admin/v1/accounts/{account_id}/topups"),
        ("POST /admin/v1/accounts/{id}/keys", "/admin/v1/accounts/{account_id}/keys"),
    ],
)
def test_admin_bodies_in_the_docs_are_the_openapi_schemas(shared_gateway, endpoint, path):
    schema = httpx.get(f"{shared_gateway.http_url}/openapi.json", timeout=10).json()
    ref = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert documented_body(endpoint) == list(body["properties"]), endpoint
    page = (ROOT / "docs" / "protocol.md").read_text()
    assert f"`{ref.rsplit('/', 1)[1]}`" in page  # the schema's name, to look it up in /openapi.json
