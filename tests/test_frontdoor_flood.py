"""Many bounded clients cannot exhaust the front door (#12): a request that needs a token or key
it lacks is answered as soon as its head is in, and its connection closed, without waiting for
its body; one peer address holds at most MESHRT_MAX_CONNECTIONS_PER_PEER connections (429
beyond), while other clients' sessions go on. Real sockets against a real gateway. The flooding
peer is 127.0.0.2 (all of 127/8 is loopback on Linux): 127.0.0.1 is the trusted proxy address
by default, and proxies are not counted."""

from __future__ import annotations

import asyncio
import json
import selectors
import socket
import time

import pytest
from conftest import wait_for
from realtime_client import connect_ws
from realtime_client import recv_json
from realtime_client import recv_until
from realtime_client import run

from meshrt.shared.settings import SettingsError
from meshrt.shared.settings import load_settings

CAP = 8
BODY_DEADLINE_S = 30.0  # MESHRT_HEADER_TIMEOUT_S: a refusal must come well before it
ADMIN = "admin-" + "f" * 24
FLOODER = "127.0.0.2"


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
        MESHRT_MAX_CONNECTIONS_PER_PEER=CAP,
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


def sort_out(socks: list[socket.socket], refusals: int) -> tuple[list[bytes], list[socket.socket]]:
    """(the answers of the connections the server closed, the connections it keeps): waits for
    `refusals` closes (or 20 s), then half a second more in case there are more."""
    selector = selectors.DefaultSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
    answers = []
    deadline = time.monotonic() + 20
    grace = None
    while grace is None or time.monotonic() < grace:
        for key, _ in selector.select(0.1):
            selector.unregister(key.fileobj)
            answers.append(read_to_close(key.fileobj))
        if grace is None and (len(answers) >= refusals or time.monotonic() > deadline):
            grace = time.monotonic() + 0.5
    kept = [key.fileobj for key in selector.get_map().values()]
    selector.close()
    return answers, kept


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


# --- connections per peer -------------------------------------------------------------------


def test_the_per_peer_cap_is_a_setting_with_a_clear_error():
    assert load_settings({}).max_connections_per_peer == 64
    assert load_settings({"MESHRT_MAX_CONNECTIONS_PER_PEER": "0"}).max_connections_per_peer == 0
    with pytest.raises(SettingsError, match=r"^MESHRT_MAX_CONNECTIONS_PER_PEER: expected a whole number, got 'lots'$"):
        load_settings({"MESHRT_MAX_CONNECTIONS_PER_PEER": "lots"})


def test_a_flood_from_one_peer_is_refused_while_other_sessions_go_on(flood_gateway, make_tenant):
    import psutil

    gw = flood_gateway
    frontdoor = psutil.Process(gw.frontdoor_pid())
    before = frontdoor.memory_info().rss
    alice, bob = make_tenant(), make_tenant()

    async def scenario():
        async with connect_ws(gw.ws_url, key=alice.key) as live:  # a session open before the flood
            assert (await recv_json(live))["type"] == "session.created"
            flood = [connect(gw, FLOODER) for _ in range(200)]
            try:
                refused, held = await asyncio.to_thread(sort_out, flood, 200 - CAP)
                assert len(held) == CAP and len(refused) == 200 - CAP, (len(held), len(refused))
                status, headers, body = error_of(refused[-1])
                assert status == 429 and body["error"]["code"] == "too_many_connections"
                assert headers["retry-after"] == "1" and body["request_id"] == headers["x-request-id"]
                # the live session still relays, and another tenant still gets a session
                await live.send(json.dumps({"type": "response.create"}))
                assert (await recv_until(live, "response.done"))[-1]["type"] == "response.done"
                async with connect_ws(gw.ws_url, key=bob.key) as other:
                    assert (await recv_json(other))["type"] == "session.created"
                # the flooder's connections inside the cap are served as ever
                for sock in held:
                    sock.settimeout(10)
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert (await asyncio.to_thread(read_response, sock)).startswith(b"HTTP/1.1 200 ")
            finally:
                for sock in flood:
                    sock.close()

    run(scenario(), timeout=60)

    # every place was given back: the peer may hold CAP connections again, and not one more
    def full_cap_accepted():
        socks = [connect(gw, FLOODER) for _ in range(CAP + 1)]
        try:
            socks[-1].settimeout(5)
            last = read_to_close(socks[-1])
            if not last.startswith(b"HTTP/1.1 429 "):
                return False
            for sock in socks[:-1]:
                sock.settimeout(10)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if not read_to_close(sock).startswith(b"HTTP/1.1 200 "):
                    return False
            return True
        finally:
            for sock in socks:
                sock.close()

    wait_for(full_cap_accepted, 10, 0.2, "the flooding peer's count to go back to zero")
    grown = frontdoor.memory_info().rss - before
    assert grown < 8 * 1024 * 1024, grown
    assert "Traceback" not in gw.log_text()


def test_upgrades_leave_the_count_once_handed_off_or_refused(flood_gateway, make_tenant):
    """A session's socket is the worker's once handed off: CAP + 2 live sessions from one peer
    all open. A refused upgrade gives its place back when it closes."""
    gw = flood_gateway
    tenant = make_tenant(max_concurrent_sessions=CAP + 4)

    async def sessions():
        opened = []
        try:
            for _ in range(CAP + 2):
                ws = await connect_ws(gw.ws_url, key=tenant.key, local_addr=(FLOODER, 0))
                opened.append(ws)
                assert (await recv_json(ws))["type"] == "session.created"
            for _ in range(CAP + 2):
                async with connect_ws(gw.ws_url, key="rsk_" + "0" * 40, local_addr=(FLOODER, 0)) as ws:
                    assert (await recv_json(ws))["error"]["code"] == "invalid_api_key"
            return len(opened)
        finally:
            for ws in opened:
                await ws.close()

    assert run(sessions(), timeout=60) == CAP + 2
    assert "Traceback" not in gw.log_text()
