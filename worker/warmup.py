"""Zygote warm-up: run every code path a session uses once, before any fork.

Python and its libraries import and initialise lazily (websockets' handshake helpers, email
date formatting, anyio's backends, tenacity, the meter's parsers). Done in the zygote, that work
is inherited by every worker instead of being paid again, milliseconds at a time, on each
session's set-up path. Nothing here touches a network or a secret.
"""

from __future__ import annotations

import json

import anyio

REQUEST = (
    b"GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: warmup\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: realtime\r\n\r\n"
)


def _handshakes() -> None:
    from websockets.client import ClientProtocol
    from websockets.uri import parse_uri

    from meshrt.shared.handshake import accept_bytes
    from meshrt.shared.handshake import error_frames
    from meshrt.shared.handshake import parse_request_bytes
    from meshrt.shared.handshake import parse_upgrade
    from meshrt.shared.handshake import strip_credentials
    from meshrt.shared.handshake import upstream_headers
    from meshrt.shared.handshake import upstream_query

    protocol, request = parse_request_bytes(REQUEST)
    upgrade = parse_upgrade(request)
    upstream_headers(upgrade), upstream_query(upgrade), strip_credentials(request)
    response, _ = accept_bytes(protocol, request, "req_warmup")
    error_frames(protocol, "internal_error", "req_warmup")
    client = ClientProtocol(parse_uri("ws://127.0.0.1:1/v1/realtime?model=x"), extensions=None)
    outgoing = client.connect()
    outgoing.headers["Authorization"] = "Bearer warmup"
    client.send_request(outgoing)
    client.data_to_send()
    server, server_request = parse_request_bytes(outgoing.serialize())
    head, _ = accept_bytes(server, server_request, "req_warmup")
    client.receive_data(head)
    client.events_received()


_sample_rates: dict | None = None  # a grant's rate snapshot, for the pool workers' rehearsal


def _relay_and_meter() -> None:
    from meshrt.shared.pricing import load_price_table
    from meshrt.worker import frames
    from meshrt.worker.meter import Meter
    from meshrt.worker.meter import may_carry_usage
    from meshrt.worker.preauth import Purse
    from meshrt.worker.relay import Relay
    from meshrt.worker.session_meter import GrantPriceTable
    from meshrt.worker.session_meter import SessionMeter

    global _sample_rates
    if _sample_rates is None:  # built once, in the zygote: a pool worker reads no file
        table = load_price_table()
        model = table.realtime("gpt-realtime")
        _sample_rates = table.grant_rates(model)
    grant_table = GrantPriceTable(_sample_rates)  # what build_meter builds for a session
    grant_table.transcription("gpt-4o-transcribe")
    meter = SessionMeter(Meter(grant_table.model, grant_table))
    purse = Purse.for_rates(meter.meter.rates, 4096)  # as worker.session.run builds a session's
    relay = Relay("req_warmup", 1_000_000, 1 << 20, meter=meter, may_carry_usage=may_carry_usage, purse=purse)
    usage = {
        "total_tokens": 2,
        "input_tokens": 1,
        "output_tokens": 1,
        "input_token_details": {
            "text_tokens": 1,
            "audio_tokens": 0,
            "image_tokens": 0,
            "cached_tokens": 0,
            "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0, "image_tokens": 0},
        },
        "output_token_details": {"text_tokens": 1, "audio_tokens": 0},
    }
    done = json.dumps({"type": "response.done", "response": {"id": "resp_w", "status": "completed", "usage": usage}})
    relay.from_upstream(frames.server_text_frame(json.dumps({"type": "response.created"}).encode()))
    for _, payload in relay.from_upstream(frames.server_text_frame(done.encode())):
        if not isinstance(payload, bytes):
            json.dumps(payload.to_json())
    relay.from_client(frames.client_text_frame(b'{"type":"session.update"}'))
    relay.end("session_idle_timeout")


async def _loop_smoke() -> None:
    from tenacity import AsyncRetrying
    from tenacity import stop_after_attempt

    async for attempt in AsyncRetrying(stop=stop_after_attempt(1), sleep=anyio.sleep):
        with attempt:
            await anyio.sleep(0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.sleep, 0)
    with anyio.move_on_after(0):
        await anyio.sleep(1)


def _run_loop(backend: str) -> None:
    """anyio.run as worker.session.run starts a session's event loop."""
    if backend == "uvloop":
        anyio.run(_loop_smoke, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        anyio.run(_loop_smoke, backend=backend)


def warm_up() -> None:
    _handshakes()
    _relay_and_meter()
    for backend in ("asyncio", "uvloop", "trio"):
        _run_loop(backend)


def rehearse(backend: str) -> None:
    """In an idle pool worker, before its session arrives: run the set-up path once more. The
    pages that code writes (reference counts, allocator arenas) are then copied from the zygote
    now rather than fault by fault on the session's set-up: ~2.5 ms of it on the bench box.
    Costs each idle worker ~4 MiB; a session's worker ends ~0.4 MiB larger (pages only the
    rehearsal wrote)."""
    _handshakes()
    _relay_and_meter()
    _run_loop(backend)
