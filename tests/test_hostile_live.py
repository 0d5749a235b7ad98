"""Hostile clients against a real gateway, over raw TCP: broken HTTP, smuggling shapes, spoofed
proxies, slow senders, and malformed WebSocket frames after the handshake.

Every attempt must end in a clean HTTP error or the error frame + close of docs/errors.md (or
the RFC 6455 close for bad framing) within a deadline; never a 5xx, never silence. Afterwards the
gateway still serves, has leaked no worker, wrote no key anywhere, and nothing of it crashed.
Random inputs are seeded (`random.Random(seed)`) and bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import socket
import struct
import time
from dataclasses import dataclass

import psutil
import pytest
from conftest import Tenant
from conftest import _stop
from conftest import ended_record
from conftest import start_gateway
from conftest import wait_for
from sqlmodel import Session
from sqlmodel import select

from meshrt.shared.money import Money
from meshrt.storage import accounts
from meshrt.storage.db import SessionRecord
from meshrt.worker.frames import FrameScanner
from meshrt.worker.frames import payload

MAX_MESSAGE = 65536
DEADLINE_S = 10.0  # generous: the answers come in milliseconds, but CI machines get loaded
WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


# --- fixtures -----------------------------------------------------------------------------


WARM_WORKERS = 2


def start_hostile_gateway(tmp_path_factory, database_url, sim, backend: str | None):
    env = {"MESHRT_MAX_MESSAGE_BYTES": str(MAX_MESSAGE), "MESHRT_WARM_WORKERS": str(WARM_WORKERS)}
    if backend is not None:
        env["MESHRT_WORKER_BACKEND"] = backend
    gw = start_gateway(tmp_path_factory.mktemp(f"hostile-{backend or 'default'}"), database_url, sim.url, **env)
    gw.started_pids = (gw.proc.pid, gw.frontdoor_pid())
    return gw


@pytest.fixture(scope="module")
def hostile_gateway(tmp_path_factory, database_url, sim):
    """The gateway every HTTP-level attack goes to (the default worker backend)."""
    gw = start_hostile_gateway(tmp_path_factory, database_url, sim, None)
    yield gw
    _stop(gw.proc)


@pytest.fixture(scope="module")
def trio_gateway(tmp_path_factory, database_url, sim):
    gw = start_hostile_gateway(tmp_path_factory, database_url, sim, "trio")
    yield gw
    _stop(gw.proc)


@pytest.fixture(params=["default", "trio"])
def fuzzed_gateway(request):
    """Frame-level attacks hit workers, so they run on the default worker backend and on trio."""
    return request.getfixturevalue("hostile_gateway" if request.param == "default" else "trio_gateway")


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory, database_url, sim):
    """Plain ws refused, and 127.0.0.1 is not a trusted proxy: its X-Forwarded-Proto is a lie."""
    gw = start_gateway(
        tmp_path_factory.mktemp("hostile-tls"),
        database_url,
        sim.url,
        MESHRT_ALLOW_PLAIN_WS="0",
        MESHRT_FORWARDED_ALLOW_IPS="10.9.9.9",
    )
    yield gw
    _stop(gw.proc)


@pytest.fixture(scope="module")
def hostile_tenant(engine) -> Tenant:
    account = accounts.create_account(engine, f"hostile-{secrets.token_hex(3)}", Money.from_usd("100"), 1000, None)
    created = accounts.create_key(engine, account.id, "hostile", None)
    return Tenant(account.id, created.plaintext, created.key.id)


# --- a raw client -------------------------------------------------------------------------


def upgrade_request(
    key: str | None = None,
    target: bytes = b"/v1/realtime?model=gpt-realtime",
    extra: list[bytes] | tuple = (),
    version: bytes = b"13",
) -> bytes:
    lines = [
        b"GET " + target + b" HTTP/1.1",
        b"Host: 127.0.0.1",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + WS_KEY,
        b"Sec-WebSocket-Version: " + version,
    ]
    if key is not None:
        lines.append(b"Authorization: Bearer " + key.encode())
    lines += list(extra)
    return b"\r\n".join(lines) + b"\r\n\r\n"


@dataclass
class Answer:
    """What the gateway said: the HTTP status (None: nothing), its head, and for a 101 the frames
    that followed up to the close, as (opcode, payload)."""

    status: int | None
    head: bytes
    body: bytes
    frames: list[tuple[int, bytes]]
    ended: str  # "closed" | "close-frame" | "complete" | "deadline"

    @property
    def close_code(self) -> int | None:
        if self.frames and self.frames[-1][0] == 0x8:
            data = self.frames[-1][1]
            return int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
        return None

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower().encode():
                return value.strip().decode("latin-1")
        return None

    def error_event(self) -> dict | None:
        texts = [json.loads(data) for opcode, data in self.frames if opcode == 0x1]
        errors = [event for event in texts if event.get("type") == "error"]
        return errors[-1] if errors else None


class RawClient:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
        self.buffer = b""
        self.scanner = FrameScanner(expect_masked=False)
        self.parsed: list[tuple[int, bytes]] = []  # frames scanned but not read yet

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self, deadline: float) -> bytes | None:
        """Bytes, b"" on EOF/reset, None when the deadline passed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        self.sock.settimeout(remaining)
        try:
            return self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return b""
        except socket.timeout:
            return None

    def read_answer(self, until_close: bool = True, deadline_s: float = DEADLINE_S) -> Answer:
        """Read the HTTP response; after a 101, read frames until the close frame (or only the
        first frame when `until_close` is False)."""
        deadline = time.monotonic() + deadline_s
        while b"\r\n\r\n" not in self.buffer:
            data = self._recv(deadline)
            if not data:
                return Answer(None, self.buffer, b"", [], "closed" if data == b"" else "deadline")
            self.buffer += data
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ", 2)[1])
        answer = Answer(status, head, b"", [], "complete")
        if status != 101:
            length = int(answer.header("content-length") or 0)
            while len(self.buffer) < length:
                data = self._recv(deadline)
                if not data:
                    answer.ended = "closed" if data == b"" else "deadline"
                    break
                self.buffer += data
            answer.body = self.buffer[:length]
            return answer
        return self.read_frames(answer, until_close, deadline)

    def next_frame(self, deadline: float) -> tuple[int, bytes] | str:
        """The next frame as (opcode, payload), or "closed" / "deadline"."""
        while not self.parsed:
            data, self.buffer = self.buffer or self._recv(deadline), b""
            if not data:
                return "closed" if data == b"" else "deadline"
            chunk, frames = self.scanner.feed(data)
            self.parsed += [(frame.opcode, payload(chunk, frame)) for frame in frames]
        return self.parsed.pop(0)

    def read_frames(self, answer: Answer, until_close: bool, deadline: float) -> Answer:
        while True:
            frame = self.next_frame(deadline)
            if isinstance(frame, str):
                answer.ended = frame
                return answer
            answer.frames.append(frame)
            if frame[0] == 0x8:
                answer.ended = "close-frame"
                return answer
            if not until_close and frame[0] == 0x1:
                return answer

    def more_frames(self, deadline_s: float = DEADLINE_S) -> Answer:
        return self.read_frames(Answer(101, b"", b"", [], "complete"), True, time.monotonic() + deadline_s)


