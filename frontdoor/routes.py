"""HTTP routes of the front door beyond health: models, usage, account (tenant keys) and the
admin API (operator token). The admin operations are `accounts.py`'s, the same as the CLI's."""

from __future__ import annotations

import hmac
import json
from typing import Any
from typing import Literal

from fastapi import Depends
from fastapi import FastAPI
from fastapi import Query
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pydantic import Field
from sqlmodel import Session
from sqlmodel import select
from starlette.datastructures import Headers
from starlette.routing import get_route_path
from websockets.datastructures import Headers as HandshakeHeaders

from meshrt.shared.errors import ERRORS
from meshrt.shared.errors import http_error_body
from meshrt.shared.handshake import is_secure
from meshrt.shared.handshake import model_detail
from meshrt.shared.handshake import refused_key_detail
from meshrt.shared.money import Money
from meshrt.storage import accounts as ops
from meshrt.storage.db import LIVE_STATES
from meshrt.storage.db import SessionRecord

from .app import ApiError
from .app import new_request_id
from .dashboard import dashboard_routes
from .usage import MAX_LIMIT
from .usage import query_usage


def _bearer(request: Request) -> str | None:
    return _bearer_token(request.headers.get("authorization"))


def _bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else ""


def _spec_error(code: str, detail: str | None = None) -> ApiError:
    spec = ERRORS[code]
    return ApiError(spec.http_status, code, f"{spec.message} {detail}" if detail else spec.message, spec.type)


def require_tls(request: Request) -> None:
    """The realtime upgrade's TLS rule (`shared.handshake.is_secure`), for every route a tenant key
    travels on: a key sent in clear over HTTP is as exposed as one sent over ws://."""
    settings = request.app.state.ctx.settings
    headers = HandshakeHeaders([(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw])
    peer = request.client.host if request.client else None
    if not is_secure(headers, peer, settings.forwarded_allow_ips, settings.allow_plain_ws):
        raise _spec_error("tls_required")


# An ephemeral key opens realtime sessions and nothing else: it must not read the account's
# usage or balance, nor mint keys that outlive it (docs/protocol.md, Ephemeral keys).
EPHEMERAL_REFUSED = (
    "Ephemeral keys (ek_…) only open realtime sessions (the WebSocket /v1/realtime) and WebRTC calls; "
    "this endpoint takes the rsk_ key they were minted with."
)


def tenant_key(request: Request):
    """The caller's key (Authorization: Bearer rsk_…), by the realtime upgrade's own rules (TLS,
    then the key): a row with `api_key_id` and `account_id`."""
    require_tls(request)
    token = _bearer(request)
    if token is None:
        raise ApiError(401, "missing_api_key", "No API key provided. Send Authorization: Bearer <key>.")
    if token.startswith(ops.EPHEMERAL_PREFIX):  # refused unlooked-up: nothing to learn about it
        raise _spec_error("invalid_api_key", EPHEMERAL_REFUSED)
    with request.app.state.ctx.engine.connect() as connection:
        found = ops.usable_key(connection, token) if token else None
    if found is None:
        raise _spec_error("invalid_api_key", refused_key_detail(token))
    return found


def admin_refusal(expected: str, authorization: str | None) -> ApiError | None:
    """Why a request with this Authorization header may not use the admin API, or None."""
    token = _bearer_token(authorization)
    if not expected:
        return ApiError(403, "admin_disabled", "The admin API is off: set MESHRT_ADMIN_TOKEN.", "permission_error")
    if token is None or not hmac.compare_digest(token.encode(), expected.encode()):
        return ApiError(401, "invalid_admin_token", "Incorrect admin token.", "permission_error")
    return None


def admin(request: Request) -> None:
    refusal = admin_refusal(request.app.state.ctx.settings.admin_token, request.headers.get("authorization"))
    if refusal is not None:
        raise refusal


ADMIN_PREFIX = "/admin/"


class AdminTokenFirst:
    """ASGI middleware: the admin token is checked as soon as a request's head is in, before its
    body is read. FastAPI reads a route's body before it runs the route's dependencies, so with
    `admin` alone an unauthenticated client could make the front door wait for its body (and
    hold its connection) until the body's deadline. The refusal goes out at once, and the front
    door closes the connection rather than read the rest (`frontdoor.server.bounded_protocol`).
    `admin` stays on every route: this is an early answer, not the only check."""

    def __init__(self, app, ctx):
        self.app, self.ctx = app, ctx

    async def __call__(self, scope, receive, send):
        # the path as the router matches it (percent-decoded), so no spelling of it slips by
        if scope["type"] == "http" and (get_route_path(scope) + "/").startswith(ADMIN_PREFIX):
            refusal = admin_refusal(self.ctx.settings.admin_token, Headers(scope=scope).get("authorization"))
            if refusal is not None:
                request_id = new_request_id()
                body = http_error_body(refusal.code, refusal.message, refusal.type, request_id)
                response = JSONResponse(body, status_code=refusal.status, headers={"x-request-id": request_id})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _model_json(model_id: str, rates) -> dict:
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "openai",
        "realtime": rates.realtime,
        "kind": str(rates.kind),
        "pricing": rates.pricing_json(),
        "effective_date": rates.effective_date,
    }


