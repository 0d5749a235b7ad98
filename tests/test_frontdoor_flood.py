"""Many bounded clients cannot exhaust the front door (#12): a request that needs a token or key
it lacks is answered as soon as its head is in, and its connection closed, without waiting for
its body. Real sockets against a real gateway."""

from __future__ import annotations

import json
import socket
import time

import pytest

BODY_DEADLINE_S = 10.0  # MESHRT_HEADER_TIMEOUT_S: a refusal must come well before it
ADMIN = "admin-" + "f" * 24


@pytest.fixture(scope="module")
def flood_gateway(tmp_path_factory, database_url, sim):
    from conftest import _stop
    from conftest import start_gateway

    gw = start_gateway(
        tmp_path_factory.mktemp("gw"),
        database_url,
        sim.url,
        MESHRT_HEADER_TIMEOUT_S=BODY_DEADLINE_S,
        MESHRT_ADMIN_TOKEN=ADMIN,
    )
    yield gw
    _stop(gw.proc)


def connect(gw, source: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=timeout, source_address=(source, 0))


def read_to_close(sock: socket.socket) -> bytes:
    """Everything until the server closes (a timeout here means it did not close)."""
    reply = b""
    try:
        while chunk := sock.recv(65536):
            reply += chunk
    except ConnectionResetError:
        pass  # closed while the client still sent: what it got before is in `reply`
    return reply


def read_response(sock: socket.socket) -> bytes:
    """One response on a connection kept open: its head, then Content-Length bytes of body."""
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(65536) or b"<closed>"
        assert not reply.endswith(b"<closed>"), reply
    head, _, body = reply.partition(b"\r\n\r\n")
    lengths = [line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    length = int(lengths[0])
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def error_of(reply: bytes) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one HTTP response."""
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, json.loads(body)


def slow_post(path: str, authorization: bytes | None = None) -> bytes:
    """A head announcing a body of almost 1 MiB (under the 413 limit), and the body's first byte."""
    auth = b"Authorization: " + authorization + b"\r\n" if authorization else b""
    head = b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth
    return head + b"Content-Length: 1000000\r\n\r\n{"


# --- answered before the body ---------------------------------------------------------------


def test_unauthenticated_admin_posts_are_refused_before_their_body(flood_gateway):
    """The issue's reproduction: slow-body POSTs without the admin token held their connections
    until the body's deadline. Each now gets its 401 and its connection closed at once."""
    variants = [
        ("/admin/v1/accounts", None),
        ("/admin/v1/accounts", b"Bearer wrong-token"),
        ("/admin/v1/accounts/acct_x/topups", b"Basic " + ADMIN.encode()),
        ("/%61dmin/v1/accounts", None),  # the router decodes the path: so does the check
    ]
    began = time.monotonic()
    socks = []
    for i in range(20):
        path, authorization = variants[i % len(variants)]
        sock = connect(flood_gateway)
        sock.sendall(slow_post(path, authorization))  # and never the rest of the body
        socks.append(sock)
    replies = []
    for sock in socks:
        with sock:
            replies.append(read_to_close(sock))
    took = time.monotonic() - began
    for reply in replies:
        status, headers, body = error_of(reply)
        assert status == 401 and body["error"]["code"] == "invalid_admin_token", reply[:200]
        assert body["request_id"] == headers["x-request-id"] and headers["connection"] == "close"
    assert took < BODY_DEADLINE_S / 2, took


def test_a_tenant_route_with_a_bad_key_does_not_wait_for_the_body(flood_gateway):
    with connect(flood_gateway) as sock:
        sock.sendall(
            b"GET /v1/account HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer rsk_nope\r\nContent-Length: 1000000\r\n\r\n{"
        )
        began = time.monotonic()
        status, _, body = error_of(read_to_close(sock))
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert time.monotonic() - began < BODY_DEADLINE_S / 2


def test_an_authenticated_admin_post_still_reads_its_body_and_keeps_its_connection(flood_gateway):
    body = json.dumps({"name": "early-auth"}).encode()
    head = (
        b"POST /admin/v1/accounts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + ADMIN.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    with connect(flood_gateway) as sock:
        sock.sendall(head + body[:5])
        time.sleep(0.3)  # the body in two parts: the route waits for the rest
        sock.sendall(body[5:])
        created = read_response(sock)
        assert created.startswith(b"HTTP/1.1 201 "), created[:200]
        assert b'"name":"early-auth"' in created
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection is kept alive
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
