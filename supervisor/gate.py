"""The upgrade check: decides whether a realtime upgrade becomes a session, and with what grant.

Checks run in the order of SPEC §5's table: TLS, key present, key valid, model present, model
known, balance, the account's concurrent sessions. The last three and the session row's insert
are one database transaction (the account row locked), so the per-account limit holds across
front-door processes and nodes. Raises GatewayError; never logs or returns the key.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import func
from sqlmodel import Session, select

from meshrt.shared.control import Grant
from meshrt.shared.errors import GatewayError
from meshrt.shared.handshake import UpgradeRequest, extract_credentials, is_secure, is_wellformed_key
from meshrt.shared.settings import Settings

from .db import LIVE_STATES, SessionRecord, SessionState, find_key, lock_account, new_id


log = logging.getLogger("meshrt.frontdoor")


def check_request(settings: Settings, upgrade: UpgradeRequest, peer_ip: str | None) -> str:
    """The checks that need no database; returns the key."""
    if not is_secure(upgrade.headers, peer_ip, settings.forwarded_allow_ips, settings.allow_plain_ws):
        raise GatewayError("tls_required")
    credentials = extract_credentials(upgrade)
    if credentials.key is None or credentials.key == "":
        raise GatewayError("missing_api_key")
    if not is_wellformed_key(credentials.key):
        raise GatewayError("invalid_api_key")
    return credentials.key


def admit(engine, settings: Settings, prices, upgrade: UpgradeRequest, peer_ip: str | None,
          request_id: str, node: str) -> Grant:
    """Admit an upgrade: returns the grant, with its session row inserted (state granted)."""
    key = check_request(settings, upgrade, peer_ip)
    began = time.monotonic()
    with Session(engine, expire_on_commit=False) as db, db.begin():
        api_key = find_key(db, key)
        if api_key is None or api_key.revoked_at is not None:
            raise GatewayError("invalid_api_key")
        account = lock_account(db, api_key.account_id)
        if account is None or not account.active:
            raise GatewayError("invalid_api_key")
        model = upgrade.model
        if model is None:
            raise GatewayError("missing_model")
        rates = prices.get(model)
        if rates is None or not getattr(rates, "realtime", True) or not getattr(rates, "listed", True):
            raise GatewayError("model_not_found")
        if account.balance_pico <= 0:
            raise GatewayError("insufficient_quota")
        limit = account.max_concurrent_sessions or settings.default_max_concurrent_sessions
        live = db.exec(
            select(func.count()).select_from(SessionRecord).where(
                SessionRecord.account_id == account.id, SessionRecord.state.in_(LIVE_STATES))
        ).one()
        if live >= limit:
            raise GatewayError("too_many_sessions")
        cap = api_key.token_cap or account.session_token_cap or settings.session_token_cap
        grant = Grant(
            session_id=new_id("sess"), request_id=request_id, account_id=account.id,
            api_key_id=api_key.id, model=model, token_cap=cap, rates=prices.grant_rates(model),
            beta=upgrade.beta, client_addr=peer_ip or "", started_at=time.time(),
            balance_pico=account.balance_pico,
        )
        db.add(SessionRecord(id=grant.session_id, request_id=request_id, account_id=account.id,
                             api_key_id=api_key.id, model=model, node=node,
                             state=SessionState.GRANTED.value, client_addr=grant.client_addr,
                             rates=grant.rates))
    log.info("admitted", extra={"request_id": request_id, "session_id": grant.session_id,
                                "fields": {"admit_ms": round((time.monotonic() - began) * 1000, 2)}})
    return grant
