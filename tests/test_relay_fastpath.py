"""The relay's short path for the usual read (one whole data frame: `FrameScanner.whole`) does
what the general path does with the same bytes: the same actions in the same order, the same
bills, the same reservations and the same state after. Each script of events is relayed twice,
once with the short path turned off, each event in a read of its own or several to a read."""

from __future__ import annotations

import base64
import json

from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from websockets.frames import Frame
from websockets.frames import Opcode

from meshrt.shared.pricing import load_price_table
from meshrt.worker.frames import FrameScanner
from meshrt.worker.frames import payload as frame_payload
from meshrt.worker.meter import Meter
from meshrt.worker.meter import may_carry_usage
from meshrt.worker.preauth import Purse
from meshrt.worker.relay import Relay
from meshrt.worker.relay import Target
from meshrt.worker.session_meter import SessionMeter

TABLE = load_price_table()
RATES = TABLE.realtime("gpt-realtime")
AUDIO = base64.b64encode(bytes(range(96)) * 10).decode()  # 20 ms of 24 kHz PCM16, as base64
USAGE = {
    "total_tokens": 30,
    "input_tokens": 10,
    "output_tokens": 20,
    "input_token_details": {"text_tokens": 4, "audio_tokens": 6, "cached_tokens": 0},
    "output_token_details": {"text_tokens": 5, "audio_tokens": 15},
}


def text(event: dict | str, masked: bool) -> bytes:
    data = event.encode() if isinstance(event, str) else json.dumps(event, separators=(",", ":")).encode()
    return Frame(Opcode.TEXT, data).serialize(mask=masked, extensions=[])


CLIENT_EVENTS = [
    text({"type": "input_audio_buffer.append", "audio": AUDIO}, True),  # the compact append
    text({"type": "input_audio_buffer.append", "audio": AUDIO, "event_id": "e1"}, True),
    text('{"type":"input_audio_buffer\\u002eappend","audio":"' + AUDIO[:40] + '"}', True),
    text('{"type":"input_audio_buffer.append","audio":"AA"AA"}', True),  # not JSON: a token a byte
    text({"type": "input_audio_buffer.append", "audio": "A" * 70000}, True),  # past the 16-bit length
    text({"type": "response.create", "event_id": "c1"}, True),
    text({"type": "response.create", "response": {"max_output_tokens": 50}}, True),
    text({"type": "session.update", "session": {"turn_detection": None}}, True),
    text({"type": "session.update", "session": {"turn_detection": {"type": "server_vad"}}}, True),
    text({"type": "conversation.item.create", "item": {"type": "message"}}, True),
    Frame(Opcode.BINARY, b"\x00\x01" * 300).serialize(mask=True, extensions=[]),
    Frame(Opcode.PING, b"hi").serialize(mask=True, extensions=[]),
    Frame(Opcode.TEXT, b'{"type":"response.cre', fin=False).serialize(mask=True, extensions=[])
    + Frame(Opcode.CONT, b'ate"}').serialize(mask=True, extensions=[]),
]
UPSTREAM_EVENTS = [
    text({"type": "session.created", "session": {"turn_detection": {"type": "server_vad"}}}, False),
    text({"type": "session.updated", "session": {"turn_detection": None, "max_output_tokens": 200}}, False),
    text({"type": "response.created", "response": {"id": "r1"}}, False),
    text({"type": "response.output_audio.delta", "response_id": "r1", "delta": AUDIO}, False),
    text({"type": "response.done", "response": {"id": "r1", "status": "completed", "usage": USAGE}}, False),
    text({"type": "error", "error": {"type": "invalid_request_error", "event_id": "c1"}}, False),
    Frame(Opcode.BINARY, b"\x07" * 200).serialize(mask=False, extensions=[]),
    Frame(Opcode.PING, b"").serialize(mask=False, extensions=[]),
]
ENDINGS = [
    ("client", Frame(Opcode.CLOSE, b"\x03\xe8").serialize(mask=True, extensions=[])),
    ("upstream", Frame(Opcode.CLOSE, b"\x03\xe8").serialize(mask=False, extensions=[])),
    ("client", b"\x81\x05hello"),  # unmasked: a violation
    ("upstream", b"\x83\x00"),  # an unknown opcode
]

