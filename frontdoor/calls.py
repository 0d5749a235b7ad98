"""WebRTC calls at the front door: `POST /v1/realtime/calls` in both of OpenAI's forms, the
tenant's hangup, and CORS for a browser's cross-origin call.

A call is admitted like a socket (`frontdoor.gate.admit_call`: key, model, balance, the
account's sessions), then handed to the supervisor as a `PlaceCall`: the supervisor posts the
offer upstream with the operator's key and starts the call's metering worker
(`supervisor.calls`, `worker.call`). The answer goes back to the client as OpenAI gives it:
`201`, the SDP answer, `Location: /v1/realtime/calls/{call_id}`. Media and the data channel go
between the client and upstream; meshrt never carries them (docs/browsers.md).
"""

from __future__ import annotations

import json
import logging

import anyio
from fastapi import FastAPI
from fastapi import Request
from fastapi.responses import Response
from starlette.middleware.cors import CORSMiddleware

from meshrt.shared.control import CallPlaced
from meshrt.shared.control import HangUp
from meshrt.shared.control import HungUp
from meshrt.shared.control import PlaceCall
from meshrt.shared.errors import GatewayError
from meshrt.shared.handshake import is_wellformed_key
from meshrt.shared.handshake import refused_key_detail
from meshrt.storage import accounts as ops

from .app import ApiError
from .routes import _bearer
from .routes import _spec_error
from .routes import require_tls
from .routes import tenant_key

log = logging.getLogger("meshrt.frontdoor")

CALLS_PATH = "/v1/realtime/calls"
MAX_OFFER_BYTES = 64 * 1024  # a browser's offer is a few KiB
MAX_SESSION_BYTES = 64 * 1024  # as an ephemeral key's config: it rides in a control message
HANGUP_ANSWER_S = 30.0  # the supervisor retries an unreachable upstream for up to ~10 s


def _offer(raw: object) -> str:
    text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace") if isinstance(raw, bytes) else None
    if text is None or not text.lstrip().startswith("v=0") or len(text) > MAX_OFFER_BYTES:
        raise ApiError(400, "invalid_parameter", "sdp: not an SDP offer (it starts with v=0, at most 64 KiB).")
    return text


def _session_part(raw: object) -> dict:
    """The `session` part of the multipart form: a realtime session's config (JSON object)."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    try:
        session = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        session = None
    if not isinstance(session, dict) or len(raw) > MAX_SESSION_BYTES:
        raise ApiError(400, "invalid_parameter", "session: a JSON object (a realtime session config, at most 64 KiB).")
    if session.get("type", "realtime") != "realtime":
        raise ApiError(400, "invalid_parameter", "session.type: a call is a realtime session ('realtime').")
    if "model" in session and not isinstance(session["model"], str):
        raise ApiError(400, "invalid_parameter", "session.model: must be a string.")
    return session


async def _read_call(request: Request) -> tuple[str, dict]:
    """(offer, session config) from either form: `application/sdp` (the offer as the body, the
    model in `?model=` or the ephemeral key's) or `multipart/form-data` with `sdp` and `session`."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/sdp":
        return _offer(await request.body()), {}
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=2, max_fields=4, max_part_size=MAX_OFFER_BYTES)
        except Exception as exc:  # noqa: BLE001 - any malformed form is the client's error
            raise ApiError(400, "invalid_parameter", f"The multipart body could not be read: {exc}") from None
        parts = {}
        for name in ("sdp", "session"):
            value = form.get(name)
            parts[name] = await value.read() if hasattr(value, "read") else value
        if parts["sdp"] is None:
            raise ApiError(400, "invalid_parameter", "sdp: the multipart form needs an 'sdp' part (the offer).")
        return _offer(parts["sdp"]), _session_part(parts["session"]) if parts["session"] is not None else {}
    raise ApiError(
        415,
        "invalid_parameter",
        "Content-Type: send the offer as application/sdp, or multipart/form-data with parts 'sdp' and 'session'.",
    )


def _key(request: Request) -> str:
    key = _bearer(request)
    if key is None or key == "":
        raise ApiError(401, "missing_api_key", "No API key provided. Send Authorization: Bearer <key>.")
    if not is_wellformed_key(key):
        raise _spec_error("invalid_api_key", refused_key_detail(key))
    return key


def _refused(error: GatewayError) -> ApiError:
    return _spec_error(error.code, error.detail)


def call_routes(app: FastAPI, ctx) -> None:
    app.add_middleware(CallsCors)

    @app.post(CALLS_PATH, status_code=201)
    async def place_call(request: Request):
        require_tls(request)
        key = _key(request)
        offer, session = await _read_call(request)
        model = session.get("model") or request.query_params.get("model")
        peer = request.client.host if request.client else None
        request_id = request.state.request_id
        try:
            grant = await anyio.to_thread.run_sync(
                ctx.admit_call, key, model, peer, request_id, abandon_on_cancel=False
            )
        except GatewayError as error:
            raise _refused(error) from None
        upstream_session = {**(grant.session_config or {}), **session, "type": "realtime"}
        upstream_session.pop("model", None)  # the grant's: the supervisor sets it
        answer = await ctx.ask_supervisor(PlaceCall(grant, offer, upstream_session), ctx.call_answer_s)
        if not isinstance(answer, CallPlaced):
            # not answered: the supervisor may have the call by now, and settles its row itself
            log.error("call not answered by the supervisor", extra={"session_id": grant.session_id})
            raise _spec_error("upstream_unavailable", "The call was not placed in time.")
        if answer.error_code is not None:
            await anyio.to_thread.run_sync(ctx.refuse_granted, grant.session_id, answer.error_code)
            raise _spec_error(answer.error_code, answer.detail or None)
        log.info("call placed", extra={"session_id": grant.session_id, "fields": {"call_id": answer.call_id}})
        return Response(
            answer.answer,
            status_code=201,
            media_type="application/sdp",
            headers={"Location": f"{CALLS_PATH}/{answer.call_id}"},
        )

    @app.post(CALLS_PATH + "/{call_id}/hangup")
    async def hang_up(call_id: str, request: Request):
        call = await anyio.to_thread.run_sync(_tenants_call, request, call_id)
        if call is None:
            raise _spec_error("call_not_found")
        answer = await ctx.ask_supervisor(HangUp(call_id), HANGUP_ANSWER_S)
        if not isinstance(answer, HungUp) or answer.status == 0:
            raise _spec_error("upstream_unavailable", "The call could not be hung up; try again.")
        return {}


def _tenants_call(request: Request, call_id: str):
    """The caller's running call `call_id` (its rsk_ key's account's), or None."""
    key = tenant_key(request)
    with request.app.state.ctx.engine.connect() as connection:
        return ops.live_call(connection, key.account_id, call_id)


class CallsCors:
    """CORS for the calls endpoints only: a browser page posts its offer cross-origin with an
    ephemeral key in `Authorization` (no cookies, so any origin) and reads `Location`. The rest
    of the API is for servers and sends no CORS headers."""

    def __init__(self, app):
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=["*"],
            allow_methods=["POST"],
            # any header: OpenAI's Agents SDK sends `X-OpenAI-Agents-SDK` with the offer, and
            # other clients their own; with no cookies involved a header grants nothing
            allow_headers=["*"],
            expose_headers=["Location", "x-request-id"],
            max_age=600,
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(CALLS_PATH):
            return await self.cors(scope, receive, send)
        await self.app(scope, receive, send)
