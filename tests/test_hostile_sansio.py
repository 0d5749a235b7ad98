"""Hostile input against the sans-I/O cores: the frame scanner, the relay and the handshake.

Property tests with plain bytes: no socket, no loop, no clock. Each test states one behaviour;
hypothesis looks for a counter-example with a bounded number of examples.
"""

from __future__ import annotations

import re
import string
import struct
from urllib.parse import quote
from urllib.parse import unquote_plus

from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from websockets.datastructures import Headers
from websockets.frames import Close
from websockets.frames import Frame
from websockets.frames import Opcode

from meshrt.shared.errors import ERRORS
from meshrt.shared.handshake import accept_bytes
from meshrt.shared.handshake import extract_credentials
from meshrt.shared.handshake import is_secure
from meshrt.shared.handshake import is_wellformed_key
from meshrt.shared.handshake import parse_request_bytes
from meshrt.shared.handshake import parse_upgrade
from meshrt.shared.handshake import redact
from meshrt.shared.handshake import strip_credentials
from meshrt.shared.handshake import upstream_headers
from meshrt.worker.frames import FrameScanner
from meshrt.worker.frames import ProtocolViolation
from meshrt.worker.relay import Relay
from meshrt.worker.relay import Target

BOUNDED = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
ALNUM = string.ascii_letters + string.digits


# --- streams ------------------------------------------------------------------------------


def serialize(opcode: int, payload: bytes, fin: bool, masked: bool) -> bytes:
    return Frame(Opcode(opcode), payload, fin).serialize(mask=masked, extensions=[])


