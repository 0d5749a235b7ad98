"""Ephemeral keys (ek_, POST /v1/realtime/client_secrets) end to end: minted through the official
SDK with an rsk_ key, opening sessions billed to the parent's account with the minted session
config applied, refused once expired, on the HTTP API, or when their parent is revoked."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest
from conftest import ended_record
from conftest import wait_for
from openai.types.realtime import RealtimeSessionCreateResponse
from realtime_client import connect_ws
from realtime_client import expect_closed
from realtime_client import expect_refusal
from realtime_client import recv_json
from realtime_client import recv_until
from realtime_client import run
from sqlalchemy import text
from sqlalchemy import update
from sqlmodel import Session
from sqlmodel import select

from meshrt.shared.errors import ERRORS
from meshrt.storage import accounts
from meshrt.storage.db import Account
from meshrt.storage.db import ApiKey
from meshrt.storage.db import LedgerEntry
from meshrt.storage.db import hash_key

ADMIN = "admin-" + "e" * 24
PIRATE = "Answer like a pirate, in one short sentence."


@pytest.fixture(scope="module")
def ek_gateway(tmp_path_factory, database_url, sim):
    from conftest import _stop
    from conftest import start_gateway

    gw = start_gateway(tmp_path_factory.mktemp("ek"), database_url, sim.url, MESHRT_ADMIN_TOKEN=ADMIN)
    yield gw
    _stop(gw.proc)


def sdk(gw, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=f"{gw.http_url}/v1", max_retries=0)


def mint(gw, key: str, **params):
    return sdk(gw, key).realtime.client_secrets.create(**params)


def balance(engine, account_id: str) -> int:
    with Session(engine) as db:
        return db.get(Account, account_id).balance_pico


def debits(engine, account_id: str) -> int:
    with Session(engine) as db:
        rows = db.exec(select(LedgerEntry).where(LedgerEntry.account_id == account_id, LedgerEntry.kind == "usage"))
        return -sum(r.amount_pico for r in rows)


def key_row(engine, key_id: str) -> ApiKey:
    with Session(engine) as db:
        return db.get(ApiKey, key_id)


def upstream_text_in(sim, before: set) -> list[list[dict]]:
    """The client → upstream text events of each simulator connection opened since `before`."""
    out = []
    for path in sorted(set(sim.logs()) - before, key=lambda p: p.stat().st_mtime):
        frames = [json.loads(line) for line in path.read_text().splitlines()]
        out.append(
            [
                json.loads(base64.b64decode(f["payload_b64"]))
                for f in frames
                if f.get("dir") == "in" and f.get("opcode") == "text"
            ]
        )
    return out


async def converse(ws) -> tuple[dict, dict, dict]:
    """session.created, the session.updated the minted config caused, and one response.done."""
    created = await recv_json(ws)
    updated = await recv_json(ws)
    await ws.send(json.dumps({"type": "response.create"}))
    done = (await recv_until(ws, "response.done"))[-1]
    return created, updated, done


def test_sdk_mints_a_key_whose_sessions_get_its_config_and_bill_the_parent(gateway, sim, make_tenant, engine):
    """On both worker backends (the `gateway` fixture): the config goes upstream from the worker."""
    ek_gateway = gateway
    tenant = make_tenant(balance="5")
    start = balance(engine, tenant.account_id)
    began = int(time.time())
    secret = mint(
        ek_gateway,
        tenant.key,
        expires_after={"anchor": "created_at", "seconds": 120},
        session={"type": "realtime", "model": "gpt-realtime", "instructions": PIRATE},
    )
    # OpenAI's response shape, parsed by the SDK's own types
    assert secret.value.startswith("ek_") and len(secret.value) == 43
    assert began + 120 <= secret.expires_at <= int(time.time()) + 120
    assert isinstance(secret.session, RealtimeSessionCreateResponse)
    session = secret.session
    assert (session.type, session.model, session.instructions) == ("realtime", "gpt-realtime", PIRATE)
    ek_id = secret.session.id
    row = key_row(engine, ek_id)
    assert (row.account_id, row.parent_key_id, row.expires_at) == (tenant.account_id, tenant.key_id, secret.expires_at)

    before = set(sim.logs())

    async def sessions():
        results = []
        # a browser's way (subprotocol, no model in the URL: the key's), then the SDK's (Authorization)
        for how, model in (("insecure", None), ("authorization", "gpt-realtime")):
            async with connect_ws(ek_gateway.ws_url, key=secret.value, how=how, model=model) as ws:
                results.append((*await converse(ws), ws.response.headers["x-request-id"]))
        return results

    results = run(sessions(), 60)
    for created, updated, done, _ in results:
        assert created["type"] == "session.created" and created["session"]["instructions"] != PIRATE
        assert updated["type"] == "session.updated" and updated["session"]["instructions"] == PIRATE
        assert done["response"]["status"] == "completed"
    # upstream got the config as the session's first event, before anything of the client's
    for events in upstream_text_in(sim, before):
        assert events[0] == {"type": "session.update", "session": {"type": "realtime", "instructions": PIRATE}}
        assert [e["type"] for e in events[1:]] == ["response.create"]
    rows = [ended_record(engine, request_id) for *_, request_id in results]
    for row, (_, _, done, _) in zip(rows, results):
        assert (row.account_id, row.api_key_id, row.model) == (tenant.account_id, ek_id, "gpt-realtime")
        assert row.end_reason == "client_closed" and row.responses == 1
        assert row.usage["total_tokens"] == done["response"]["usage"]["total_tokens"] > 0
    spent = start - balance(engine, tenant.account_id)
    assert spent == sum(r.cost_pico for r in rows) == debits(engine, tenant.account_id) > 0
    # the plaintext is nowhere in the database: only its hash and display form
    stored = key_row(engine, ek_id)
    assert stored.key_hash == hash_key(secret.value)
    assert secret.value not in json.dumps(stored.model_dump(), default=str)
    assert stored.display == f"{secret.value[:8]}…{secret.value[-4:]}"


def test_the_key_is_listed_with_its_parent(ek_gateway, make_tenant, engine):
    tenant = make_tenant()
    secret = mint(ek_gateway, tenant.key, session={"type": "realtime"})
    listed = httpx.get(
        f"{ek_gateway.http_url}/admin/v1/keys",
        params={"account_id": tenant.account_id},
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=10,
    ).json()["data"]
    by_id = {k["id"]: k for k in listed}
    assert by_id[tenant.key_id]["parent_key_id"] is None and by_id[tenant.key_id]["expires_at"] is None
    assert by_id[secret.session.id]["parent_key_id"] == tenant.key_id
    assert by_id[secret.session.id]["expires_at"] == secret.expires_at
    assert secret.value not in json.dumps(listed)
    cli = subprocess.run(
        [sys.executable, "-m", "meshrt.supervisor.cli", "keys", "list", "--account", tenant.account_id],
        env=ek_gateway.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    line = next(x for x in cli.stdout.splitlines() if x.startswith(secret.session.id))
    assert f"active\tephemeral of {tenant.key_id}, expires_at {secret.expires_at}" in line
    assert secret.value not in cli.stdout


def test_an_ephemeral_key_mints_nothing_and_reads_nothing(ek_gateway, make_tenant):
    tenant = make_tenant()
    secret = mint(ek_gateway, tenant.key)
    assert secret.session.model is None and secret.expires_at - time.time() > 590  # default: 600 s
    with pytest.raises(openai.AuthenticationError) as refused:
        mint(ek_gateway, secret.value)
    assert refused.value.code == "invalid_api_key" and "only open realtime sessions" in refused.value.message
    for path in ("/v1/usage", "/v1/account", "/v1/models"):
        answer = httpx.get(ek_gateway.http_url + path, headers={"Authorization": f"Bearer {secret.value}"}, timeout=10)
        assert answer.status_code == 401, path
        assert answer.json()["error"]["code"] == "invalid_api_key" and "rsk_ key" in answer.json()["error"]["message"]
        assert secret.value not in answer.text


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"expires_after": {"anchor": "created_at", "seconds": 9}}, "expires_after.seconds"),
        ({"expires_after": {"anchor": "created_at", "seconds": 7201}}, "expires_after.seconds"),
        ({"expires_after": {"anchor": "now", "seconds": 60}}, "expires_after.anchor"),
        ({"session": {"type": "transcription", "model": "gpt-realtime"}}, "session.model"),
        (
            {"session": {"type": "transcription", "audio": {"input": {"transcription": {"model": "gpt-realtime"}}}}},
            "session.audio.input.transcription.model",
        ),
        ({"session": {"type": "realtime", "model": "gpt-5"}}, "session.model"),
        ({"session": {"type": "realtime", "instructions": "x" * 70_000}}, "session: over"),
    ],
)
def test_bad_requests_are_told_what_is_wrong(ek_gateway, tenant, body, says):
    answer = httpx.post(
        f"{ek_gateway.http_url}/v1/realtime/client_secrets",
        json=body,
        headers={"Authorization": f"Bearer {tenant.key}"},
        timeout=10,
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "invalid_parameter" and says in answer.json()["error"]["message"]


def test_an_expired_key_is_refused_saying_so(ek_gateway, tenant, engine):
    secret = mint(ek_gateway, tenant.key, expires_after={"anchor": "created_at", "seconds": 10})
    past = int(time.time()) - 1
    with engine.begin() as db:  # rather than wait 10 s
        db.execute(update(ApiKey).where(ApiKey.id == secret.session.id).values(expires_at=past))
    event, code, reason = run(expect_refusal(ek_gateway.ws_url, key=secret.value, how="insecure"))
    assert event["error"]["code"] == "invalid_api_key"
    assert (code, reason) == (1008, ERRORS["invalid_api_key"].close_reason)
    assert f"expired at {past}" in event["error"]["message"] and secret.value not in json.dumps(event)


def test_the_url_may_only_repeat_the_keys_model(ek_gateway, tenant):
    secret = mint(ek_gateway, tenant.key, session={"type": "realtime", "model": "gpt-realtime"})
    event, code, _ = run(expect_refusal(ek_gateway.ws_url, key=secret.value, model="gpt-realtime-mini"))
    assert event["error"]["code"] == "model_not_found" and code == 1008
    assert "This ephemeral key is for 'gpt-realtime'" in event["error"]["message"]


def test_a_key_without_a_model_takes_the_urls(ek_gateway, tenant, engine):
    secret = mint(ek_gateway, tenant.key)
    assert run(expect_refusal(ek_gateway.ws_url, key=secret.value, model=None))[0]["error"]["code"] == "missing_model"

    async def go():
        async with connect_ws(ek_gateway.ws_url, key=secret.value, model="gpt-realtime-mini") as ws:
            created = await recv_json(ws)  # no config to apply: no session.update was sent
            return created, ws.response.headers["x-request-id"]

    created, request_id = run(go())
    assert created["type"] == "session.created" and created["session"]["model"] == "gpt-realtime-mini"
    assert ended_record(engine, request_id).model == "gpt-realtime-mini"


def test_the_parents_token_cap_applies(ek_gateway, make_tenant, engine):
    capped = make_tenant(token_cap=30)
    secret = mint(ek_gateway, capped.key)

    async def go():
        async with connect_ws(ek_gateway.ws_url, key=secret.value) as ws:
            await recv_json(ws)
            await ws.send(json.dumps({"type": "response.create"}))
            events = await expect_closed(ws, 20)
            return events, ws.response.headers["x-request-id"]

    events, request_id = run(go())
    assert events[-1]["error"]["code"] == "session_token_cap_exceeded"
    assert ended_record(engine, request_id).end_reason == "session_token_cap_exceeded"


def test_revoking_the_parent_ends_its_keys_and_their_live_sessions(ek_gateway, make_tenant, engine):
    tenant = make_tenant()
    secret = mint(ek_gateway, tenant.key, session={"type": "realtime", "instructions": PIRATE})
    sibling = mint(ek_gateway, tenant.key)

    async def go():
        async with connect_ws(ek_gateway.ws_url, key=secret.value) as ws:
            assert (await recv_json(ws))["type"] == "session.created"
            assert (await recv_json(ws))["type"] == "session.updated"
            revoked_at = time.monotonic()
            await asyncio.to_thread(accounts.revoke_key, engine, tenant.key_id)
            events = await expect_closed(ws, 10)
            took = time.monotonic() - revoked_at
            return events, ws.close_code, ws.response.headers["x-request-id"], took

    events, code, request_id, took = run(go())
    print(f"ek_ session closed {took:.2f} s after its parent key's revocation")
    assert events[-1]["error"]["code"] == "key_revoked" and code == 1008 and took < 2
    assert ended_record(engine, request_id).end_reason == "key_revoked"
    assert key_row(engine, secret.session.id).revoked_at is None  # ended through its parent, not marked
    for value in (secret.value, sibling.value):
        assert run(expect_refusal(ek_gateway.ws_url, key=value))[0]["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        mint(ek_gateway, tenant.key)


def test_the_key_never_reaches_a_log_line(ek_gateway, tenant):
    secret = mint(ek_gateway, tenant.key)

    async def go():
        async with connect_ws(ek_gateway.ws_url, key=secret.value, how="query") as ws:
            return (await recv_json(ws))["type"]

    assert run(go()) == "session.created"
    wait_for(lambda: "api_key=rsk_…REDACTED" in ek_gateway.log_text(), 10, what="the upgrade's log line")
    assert secret.value not in ek_gateway.log_text() and secret.value[3:] not in ek_gateway.log_text()


def test_an_older_database_gets_the_columns_on_upgrade(tmp_path):
    """`meshrt db upgrade` on a database from before ephemeral keys adds their columns and index."""
    from meshrt.storage.db import create_schema
    from meshrt.storage.db import make_engine

    old = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    create_schema(old)
    with old.begin() as db:
        db.execute(text("DROP INDEX ix_apikey_parent_key_id"))
        for column in ("parent_key_id", "expires_at", "session_config"):
            db.execute(text(f"ALTER TABLE apikey DROP COLUMN {column}"))
    changes = create_schema(old)
    assert set(changes.columns) == {"apikey.parent_key_id", "apikey.expires_at", "apikey.session_config"}
    assert changes.indexes == ("ix_apikey_parent_key_id",)
    with old.connect() as db:
        assert db.execute(text("SELECT parent_key_id, expires_at, session_config FROM apikey")).all() == []


def test_a_session_outlives_its_key_and_counts_against_the_account(ek_gateway, make_tenant, engine):
    tenant = make_tenant(max_concurrent_sessions=1)
    secret = mint(ek_gateway, tenant.key)

    async def go():
        async with connect_ws(ek_gateway.ws_url, key=secret.value) as ws:
            await recv_json(ws)
            # the account's one session is taken: its rsk_ key and its ek_ key are refused alike
            for key in (tenant.key, secret.value):
                assert (await expect_refusal(ek_gateway.ws_url, key=key))[0]["error"]["code"] == "too_many_sessions"
            with engine.begin() as db:
                db.execute(update(ApiKey).where(ApiKey.id == secret.session.id).values(expires_at=int(time.time()) - 1))
            await asyncio.sleep(1.5)  # three of the supervisor's re-reads of its live sessions' keys
            await ws.send(json.dumps({"type": "response.create"}))
            done = (await recv_until(ws, "response.done"))[-1]
            return done, ws.response.headers["x-request-id"]

    done, request_id = run(go(), 60)
    assert done["response"]["status"] == "completed"
    assert ended_record(engine, request_id).end_reason == "client_closed"
    assert "expired" in run(expect_refusal(ek_gateway.ws_url, key=secret.value))[0]["error"]["message"]


def test_minting_takes_the_tls_rule_of_every_tenant_route(gateway_factory, tenant):
    gw = gateway_factory(MESHRT_ALLOW_PLAIN_WS="0")
    answer = httpx.post(
        f"{gw.http_url}/v1/realtime/client_secrets", json={}, headers={"Authorization": f"Bearer {tenant.key}"}
    )
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "tls_required"


def test_expired_keys_are_pruned_but_not_while_a_session_they_opened_runs(
    tmp_path, database_url, sim, make_tenant, engine
):
    """MESHRT_EPHEMERAL_KEY_RETENTION_S: an ek_ key expired for longer than that is deleted by
    the supervisor; one whose session still runs stays until the session ends; live keys and
    rsk_ keys stay; the session's record keeps the key's id."""
    from conftest import _stop
    from conftest import start_gateway

    gw = start_gateway(tmp_path, database_url, sim.url, MESHRT_EPHEMERAL_KEY_RETENTION_S="2")
    try:
        tenant = make_tenant()
        unused, in_use, valid = (
            mint(gw, tenant.key, session={"type": "realtime", "model": "gpt-realtime"}) for _ in range(3)
        )

        async def scenario():
            async with connect_ws(gw.ws_url, key=in_use.value, how="insecure", model=None) as ws:
                assert (await recv_json(ws))["type"] == "session.created"
                await ws.send(json.dumps({"type": "response.create"}))
                await recv_until(ws, "response.done")
                long_ago = int(time.time()) - 60
                with engine.begin() as db:
                    for secret in (unused, in_use):
                        db.execute(update(ApiKey).where(ApiKey.id == secret.session.id).values(expires_at=long_ago))
                await asyncio.to_thread(
                    wait_for, lambda: key_row(engine, unused.session.id) is None, 15, 0.2, "the unused key's pruning"
                )
                assert key_row(engine, in_use.session.id) is not None  # its session runs on
                await ws.send(json.dumps({"type": "response.create"}))
                await recv_until(ws, "response.done")  # and still relays and bills
                return ws.response.headers["x-request-id"]

        request_id = run(scenario(), 60)
        wait_for(
            lambda: key_row(engine, in_use.session.id) is None, 15, 0.2, "the key's pruning once its session ended"
        )
        assert key_row(engine, valid.session.id) is not None
        assert [k.id for k in accounts.list_keys(engine, tenant.account_id)] == [tenant.key_id, valid.session.id]
        record = ended_record(engine, request_id)
        assert record.api_key_id == in_use.session.id and record.responses == 2
        assert "expired ephemeral keys pruned" in gw.log_text()
    finally:
        _stop(gw.proc)
