"""A raw WebSocket client for tests: exact frames, handshake headers and close codes."""

from __future__ import annotations

import asyncio
import base64
import json

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

AUDIO_100MS = base64.b64encode(b"\x01\x00" * 2400).decode()


def run(coro, timeout: float = 30):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def connect_ws(
    url: str,
    *,
    key: str | None = None,
    how: str = "authorization",
    model: str | None = "gpt-realtime",
    query: str = "",
    subprotocols: list[str] | None = None,
    headers: dict | None = None,
    **kw,
):
    params = []
    if model is not None:
        params.append(f"model={model}")
    if how == "query" and key is not None:
        params.append(f"api_key={key}")
    if query:
        params.append(query)
    full = url + ("?" + "&".join(params) if params else "")
    extra = dict(headers or {})
    protocols = list(subprotocols or [])
    if key is not None and how == "authorization":
        extra["Authorization"] = f"Bearer {key}"
    elif key is not None and how == "insecure":
        protocols = ["realtime", f"openai-insecure-api-key.{key}", *protocols]
    elif key is not None and how == "bearer-dot":
        protocols = ["realtime", f"Bearer.{key}", *protocols]
    return connect(
        full,
        additional_headers=extra,
        subprotocols=protocols or None,
        compression=None,
        max_size=None,
        open_timeout=15,
        close_timeout=5,
        **kw,
    )


async def recv_json(ws, timeout: float = 10) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def recv_until(ws, event_type: str, timeout: float = 15) -> list[dict]:
    events = []
    async with asyncio.timeout(timeout):
        while True:
            event = json.loads(await ws.recv())
            events.append(event)
            if event["type"] == event_type:
                return events


async def expect_refusal(url: str, **kw) -> tuple[dict, int, str]:
    """Connect, read the terminating error frame and the close: (error event, code, reason)."""
    async with connect_ws(url, **kw) as ws:
        event = await recv_json(ws)
        try:
            extra = await asyncio.wait_for(ws.recv(), 10)
            raise AssertionError(f"expected a close after the error frame, got {extra!r}")
        except ConnectionClosed:
            pass
        return event, ws.close_code, ws.close_reason


async def expect_closed(ws, timeout: float = 15) -> list[dict]:
    """Read until the connection closes; returns the events read."""
    events = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                events.append(json.loads(await ws.recv()))
    except ConnectionClosed:
        return events