def hand_built_frame(opcode: int, payload: bytes, fin: bool, rsv: int, masked: bool, mask: bytes) -> bytes:
    """Any header at all, including the ones websockets refuses to build (bad opcodes, RSV bits)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    b1 = 0x80 if masked else 0
    if n < 126:
        head = bytes([b0, b1 | n])
    elif n < 65536:
        head = bytes([b0, b1 | 126]) + struct.pack("!H", n)
    else:
        head = bytes([b0, b1 | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


payloads = st.one_of(
    st.binary(max_size=200), st.integers(126, 400).map(lambda n: bytes(range(256)) * (n // 256) + bytes(n % 256))
)
big_payloads = st.integers(65536, 66000).map(lambda n: b"\xa5" * n)  # the 8-byte length form
control_payloads = st.binary(max_size=125)


@st.composite
def message_frames(draw, masked: bool, usage_texts: bool = False, big: bool = True) -> list[tuple[int, bytes, bool]]:
    """One data message as (opcode, payload, fin) fragments, control frames between fragments."""
    opcode = draw(st.sampled_from([OP_TEXT, OP_BINARY]))
    if opcode == OP_TEXT and usage_texts and draw(st.booleans()):
        whole = b'{"type":"response.done","response":{"usage":{"total_tokens":%d}}}' % draw(st.integers(0, 99))
    else:
        whole = draw(big_payloads if big and draw(st.integers(0, 9)) == 0 else payloads)
    cuts = sorted(draw(st.lists(st.integers(0, len(whole)), max_size=3)))
    parts = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)])]
    frames = []
    for i, part in enumerate(parts):
        frames.append((opcode if i == 0 else OP_CONT, part, i == len(parts) - 1))
        if i < len(parts) - 1 and draw(st.booleans()):
            frames.append((draw(st.sampled_from([OP_PING, OP_PONG])), draw(control_payloads), True))
    return frames


@st.composite
def valid_stream(
    draw, masked: bool, usage_texts: bool = False, with_close: bool = True, big: bool = True
) -> tuple[bytes, list]:
    """A well-formed frame stream and its frames; optionally ending in a close frame."""
    frames: list[tuple[int, bytes, bool]] = []
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.integers(0, 3)) == 0:
            frames.append((draw(st.sampled_from([OP_PING, OP_PONG])), draw(control_payloads), True))
        else:
            frames += draw(message_frames(masked, usage_texts, big))
    if with_close and draw(st.booleans()):
        frames.append((OP_CLOSE, Close(draw(st.sampled_from([1000, 1001, 4000])), "bye").serialize(), True))
    return b"".join(serialize(op, data, fin, masked) for op, data, fin in frames), frames


@st.composite
def hostile_stream(draw) -> bytes:
    """Frames with any header bits (bad opcodes, RSV, wrong masking, oversized control frames,
    stray continuations) mixed with valid frames and raw garbage."""
    pieces = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.integers(0, 3))
        if kind == 0:
            pieces.append(draw(st.binary(min_size=1, max_size=40)))
        elif kind == 1:
            pieces.append(draw(valid_stream(masked=draw(st.booleans()), big=False))[0])
        else:
            pieces.append(
                hand_built_frame(
                    draw(st.integers(0, 15)),
                    draw(st.one_of(st.binary(max_size=140), payloads)),
                    draw(st.booleans()),
                    draw(st.integers(0, 7)) if kind == 2 else 0,
                    draw(st.booleans()),
                    draw(st.binary(min_size=4, max_size=4)),
                )
            )
    return b"".join(pieces)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted(min(c, len(data)) for c in cuts)
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


cut_lists = st.lists(st.integers(0, 70000), max_size=12)


def scan(pieces: list[bytes], expect_masked: bool, max_message: int | None = None):
    """Feed pieces to a fresh scanner: (frames as comparable tuples, violation close code or None)."""
    scanner = FrameScanner(expect_masked, max_message)
    seen = []
    for piece in pieces:
        try:
            chunk, frames = scanner.feed(piece)
        except ProtocolViolation as violation:
            return seen, violation.close_code
        seen += [(f.opcode, f.fin, f.mask, f.message_start, chunk[f.start : f.end]) for f in frames]
    return seen, None


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# --- the frame scanner --------------------------------------------------------------------


@BOUNDED
@given(st.binary(max_size=600), st.booleans(), st.one_of(st.none(), st.integers(0, 300)), cut_lists)
def test_scanner_raises_nothing_but_protocol_violation_on_arbitrary_bytes(data, masked, max_message, cuts):
    scanner = FrameScanner(masked, max_message)
    for piece in split_at(data, cuts):
        try:
            scanner.feed(piece)
        except ProtocolViolation as violation:
            assert violation.close_code in (1002, 1009)
            return


@BOUNDED
@given(st.data(), st.booleans())
def test_scanner_gives_identical_frames_however_a_valid_stream_is_split(data, masked):
    stream, frames = data.draw(valid_stream(masked))
    whole = scan([stream], masked)
    assert scan(split_at(stream, data.draw(cut_lists)), masked) == whole
    if len(stream) < 4000:
        assert scan(bytewise(stream), masked) == whole
    assert whole[1] is None
    assert [(op, fin) for op, fin, *_ in whole[0]] == [(op, fin) for op, _, fin in frames]


@BOUNDED
@given(hostile_stream(), st.booleans(), st.one_of(st.none(), st.integers(0, 300)), cut_lists)
def test_scanner_reaches_the_same_verdict_however_hostile_bytes_are_split(stream, masked, max_message, cuts):
    """Same violation (or none) whatever the split; frames found before it agree with byte-at-a-time
    scanning. (A violation discards the frames scanned earlier in the same feed: see the report.)"""
    eager_frames, eager_code = scan(bytewise(stream), masked, max_message)
    frames, code = scan(split_at(stream, cuts), masked, max_message)
    assert code == eager_code
    assert frames == eager_frames[: len(frames)]
    if code is None:
        assert frames == eager_frames


@FEW
@given(st.integers(0, 2**16), st.sampled_from([OP_TEXT, OP_BINARY]))
def test_scanner_refuses_a_message_one_byte_over_the_limit(limit, opcode):
    frame = serialize(opcode, b"x" * (limit + 1), True, True)
    assert scan([frame[:16]], True, limit) == ([], 1009)
    assert scan([serialize(opcode, b"x" * limit, True, True)], True, limit)[1] is None


# --- the relay ----------------------------------------------------------------------------


class CountingMeter:
    """Bills whatever the relay asks it to observe; never reaches a cap."""

    total_tokens = 0

    def __init__(self):
        self.observed = 0

    def observe(self, payload: bytes):
        self.observed += 1
        return ("increment", self.observed)


def carries_usage(payload) -> bool:
    return b'"response.done"' in bytes(payload)


def new_relay(meter=None) -> Relay:
    return Relay("req_hostile", token_cap=10**12, max_message_bytes=1 << 20, meter=meter, may_carry_usage=carries_usage)


def forwarded(actions, target: Target) -> bytes:
    return b"".join(payload for t, payload in actions if t is target)


@BOUNDED
@given(st.data())
def test_relay_forwards_client_frames_upstream_byte_for_byte_however_split(data):
    stream, _ = data.draw(valid_stream(masked=True))
    relay = new_relay()
    actions = []
    for piece in split_at(stream, data.draw(cut_lists)):
        actions += relay.from_client(piece)
    assert forwarded(actions, Target.UPSTREAM) == stream
    assert [t for t, _ in actions if t is not Target.UPSTREAM] == []


@BOUNDED
@given(st.data())
def test_relay_forwards_upstream_frames_to_the_client_byte_for_byte_however_split(data):
    stream, _ = data.draw(valid_stream(masked=False, usage_texts=True))
    relay = new_relay(CountingMeter())
    actions = []
    for piece in split_at(stream, data.draw(cut_lists)):
        actions += relay.from_upstream(piece)
    assert forwarded(actions, Target.CLIENT) == stream
    assert forwarded(actions, Target.UPSTREAM) == b""


@BOUNDED
@given(st.data())
def test_relay_bills_each_usage_message_before_its_last_byte_reaches_the_client(data):
    stream, frames = data.draw(valid_stream(masked=False, usage_texts=True, with_close=False))
    usage_ends = []  # stream offset of the end of each usage-carrying message
    offset, message, message_opcode = 0, b"", None
    for opcode, payload, fin in frames:
        offset += len(serialize(opcode, payload, fin, False))
        if opcode in (OP_TEXT, OP_BINARY):
            message, message_opcode = payload, opcode
        elif opcode == OP_CONT:
            message += payload
        if opcode in (OP_TEXT, OP_BINARY, OP_CONT) and fin and message_opcode == OP_TEXT and carries_usage(message):
            usage_ends.append(offset)
    relay = new_relay(CountingMeter())
    delivered, bills = 0, []
    for piece in split_at(stream, data.draw(cut_lists)):
        for target, payload in relay.from_upstream(piece):
            if target is Target.BILL:
                bills.append(delivered)
            elif target is Target.CLIENT:
                delivered += len(payload)
    assert len(bills) == len(usage_ends)
    assert all(billed_at < end for billed_at, end in zip(bills, usage_ends))


@FEW
@given(st.data())
def test_relay_keeps_both_directions_transparent_when_interleaved(data):
    client_stream, _ = data.draw(valid_stream(masked=True, with_close=False))
    upstream_stream, _ = data.draw(valid_stream(masked=False, usage_texts=True, with_close=False))
    client_pieces = split_at(client_stream, data.draw(cut_lists))
    upstream_pieces = split_at(upstream_stream, data.draw(cut_lists))
    relay = new_relay(CountingMeter())
    actions = []
    while client_pieces or upstream_pieces:
        if client_pieces and (not upstream_pieces or data.draw(st.booleans())):
            actions += relay.from_client(client_pieces.pop(0))
        else:
            actions += relay.from_upstream(upstream_pieces.pop(0))
    assert forwarded(actions, Target.UPSTREAM) == client_stream
    assert forwarded(actions, Target.CLIENT) == upstream_stream


def leg_input(masked: bool):
    return st.one_of(
        st.binary(max_size=60),
        hostile_stream(),
        valid_stream(masked=masked).map(lambda s: s[0]),
        valid_stream(masked=not masked).map(lambda s: s[0]),
        st.sampled_from([1000, 1001, 1005, 999, 4000]).map(
            lambda code: serialize(OP_CLOSE, struct.pack("!H", code), True, masked)
        ),
        st.just(serialize(OP_TEXT, b'{"type":"response.created"}', True, masked)),
    )


relay_operations = st.lists(
    st.one_of(
        st.tuples(st.just("from_client"), leg_input(masked=True)),
        st.tuples(st.just("from_upstream"), leg_input(masked=False)),
        st.tuples(st.sampled_from(["client_vanished", "upstream_vanished", "drain_expired"]), st.none()),
        st.tuples(st.just("end"), st.sampled_from(sorted(ERRORS))),
    ),
    max_size=12,
)


def run_operations(operations) -> tuple[Relay, list]:
    relay = new_relay(CountingMeter())
    actions = []
    for name, argument in operations:
        method = getattr(relay, name)
        actions += method(argument) if argument is not None else method()
    return relay, actions


@BOUNDED
@given(relay_operations)
def test_relay_never_raises_whatever_the_legs_send_or_do(operations):
    relay, actions = run_operations(operations)
    assert all(isinstance(target, Target) for target, _ in actions)
    assert all(isinstance(payload, bytes) for target, payload in actions if target is not Target.BILL)
    assert isinstance(relay.finished, bool)
    relay.outcome  # noqa: B018 - readable whatever happened


@BOUNDED
@given(relay_operations)
def test_relay_writes_only_well_formed_frames_toward_the_client(operations):
    _, actions = run_operations(operations)
    assert scan([forwarded(actions, Target.CLIENT)], expect_masked=False)[1] is None


@BOUNDED
@given(relay_operations)
def test_relay_writes_only_well_formed_masked_frames_upstream(operations):
    _, actions = run_operations(operations)
    assert scan([forwarded(actions, Target.UPSTREAM)], expect_masked=True)[1] is None


# --- the handshake ------------------------------------------------------------------------


# tenant keys and ephemeral keys (ek_, minted from one) are carried, stripped and redacted alike
keys = st.tuples(st.sampled_from(["rsk_", "ek_"]), st.text(ALNUM, min_size=32, max_size=48)).map("".join)
SUBPROTOCOL_KEY_PREFIXES = [
    "openai-insecure-api-key.",
    "OpenAI-Insecure-API-Key.",
    "Bearer.",
    "bearer.",
    "BEARER.",
    "Bearer ",
    "bearer  ",
]
DECOY_SUBPROTOCOLS = [
    "realtime",
    "openai-beta.realtime-v1",
    "openai-agents-sdk.0.2.1",
    "openai-organization.org_1",
    "openai-project.proj_1",
    "chat",
    "bearer",
    "Bearerx",
]
DECOY_HEADERS = [
    ("User-Agent", "hostile/1.0"),
    ("OpenAI-Beta", "realtime=v1"),
    ("X-Request", "a, b"),
    ("Origin", "https://example.test"),
    ("OpenAI-Safety-Identifier", "user-1"),
]


@st.composite
def credential_request(draw) -> tuple[bytes, dict]:
    """A realtime upgrade carrying any combination of the three credential forms, spelled in any
    of their accepted ways, among decoys. Returns the raw bytes and what was put where."""
    where: dict[str, str] = {}
    tokens = draw(st.lists(st.sampled_from(DECOY_SUBPROTOCOLS), max_size=4))
    if draw(st.booleans()):
        where["subprotocol"] = draw(keys)
        tokens.insert(
            draw(st.integers(0, len(tokens))), draw(st.sampled_from(SUBPROTOCOL_KEY_PREFIXES)) + where["subprotocol"]
        )
    headers = list(draw(st.lists(st.sampled_from(DECOY_HEADERS), max_size=3)))
    if tokens:
        groups = draw(st.integers(1, min(3, len(tokens))))
        for g in range(groups):
            sep = draw(st.sampled_from([",", ", ", " ,  "]))
            headers.append(("Sec-WebSocket-Protocol", sep.join(tokens[g::groups])))
    if draw(st.booleans()):
        where["authorization"] = draw(keys)
        scheme = draw(st.sampled_from(["Bearer", "bearer", "BEARER"]))
        headers.append(("Authorization", scheme + draw(st.sampled_from([" ", "  "])) + where["authorization"]))
    params = [("model", "gpt-realtime")] + draw(
        st.lists(st.sampled_from([("foo", "bar"), ("x", ""), ("voice", "a b")]), max_size=2)
    )
    query_keys = draw(st.lists(keys, max_size=2))
    for key in query_keys:
        params.insert(draw(st.integers(0, len(params))), ("api_key", key))
    if query_keys:
        where["query"] = next(value for name, value in params if name == "api_key")  # the first one counts
    draw(st.randoms()).shuffle(headers)
    encoding = draw(st.sampled_from(["plain", "encoded-name", "encoded-value", "all-encoded"]))
    query = "&".join(encode_param(name, value, encoding) for name, value in params)
    lines = [
        f"GET /v1/realtime?{query} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), where


def encode_param(name: str, value: str, encoding: str) -> str:
    if name != "api_key" or encoding == "plain":
        return f"{name}={quote(value)}"
    every = "".join(f"%{b:02X}" for b in value.encode())
    if encoding == "encoded-name":
        return f"api%5Fkey={value}"
    if encoding == "encoded-value":
        prefix, _, body = value.partition("_")
        return f"api_key={prefix}%5F{body}"
    return f"api%5Fkey={every}"


def secret(key: str) -> str:
    """What must never be written anywhere: the key's body (the `rsk_` / `ek_` prefix is public)."""
    return key.partition("_")[2]