step = st.one_of(
    st.tuples(st.just("client"), st.sampled_from(CLIENT_EVENTS)),
    st.tuples(st.just("upstream"), st.sampled_from(UPSTREAM_EVENTS)),
)
script = st.tuples(
    st.lists(st.tuples(step, st.booleans()), max_size=40),  # (event, whether it joins the previous read)
    st.one_of(st.none(), st.sampled_from(ENDINGS)),
    st.integers(0, 10**12),  # picodollars the purse holds at the start
)


def run(steps, ending, held: int, short_path: bool) -> list:
    meter = SessionMeter(Meter(RATES, TABLE))
    purse = Purse.for_rates(RATES, 4096)
    purse.held = held
    relay = Relay("req_t", 10**6, 1 << 17, meter=meter, may_carry_usage=may_carry_usage, purse=purse)
    if not short_path:
        relay._client.whole = relay._upstream.whole = lambda data: 0
    reads: list[tuple[str, bytes]] = []
    for (leg, data), joins in steps:
        if joins and reads and reads[-1][0] == leg:
            reads[-1] = (leg, reads[-1][1] + data)
        else:
            reads.append((leg, data))
    if ending is not None:
        reads.append(ending)
    seen = []

    def record(target, payload) -> None:
        if target is Target.UPSTREAM:  # the gateway's own frames upstream are masked at random: unmasked here
            chunk, frames = FrameScanner(expect_masked=True).feed(payload)
            payload = [(f.opcode, frame_payload(chunk, f)) for f in frames]
        seen.append((target, payload if isinstance(payload, (bytes, tuple, list)) else repr(payload)))

    for leg, data in reads:
        actions = relay.from_client(data) if leg == "client" else relay.from_upstream(data)
        for target, payload in actions:
            record(target, payload)
            if target is Target.RESERVE:  # the supervisor grants what it asks, at once
                version, want = payload[0], payload[1]
                for answer in relay.reserved(version, want, True, "", 10**15):
                    record(*answer)
        seen.append(("active", relay.take_client_activity(), relay.holding))
    state = (relay.phase, relay.outcome, relay.responses_in_flight, dict(relay.settles), relay.client.state)
    money = (
        purse.held,
        purse.version,
        purse.waiting,
        purse.conversation_tokens,
        list(purse.in_flight),
        purse.auto_response,
    )
    return [seen, state, money, meter.total_tokens]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script)
def test_the_short_path_relays_and_bills_exactly_as_the_general_path(case):
    steps, ending, held = case
    assert run(steps, ending, held, short_path=True) == run(steps, ending, held, short_path=False)


def test_the_short_path_takes_the_usual_reads_and_nothing_else():
    """What `whole` claims is a single whole frame, and what it leaves to `feed` (so that the
    test above compares two different paths, not one path twice)."""
    append = CLIENT_EVENTS[0]
    client, upstream = FrameScanner(expect_masked=True, max_message=1 << 17), FrameScanner(expect_masked=False)
    assert client.whole(append) == 8 and append[1] & 0x7F == 126  # 2 + 2 (length) + 4 (mask)
    assert client.whole(CLIENT_EVENTS[10]) == 8  # a binary frame
    assert upstream.whole(UPSTREAM_EVENTS[3]) == 4
    assert client.whole(CLIENT_EVENTS[4]) == 0  # a 64-bit length
    assert client.whole(CLIENT_EVENTS[11]) == 0  # a ping
    assert client.whole(CLIENT_EVENTS[12]) == 0  # fragments
    assert client.whole(append + append) == 0  # two frames in one read
    assert client.whole(append[:-1]) == 0  # a frame not all there
    assert upstream.whole(append) == 0  # masked toward the client
    assert FrameScanner(expect_masked=True, max_message=100).whole(append) == 0  # too large: feed says 1009
    client.feed(append[:10])
    assert client.whole(append) == 0  # bytes pending from an earlier read