def _usage_page(engine, account_id, start_time, end_time, model, limit, after) -> dict:
    if start_time is not None and end_time is not None and end_time <= start_time:
        raise ApiError(400, "invalid_parameter", "end_time must be after start_time.")
    try:
        return query_usage(
            engine, account_id, start_time=start_time, end_time=end_time, model=model, limit=limit, after=after
        )
    except LookupError as exc:
        raise ApiError(400, "invalid_parameter", f"after: {exc.args[0]}") from None


# An ephemeral key's session config rides in every Grant (control messages are at most 256 KiB)
MAX_SESSION_CONFIG_BYTES = 64 * 1024


class ExpiresAfter(BaseModel):
    anchor: Literal["created_at"] = "created_at"
    seconds: int = Field(600, ge=10, le=7200)


class ClientSecretRequest(BaseModel):
    """OpenAI's `POST /v1/realtime/client_secrets` body (openai.types.realtime.ClientSecretCreateParams)."""

    expires_after: ExpiresAfter | None = None
    session: dict[str, Any] | None = None


def _session_config(session: dict | None, prices) -> dict:
    """The session config an ephemeral key carries, checked: a realtime session, a listed
    realtime model if one is named, small enough to travel in a grant."""
    config = dict(session or {})
    kind = config.setdefault("type", "realtime")
    if kind == "transcription":
        _transcription_config(config, prices)
    elif kind != "realtime":
        raise ApiError(400, "invalid_parameter", "session.type: must be 'realtime' or 'transcription'.")
    model = config.get("model")
    if model is not None:
        rates = prices.get(model) if isinstance(model, str) else None
        translation = str(getattr(rates, "kind", "")) == "translation"  # it opens no conversation session
        if rates is None or translation or not getattr(rates, "realtime", True) or not getattr(rates, "listed", True):
            shown = model_detail(model) if isinstance(model, str) else "It must be a string."
            raise ApiError(
                400,
                "invalid_parameter",
                f"session.model: not a realtime model here. {shown} GET /v1/models lists the ones you can use.",
            )
    if len(json.dumps(config, separators=(",", ":"))) > MAX_SESSION_CONFIG_BYTES:
        raise ApiError(400, "invalid_parameter", f"session: over {MAX_SESSION_CONFIG_BYTES} bytes of JSON.")
    return config


def _transcription_config(config: dict, prices) -> None:
    """A transcription session's config (OpenAI's: no model of its own; the transcription model
    in `audio.input.transcription.model`, which must be one `/v1/models` prices)."""
    if "model" in config:
        raise ApiError(
            400,
            "invalid_parameter",
            "session.model: a transcription session has none; set audio.input.transcription.model.",
        )
    audio = config.get("audio")
    audio_input = audio.get("input") if isinstance(audio, dict) else None
    transcription = audio_input.get("transcription") if isinstance(audio_input, dict) else None
    model = transcription.get("model") if isinstance(transcription, dict) else None
    if model is not None and prices.priced_transcription(model) is None:
        shown = model_detail(model) if isinstance(model, str) else "It must be a string."
        raise ApiError(
            400,
            "invalid_parameter",
            f"session.audio.input.transcription.model: not a transcription model here. {shown} "
            "GET /v1/models lists the ones you can use.",
        )


def tenant_routes(app: FastAPI, ctx) -> None:
    @app.post("/v1/realtime/client_secrets")
    def client_secrets(body: ClientSecretRequest, key=Depends(tenant_key)):
        config = _session_config(body.session, ctx.prices)
        seconds = (body.expires_after or ExpiresAfter()).seconds
        created = ops.create_ephemeral_key(ctx.engine, key, seconds, config)
        return {
            "value": created.plaintext,
            "expires_at": created.key.expires_at,
            # OpenAI's effective session object; its id is the ephemeral key's id, the api_key_id
            # of every usage record of the sessions it opens
            "session": {**config, "object": "realtime.session", "id": created.key.id, "expires_at": 0},
        }

    @app.get("/v1/models")
    def list_models(key=Depends(tenant_key)):
        return {"object": "list", "data": [_model_json(m, r) for m, r in ctx.prices.listed_models().items()]}

    @app.get("/v1/models/{model_id}")
    def get_model(model_id: str, key=Depends(tenant_key)):
        rates = ctx.prices.listed_models().get(model_id)
        if rates is None:
            raise _spec_error("model_not_found", model_detail(model_id))
        return _model_json(model_id, rates)

    @app.get("/v1/usage")
    def usage(
        key=Depends(tenant_key),
        start_time: int | None = Query(None, ge=0),
        end_time: int | None = Query(None, ge=0),
        model: str | None = None,
        limit: int = Query(20, ge=1, le=MAX_LIMIT),
        after: str | None = None,
    ):
        return _usage_page(ctx.engine, key.account_id, start_time, end_time, model, limit, after)

    @app.get("/v1/account")
    def account(key=Depends(tenant_key)):
        row = ops.get_account(ctx.engine, key.account_id)
        return {
            **ops.account_json(row),
            "live_sessions": ops.open_sessions(ctx.engine, row.id),
            "max_concurrent_sessions": row.max_concurrent_sessions or ctx.settings.default_max_concurrent_sessions,
            "api_key_id": key.api_key_id,
        }