@BOUNDED
@given(credential_request())
def test_credentials_are_taken_subprotocol_first_then_authorization_then_query(request):
    raw, where = request
    _, parsed = parse_request_bytes(raw)
    credentials = extract_credentials(parse_upgrade(parsed))
    expected = next((source for source in ("subprotocol", "authorization", "query") if source in where), "none")
    assert credentials.source == expected
    assert credentials.key == where.get(expected)


@BOUNDED
@given(credential_request())
def test_strip_credentials_leaves_no_form_of_any_key(request):
    raw, where = request
    _, parsed = parse_request_bytes(raw)
    stripped = strip_credentials(parsed)
    text = stripped.decode("latin-1")
    for key in where.values():
        assert secret(key) not in text and secret(key) not in unquote_plus(text)
    _, reparsed = parse_request_bytes(stripped)
    assert extract_credentials(parse_upgrade(reparsed)).source == "none"


@BOUNDED
@given(credential_request())
def test_upstream_headers_never_carry_a_key(request):
    raw, where = request
    _, parsed = parse_request_bytes(raw)
    sent = repr(upstream_headers(parse_upgrade(parsed)))
    assert not any(secret(key) in sent for key in where.values())
    assert "authorization" not in sent.lower()


@BOUNDED
@given(credential_request())
def test_redact_removes_every_key_from_the_request_as_logged(request):
    raw, where = request
    _, parsed = parse_request_bytes(raw)
    logged = redact(parsed.path + "\n" + repr(list(parsed.headers.raw_items())))
    assert not any(secret(key) in logged or secret(key) in unquote_plus(logged) for key in where.values()), logged


