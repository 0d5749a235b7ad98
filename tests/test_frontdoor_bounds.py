"""A client cannot hold or grow the front door: a request head or body that trickles in is cut
at the deadline (408); a head over 32 KiB or 100 header lines is refused (431); a body over
1 MiB is refused from its Content-Length before a byte of it is read, or as its chunks arrive
(413). Real sockets against a real gateway; the front door serves the next client at once."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from meshrt.frontdoor.server import MAX_BODY_BYTES
from meshrt.frontdoor.server import MAX_HEAD_BYTES

HEADER_TIMEOUT_S = 1.0
ADMIN = "admin-" + "t" * 24
# the body tests authenticate: a request without the token is refused before its body is read
# (tests/test_frontdoor_flood.py), and these are about what happens while it is read
AUTHORIZED = b"Authorization: Bearer " + ADMIN.encode() + b"\r\n"


@pytest.fixture(scope="module")
def bounded_gateway(tmp_path_factory, database_url, sim):
    from conftest import _stop
    from conftest import start_gateway

    gw = start_gateway(
        tmp_path_factory.mktemp("gw"),
        database_url,
        sim.url,
        MESHRT_HEADER_TIMEOUT_S=HEADER_TIMEOUT_S,
        MESHRT_ADMIN_TOKEN=ADMIN,
    )
    yield gw
    _stop(gw.proc)


def answer(port: int, *parts: bytes, pause_s: float = 0.0, timeout_s: float = 10.0) -> tuple[bytes, float]:
    """Send the parts (pausing between them), then read until the server closes: (reply, seconds)."""
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        try:
            for part in parts:
                sock.sendall(part)
                time.sleep(pause_s)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-send: the reply is already there
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    return reply, time.monotonic() - began


def still_serves(gw) -> bool:
    return httpx.get(f"{gw.http_url}/healthz", timeout=5).status_code == 200


def test_a_giant_head_is_refused_with_431(bounded_gateway):
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 1024) + b"\r\n\r\n"
    reply, took = answer(bounded_gateway.port, head)
    assert reply.startswith(b"HTTP/1.1 431 ") and took < HEADER_TIMEOUT_S, (reply[:80], took)
    assert still_serves(bounded_gateway)


def test_too_many_header_lines_are_refused_with_431(bounded_gateway):
    lines = b"".join(b"X-%d: 1\r\n" % i for i in range(150))
    reply, _ = answer(bounded_gateway.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:80]


def test_a_trickling_body_is_cut_at_the_deadline(bounded_gateway):
    head = (
        b"POST /admin/v1/accounts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + AUTHORIZED
        + b"Content-Length: 1000\r\n\r\n"
    )
    reply, took = answer(bounded_gateway.port, head, *[b"{"] + [b" "] * 40, pause_s=0.1)
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:80]
    assert HEADER_TIMEOUT_S * 0.9 < took < HEADER_TIMEOUT_S + 3, took
    assert still_serves(bounded_gateway)


def test_a_body_too_large_is_refused_before_it_is_read(bounded_gateway):
    head = (
        b"POST /admin/v1/accounts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1)
    )
    reply, took = answer(bounded_gateway.port, head)
    assert reply.startswith(b"HTTP/1.1 413 ") and took < HEADER_TIMEOUT_S, (reply[:80], took)


def test_a_chunked_body_too_large_is_refused_as_it_arrives(bounded_gateway):
    head = (
        b"POST /admin/v1/accounts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + AUTHORIZED
        + b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (256 * 1024, b" " * 256 * 1024)
    reply, _ = answer(bounded_gateway.port, head, *[chunk] * 6)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:80]
    assert still_serves(bounded_gateway)


def test_ordinary_requests_still_pass(bounded_gateway):
    created = httpx.post(
        f"{bounded_gateway.http_url}/admin/v1/accounts",
        json={"name": "bounded"},
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=10,
    )
    assert created.status_code in (200, 201), created.text


def test_a_header_that_never_ends_cannot_grow_the_front_door(bounded_gateway):
    """The attack that grew the front door from 71 to 300 MiB: connections streaming one header
    without end. Each is cut after its first 32 KiB-plus read; the front door stays flat."""
    import psutil

    frontdoor = psutil.Process(bounded_gateway.frontdoor_pid())
    before = frontdoor.memory_info().rss
    cut = []
    for _ in range(4):
        with socket.create_connection(("127.0.0.1", bounded_gateway.port), timeout=5) as sock:
            total = 0
            try:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
                while total < 64 * 1024 * 1024:  # bounded: 64 MiB a connection at most
                    sock.sendall(b"a" * 65536)
                    total += 65536
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                cut.append(total)
    grown = frontdoor.memory_info().rss - before
    # Every connection is cut. How many bytes the client got off before it saw the reset depends
    # on the kernel's socket buffers (up to tens of MiB with autotuning), so the bound that matters
    # is the front door's memory, not the count sent.
    assert len(cut) == 4, cut
    assert grown < 8 * 1024 * 1024, grown
    assert still_serves(bounded_gateway)
