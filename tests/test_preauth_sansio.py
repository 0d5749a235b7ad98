"""Pre-authorisation without sockets: the purse's bounds (worker/preauth.py) and the relay
holding, releasing and refusing client events around a reservation (worker/relay.py)."""

from __future__ import annotations

import base64
import json

from websockets.frames import Frame
from websockets.frames import Opcode

from meshrt.shared.pricing import load_price_table
from meshrt.worker.frames import FrameScanner
from meshrt.worker.frames import payload as frame_payload
from meshrt.worker.meter import Meter
from meshrt.worker.preauth import Purse
from meshrt.worker.relay import Relay
from meshrt.worker.relay import Target
from meshrt.worker.session_meter import SessionMeter

TABLE = load_price_table()
RATES = TABLE.realtime("gpt-realtime")
IN, OUT = 32_000_000, 64_000_000  # gpt-realtime's audio rates, its highest: picodollars a token
CAP = 4096


def purse(**kw) -> Purse:
    return Purse.for_rates(RATES, CAP, **kw) if kw else Purse.for_rates(RATES, CAP)


def client(event: dict, fin: bool = True, opcode=Opcode.TEXT) -> bytes:
    return Frame(opcode, json.dumps(event).encode(), fin).serialize(mask=True, extensions=[])


def server(event: dict) -> bytes:
    return Frame(Opcode.TEXT, json.dumps(event).encode()).serialize(mask=False, extensions=[])


def relay_with(p: Purse) -> Relay:
    meter = SessionMeter(Meter(RATES, TABLE))
    return Relay("req_t", 10**9, 1 << 20, meter=meter, may_carry_usage=lambda b: b"response.done" in b[:80], purse=p)


def upstream_payloads(actions) -> list[dict]:
    """The client events in the UPSTREAM actions (masked frames, several to an action)."""
    out = []
    for target, payload in actions:
        if target is not Target.UPSTREAM:
            continue
        chunk, frames = FrameScanner(expect_masked=True).feed(payload)
        out += [json.loads(frame_payload(chunk, frame)) for frame in frames]
    return out


def client_errors(actions) -> list[dict]:
    found = []
    for target, payload in actions:
        if target is Target.CLIENT:
            start = 4 if payload[1] & 0x7F == 126 else 2
            event = json.loads(payload[start:])
            if event["type"] == "error":
                found.append(event["error"])
    return found


def no_turn_detection(p: Purse) -> None:
    p.session_event({"type": "realtime", "instructions": "", "tools": [], "audio": {"input": {"turn_detection": None}}})


# --- the purse --------------------------------------------------------------------------------


def test_a_response_is_bounded_by_its_output_cap_and_the_input_so_far():
    p = purse()
    no_turn_detection(p)
    session = len(json.dumps(["", []]).encode())
    assert p.bound() == session * IN + CAP * OUT
    assert p.bound(100) == session * IN + 100 * OUT
    p.session_event({"instructions": "", "tools": [], "max_output_tokens": 500})  # upstream sends it whole
    assert p.bound() == session * IN + 500 * OUT and p.bound(100) == session * IN + 100 * OUT
    p.session_event({"instructions": "", "tools": [], "max_output_tokens": "inf"})
    assert p.bound() == session * IN + CAP * OUT


def test_audio_counts_at_its_duration_in_the_session_format():
    p = purse()
    one_second = base64.b64encode(b"\0" * 48_000)  # PCM16 24 kHz: one second
    assert p.audio_tokens(len(one_second)) == 60  # format unknown: G.711's 8 kB/s, 6× as many
    p.session_event({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 24_000}}}})
    assert p.audio_tokens(len(one_second)) == 10
    p.session_event({"input_audio_format": "g711_ulaw"})  # beta spelling
    assert p.audio_tokens(len(one_second)) == 60


def test_a_response_create_waits_for_a_reservation_and_counts_once_admitted():
    p = purse()
    no_turn_detection(p)
    create = json.dumps({"type": "response.create", "response": {"max_output_tokens": 50}}).encode()
    before = p.conversation_tokens
    assert not p.admit(create)
    assert p.conversation_tokens == before and not p.in_flight  # nothing counted
    version, want, least, held = p.wanted()
    assert (version, held) == (1, 0) and p.waiting
    assert least >= p.bound(50) and want > least  # headroom: the next response starts at once
    assert p.answered(version, want, True, "", available=10**12)
    assert p.admit(create)
    assert p.conversation_tokens == before + len(create) and len(p.in_flight) == 1


def test_audio_needs_a_reservation_only_while_the_session_answers_by_itself():
    append = json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA" * 100}).encode()
    automatic = purse()  # until upstream says otherwise: server VAD creates responses
    assert not automatic.admit(append)
    manual = purse()
    no_turn_detection(manual)
    assert manual.admit(append) and manual.conversation_tokens > 0


def test_settle_lowers_the_reservation_to_what_is_still_needed():
    p = purse()
    no_turn_detection(p)
    p.answered(*p.wanted()[:1], 10 * p.bound(), True, "")
    assert p.admit(b'{"type":"response.create"}')
    p.response_created()
    p.response_done(123)
    version, amount = p.settle()
    assert version == 2 and amount == p.need() + p.headroom() < 10 * p.bound(CAP)
    assert p.settle() is None  # nothing more to release


# --- the relay around it ------------------------------------------------------------------------


