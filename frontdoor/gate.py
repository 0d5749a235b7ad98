"""The upgrade check: decides whether a realtime upgrade becomes a session, and with what grant.

Checks run in the order of docs/errors.md's table (Codes): TLS, key present, key valid, model
present, model known, balance, the account's concurrent sessions. The last three and the session
row's insert are one database transaction (the account row locked), so the per-account limit
holds across front-door processes and nodes. A transcription session (`?intent=transcription`)
names no model: it is granted the price file's transcription rates and is billed at the model
it configures. Raises GatewayError; never logs or returns the key.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from datetime import timezone

from sqlalchemy import insert
from sqlalchemy.exc import SQLAlchemyError

from meshrt.shared.control import Grant
from meshrt.shared.errors import GatewayError
from meshrt.shared.handshake import UpgradeRequest
from meshrt.shared.handshake import extract_credentials
from meshrt.shared.handshake import is_secure
from meshrt.shared.handshake import is_wellformed_key
from meshrt.shared.handshake import model_detail
from meshrt.shared.handshake import refused_key_detail
from meshrt.shared.ids import new_id
from meshrt.shared.logs import one_line
from meshrt.shared.settings import Settings
from meshrt.storage.accounts import OPEN_SESSIONS
from meshrt.storage.accounts import KeyExpired
from meshrt.storage.accounts import live_call
from meshrt.storage.accounts import usable_key
from meshrt.storage.db import SessionRecord
from meshrt.storage.db import SessionState

log = logging.getLogger("meshrt.frontdoor")

# Admission is on every session's set-up path, so it uses Core statements built once (SQLAlchemy
# caches their compiled form) rather than ORM objects: the ORM was ~45 % of the front door's CPU.
_INSERT_SESSION = insert(SessionRecord.__table__)


def check_request(settings: Settings, upgrade: UpgradeRequest, peer_ip: str | None) -> str:
    """The checks that need no database; returns the key."""
    if not is_secure(upgrade.headers, peer_ip, settings.forwarded_allow_ips, settings.allow_plain_ws):
        raise GatewayError("tls_required")
    credentials = extract_credentials(upgrade)
    if credentials.key is None or credentials.key == "":
        raise GatewayError("missing_api_key")
    if not is_wellformed_key(credentials.key):
        raise GatewayError("invalid_api_key", refused_key_detail(credentials.key))
    return credentials.key


def admit(
    engine, settings: Settings, prices, upgrade: UpgradeRequest, peer_ip: str | None, request_id: str, node: str
) -> Grant:
    """Admit an upgrade: returns the grant, with its session row inserted (state granted)."""
    key = check_request(settings, upgrade, peer_ip)
    began = time.monotonic()
    try:
        grant = _admit_in_transaction(engine, settings, prices, upgrade, peer_ip, request_id, node, key)
    except SQLAlchemyError as exc:  # refused, dropped, timed out, locked: the client may retry
        log.warning(
            "admission failed: database unavailable",
            extra={"request_id": request_id, "fields": {"error": one_line(exc)}},
        )
        raise GatewayError("service_unavailable") from exc
    log.info(
        "admitted",
        extra={
            "request_id": request_id,
            "session_id": grant.session_id,
            "fields": {"admit_ms": round((time.monotonic() - began) * 1000, 2)},
        },
    )
    return grant


@dataclass(frozen=True)
class CallRequest:
    """What a WebRTC call asks to be admitted as (the upgrade's fields admission reads)."""

    model: str | None
    transcription: bool = False
    translation: bool = False
    beta: bool = False
    surface: str = "webrtc"
    call_id: str | None = None


def admit_call(
    engine, settings: Settings, prices, key: str, model: str | None, peer_ip: str | None, request_id: str, node: str
) -> Grant:
    """Admit a WebRTC call as a socket is admitted (key, model, balance, the account's
    sessions): its grant, with its session row inserted (granted, surface `webrtc`). The key
    was taken from the request and TLS checked by the route."""
    try:
        grant = _admit_in_transaction(engine, settings, prices, CallRequest(model), peer_ip, request_id, node, key)
    except SQLAlchemyError as exc:
        log.warning(
            "call admission failed: database unavailable",
            extra={"request_id": request_id, "fields": {"error": one_line(exc)}},
        )
        raise GatewayError("service_unavailable") from exc
    log.info("call admitted", extra={"request_id": request_id, "session_id": grant.session_id})
    return grant


def _admit_in_transaction(
    engine,
    settings: Settings,
    prices,
    upgrade: UpgradeRequest,
    peer_ip: str | None,
    request_id: str,
    node: str,
    key: str,
) -> Grant:
    with engine.begin() as db:
        try:
            found = usable_key(db, key, lock_account=True)
        except KeyExpired as expired:
            raise GatewayError("invalid_api_key", str(expired)) from None
        if found is None:
            raise GatewayError("invalid_api_key")
        model = upgrade.model
        bound = (found.session_config or {}).get("model")
        call_id = getattr(upgrade, "call_id", None) or ""
        if (found.session_config or {}).get("type") == "transcription" and not upgrade.transcription:
            raise GatewayError(
                "model_not_found",
                "This ephemeral key is for transcription sessions: connect to /v1/realtime?intent=transcription.",
            )
        if upgrade.surface == "sideband":
            model = _sideband_model(db, found, call_id)
        elif upgrade.translation:
            model = _translation_model(prices, upgrade.model, found.session_config)
        elif upgrade.transcription:
            model = _transcription_model(prices, found.session_config)
        elif bound is not None:  # an ephemeral key's model is the session's: the URL may only repeat it
            if model is not None and model != bound:
                raise GatewayError(
                    "model_not_found",
                    f"{model_detail(model)} This ephemeral key is for {bound!r}: leave model out or ask for that one.",
                )
            model = bound
        if model is None:
            raise GatewayError("missing_model")
        if not upgrade.transcription and not upgrade.translation:
            rates = prices.get(model)
            if rates is None or not getattr(rates, "realtime", True) or not getattr(rates, "listed", True):
                raise GatewayError("model_not_found", model_detail(model))
            if str(getattr(rates, "kind", "realtime")) == "translation":  # it opens translation sessions only
                raise GatewayError(
                    "model_not_found", f"{model!r} is a translation model: connect to /v1/realtime/translations."
                )
        if found.balance_pico <= 0:
            raise GatewayError("insufficient_quota")
        limit = found.max_concurrent_sessions or settings.default_max_concurrent_sessions
        # after the lock, as its own statement: on PostgreSQL each statement sees the rows committed
        # before it started, so this count includes sessions admitted while we waited for the lock
        live = db.execute(OPEN_SESSIONS, {"account_id": found.account_id}).scalar_one()
        if live >= limit:
            raise GatewayError("too_many_sessions")
        cap = found.token_cap or found.session_token_cap or settings.session_token_cap
        now = time.time()
        grant = Grant(
            session_id=new_id("sess"),
            request_id=request_id,
            account_id=found.account_id,
            api_key_id=found.api_key_id,
            model=model,
            token_cap=cap,
            rates=prices.grant_rates(model),
            beta=upgrade.beta,
            client_addr=peer_ip or "",
            started_at=now,
            balance_pico=found.balance_pico,
            session_config=None if upgrade.surface == "sideband" else _upstream_config(found.session_config),
            surface=upgrade.surface,
            call_id=call_id,
        )
        db.execute(
            _INSERT_SESSION,
            {
                "id": grant.session_id,
                "request_id": request_id,
                "account_id": grant.account_id,
                "api_key_id": grant.api_key_id,
                "model": model,
                "node": node,
                "state": SessionState.GRANTED,
                "pid": None,
                "client_addr": grant.client_addr,
                "started_at": datetime.fromtimestamp(now, timezone.utc),
                "ended_at": None,
                "end_reason": None,
                "close_code": None,
                "responses": 0,
                "usage": {},
                "cost_pico": 0,
                "by_category": {},
                "rates": grant.rates,
                "amended_at": None,
                "surface": grant.surface,
                "call_id": call_id or None,
            },
        )
    return grant


def _sideband_model(db, found, call_id: str) -> str:
    """A tenant's sideband joins one of its account's running calls, with an rsk_ key (as on
    OpenAI, whose sidebands take the server's key): the call's model, billed by the call."""
    if found.expires_at is not None:
        raise GatewayError("invalid_api_key", "A call's sideband takes an rsk_ key, not an ephemeral key.")
    call = live_call(db, found.account_id, call_id)
    if call is None:
        raise GatewayError("call_not_found")
    return call.model


def _transcription_model(prices, key_config: dict | None) -> str:
    """A transcription session's starting model (its record's until it is billed at another):
    it names none in its URL. An ephemeral key minted for a transcription session starts it at
    its configured transcription model. One minted with a conversation's settings (a model,
    instructions, …) opens no transcription session; one minted without (its config is
    `{"type": "realtime"}` alone) may."""
    if key_config and key_config.get("type") == "transcription":
        configured = _configured_transcription_model(key_config)
        rates = prices.priced_transcription(configured) if configured else None
        if rates is not None:
            return rates.model
    elif key_config and (key_config.get("model") is not None or _upstream_config(key_config) is not None):
        bound = key_config.get("model")
        raise GatewayError(
            "model_not_found",
            f"This ephemeral key is for a conversation session{f' with {bound!r}' if bound else ''}: "
            "intent=transcription needs an rsk_ key, or an ephemeral key minted without session settings.",
        )
    rates = prices.transcription_session_model()
    if rates is None:
        raise GatewayError("model_not_found", "No transcription model is priced on this gateway.")
    return rates.model


def _configured_transcription_model(config: dict) -> object:
    audio = config.get("audio")
    audio_input = audio.get("input") if isinstance(audio, dict) else None
    transcription = audio_input.get("transcription") if isinstance(audio_input, dict) else None
    return transcription.get("model") if isinstance(transcription, dict) else None


def _translation_model(prices, model: str | None, key_config: dict | None) -> str:
    """A translation session's model: the URL's, which must be a listed translation model of the
    price file. An ephemeral key's config is a conversation session's: such a key opens none."""
    if key_config:
        raise GatewayError(
            "model_not_found",
            "This ephemeral key is for a conversation session: /v1/realtime/translations needs an rsk_ key, "
            "or an ephemeral key minted without a session.",
        )
    if model is None:
        raise GatewayError("missing_model")
    rates = prices.get(model)
    if rates is None or str(getattr(rates, "kind", "")) != "translation" or not getattr(rates, "listed", True):
        detail = f"{model_detail(model)} /v1/realtime/translations takes a translation model of GET /v1/models."
        raise GatewayError("model_not_found", detail)
    return model


def _upstream_config(config: dict | None) -> dict | None:
    """An ephemeral key's session config as the session.update the worker sends: the model is
    the URL's (upstream takes it there, and it cannot change mid-session)."""
    if not config:
        return None
    update = {k: v for k, v in config.items() if k != "model"}
    return update if set(update) - {"type"} else None
