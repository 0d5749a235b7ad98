"""The account dashboard (docs/protocol.md, Dashboard): `GET /dashboard`, one static page plus
its script and style.

The page is plain HTML + CSS + vanilla JS from `static/` (no CDN, no build step). The tenant
types their `rsk_` key into the page; it lives in the tab's sessionStorage only and is sent only
as `Authorization: Bearer` on same-origin fetches of the tenant API (`/v1/account`, `/v1/usage`).
The server side is therefore just files with strict headers: the script and style are separate
files so the Content-Security-Policy needs no 'unsafe-inline', nonce or hash.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Only our own files, only same-origin API calls; no frames, no plugins, no form posts (the key
# form is handled by the script and can never be submitted into a URL).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
}

# URL path → (file in static/, media type)
ASSETS = {
    "/dashboard": ("dashboard.html", "text/html; charset=utf-8"),
    "/dashboard/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}


def _load(name: str) -> bytes:
    path = STATIC_DIR / name
    try:
        return path.read_bytes()
    except OSError as exc:  # a broken install: say which file, at start-up, not per request
        raise RuntimeError(f"dashboard asset missing: {path} ({exc.strerror})") from None


def dashboard_routes(app: FastAPI, ctx) -> None:
    """Register `GET /dashboard` and its two assets. Files are read once, at registration."""
    for url_path, (name, media_type) in ASSETS.items():
        app.add_api_route(
            url_path,
            _endpoint(_load(name), media_type),
            methods=["GET"],
            include_in_schema=False,
            name=f"dashboard:{name}",
        )


def _endpoint(body: bytes, media_type: str):
    # A closure, not default arguments: FastAPI would turn those into query parameters.
    async def serve() -> Response:
        return Response(body, media_type=media_type, headers=SECURITY_HEADERS)

    return serve