def test_held_events_go_upstream_in_order_once_granted():
    p = purse()
    no_turn_detection(p)
    r = relay_with(p)
    first = client({"type": "conversation.item.create", "item": {"type": "message"}})
    create = client({"type": "response.create", "event_id": "evt_1"})
    after = client({"type": "input_audio_buffer.clear"})
    actions = r.from_client(first + create + after)
    assert [e["type"] for e in upstream_payloads(actions)] == ["conversation.item.create"]
    asks = [payload for target, payload in actions if target is Target.RESERVE]
    assert len(asks) == 1 and r.holding
    assert r.from_client(client({"type": "input_audio_buffer.commit"})) == []  # queued behind
    version, want, least, held = asks[0]
    released = r.reserved(version, want, True, "", 10**12)
    assert [e["type"] for e in upstream_payloads(released)] == [
        "response.create",
        "input_audio_buffer.clear",
        "input_audio_buffer.commit",
    ]
    assert not r.holding


def test_a_refused_response_create_is_answered_in_band_and_the_rest_goes_on():
    p = purse()
    no_turn_detection(p)
    r = relay_with(p)
    actions = r.from_client(client({"type": "response.create", "event_id": "evt_9"}) + client({"type": "x.y"}))
    (version, want, least, held) = next(payload for target, payload in actions if target is Target.RESERVE)
    released = r.reserved(version, 0, False, "insufficient_quota", 1234)
    errors = client_errors(released)
    assert [(e["code"], e["event_id"]) for e in errors] == [("insufficient_quota", "evt_9")]
    assert [e["type"] for e in upstream_payloads(released)] == ["x.y"]
    # while refused, the next response.create is refused at once, without a database round trip
    again = r.from_client(client({"type": "response.create", "event_id": "evt_10"}))
    assert [e["event_id"] for e in client_errors(again)] == ["evt_10"]
    assert not any(target is Target.RESERVE for target, _ in again)
    assert r.retry_refused() is not None  # the shell asks again now and then


def test_refused_audio_is_dropped_with_one_error_a_spell():
    p = purse()
    r = relay_with(p)  # turn detection not known yet: audio can start a response
    append = client({"type": "input_audio_buffer.append", "audio": "AAAA" * 50})
    actions = r.from_client(append)
    version = next(payload for target, payload in actions if target is Target.RESERVE)[0]
    refused = r.reserved(version, 0, False, "insufficient_quota", 0)
    more = r.from_client(append + append)
    assert len(client_errors(refused)) == 1 and client_errors(more) == []
    assert upstream_payloads(refused) == upstream_payloads(more) == []
    # a granted retry ends the spell: audio flows again
    version, want, least, held = r.retry_refused()
    r.reserved(version, want, True, "", 10**12)
    assert [e["type"] for e in upstream_payloads(r.from_client(append))] == ["input_audio_buffer.append"]


def test_a_fragmented_message_is_judged_whole_at_its_first_fragment():
    p = purse()
    no_turn_detection(p)
    r = relay_with(p)
    body = json.dumps({"type": "response.create", "event_id": "evt_f"}).encode()
    first = Frame(Opcode.TEXT, body[:10], fin=False).serialize(mask=True, extensions=[])
    rest = Frame(Opcode.CONT, body[10:], fin=True).serialize(mask=True, extensions=[])
    actions = r.from_client(first)
    version = next(payload for target, payload in actions if target is Target.RESERVE)[0]
    r.from_client(rest)  # held behind the first
    refused = r.reserved(version, 0, False, "insufficient_quota", 0)
    assert [t for t, _ in refused if t is Target.UPSTREAM] == []  # neither fragment went up
    assert len(client_errors(refused)) == 1


def test_a_response_done_settles_the_reservation_with_its_increment():
    p = purse()
    no_turn_detection(p)
    r = relay_with(p)
    actions = r.from_client(client({"type": "response.create"}))
    version, want, least, held = next(payload for target, payload in actions if target is Target.RESERVE)
    r.reserved(version, want, True, "", 10**12)
    r.from_upstream(server({"type": "response.created", "response": {"id": "r1"}}))
    usage = {"total_tokens": 30, "input_tokens": 10, "output_tokens": 20}
    done = r.from_upstream(server({"type": "response.done", "response": {"id": "r1", "usage": usage}}))
    bills = [payload for target, payload in done if target is Target.BILL]
    assert len(bills) == 1
    settle_version, amount = r.settles[bills[0].seq]
    assert settle_version > version and amount < want and p.held == amount
    assert not p.in_flight


def test_an_escaped_event_name_is_judged_like_the_plain_one():
    """JSON lets a client spell `response.create` with escapes; it starts a response all the same."""
    p = purse()
    no_turn_detection(p)
    assert not p.admit(b'{"type":"response\\u002ecreate"}')
    automatic = purse()
    assert not automatic.admit(b'{"type":"input_audio_buffer\\u002eappend","audio":"AAAA"}')
    assert p.admit(b'{"type":"conversation.item.create","item":{"type":"message"}}')  # no parse needed


def test_a_response_limit_replaces_the_session_limit_even_when_higher():
    p = purse()
    no_turn_detection(p)
    p.session_event({"instructions": "", "tools": [], "max_output_tokens": 100})
    p.answered(*p.wanted()[:1], 10**15, True, "")
    assert p.admit(b'{"type":"response.create","response":{"max_output_tokens":1000}}')
    assert p.in_flight[-1] == p.bound(1000) > p.bound()  # 1000 tokens, not the session's 100
    assert p.admit(b'{"type":"response.create","response":{"max_output_tokens":"inf"}}')
    assert p.in_flight[-1] == p.bound(CAP)  # "inf" on the response: the cap