def test_two_authorization_headers_are_an_invalid_key_not_a_crash():
    raw = BASE_REQUEST.replace(
        b"Sec-WebSocket-Protocol: realtime, openai-insecure-api-key.rsk_" + b"s" * 40,
        b"Authorization: Bearer rsk_" + b"b" * 40,
    )
    _, request = parse_request_bytes(raw)
    credentials = extract_credentials(parse_upgrade(request))
    assert credentials.source == "authorization" and not is_wellformed_key(credentials.key)


key_contexts = st.sampled_from(
    [
        "{k}",
        "api_key={k}",
        "API_KEY={k}",
        "?model=m&api_key={k}&x=1",
        "rsk_{k}",
        "rsk_x{k}",
        "ek_x{k}",
        "week_{k}",
        "api_key=ek%5F{b}",
        "x=%65k_{b}",
        "{k}{k}",
        "Bearer {k}",
        '"{k}"',
        "'{k}'",
        "api_key={k}\n",
        "/v1/realtime?api%5Fkey=rsk%5F{b}",
        "api%255Fkey=rsk%255F{b}",
        "api_key=rsk%5F{b}&model=m",
        "x=%72sk_{b}",
        "{k}%20tail",
        "<{k}>",
    ]
)


@BOUNDED
@given(st.lists(st.tuples(st.text(max_size=20), key_contexts), min_size=1, max_size=4), keys)
def test_redact_leaves_no_key_in_any_text(pieces, key):
    text = "".join(noise + context.format(k=key, b=secret(key)) for noise, context in pieces)
    assert secret(key) not in redact(text)


