"""The relay core with plain bytes, no sockets: transparency, bill-before-deliver, closes,
the cut-short drain, gateway endings and client protocol violations."""

from __future__ import annotations

import json

from websockets.frames import Close
from websockets.frames import Frame
from websockets.frames import Opcode

from meshrt.worker.relay import LEG_TRANSITIONS
from meshrt.worker.relay import LegClose
from meshrt.worker.relay import LegEvent
from meshrt.worker.relay import LegState
from meshrt.worker.relay import Phase
from meshrt.worker.relay import Relay
from meshrt.worker.relay import RelayStateError
from meshrt.worker.relay import Target


def client_frame(opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=True, extensions=[])


def server_frame(opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=False, extensions=[])


def unmasked_payload(frame: bytes) -> bytes:
    """The payload of one unmasked (server) frame."""
    length, start = frame[1] & 0x7F, 2
    if length == 126:
        length, start = int.from_bytes(frame[2:4], "big"), 4
    elif length == 127:
        length, start = int.from_bytes(frame[2:10], "big"), 10
    return frame[start : start + length]


def event(type_: str, **fields) -> bytes:
    return json.dumps({"type": type_, **fields}).encode()


def close_payload(code: int, reason: str = "") -> bytes:
    return Close(code, reason).serialize()


class FakeMeter:
    """Stands in for the meter's pricing (tested in test_meter.py); counts tokens it is shown."""

    def __init__(self):
        self.total_tokens = 0
        self.seq = 0

    def observe(self, payload: bytes):
        body = json.loads(payload)
        if body["type"] != "response.done":
            return None
        self.seq += 1
        self.total_tokens += body["response"]["usage"]["total_tokens"]
        return ("increment", self.seq)


def relay(**kw) -> Relay:
    meter = kw.pop("meter", FakeMeter())
    return Relay(
        "req_test",
        kw.pop("token_cap", 10_000),
        kw.pop("max_message_bytes", 1 << 20),
        meter=meter,
        may_carry_usage=lambda p: b"response.done" in p[:80],
        **kw,
    )


def joined(actions, target) -> bytes:
    return b"".join(p for t, p in actions if t is target)


def done(tokens: int) -> bytes:
    return server_frame(Opcode.TEXT, event("response.done", response={"usage": {"total_tokens": tokens}}))


def test_frames_are_forwarded_byte_for_byte_however_the_stream_is_split():
    r = relay()
    stream = (
        client_frame(Opcode.TEXT, event("session.update"))
        + client_frame(Opcode.BINARY, b"\x00\xff" * 300)
        + client_frame(Opcode.PING, b"p")
        + client_frame(Opcode.TEXT, b"frag-", fin=False)
        + client_frame(Opcode.CONT, b"ment")
    )
    out = b""
    for i in range(0, len(stream), 7):
        out += joined(r.from_client(stream[i : i + 7]), Target.UPSTREAM)
    assert out == stream


def test_usage_is_billed_before_the_frame_that_carries_it_is_delivered():
    r = relay()
    created = server_frame(Opcode.TEXT, event("response.created"))
    delta = server_frame(Opcode.TEXT, event("response.output_audio.delta", delta="AAAA"))
    actions = r.from_upstream(created + delta + done(42) + delta)
    targets = [t for t, _ in actions]
    assert targets == [Target.CLIENT, Target.BILL, Target.CLIENT]
    assert actions[0][1] == created + delta and actions[2][1] == done(42) + delta
    assert r.responses_in_flight == 0


def test_client_close_is_relayed_and_upstreams_reply_completes_the_session():
    r = relay()
    close = client_frame(Opcode.CLOSE, close_payload(1000, "bye"))
    assert r.from_client(close) == [(Target.UPSTREAM, close)]
    assert r.phase is Phase.CLIENT_CLOSING and not r.finished
    reply = server_frame(Opcode.CLOSE, close_payload(1000, "bye"))
    assert r.from_upstream(reply) == [(Target.CLIENT, reply)]
    assert r.finished and (r.outcome.end_reason, r.outcome.close_code) == ("client_closed", 1000)


def test_upstream_close_code_and_reason_reach_the_client_verbatim():
    r = relay()
    close = server_frame(Opcode.CLOSE, close_payload(3000, "invalid_request_error.invalid_api_key"))
    assert r.from_upstream(close) == [(Target.CLIENT, close)]
    reply = client_frame(Opcode.CLOSE, close_payload(3000))
    assert r.from_client(reply) == [(Target.UPSTREAM, reply)]
    assert r.finished and (r.outcome.end_reason, r.outcome.close_code) == ("upstream_closed", 3000)


def test_a_vanished_client_cancels_the_response_and_waits_for_its_usage():
    r = relay()
    r.from_upstream(server_frame(Opcode.TEXT, event("response.created")))
    actions = r.client_vanished()
    assert len(actions) == 1 and actions[0][0] is Target.UPSTREAM and r.draining
    after = r.from_upstream(done(7))
    assert [t for t, _ in after] == [Target.BILL, Target.UPSTREAM]  # billed, then the held close
    assert not r.draining and r.outcome.close_code == 1006


def test_the_drain_is_bounded_by_the_shell():
    r = relay()
    r.from_upstream(server_frame(Opcode.TEXT, event("response.created")))
    r.client_vanished()
    released = r.drain_expired()
    assert len(released) == 1 and released[0][0] is Target.UPSTREAM and not r.draining