class NewAccount(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    balance: str = "0"
    max_concurrent_sessions: int | None = Field(None, ge=1)
    session_token_cap: int | None = Field(None, ge=1)


class TopUp(BaseModel):
    amount: str
    note: str = Field("", max_length=500)


class NewKey(BaseModel):
    name: str = Field("", max_length=200)
    token_cap: int | None = Field(None, ge=1)


def _usd(raw: str, field: str) -> Money:
    try:
        return Money.from_usd(raw)
    except (ValueError, TypeError, ArithmeticError):
        raise ApiError(400, "invalid_parameter", f"{field}: not a USD amount: {raw!r}") from None


def _found(call, *args):
    try:
        return call(*args)
    except ops.NotFound as exc:
        raise ApiError(404, "not_found", str(exc.args[0])) from None


def admin_routes(app: FastAPI, ctx) -> None:
    app.add_middleware(AdminTokenFirst, ctx=ctx)
    guard = [Depends(admin)]

    @app.post("/admin/v1/accounts", dependencies=guard, status_code=201)
    def create_account(body: NewAccount):
        account = ops.create_account(
            ctx.engine, body.name, _usd(body.balance, "balance"), body.max_concurrent_sessions, body.session_token_cap
        )
        return ops.account_json(account)

    @app.get("/admin/v1/accounts", dependencies=guard)
    def list_accounts():
        return {"object": "list", "data": [ops.account_json(a) for a in ops.list_accounts(ctx.engine)]}

    @app.get("/admin/v1/accounts/{account_id}", dependencies=guard)
    def get_account(account_id: str):
        return {
            **ops.account_json(_found(ops.get_account, ctx.engine, account_id)),
            "live_sessions": ops.open_sessions(ctx.engine, account_id),
        }

    @app.post("/admin/v1/accounts/{account_id}/topups", dependencies=guard)
    def topup(account_id: str, body: TopUp):
        return ops.account_json(_found(ops.topup, ctx.engine, account_id, _usd(body.amount, "amount"), body.note))

    @app.post("/admin/v1/accounts/{account_id}/deactivate", dependencies=guard)
    def deactivate(account_id: str):
        return ops.account_json(_found(ops.set_active, ctx.engine, account_id, False))

    @app.post("/admin/v1/accounts/{account_id}/activate", dependencies=guard)
    def activate(account_id: str):
        return ops.account_json(_found(ops.set_active, ctx.engine, account_id, True))

    @app.post("/admin/v1/accounts/{account_id}/keys", dependencies=guard, status_code=201)
    def create_key(account_id: str, body: NewKey):
        created = _found(ops.create_key, ctx.engine, account_id, body.name, body.token_cap)
        return {**ops.key_json(created.key), "key": created.plaintext}

    @app.get("/admin/v1/keys", dependencies=guard)
    def list_keys(account_id: str | None = None):
        return {"object": "list", "data": [ops.key_json(k) for k in ops.list_keys(ctx.engine, account_id)]}

    @app.post("/admin/v1/keys/{key_id}/revoke", dependencies=guard)
    def revoke_key(key_id: str):
        return ops.key_json(_found(ops.revoke_key, ctx.engine, key_id))

    @app.get("/admin/v1/usage", dependencies=guard)
    def usage(
        account_id: str | None = None,
        start_time: int | None = Query(None, ge=0),
        end_time: int | None = Query(None, ge=0),
        model: str | None = None,
        limit: int = Query(20, ge=1, le=MAX_LIMIT),
        after: str | None = None,
    ):
        return _usage_page(ctx.engine, account_id, start_time, end_time, model, limit, after)

    @app.get("/admin/v1/sessions", dependencies=guard)
    def live_sessions():
        with Session(ctx.engine) as db:
            rows = db.exec(
                select(SessionRecord).where(SessionRecord.state.in_(LIVE_STATES)).order_by(SessionRecord.started_at)
            ).all()
            return {
                "object": "list",
                "data": [
                    {
                        "id": r.id,
                        "request_id": r.request_id,
                        "account_id": r.account_id,
                        "model": r.model,
                        "node": r.node,
                        "state": r.state,
                        "pid": r.pid,
                        "started_at": int(r.started_at.timestamp()),
                    }
                    for r in rows
                ],
            }


ROUTERS = [tenant_routes, admin_routes, dashboard_routes]