@BOUNDED
@given(st.text(max_size=200))
def test_redact_leaves_text_without_keys_alone(text):
    if "rsk_" in text or "ek_" in text or "%" in text or re.search("api_key=", text, re.IGNORECASE):
        return
    assert redact(text) == text


def mutated_request(raw: bytes):
    """A valid upgrade with bytes inserted, deleted or replaced, or header lines duplicated."""

    @st.composite
    def mutate(draw):
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data)))
            kind = draw(st.integers(0, 3))
            if kind == 0:
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
            elif kind == 1:
                del data[at : at + draw(st.integers(1, 8))]
            elif kind == 2 and at < len(data):
                data[at] = draw(st.integers(0, 255))
            else:
                lines = bytes(data).split(b"\r\n")
                if len(lines) > 2:
                    i = draw(st.integers(1, len(lines) - 1))
                    lines.insert(i, lines[draw(st.integers(1, len(lines) - 1))])
                    data = bytearray(b"\r\n".join(lines))
        return bytes(data)

    return mutate()


BASE_REQUEST = (
    b"GET /v1/realtime?model=gpt-realtime&api_key=rsk_" + b"q" * 40 + b" HTTP/1.1\r\n"
    b"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: realtime, openai-insecure-api-key.rsk_" + b"s" * 40 + b"\r\n"
    b"Authorization: Bearer rsk_" + b"a" * 40 + b"\r\nUser-Agent: x\r\nX-Forwarded-Proto: https\r\n\r\n"
)