def test_gateway_end_sends_error_frame_then_close_and_closes_upstream():
    r = relay()
    actions = r.end("session_idle_timeout")
    to_client = [p for t, p in actions if t is Target.CLIENT]
    error = json.loads(unmasked_payload(to_client[0]))
    assert error["error"]["code"] == "session_idle_timeout" and error["request_id"] == "req_test"
    assert Close.parse(unmasked_payload(to_client[1])) == Close(1000, "invalid_request_error.session_idle_timeout")
    assert any(t is Target.UPSTREAM for t, _ in actions)
    assert r.end("insufficient_quota") == []  # only the first ending counts


def test_token_cap_ends_the_session_after_the_crossing_response_is_delivered():
    r = relay(token_cap=50)
    actions = r.from_upstream(done(60))
    targets = [t for t, _ in actions]
    assert targets[:2] == [Target.BILL, Target.CLIENT]
    assert r.outcome.end_reason == "session_token_cap_exceeded"
    error = json.loads(unmasked_payload(actions[2][1]))
    assert error["error"]["code"] == "session_token_cap_exceeded"


def test_unmasked_client_frame_gets_1002_and_nothing_reaches_upstream_but_a_close():
    r = relay()
    actions = r.from_client(server_frame(Opcode.TEXT, b"{}"))
    to_client = [p for t, p in actions if t is Target.CLIENT]
    assert Close.parse(unmasked_payload(to_client[0])).code == 1002
    assert all(p[:1] == b"\x88" for t, p in actions if t is Target.UPSTREAM)  # only a close frame
    assert r.outcome.close_code == 1002 and r.client.state is LegState.GONE


def test_oversized_message_is_message_too_large_with_1009():
    r = relay(max_message_bytes=100)
    actions = r.from_client(client_frame(Opcode.TEXT, b"x" * 101))
    frames = [p for t, p in actions if t is Target.CLIENT]
    assert json.loads(unmasked_payload(frames[0]))["error"]["code"] == "message_too_large"
    assert Close.parse(unmasked_payload(frames[1])).code == 1009


def test_fragmented_usage_is_billed_before_its_last_fragment():
    r = relay()
    body = event("response.done", response={"usage": {"total_tokens": 5}})
    first, rest = server_frame(Opcode.TEXT, body[:20], fin=False), server_frame(Opcode.CONT, body[20:])
    assert [t for t, _ in r.from_upstream(first)] == [Target.CLIENT]
    assert [t for t, _ in r.from_upstream(rest)] == [Target.BILL, Target.CLIENT]


def test_nothing_from_the_client_goes_upstream_after_its_close():
    r = relay()
    r.from_upstream(server_frame(Opcode.CLOSE, close_payload(1000)))
    close = client_frame(Opcode.CLOSE, close_payload(1000))
    first = r.from_client(close + client_frame(Opcode.TEXT, b"late"))
    assert first == [(Target.UPSTREAM, close)]
    assert r.from_client(client_frame(Opcode.CLOSE, close_payload(1000))) == []


def test_a_client_violation_after_the_close_sends_no_second_close_to_the_client():
    r = relay()
    first = r.upstream_vanished()
    assert sum(1 for t, p in first if t is Target.CLIENT and p[:1] == b"\x88") == 1
    assert [t for t, _ in r.from_client(b"\x00\x00")] == []  # unmasked junk: 1002 would be a 2nd close


def test_frames_before_a_violation_in_the_same_read_are_still_relayed_and_billed():
    r = relay()
    bad = b"\x80\x00"  # continuation frame with no message started: 1002
    actions = r.from_upstream(done(9) + bad)
    targets = [t for t, _ in actions]
    assert targets[:2] == [Target.BILL, Target.CLIENT] and actions[1][1] == done(9)
    assert r.outcome.end_reason == "upstream_error"
    ok = client_frame(Opcode.TEXT, b"{}")
    actions = relay().from_client(ok + server_frame(Opcode.TEXT, b"{}"))
    assert actions[0] == (Target.UPSTREAM, ok)


def test_leg_close_table_covers_every_state_and_refuses_a_close_sent_twice():
    assert set(LEG_TRANSITIONS) == set(LegState)
    leg = LegClose()
    leg.handle(LegEvent.SENT_CLOSE)
    assert leg.state is LegState.CLOSE_SENT and not leg.can_send and not leg.done
    try:
        leg.handle(LegEvent.SENT_CLOSE)
    except RelayStateError:
        pass
    else:
        raise AssertionError("a second close toward a peer must be impossible")
    leg.handle(LegEvent.RECEIVED_CLOSE)
    assert leg.state is LegState.CLOSED and leg.done
    leg.handle(LegEvent.VANISHED)
    assert leg.state is LegState.GONE and leg.done


def test_a_session_ends_with_both_legs_closed_by_handshake():
    r = relay()
    r.from_client(client_frame(Opcode.CLOSE, Close(1000, "bye").serialize()))
    assert (r.client.state, r.upstream.state) == (LegState.CLOSE_RECEIVED, LegState.CLOSE_SENT)
    r.from_upstream(server_frame(Opcode.CLOSE, Close(1000, "bye").serialize()))
    assert (r.client.state, r.upstream.state) == (LegState.CLOSED, LegState.CLOSED) and r.finished