def ask(port: int, raw: bytes, until_close: bool = True) -> Answer:
    with RawClient(port) as client:
        client.send(raw)
        return client.read_answer(until_close)


def assert_clean_http_error(answer: Answer, statuses=range(400, 500)) -> None:
    assert answer.status is not None, f"no answer ({answer.ended}); got {answer.head!r}"
    assert answer.status in statuses, answer.head
    if (answer.header("content-type") or "").startswith("application/json"):
        body = json.loads(answer.body)
        assert body["error"]["code"] and body["request_id"].startswith("req_")


def client_frame(
    opcode: int, data: bytes, fin: bool = True, rsv: int = 0, masked: bool = True, declared: int | None = None
) -> bytes:
    """Any frame a hostile client could write; `declared` lies about the payload length."""
    n = len(data) if declared is None else declared
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    flag = 0x80 if masked else 0
    if n < 126:
        head += bytes([flag | n])
    elif n < 65536:
        head += bytes([flag | 126]) + struct.pack("!H", n)
    else:
        head += bytes([flag | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + data
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def records_of(engine, account_id: str) -> list[SessionRecord]:
    with Session(engine) as db:
        return list(db.exec(select(SessionRecord).where(SessionRecord.account_id == account_id)).all())


# --- the request line and headers ---------------------------------------------------------


def malformed_request_lines(key: str) -> dict[str, bytes]:
    rest = upgrade_request(key).split(b"\r\n", 1)[1]
    return {
        "garbage": b"HELLO THERE\r\n" + rest,
        "unknown-version": b"GET /v1/realtime?model=gpt-realtime HTTP/9.9\r\n" + rest,
        "no-target": b"GET HTTP/1.1\r\n" + rest,
        "lowercase-method": b"get /v1/realtime?model=gpt-realtime HTTP/1.1\r\n" + rest,
        "post-upgrade": b"POST /v1/realtime?model=gpt-realtime HTTP/1.1\r\n" + rest,
        "nul-in-target": b"GET /v1/realtime?model=gpt\x00realtime HTTP/1.1\r\n" + rest,
        "space-in-target": b"GET /v1/realtime?model=gpt realtime HTTP/1.1\r\n" + rest,
        "bare-lf-lines": upgrade_request(key).replace(b"\r\n", b"\n"),
        "huge-target": b"GET /v1/realtime?model=gpt-realtime&pad=" + b"p" * 70000 + b" HTTP/1.1\r\n" + rest,
        "non-utf8-target": b"GET /v1/realtime?model=gpt-realtime&x=\xff\xfe HTTP/1.1\r\n" + rest,
    }


@pytest.mark.parametrize("case", list(malformed_request_lines("rsk_x")))
def test_malformed_request_line_gets_a_clean_4xx(hostile_gateway, hostile_tenant, case):
    assert_clean_http_error(ask(hostile_gateway.port, malformed_request_lines(hostile_tenant.key)[case]))


def broken_handshakes(key: str) -> dict[str, bytes]:
    return {
        "header-over-64KiB": upgrade_request(key, extra=[b"X-Pad: " + b"a" * 70000]),
        "headers-over-1MiB": upgrade_request(key, extra=[b"X-Pad-%d: %s" % (i, b"b" * 4000) for i in range(260)]),
        "300-headers": upgrade_request(key, extra=[b"X-H%d: v" % i for i in range(300)]),
        "duplicate-websocket-key": upgrade_request(key, extra=[b"Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA=="]),
        "short-websocket-key": upgrade_request(key).replace(WS_KEY, b"c2hvcnQ="),
        "missing-websocket-version": upgrade_request(key).replace(b"Sec-WebSocket-Version: 13\r\n", b""),
        "websocket-version-8": upgrade_request(key, version=b"8"),
        "websocket-version-list": upgrade_request(key, version=b"13, 8"),
        "websocket-version-junk": upgrade_request(key, version=b"thirteen"),
        "duplicate-authorization": upgrade_request(key, extra=[b"Authorization: Bearer rsk_" + b"d" * 40]),
        "non-utf8-websocket-key": upgrade_request(key).replace(WS_KEY, b"\xff" * 24),
        "non-utf8-connection-token": upgrade_request(key).replace(b"Connection: Upgrade", b"Connection: Upgrade, \xe9"),
    }


@pytest.mark.parametrize("case", list(broken_handshakes("rsk_x")))
def test_broken_websocket_handshake_gets_a_clean_4xx_or_the_error_frame(hostile_gateway, hostile_tenant, case):
    answer = ask(hostile_gateway.port, broken_handshakes(hostile_tenant.key)[case])
    if answer.status == 101:  # refused after the upgrade, the way browsers can read it (docs/errors.md)
        assert answer.error_event() is not None and answer.close_code == 1008, answer.frames
    else:
        assert_clean_http_error(answer)


NOT_AN_UPGRADE = {
    "upgrade-h2c": (b"Upgrade: websocket", b"Upgrade: h2c"),
    "upgrade-websockets": (b"Upgrade: websocket", b"Upgrade: websockets"),
    "upgrade-list": (b"Upgrade: websocket", b"Upgrade: h2c, websocket"),
    "connection-keep-alive": (b"Connection: Upgrade", b"Connection: keep-alive"),
    "no-connection": (b"Connection: Upgrade\r\n", b""),
    "no-upgrade": (b"Upgrade: websocket\r\n", b""),
}


@pytest.mark.parametrize("case", list(NOT_AN_UPGRADE))
def test_request_that_is_not_a_websocket_upgrade_gets_426(hostile_gateway, hostile_tenant, case):
    old, new = NOT_AN_UPGRADE[case]
    answer = ask(hostile_gateway.port, upgrade_request(hostile_tenant.key).replace(old, new))
    assert_clean_http_error(answer, statuses=[426])
    assert answer.header("upgrade") == "websocket"


SMUGGLING = {
    "content-length-and-chunked": ([b"Content-Length: 5", b"Transfer-Encoding: chunked"], b"0\r\n\r\n"),
    "content-length-body": ([b"Content-Length: 5"], b"hello"),
    "chunked-body": ([b"Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\n\r\n"),
    "two-content-lengths": ([b"Content-Length: 0", b"Content-Length: 5"], b"hello"),
    "negative-content-length": ([b"Content-Length: -1"], b""),
    "chunked-twice": ([b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity"], b"0\r\n\r\n"),
}


@pytest.mark.parametrize("case", list(SMUGGLING))
def test_upgrade_with_a_body_is_refused_as_bad_request(hostile_gateway, hostile_tenant, case):
    headers, body = SMUGGLING[case]
    answer = ask(hostile_gateway.port, upgrade_request(hostile_tenant.key, extra=headers) + body)
    assert_clean_http_error(answer)


def test_an_http_1_0_upgrade_is_refused_with_400(hostile_gateway, hostile_tenant, engine):
    before = len(hostile_gateway.log_text())
    raw = upgrade_request(hostile_tenant.key).replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    answer = ask(hostile_gateway.port, raw)
    assert answer.status == 400 and b"HTTP/1.1" in json.loads(answer.body)["error"]["message"].encode()
    assert_clean_http_error(answer)
    assert '"event": "upgrade"' not in hostile_gateway.log_text()[before:]  # it never reached the gate


def test_pipelined_request_after_an_upgrade_is_never_answered_as_http(hostile_gateway, hostile_tenant):
    second = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + hostile_tenant.key.encode()
    with RawClient(hostile_gateway.port) as client:
        client.send(upgrade_request(hostile_tenant.key) + second + b"\r\n\r\n")
        answer = client.read_answer(until_close=False)
        assert answer.status == 101 and json.loads(answer.frames[-1][1])["type"] == "session.created"
        client.send(client_frame(0x1, b'{"type":"session.update","session":{"type":"realtime"}}'))
        answer = client.read_frames(Answer(101, b"", b"", [], "complete"), False, time.monotonic() + DEADLINE_S)
    # dropped by the front door (it came in the request's segment), or read by the worker as bad framing
    assert answer.close_code == 1002 or json.loads(answer.frames[-1][1])["type"] == "session.updated"
    assert b"HTTP/1.1" not in client.buffer + b"".join(data for _, data in answer.frames)


def test_bytes_after_the_upgrade_request_never_reach_upstream(hostile_gateway, hostile_tenant, sim):
    before = set(sim.logs())
    with RawClient(hostile_gateway.port) as client:
        client.send(upgrade_request(hostile_tenant.key) + b"SMUGGLED-BODY")
        assert client.read_answer(until_close=False).status == 101
    new = [p for p in sim.logs() if p not in before]
    assert all(b"SMUGGLED" not in p.read_bytes() for p in new)


def test_percent_encoded_query_key_is_accepted_and_never_logged(hostile_gateway, hostile_tenant):
    body = hostile_tenant.key[4:].encode()
    for target in (
        b"/v1/realtime?model=gpt-realtime&api%5Fkey=rsk%5F" + body,
        b"/v1/realtime?model=gpt-realtime&api%255Fkey=rsk%255F" + body + b"&api_key=" + hostile_tenant.key.encode(),
    ):
        answer = ask(hostile_gateway.port, upgrade_request(target=target), until_close=False)
        assert answer.status == 101 and json.loads(answer.frames[-1][1])["type"] == "session.created"
    assert body.decode() not in hostile_gateway.log_text()


SPOOFED_PROXY_HEADERS = {
    "x-forwarded-proto-https": [b"X-Forwarded-Proto: https"],
    "x-forwarded-proto-wss": [b"X-Forwarded-Proto: wss"],
    "x-forwarded-proto-twice": [b"X-Forwarded-Proto: https", b"X-Forwarded-Proto: https"],
    "forwarded-proto": [b"Forwarded: for=10.9.9.9;proto=https"],
    "x-forwarded-for-trusted-ip": [b"X-Forwarded-For: 10.9.9.9", b"X-Forwarded-Proto: https"],
    "x-forwarded-ssl": [b"X-Forwarded-Ssl: on", b"X-Forwarded-Scheme: https"],
}


@pytest.mark.parametrize("case", list(SPOOFED_PROXY_HEADERS))
def test_forwarded_proto_from_an_untrusted_peer_is_tls_required(tls_gateway, hostile_tenant, case):
    answer = ask(tls_gateway.port, upgrade_request(hostile_tenant.key, extra=SPOOFED_PROXY_HEADERS[case]))
    assert answer.status == 101
    assert answer.error_event()["error"]["code"] == "tls_required"
    assert answer.close_code == 1008


SUBPROTOCOL_INJECTIONS = [
    b"realtime\rX-Injected: 1",
    b"realtime\x00, openai-insecure-api-key.{key}",
    b"realtime, openai-insecure-api-key.{key}\r\n X-Folded: 1",
    b"realtime, openai-insecure-api-key.{key}; q=1",
    b'realtime, "openai-insecure-api-key.{key}"',
    b"realtime, openai-insecure-api-key.{key}, Sec-WebSocket-Accept: forged",
    b"realtime, openai-insecure-api-key.{key}\xc3\xa9",
    b"realtime, openai-insecure-api-key.{key}, " + b"x," * 3000,
]


@pytest.mark.parametrize("index", range(len(SUBPROTOCOL_INJECTIONS)))
def test_injection_in_subprotocols_is_refused_or_selects_only_realtime(hostile_gateway, hostile_tenant, index):
    value = SUBPROTOCOL_INJECTIONS[index].replace(b"{key}", hostile_tenant.key.encode())
    answer = ask(hostile_gateway.port, upgrade_request(extra=[b"Sec-WebSocket-Protocol: " + value]), until_close=False)
    assert hostile_tenant.key[4:].encode() not in answer.head + answer.body
    assert b"injected" not in answer.head.lower() and b"folded" not in answer.head.lower()
    if answer.status == 101:
        assert answer.header("sec-websocket-protocol") in (None, "realtime")
        assert answer.head.count(b"Sec-WebSocket-Accept") == 1
    else:
        assert_clean_http_error(answer)


@pytest.mark.parametrize("header", [b"User-Agent: caf\xc3\xa9/1.0", b"X-Latin: \xe9t\xe9", b"OpenAI-Beta: \xff"])
def test_non_utf8_header_value_still_opens_a_session(hostile_gateway, hostile_tenant, engine, header):
    answer = ask(hostile_gateway.port, upgrade_request(hostile_tenant.key, extra=[header]), until_close=False)
    assert answer.status == 101, answer
    assert json.loads(answer.frames[-1][1])["type"] == "session.created"
    assert ended_record(engine, answer.header("x-request-id")).end_reason == "client_closed"


def test_non_utf8_header_name_gets_a_clean_4xx(hostile_gateway, hostile_tenant):
    assert_clean_http_error(ask(hostile_gateway.port, upgrade_request(hostile_tenant.key, extra=[b"X-\xff: v"])))


# --- slow and partial senders -------------------------------------------------------------


def test_request_sent_a_byte_at_a_time_is_still_answered(hostile_gateway, hostile_tenant):
    raw = upgrade_request(hostile_tenant.key)
    with RawClient(hostile_gateway.port) as client:
        step = 1.5 / len(raw)
        for i in range(len(raw)):
            client.send(raw[i : i + 1])
            time.sleep(step)
        answer = client.read_answer(until_close=False)
    assert answer.status == 101
    assert json.loads(answer.frames[-1][1])["type"] == "session.created"


def test_partial_requests_held_open_do_not_block_other_clients(hostile_gateway, hostile_tenant):
    partials = [
        b"GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        b"GET /v1/realt",
        b"\r\n\r\n",
        upgrade_request(hostile_tenant.key)[:-2],
    ]
    held = []
    try:
        for i in range(40):
            client = RawClient(hostile_gateway.port)
            held.append(client)
            client.send(partials[i % len(partials)])
        answer = ask(hostile_gateway.port, upgrade_request(hostile_tenant.key), until_close=False)
        assert answer.status == 101
    finally:
        for client in held:
            client.sock.close()


def test_client_that_vanishes_mid_request_leaves_no_session(hostile_gateway, hostile_tenant, engine):
    before = len(records_of(engine, hostile_tenant.account_id))
    raw = upgrade_request(hostile_tenant.key)
    for cut in (1, 20, len(raw) // 2, len(raw) - 2):
        with RawClient(hostile_gateway.port) as client:
            client.send(raw[:cut])
    time.sleep(0.3)
    assert len(records_of(engine, hostile_tenant.account_id)) == before


# --- seeded fuzz of the upgrade request ---------------------------------------------------


def mutate_head(rng: random.Random, raw: bytes) -> bytes:
    """Mutate a request's head, keeping its terminating blank line (so it is always complete)."""
    head = bytearray(raw[:-4])
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(head) + 1)
        kind = rng.randrange(6)
        if kind == 0:
            head[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
        elif kind == 1:
            del head[at : at + rng.randint(1, 10)]
        elif kind == 2 and at < len(head):
            head[at] = rng.randrange(256)
        elif kind == 3:
            head[at:at] = rng.choice([b"\r\n", b"\n", b"\r", b":", b",", b" ", b"\t", b"\x00", b"%", b"\r\n "])
        elif kind == 4:
            lines = bytes(head).split(b"\r\n")
            lines.insert(rng.randint(1, len(lines)), rng.choice(lines[1:]))
            head = bytearray(b"\r\n".join(lines))
        else:
            head[at:at] = rng.choice(
                [
                    b"Content-Length: 3\r\n",
                    b"Transfer-Encoding: chunked\r\n",
                    b"X-Forwarded-Proto: https\r\n",
                    b"Sec-WebSocket-Protocol: realtime\r\n",
                    b"Authorization: Basic x\r\n",
                    b"Expect: 100-continue\r\n",
                ]
            )
    return bytes(head).replace(b"\r\n\r\n", b"\r\n") + b"\r\n\r\n"


@pytest.mark.parametrize("seed", range(8))
def test_fuzzed_upgrade_requests_are_all_answered_without_a_5xx(hostile_gateway, hostile_tenant, seed):
    rng = random.Random(seed)
    raw = upgrade_request(hostile_tenant.key, extra=[b"Sec-WebSocket-Protocol: realtime", b"User-Agent: fuzz"])
    for attempt in range(60):
        mutated = mutate_head(rng, raw)
        answer = ask(hostile_gateway.port, mutated, until_close=False)
        context = f"seed {seed} attempt {attempt}: {mutated!r}"
        if answer.status is None and b"Content-Length: 3" in mutated:
            continue  # a declared body never sent: the server rightly waits for it
        assert answer.status is not None, f"no answer ({answer.ended}) to {context}"
        assert answer.status < 500, f"{answer.head!r} for {context}"
        if answer.status == 101:
            assert answer.frames, context
            assert json.loads(answer.frames[-1][1])["type"] in ("session.created", "error"), context


# --- malformed frames after the handshake -------------------------------------------------


FRAMING_ERRORS = [
    "unmasked",
    "reserved-bits",
    "bad-opcode",
    "oversized-control",
    "fragmented-control",
    "continuation-without-start",
    "data-inside-a-message",
    "length-msb-set",
    "message-too-large",
    "fragments-too-large",
]
BAD_CLOSE_FRAMES = ["close-one-byte", "close-bad-code", "close-bad-utf8"]


def hostile_frame(rng: random.Random, kinds: list[str]) -> tuple[str, bytes, set[int]]:
    """One malformed client frame: (kind, bytes, close codes RFC 6455 allows as the answer)."""
    kind = rng.choice(kinds)
    text = b'{"type":"session.update","session":{"type":"realtime"}}'
    if kind == "unmasked":
        return kind, client_frame(rng.choice([0x1, 0x2, 0x9]), text, masked=False), {1002}
    if kind == "reserved-bits":
        return kind, client_frame(rng.choice([0x1, 0x2, 0x9]), text, rsv=rng.randint(1, 7)), {1002}
    if kind == "bad-opcode":
        return kind, client_frame(rng.choice([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]), text), {1002}
    if kind == "oversized-control":
        return kind, client_frame(rng.choice([0x8, 0x9, 0xA]), b"\x03\xe8" + b"x" * rng.randint(124, 300)), {1002}
    if kind == "fragmented-control":
        return kind, client_frame(rng.choice([0x9, 0xA]), b"ping", fin=False), {1002}
    if kind == "continuation-without-start":
        return kind, client_frame(0x0, text, fin=rng.random() < 0.5), {1002}
    if kind == "data-inside-a-message":
        return kind, client_frame(0x1, text[:10], fin=False) + client_frame(rng.choice([0x1, 0x2]), text), {1002}
    if kind == "length-msb-set":
        return kind, client_frame(0x2, b"", declared=(1 << 63) + rng.randrange(1 << 20))[:14], {1002}
    if kind == "message-too-large":
        return kind, client_frame(0x2, b"", declared=MAX_MESSAGE + rng.randint(1, 1 << 30))[:14], {1009}
    if kind == "fragments-too-large":
        half = b"a" * (MAX_MESSAGE // 2 + 1)
        return kind, client_frame(0x1, half, fin=False) + client_frame(0x0, half), {1009}
    if kind == "close-one-byte":
        return kind, client_frame(0x8, b"\x03"), {1002}
    if kind == "close-bad-code":
        code = rng.choice([0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
        return kind, client_frame(0x8, struct.pack("!H", code) + b"bye"), {1002}
    return kind, client_frame(0x8, b"\x03\xe8" + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"ok\xfe"])), {1007}


def open_session(port: int, key: str) -> tuple[RawClient, str]:
    client = RawClient(port)
    client.send(upgrade_request(key))
    answer = client.read_answer(until_close=False)
    assert answer.status == 101 and json.loads(answer.frames[-1][1])["type"] == "session.created", answer
    return client, answer.header("x-request-id")


def fuzz_frames(gateway, tenant, engine, rng: random.Random, kinds: list[str], sessions: int) -> None:
    """One session per malformed frame; each must get its RFC close and a client-side record."""
    outcomes = []
    for _ in range(sessions):
        kind, frame, codes = hostile_frame(rng, kinds)
        client, request_id = open_session(gateway.port, tenant.key)
        with client:
            if rng.random() < 0.5:  # a valid message first, sometimes in the same write
                valid = client_frame(0x1, b'{"type":"input_audio_buffer.clear"}')
                if rng.random() < 0.5:
                    client.send(valid)
                    time.sleep(0.02)
                else:
                    frame = valid + frame
            client.send(frame)
            answer = client.more_frames()
            if answer.close_code is not None:
                with contextlib.suppress(OSError):  # the gateway may have closed the TCP side already
                    client.send(client_frame(0x8, struct.pack("!H", 1000)))
        outcomes.append((kind, request_id, codes, answer))
    for kind, request_id, codes, answer in outcomes:
        assert answer.close_code in codes, f"{kind}: {answer.frames} ({answer.ended})"
        if kind.endswith("too-large"):
            assert answer.error_event()["error"]["code"] == "message_too_large"
        row = ended_record(engine, request_id)
        assert row.end_reason == ("message_too_large" if kind.endswith("too-large") else "client_closed"), kind


@pytest.mark.parametrize("seed", range(2))
def test_malformed_framing_gets_1002_or_1009_and_a_client_side_record(fuzzed_gateway, hostile_tenant, engine, seed):
    fuzz_frames(fuzzed_gateway, hostile_tenant, engine, random.Random(1000 + seed), FRAMING_ERRORS, 16)


def test_malformed_close_frame_gets_1002_or_1007_and_a_client_side_record(fuzzed_gateway, hostile_tenant, engine):
    fuzz_frames(fuzzed_gateway, hostile_tenant, engine, random.Random(2000), BAD_CLOSE_FRAMES, 16)


def test_invalid_utf8_text_from_a_client_gets_1007(fuzzed_gateway, hostile_tenant):
    client, _ = open_session(fuzzed_gateway.port, hostile_tenant.key)
    with client:
        client.send(client_frame(0x1, b'{"type":"session.update","x":"\xff\xfe"}'))
        assert client.more_frames().close_code == 1007


def test_random_bytes_after_the_handshake_end_the_session_cleanly(fuzzed_gateway, hostile_tenant, engine):
    rng = random.Random(7)
    request_ids = []
    for _ in range(12):
        client, request_id = open_session(fuzzed_gateway.port, hostile_tenant.key)
        with client:
            client.send(bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))))
            answer = client.more_frames(3)
        # random bytes may also be the start of a frame still in flight: then the client leaves
        assert answer.close_code in (1002, 1009, None), answer.frames
        request_ids.append(request_id)
    for request_id in request_ids:
        assert ended_record(engine, request_id).end_reason in ("client_closed", "message_too_large")


# --- afterwards: the gateway is whole -----------------------------------------------------


def read_events_until(client: RawClient, event_type: str, deadline_s: float = 15) -> list[str]:
    """The event types read until `event_type` arrives, the connection ends or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    types: list[str] = []
    while event_type not in types:
        answer = client.read_frames(Answer(101, b"", b"", [], "complete"), False, deadline)
        types += [json.loads(data)["type"] for opcode, data in answer.frames if opcode == 0x1]
        if answer.ended != "complete":
            break
    return types


def test_after_the_fuzz_a_normal_session_still_runs(fuzzed_gateway, hostile_tenant):
    client, _ = open_session(fuzzed_gateway.port, hostile_tenant.key)
    with client:
        client.send(client_frame(0x1, b'{"type":"response.create"}'))
        assert "response.done" in read_events_until(client, "response.done")


def zygote_children(gateway) -> list[psutil.Process]:
    children = gateway.children()
    zygotes = [c for c in children if c.ppid() == gateway.proc.pid and "meshrt.worker.zygote" in " ".join(c.cmdline())]
    assert len(zygotes) == 1
    return [c for c in children if c.ppid() == zygotes[0].pid]


def holds_a_client(process: psutil.Process, gateway_port: int) -> bool:
    """A client's socket: a connection accepted on the gateway's port. (An idle pool worker may
    hold one connection, to upstream, opened ahead of its session: worker/preconnect.py.)"""
    try:
        return any(c.laddr and c.laddr.port == gateway_port for c in process.net_connections(kind="inet"))
    except psutil.NoSuchProcess:
        return False


def test_after_the_fuzz_no_session_worker_is_left_running(fuzzed_gateway):
    """At rest the zygote's children are only its idle warm workers: none holds a client's socket."""

    def at_rest():
        workers = zygote_children(fuzzed_gateway)
        return len(workers) <= WARM_WORKERS and not any(holds_a_client(w, fuzzed_gateway.port) for w in workers)

    wait_for(at_rest, 20, 0.1, "every session worker to exit")


def test_after_the_fuzz_every_session_record_is_ended(hostile_tenant, engine):
    wait_for(
        lambda: all(r.state == "ended" for r in records_of(engine, hostile_tenant.account_id)),
        20,
        0.1,
        "every session record to end",
    )


def test_after_the_fuzz_no_key_is_in_the_log_or_the_records(fuzzed_gateway, hostile_tenant, engine):
    body = hostile_tenant.key[4:]
    assert body not in fuzzed_gateway.log_text()
    dump = json.dumps([r.model_dump() for r in records_of(engine, hostile_tenant.account_id)], default=str)
    assert body not in dump


def test_after_the_fuzz_front_door_and_supervisor_never_restarted(fuzzed_gateway):
    supervisor_pid, frontdoor_pid = fuzzed_gateway.started_pids
    assert fuzzed_gateway.proc.poll() is None and fuzzed_gateway.proc.pid == supervisor_pid
    assert fuzzed_gateway.frontdoor_pid() == frontdoor_pid
    assert '"level": "critical"' not in fuzzed_gateway.log_text()