@BOUNDED
@given(st.one_of(st.binary(max_size=400), mutated_request(BASE_REQUEST)))
def test_parse_request_bytes_raises_nothing_but_value_error(raw):
    try:
        parse_request_bytes(raw)
    except ValueError:
        pass


@BOUNDED
@given(mutated_request(BASE_REQUEST), st.sampled_from(["127.0.0.1", "10.0.0.1", "::1", "not-an-ip", None]))
def test_every_request_the_parser_accepts_goes_through_the_gate_functions(raw, peer):
    try:
        protocol, request = parse_request_bytes(raw)
    except ValueError:
        return
    upgrade = parse_upgrade(request)
    extract_credentials(upgrade)
    upstream_headers(upgrade)
    is_secure(upgrade.headers, peer, (), False)
    accept_bytes(protocol, request, "req_hostile")
    _, reparsed = parse_request_bytes(strip_credentials(request))
    assert extract_credentials(parse_upgrade(reparsed)).source == "none"


@BOUNDED
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["X-Forwarded-Proto", "x-forwarded-proto", "Forwarded", "X-Forwarded-For"]),
            st.sampled_from(["https", "wss", "HTTPS", " https ", "http", "https, http", ""]),
        ),
        max_size=3,
    ),
    st.sampled_from(["127.0.0.1", "::1", "10.1.2.3", "192.168.0.9", None, "garbage"]),
)
def test_forwarded_proto_from_an_untrusted_peer_is_never_secure(headers, peer):
    import ipaddress

    trusted = (ipaddress.ip_network("10.9.9.9/32"),)
    assert is_secure(Headers(headers), peer, trusted, allow_plain_loopback=False) is False


@FEW
@given(st.integers(0, 4000), st.integers(0, 4000), st.sampled_from([",", ", ", "  ,"]), keys)
def test_stripped_request_parses_wherever_the_request_did(tokens, slashes, sep, key):
    """Stripping never lengthens a line past the worker's parser limit (8 KiB a line)."""
    protocols = sep.join(["realtime", f"openai-insecure-api-key.{key}"] + ["x"] * tokens)
    raw = (
        f"GET /v1/realtime?model=gpt-realtime&path={'/' * slashes}&api_key={key} HTTP/1.1\r\n"
        f"Host: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocols}\r\n\r\n"
    ).encode()
    try:
        _, request = parse_request_bytes(raw)
    except ValueError:
        return
    _, stripped = parse_request_bytes(strip_credentials(request))
    assert parse_upgrade(stripped).query == [(k, v) for k, v in parse_upgrade(request).query if k != "api_key"]
