"""The operator's two doors, the CLI and the admin API: same operations, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx

from meshrt.shared.money import Money

ADMIN = "admin-" + "t" * 30


def meshrt(database_url: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHRT_")}
    env.update(MESHRT_DATABASE_URL=database_url, MESHRT_STATE_DIR=str(tmp_path / "cli-state"))
    return subprocess.run(
        [sys.executable, "-m", "meshrt.supervisor.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_cli_accounts_keys_topups_and_revocation(database_url, tmp_path):
    created = meshrt(database_url, tmp_path, "--json", "accounts", "create", "acme", "--balance", "12.50")
    assert created.returncode == 0, created.stderr
    account = json.loads(created.stdout)
    assert account["balance"] == "12.500000"
    topped = json.loads(meshrt(database_url, tmp_path, "--json", "accounts", "topup", account["id"], "0.25").stdout)
    assert Money.from_usd(topped["balance"]) == Money.from_usd("12.75")
    key = json.loads(
        meshrt(database_url, tmp_path, "--json", "keys", "create", account["id"], "--token-cap", "5000").stdout
    )
    assert key["key"].startswith("rsk_") and key["token_cap"] == 5000
    listed = meshrt(database_url, tmp_path, "keys", "list", "--account", account["id"])
    assert key["id"] in listed.stdout and key["key"] not in listed.stdout  # shown once, never again
    revoked = json.loads(meshrt(database_url, tmp_path, "--json", "keys", "revoke", key["id"]).stdout)
    assert revoked["revoked_at"] is not None
    models = meshrt(database_url, tmp_path, "models")
    assert "gpt-realtime" in models.stdout and "gpt-4o-realtime-preview\t" not in models.stdout
    assert meshrt(database_url, tmp_path, "usage", "--account", account["id"]).returncode == 0


def test_cli_refuses_bad_arguments_and_settings_with_one_clear_line(database_url, tmp_path):
    bad_money = meshrt(database_url, tmp_path, "accounts", "create", "x", "--balance", "12,50")
    assert bad_money.returncode == 2 and "not a USD amount" in bad_money.stderr
    unknown = meshrt(database_url, tmp_path, "accounts", "topup", "acct_nope", "1")
    assert unknown.returncode == 1 and "no account" in unknown.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHRT_")}
    env.update(MESHRT_IDLE_TIMEOUT_S="soon", MESHRT_STATE_DIR=str(tmp_path / "s"))
    bad_setting = subprocess.run(
        [sys.executable, "-m", "meshrt.supervisor.cli", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert bad_setting.returncode == 2
    assert bad_setting.stderr.strip().splitlines() == [
        "meshrt: bad setting: MESHRT_IDLE_TIMEOUT_S: expected a number of seconds, got 'soon'"
    ]


def test_admin_api_runs_the_same_operations_behind_its_token(gateway_factory, engine):
    gw = gateway_factory(MESHRT_ADMIN_TOKEN=ADMIN)
    admin = httpx.Client(base_url=f"{gw.http_url}/admin/v1", headers={"Authorization": f"Bearer {ADMIN}"})
    assert httpx.get(f"{gw.http_url}/admin/v1/accounts").status_code == 401
    wrong = httpx.get(f"{gw.http_url}/admin/v1/accounts", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_admin_token"
    account = admin.post("/accounts", json={"name": "beta", "balance": "3"}).json()
    assert account["balance"] == "3.000000"
    bad = admin.post(f"/accounts/{account['id']}/topups", json={"amount": 1.5})
    assert bad.status_code == 400 and bad.json()["error"]["code"] in ("invalid_parameter",)
    topped = admin.post(f"/accounts/{account['id']}/topups", json={"amount": "1.5", "note": "promo"}).json()
    assert topped["balance"] == "4.500000"
    key = admin.post(f"/accounts/{account['id']}/keys", json={"name": "prod"})
    assert key.status_code == 201 and key.json()["key"].startswith("rsk_")
    me = httpx.get(f"{gw.http_url}/v1/account", headers={"Authorization": f"Bearer {key.json()['key']}"}).json()
    assert me["id"] == account["id"] and me["balance"] == "4.500000"
    assert admin.post(f"/keys/{key.json()['id']}/revoke").json()["revoked_at"] is not None
    assert (
        httpx.get(f"{gw.http_url}/v1/account", headers={"Authorization": f"Bearer {key.json()['key']}"}).status_code
        == 401
    )
    assert admin.get("/accounts/acct_missing").status_code == 404
    assert admin.get("/sessions").json()["object"] == "list"
