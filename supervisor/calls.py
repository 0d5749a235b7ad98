"""WebRTC calls upstream: placing a call and hanging it up, with the operator's key.

Both are plain HTTPS requests to the Realtime API (`POST /v1/realtime/calls`, multipart `sdp`
and `session`, OpenAI's "unified interface"; `POST /v1/realtime/calls/{id}/hangup`), made by the
supervisor because it holds the operator's key and outlives every worker: a call is hung up
whatever ended its worker. The URLs come from `MESHRT_UPSTREAM_URL`
(`wss://host/v1/realtime` → `https://host/v1/realtime/calls`).
"""

from __future__ import annotations

import json
import logging
import ssl
from dataclasses import dataclass
from urllib.parse import quote
from urllib.parse import urlsplit
from urllib.parse import urlunsplit

import httpx
from tenacity import AsyncRetrying
from tenacity import retry_if_exception_type
from tenacity import stop_after_attempt
from tenacity import wait_exponential

from meshrt.shared.errors import GatewayError
from meshrt.shared.logs import one_line

log = logging.getLogger("meshrt.supervisor")
logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request; the supervisor logs its own

MAX_ANSWER_BYTES = 256 * 1024
HANGUP_ATTEMPTS = 5


def calls_url(upstream_url: str) -> str:
    """`wss://host/v1/realtime?x` → `https://host/v1/realtime/calls`."""
    parts = urlsplit(upstream_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/calls", "", ""))


@dataclass(frozen=True)
class PlacedCall:
    call_id: str
    answer: str


class Upstream:
    """One HTTP client for the node's calls (a connection pool, TLS set up once)."""

    def __init__(self, upstream_url: str, api_key: str, timeout_s: float, attempts: int):
        self.base = calls_url(upstream_url)
        self.timeout_s, self.attempts = timeout_s, attempts
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # ssl's default context reads SSL_CERT_FILE / SSL_CERT_DIR, as the workers' does
        self.client = httpx.AsyncClient(
            headers=headers, timeout=timeout_s, verify=ssl.create_default_context(), trust_env=False
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def place(self, offer: str, session: dict) -> PlacedCall:
        """Post the offer; raises GatewayError (`upstream_unavailable` when upstream could not be
        reached or answered 5xx/429, `upstream_error` when it refused the call). Retried only
        when no request reached upstream: a call placed twice would run twice."""
        files = {
            "sdp": (None, offer, "application/sdp"),
            "session": (None, json.dumps(session, separators=(",", ":")), "application/json"),
        }
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential(multiplier=0.1, max=1.0),
            retry=retry_if_exception_type(httpx.ConnectError),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    response = await self.client.post(self.base, files=files)
        except httpx.HTTPError as exc:
            raise GatewayError("upstream_unavailable", "The call could not be placed upstream.") from exc
        if response.status_code == 429 or response.status_code >= 500:
            raise GatewayError("upstream_unavailable", f"Upstream answered HTTP {response.status_code}.")
        if response.status_code not in (200, 201):
            raise GatewayError("upstream_error", _upstream_message(response))
        call_id = response.headers.get("location", "").rstrip("/").rpartition("/")[2]
        if not call_id or len(response.content) > MAX_ANSWER_BYTES:
            raise GatewayError("upstream_error", "Upstream's answer had no call id.")
        return PlacedCall(call_id, response.text)

    async def hang_up(self, call_id: str) -> int:
        """Hang the call up; returns upstream's status (404: it had ended already), 0 when
        upstream could not be reached after every attempt."""
        url = f"{self.base}/{quote(call_id, safe='')}/hangup"
        retrying = AsyncRetrying(
            stop=stop_after_attempt(HANGUP_ATTEMPTS),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            retry=retry_if_exception_type((httpx.HTTPError, _Retry)),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    response = await self.client.post(url)
                    if response.status_code == 429 or response.status_code >= 500:
                        raise _Retry(response.status_code)
                    return response.status_code
        except (httpx.HTTPError, _Retry) as exc:
            log.error(
                "call not hung up: upstream unreachable", extra={"fields": {"call_id": call_id, "error": one_line(exc)}}
            )
        return 0


class _Retry(Exception):
    pass


def _upstream_message(response: httpx.Response) -> str:
    """Upstream's refusal, as it put it (OpenAI's error JSON), bounded."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = ""
    return f"Upstream refused the call (HTTP {response.status_code}){': ' + str(message)[:300] if message else '.'}"
