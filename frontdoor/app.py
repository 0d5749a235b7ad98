"""The front door's HTTP API (FastAPI): health, the 426 for plain GETs of /v1/realtime, models,
usage, account, admin. Every response carries `x-request-id`; every error is the JSON of
docs/protocol.md, HTTP errors.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from meshrt.shared.errors import ERRORS
from meshrt.shared.errors import http_error_body
from meshrt.shared.ids import new_id


def new_request_id() -> str:
    return new_id("req")


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, type_: str = "invalid_request_error", headers: dict | None = None
    ):
        self.status, self.code, self.message, self.type = status, code, message, type_
        self.headers = headers or {}


def _error(request: Request, status: int, code: str, message: str, type_: str, headers=None) -> JSONResponse:
    rid = request.state.request_id
    return JSONResponse(
        http_error_body(code, message, type_, rid), status_code=status, headers={"x-request-id": rid, **(headers or {})}
    )


def _under_v1(app: FastAPI, path: str) -> bool:
    """`/v1` + `path` is one of the app's routes (`/models` → `/v1/models`)."""
    candidate = "/v1" + path
    for route in app.routes:
        pattern = getattr(route, "path_regex", None)
        if pattern is not None and not path.startswith("/v1/") and pattern.match(candidate):
            return True
    return False


def create_app(ctx) -> FastAPI:
    """`ctx` is the front door's context: settings, engine, prices, state checks."""
    app = FastAPI(title="meshrt", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.ctx = ctx

    @app.middleware("http")
    async def request_ids(request: Request, call_next):
        request.state.request_id = new_request_id()
        response = await call_next(request)
        response.headers["x-request-id"] = request.state.request_id
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(request, exc.status, exc.code, exc.message, exc.type, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404 and _under_v1(app, request.url.path):
            # an SDK whose base URL lacks /v1 asks for /models: say where the API is
            message = f"Not Found: {request.url.path[:100]}. Did you mean /v1{request.url.path[:100]}? "
            message += "An SDK's base URL ends in /v1."
        return _error(request, exc.status_code, code, message, "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(
            request, 400, "invalid_parameter", f"{where}: {first.get('msg', 'invalid')}", "invalid_request_error"
        )

    @app.exception_handler(SQLAlchemyError)
    async def database_error(request: Request, exc: SQLAlchemyError):
        return _error(
            request,
            503,
            "service_unavailable",
            ERRORS["service_unavailable"].message,
            "server_error",
            headers={"Retry-After": "1"},
        )

    @app.get("/healthz")
    async def healthz(request: Request):
        """This process is up and its supervisor answers (a front door whose supervisor is gone
        or wedged cannot hand a socket to anyone)."""
        problems = await ctx.supervisor_problems()
        if "supervisor not answering" in problems:
            return _error(request, 503, "unhealthy", "supervisor not answering", "server_error")
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request):
        problems = await ctx.readiness_problems()
        if problems:
            return _error(request, 503, "not_ready", "; ".join(problems), "server_error")
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics():
        from fastapi.responses import PlainTextResponse

        from meshrt.shared.metrics import render

        snapshot = await ctx.metrics_snapshot()
        return PlainTextResponse(render(snapshot), media_type="text/plain; version=0.0.4")

    @app.get("/v1/realtime")
    async def realtime_without_upgrade(request: Request):
        return _error(
            request,
            426,
            "upgrade_required",
            "This endpoint speaks WebSocket: connect with wss:// and an Upgrade: websocket request.",
            "invalid_request_error",
            headers={"Upgrade": "websocket", "Connection": "Upgrade"},
        )

    for register in ctx.routers:
        register(app, ctx)
    return app
