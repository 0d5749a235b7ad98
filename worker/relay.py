"""The session relay, sans-I/O: bytes from either leg in, ordered actions out.

Invariants kept here (and tested with plain bytes, no sockets):
- transparency: every frame is forwarded as the same bytes, in order; the only frames the
  gateway adds are its own terminating error + close toward the client, and `response.cancel`
  + close toward upstream when the client is gone;
- bill before deliver: a BILL action for a usage-carrying upstream frame always comes before
  the CLIENT action that carries that frame;
- a cut-short session still bills: when the client leaves while responses are in flight, the
  close toward upstream is held back behind a `response.cancel` until the final
  `response.done` arrives or the shell calls `drain_expired()`.
"""

from __future__ import annotations

import enum
import json
from collections import deque
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import Callable

from meshrt.shared.errors import ERRORS
from meshrt.shared.errors import error_event
from meshrt.shared.errors import refusal_event
from meshrt.shared.handshake import model_detail

from . import frames as wsf
from .frames import FrameScanner
from .frames import ProtocolViolation
from .frames import RawFrame
from .frames import apply_mask
from .translation import HOLD

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE = wsf.OP_CONT, wsf.OP_TEXT, wsf.OP_BINARY, wsf.OP_CLOSE


class Target(enum.Enum):
    CLIENT = "client"
    UPSTREAM = "upstream"
    BILL = "bill"
    RESERVE = "reserve"  # (version, want, least, held): ask the supervisor to hold more


Action = tuple[Target, Any]


class Phase(enum.Enum):
    """Who is ending the session: it stays OPEN until the first close (or loss) of either leg."""

    OPEN = "open"
    CLIENT_CLOSING = "client_closing"  # client closed or vanished; upstream close pending/sent
    UPSTREAM_CLOSING = "upstream_closing"  # upstream closed; waiting for the client's reply
    GATEWAY_CLOSING = "gateway_closing"  # meshrt ended the session with an error code


_FORWARDS_CLIENT = (Phase.OPEN, Phase.UPSTREAM_CLOSING)  # phases in which client frames go upstream


class LegState(enum.Enum):
    """One leg's close handshake (RFC 6455 §7.1): a close frame each way, or the leg is gone."""

    OPEN = "open"
    CLOSE_RECEIVED = "close_received"  # its close arrived: ours is owed
    CLOSE_SENT = "close_sent"  # ours went out: its reply is awaited
    CLOSED = "closed"  # a close each way
    GONE = "gone"  # its connection ended or its stream is unreadable: nothing more to or from it


class LegEvent(enum.Enum):
    RECEIVED_CLOSE = "received_close"
    SENT_CLOSE = "sent_close"
    VANISHED = "vanished"


_O, _R, _S, _C, _G = LegState.OPEN, LegState.CLOSE_RECEIVED, LegState.CLOSE_SENT, LegState.CLOSED, LegState.GONE
# A table reads best one row a line: the formatter leaves it alone.
# fmt: off
LEG_TRANSITIONS: dict[LegState, dict[LegEvent, LegState]] = {
    # a second close from a peer is ignored (RFC 6455 allows one); a gone leg stays gone
    _O: {LegEvent.RECEIVED_CLOSE: _R, LegEvent.SENT_CLOSE: _S, LegEvent.VANISHED: _G},
    _R: {LegEvent.RECEIVED_CLOSE: _R, LegEvent.SENT_CLOSE: _C, LegEvent.VANISHED: _G},
    _S: {LegEvent.RECEIVED_CLOSE: _C, LegEvent.VANISHED: _G},
    _C: {LegEvent.RECEIVED_CLOSE: _C, LegEvent.VANISHED: _G},
    _G: {LegEvent.RECEIVED_CLOSE: _G, LegEvent.VANISHED: _G},
}
# fmt: on


class RelayStateError(RuntimeError):
    """A transition the table does not allow: a bug in the relay, never the peers' doing."""


class LegClose:
    """One leg's close state. Read on every relayed frame, changed a few times a session: the
    answers are plain attributes, recomputed at each transition."""

    __slots__ = ("state", "can_send", "close_received", "gone", "done")

    def __init__(self) -> None:
        self._enter(LegState.OPEN)

    def handle(self, event: LegEvent) -> None:
        try:
            self._enter(LEG_TRANSITIONS[self.state][event])
        except KeyError:
            raise RelayStateError(f"{event.value} in state {self.state.value}") from None

    def _enter(self, state: LegState) -> None:
        self.state = state
        self.can_send = state in (LegState.OPEN, LegState.CLOSE_RECEIVED)  # frames may still be written to it
        self.close_received = state in (LegState.CLOSE_RECEIVED, LegState.CLOSED)
        self.gone = state is LegState.GONE
        self.done = state in (LegState.CLOSED, LegState.GONE)


_CANCEL = json.dumps({"type": "response.cancel"}, separators=(",", ":")).encode()


@dataclass
class Outcome:
    end_reason: str | None = None
    close_code: int | None = None


@dataclass
class Relay:
    """One session's relay core. `meter` has `observe(payload) -> increment | None` and
    `total_tokens`; `may_carry_usage(payload)` is the cheap pre-check run on each upstream
    text message."""

    request_id: str
    token_cap: int
    max_message_bytes: int
    meter: Any = None
    may_carry_usage: Callable[[bytes], bool] = lambda payload: False
    phase: Phase = Phase.OPEN
    outcome: Outcome = field(default_factory=Outcome)
    responses_in_flight: int = 0
    client: LegClose = field(default_factory=LegClose)
    upstream: LegClose = field(default_factory=LegClose)
    purse: Any = None  # preauth.Purse: client events that can start a response wait for its cover
    # translation.TranslationMeter: a translation session's client appends are billed before
    # they go upstream (the only sessions whose client events are metered)
    translation: Any = None

    def __post_init__(self):
        self._client = FrameScanner(expect_masked=True, max_message=self.max_message_bytes)
        self._upstream = FrameScanner(expect_masked=False)
        self._held_upstream_close: bytes | None = None  # waits behind a response.cancel
        self._usage_fragments: list[bytes] | None = None
        self._pending_end: str | None = None  # an end decided mid-batch, applied after it
        self._pending_detail: str | None = None
        self._withhold = False  # a transcription session's model was refused: deliver no more
        self._client_active = False  # a client data frame arrived since the shell last asked
        # Pre-authorisation: client frames (from the one being judged on) that wait for the
        # supervisor's answer to a Reserve, in order; how the fragmented text message in
        # progress was judged (None: none in progress); settles for the shell, by increment seq.
        self._held: deque[tuple[bytes, list[RawFrame]]] = deque()
        self._fragment: bool | None = None
        self._refusal_told = False  # one error event per spell of refused audio, not one a frame
        self._translation_fragment = False  # a fragmented client text message in progress (translation)
        self.settles: dict[int, tuple[int, int]] = {}

    @property
    def finished(self) -> bool:
        """Both legs are closed (close frames both ways) or gone: the shell may drop the sockets."""
        return self.client.done and self.upstream.done

    def without_client(self) -> None:
        """A relay with no client leg (a WebRTC call's worker, fed by the call's sideband):
        nothing is delivered to a client, and the gateway answers upstream's close itself."""
        self.client.handle(LegEvent.VANISHED)

    def take_client_activity(self) -> bool:
        """Whether a client data frame arrived since the last call (the idle clock's input)."""
        active, self._client_active = self._client_active, False
        return active

    def settle_outcome(self, reason: str, code: int | None) -> None:
        """How the session ended, decided outside the relay (a refused upgrade, a failure in the
        shell); the first decision stands."""
        self._end(reason, code)

    def _end(self, reason: str, code: int | None) -> None:
        if self.outcome.end_reason is None:
            self.outcome = Outcome(reason, code)

    # --- client -> upstream ---------------------------------------------------------------

    def from_client(self, data: bytes) -> list[Action]:
        if self.client.gone:
            return []
        if self.phase is Phase.OPEN and not self._held and self.translation is None:
            head = self._client.whole(data)
            if head:  # one whole data frame: forwarded as it came, once the purse admits it
                self._client_active = True
                purse = self.purse
                if purse is None or data[0] == 0x82 or purse.admit(apply_mask(data[head:], data[head - 4 : head])):
                    if purse is not None and purse.refill_due:
                        return self._refill([(Target.UPSTREAM, data)])
                    return [(Target.UPSTREAM, data)]
                # not covered: admit() counted nothing, so the general path judges it again
        try:
            chunk, frames = self._client.feed(data)
        except ProtocolViolation as violation:
            if self._held:  # what waits goes first; the violation ends the session after it
                self._held.append((violation.chunk, violation.frames))
                return self._client_violation(violation)
            return self._client_frames(violation.chunk, violation.frames) + self._client_violation(violation)
        if self._held:
            self._held.append((chunk, frames))
            return []
        return self._client_frames(chunk, frames)

    @property
    def holding(self) -> bool:
        """Client frames wait for a reservation: the shell reads no more from the client."""
        return bool(self._held)

    def _client_frames(self, chunk: bytes, frames: list[RawFrame]) -> list[Action]:
        actions: list[Action] = []
        span = None  # (start, end) of frames forwarded together
        for i, frame in enumerate(frames):
            opcode = frame.opcode
            if opcode == OP_CLOSE:
                _flush(actions, Target.UPSTREAM, chunk, span)
                span = None
                actions += self._client_close(chunk[frame.start : frame.end], wsf.payload(chunk, frame))
                continue
            if opcode <= OP_BINARY:
                self._client_active = True
            if self.client.close_received or self.phase not in _FORWARDS_CLIENT:
                continue  # after the client's close (or the gateway's), nothing more goes upstream
            if opcode <= OP_TEXT:  # text, or a continuation: what may be metered or judged
                if self.translation is not None:
                    bill = self._meter_client(chunk, frame)
                    if bill is not None:  # billed before the audio goes upstream
                        _flush(actions, Target.UPSTREAM, chunk, span)
                        span = None
                        if bill is HOLD:  # until the supervisor says the last interval was paid for
                            self._held.appendleft((chunk, frames[i:]))
                            return actions
                        actions.append((Target.BILL, bill))
                verdict = self._judge(chunk, frame) if self.purse is not None else None
                if verdict is not None:
                    _flush(actions, Target.UPSTREAM, chunk, span)
                    span = None
                    if verdict is Target.RESERVE:  # wait for the supervisor: this frame and all after it
                        self._held.appendleft((chunk, frames[i:]))  # first: later reads queue behind it
                        if not self.purse.waiting:  # else the answer to the one on its way re-judges it
                            actions.append((Target.RESERVE, self.purse.wanted()))
                        return actions
                    actions += verdict  # refused: the error event instead of the frame
                    continue
            span = (span[0] if span else frame.start, frame.end)
        _flush(actions, Target.UPSTREAM, chunk, span)
        return self._refill(actions) if self.purse is not None and self.purse.refill_due else actions

    def _refill(self, actions: list[Action]) -> list[Action]:
        """A response started: top the reservation up for the next one, off the critical path."""
        if self.purse is not None and self.purse.refill_due:
            self.purse.refill_due = False
            wanted = self.purse.refill()
            if wanted is not None:
                actions.append((Target.RESERVE, wanted))
        return actions

    def _meter_client(self, chunk: bytes, frame: RawFrame):
        """A translation session's client text frame about to go upstream: the increment that
        must be billed before it (its audio passes what is covered), or None."""
        if frame.opcode == wsf.OP_TEXT and frame.fin:
            return self.translation.client_event(wsf.payload(chunk, frame))
        if frame.opcode == wsf.OP_TEXT:
            self._translation_fragment = True
        elif not self._translation_fragment:
            return None  # the continuation of a binary message: not audio upstream takes
        elif frame.fin:
            self._translation_fragment = False
        return self.translation.fragment(frame.end - frame.payload_start)

    def billed(self, seq: int) -> list[Action]:
        """The supervisor's `Billed` for a translation session's increment `seq` (seq 0: the
        shell's deadline passed without one): held appends go on, each metered again."""
        if self.translation is None:
            return []
        self.translation.acknowledged(seq)
        actions: list[Action] = []
        while self._held:
            chunk, frames = self._held.popleft()
            waiting = len(self._held)
            actions += self._client_frames(chunk, frames)
            if len(self._held) > waiting:  # held again: past the increment it just billed
                break
        return actions

    @property
    def awaiting_billed(self) -> int | None:
        """A translation session's held audio waits for the supervisor's `Billed` of this seq."""
        return self.translation.awaiting if self.translation is not None and self._held else None

    def translation_clock(self, seconds: float) -> list[Action]:
        """(MESHRT_TRANSLATION_BILLING=wall_clock) The session has been live `seconds`: the
        increment billing its time ahead, if one is due."""
        if self.translation is None or self.phase is not Phase.OPEN:
            return []
        increment = self.translation.clock_to(seconds)
        return [(Target.BILL, increment)] if increment is not None else []

    def settle_translation(self):
        """At the session's end: the increment that bills back audio covered but not forwarded."""
        return self.translation.settle() if self.translation is not None else None

    # --- pre-authorisation ----------------------------------------------------------------

    def _judge(self, chunk: bytes, frame: RawFrame):
        """None: forward the frame. Target.RESERVE: hold it until a reservation answers. A list
        of actions: it is refused (dropped; the client gets an error event instead)."""
        purse = self.purse
        if frame.opcode == wsf.OP_CONT:
            if self._fragment is None:
                return None
            admitted = self._fragment
            if frame.fin:
                self._fragment = None
            if admitted:
                purse.count_fragment(frame.end - frame.payload_start)
                return None
            return []  # the rest of a refused message goes nowhere
        body = wsf.payload(chunk, frame)
        if frame.fin:
            admitted = purse.admit(body)
        else:  # the first fragment of a text message: judged as the worst it can be
            admitted = purse.admit_unknown()
            if admitted:
                purse.count_fragment(len(body))
                self._fragment = True
        if admitted:
            return None
        if purse.refusal is None:
            return Target.RESERVE
        if not frame.fin:
            self._fragment = False
        return self._refuse_event(body)

    def _refuse_event(self, body: bytes) -> list[Action]:
        """The in-band refusal of a client event the balance cannot cover (the session stays
        open): an `error` event naming it. Audio is refused once a spell, not once a frame."""
        is_audio = b'"input_audio_buffer.append"' in body
        if is_audio and self._refusal_told:
            return []
        self._refusal_told = True
        event_id = None if is_audio else _event_id(body)
        frame = refusal_event(self.purse.refusal, self.request_id, event_id, self.purse.refusal_detail())
        return [(Target.CLIENT, wsf.server_text_frame(frame))] if self.client.can_send else []

    def reserved(self, version: int, held: int, granted: bool, reason: str, available: int = 0) -> list[Action]:
        """The supervisor's answer to a RESERVE (or the shell's, when none came in time): the
        held frames go on, each judged again; one still not covered is refused in-band."""
        if self.purse is None or not self.purse.answered(version, held, granted, reason, available):
            return []
        if granted:
            self._refusal_told = False
        actions: list[Action] = []
        while self._held and not self.purse.waiting:
            chunk, frames = self._held.popleft()
            actions += self._client_frames(chunk, frames)
        return actions

    def retry_refused(self) -> tuple[int, int, int, int] | None:
        """While refused, the shell asks again now and then (a top-up may have landed): the
        (version, want, least, held) to send, or None when nothing is refused or one is out."""
        if self.purse is None or self.purse.refusal is None or self.purse.waiting:
            return None
        return self.purse.wanted()

    def _client_close(self, raw: bytes, body: bytes) -> list[Action]:
        if self.client.close_received:
            return []  # a second close: RFC 6455 allows one; nothing more goes upstream
        self.client.handle(LegEvent.RECEIVED_CLOSE)
        code = _close_code(body)
        if self.phase is Phase.OPEN:
            self.phase = Phase.CLIENT_CLOSING
            self._end("client_closed", code)
            return self._close_upstream_after_drain(raw)
        if self.phase is Phase.UPSTREAM_CLOSING and self.upstream.can_send:
            # the client's reply to upstream's close completes upstream's handshake too
            self.upstream.handle(LegEvent.SENT_CLOSE)
            return [(Target.UPSTREAM, raw)]
        return []  # GATEWAY_CLOSING: the client's reply to our close

    def _client_violation(self, violation: ProtocolViolation) -> list[Action]:
        if self.phase is not Phase.OPEN or not self.client.can_send:
            self.client.handle(LegEvent.VANISHED)  # already closing: no second close toward the client
            return self._close_upstream_after_drain(wsf.client_close_frame(1001, "client error"))
        if violation.close_code == 1009:
            actions = self.end("message_too_large")
            self.client.handle(LegEvent.VANISHED)  # the stream can't be resynchronised: read no more of it
            return actions
        self._end("client_closed", violation.close_code)
        self.phase = Phase.CLIENT_CLOSING
        actions = [(Target.CLIENT, wsf.server_close_frame(violation.close_code, violation.reason))]
        self.client.handle(LegEvent.SENT_CLOSE)
        self.client.handle(LegEvent.VANISHED)  # its stream is unreadable from here on
        return actions + self._close_upstream_after_drain(wsf.client_close_frame(1001, "client error"))

    def client_vanished(self) -> list[Action]:
        """The client's TCP connection ended without a close handshake."""
        if self.client.gone:
            return []
        self.client.handle(LegEvent.VANISHED)
        if self.phase is Phase.OPEN:
            self.phase = Phase.CLIENT_CLOSING
            self._end("client_closed", 1006)
            return self._close_upstream_after_drain(wsf.client_close_frame(1001, "client went away"))
        return []

    def _close_upstream_after_drain(self, close_frame: bytes) -> list[Action]:
        if not self.upstream.can_send:
            return []
        if self.responses_in_flight > 0 and not self.upstream.close_received:
            self._held_upstream_close = close_frame
            if self._upstream_can_take_injected_frame():
                return [(Target.UPSTREAM, wsf.client_text_frame(_CANCEL))]
            return []
        self.upstream.handle(LegEvent.SENT_CLOSE)
        return [(Target.UPSTREAM, close_frame)]

    def _upstream_can_take_injected_frame(self) -> bool:
        return not self._client.in_message

    def drain_expired(self) -> list[Action]:
        """The bounded wait for cancelled responses' usage is over: close upstream now."""
        return self._release_held_close()

    def _release_held_close(self) -> list[Action]:
        held, self._held_upstream_close = self._held_upstream_close, None
        if held is None or not self.upstream.can_send:
            return []
        self.upstream.handle(LegEvent.SENT_CLOSE)
        return [(Target.UPSTREAM, held)]

    @property
    def draining(self) -> bool:
        return self._held_upstream_close is not None

    # --- upstream -> client ---------------------------------------------------------------

    def from_upstream(self, data: bytes) -> list[Action]:
        if self.upstream.gone:
            return []
        head = self._upstream.whole(data)
        if head:  # one whole data frame, the usual read: what _upstream_frames does with it, in fewer steps
            actions: list[Action] = []
            deliver = self.client.can_send
            if data[0] == 0x81:
                bill = self._meter_message(data[head:])
                if bill is not None:
                    actions.append((Target.BILL, bill))
            if deliver:
                actions.append((Target.CLIENT, data))
            return self._after_upstream(actions)
        try:
            chunk, frames = self._upstream.feed(data)
        except ProtocolViolation as violation:
            return self._upstream_frames(violation.chunk, violation.frames) + self._upstream_violation(violation)
        return self._upstream_frames(chunk, frames)

    def _upstream_frames(self, chunk: bytes, frames: list[RawFrame]) -> list[Action]:
        actions: list[Action] = []
        span = None
        deliver = self.client.can_send
        for frame in frames:
            if frame.opcode == wsf.OP_CLOSE:
                _flush(actions, Target.CLIENT, chunk, span)
                span = None
                actions += self._upstream_close(chunk[frame.start : frame.end], chunk[frame.payload_start : frame.end])
                deliver = False
                continue
            if frame.opcode != wsf.OP_BINARY:
                bill = self._meter_frame(chunk, frame)
                if bill is not None:
                    _flush(actions, Target.CLIENT, chunk, span)
                    span = None
                    actions.append((Target.BILL, bill))
            if deliver:
                span = (span[0] if span else frame.start, frame.end)
            if self._withhold:  # frames after the one that announced an unpriced model
                deliver = False
        _flush(actions, Target.CLIENT, chunk, span)
        return self._after_upstream(actions)

    def _after_upstream(self, actions: list[Action]) -> list[Action]:
        """What upstream's frames decided, once they are relayed: an end, the held close, a top-up."""
        if self._pending_end and self.phase is Phase.OPEN:
            code, self._pending_end = self._pending_end, None
            detail, self._pending_detail = self._pending_detail, None
            actions += self.end(code, detail)
        if self._held_upstream_close is not None and self.responses_in_flight == 0:  # (draining)
            actions += self._release_held_close()
        return self._refill(actions) if self.purse is not None and self.purse.refill_due else actions

    def _meter_frame(self, chunk: bytes, frame: RawFrame):
        """Track responses in flight and meter usage; returns an increment to bill, or None."""
        if frame.opcode == wsf.OP_TEXT and frame.fin:
            body = chunk[frame.payload_start : frame.end]
        elif frame.opcode == wsf.OP_TEXT:  # a fragmented text message: rare, so always reassemble
            self._usage_fragments = [chunk[frame.payload_start : frame.end]]  # (its first fragment
            return None  # may be too short to tell what it is); billed before the last fragment
        elif frame.opcode == wsf.OP_CONT and self._usage_fragments is not None:
            self._usage_fragments.append(chunk[frame.payload_start : frame.end])
            if not frame.fin:
                return None
            body, self._usage_fragments = b"".join(self._usage_fragments), None
        else:
            return None
        return self._meter_message(body)

    def _meter_message(self, body: bytes):
        """One whole upstream text message: track responses in flight and meter usage."""
        head = body[:80]
        if b'"response.created"' in head:
            self.responses_in_flight += 1
            if self.purse is not None:
                self.purse.response_created()
            return None
        if self.translation is not None and b'"session.' in head:
            self._tell_translation(body)
        done = b'"response.done"' in head
        if done:
            self.responses_in_flight = max(0, self.responses_in_flight - 1)
        elif self.purse is not None and (
            b'"error"' in head or b'"session.' in head or b'"transcription_session.' in head
        ):
            self._tell_purse(body)
        if self.meter is None or not self.may_carry_usage(body):
            if done and self.purse is not None:
                self.purse.response_done(None)
            return None
        increment = self.meter.observe(body)
        if increment is not None and self.meter.total_tokens >= self.token_cap:
            self._pending_end = "session_token_cap_exceeded"
        refused = getattr(self.meter, "refused_model", None)
        if refused is not None and not self._withhold:
            # a transcription session billed at a model with no price: ended before any
            # transcription of it reaches the client (docs/billing.md, Transcription sessions)
            self._withhold = True
            self._pending_end = "model_not_found"
            self._pending_detail = (
                f"This transcription session's model is not priced here. {model_detail(refused)} "
                "Set audio.input.transcription.model to a transcription model of GET /v1/models."
            )
        if done and self.purse is not None:
            output = increment.usage.get("output_tokens") if increment is not None else None
            self.purse.response_done(output if isinstance(output, int) else None)
            settle = self.purse.settle()
            if settle is not None and increment is not None:
                self.settles[increment.seq] = settle
        return increment

    def _tell_translation(self, body: bytes) -> None:
        """Upstream's session events set the input format a translation session's audio is
        counted in."""
        try:
            event = json.loads(body)
        except (ValueError, RecursionError):
            return
        if isinstance(event, dict) and event.get("type") in ("session.created", "session.updated"):
            self.translation.session_event(event["type"], event.get("session"))

    def _tell_purse(self, body: bytes) -> None:
        """Upstream events that change what responses may cost: the session's settings, and a
        refused response.create (its reservation is no longer needed)."""
        try:
            event = json.loads(body)
        except (ValueError, RecursionError):
            return
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        session = event.get("session")
        if kind in ("session.created", "session.updated") and isinstance(session, dict):
            self.purse.session_event(session)
            if session.get("type") == "transcription":
                self.purse.auto_response = False  # a transcription session has no responses
            elif kind == "session.created":
                self.purse.refill_due = True  # reserve for the first response before it is asked for
        elif kind in ("transcription_session.created", "transcription_session.updated"):
            self.purse.auto_response = False
        elif kind == "error" and isinstance(event.get("error"), dict):
            event_id = event["error"].get("event_id")
            self.purse.response_failed(event_id if isinstance(event_id, str) else None)

    def _upstream_close(self, raw: bytes, body: bytes) -> list[Action]:
        self.upstream.handle(LegEvent.RECEIVED_CLOSE)
        if self.phase is Phase.OPEN:
            self.phase = Phase.UPSTREAM_CLOSING
            self._end("upstream_closed", _close_code(body))
            if self.client.gone and self.upstream.can_send:  # no client to reply: the gateway does
                self.upstream.handle(LegEvent.SENT_CLOSE)
                return [(Target.UPSTREAM, wsf.client_close_frame(1000))]
            if not self.client.can_send:
                return []
            self.client.handle(LegEvent.SENT_CLOSE)
            return [(Target.CLIENT, raw)]
        if self.phase is Phase.CLIENT_CLOSING and self.client.can_send:
            # upstream's reply to the client's close completes the client's handshake
            self.client.handle(LegEvent.SENT_CLOSE)
            return [(Target.CLIENT, raw)]
        return []

    def _upstream_violation(self, violation: ProtocolViolation) -> list[Action]:
        actions = self.end("upstream_error")
        self.upstream.handle(LegEvent.VANISHED)
        return actions

    def upstream_vanished(self) -> list[Action]:
        """Upstream's TCP connection ended. Without a close frame first, that's an outage."""
        if self.upstream.gone:
            return []
        self.upstream.handle(LegEvent.VANISHED)
        self._held_upstream_close = None
        self.responses_in_flight = 0
        if self.phase is Phase.OPEN:
            return self.end("upstream_unavailable")
        if self.client.can_send:
            self.client.handle(LegEvent.SENT_CLOSE)
            return [(Target.CLIENT, wsf.server_close_frame(1001, "upstream went away"))]
        return []

    # --- the gateway's own ending ---------------------------------------------------------

    def end(self, code: str, detail: str | None = None) -> list[Action]:
        """End the session with an error code from ERRORS: error frame + close to the client,
        `response.cancel` then close (after the drain) to upstream."""
        if self.phase is not Phase.OPEN:
            return []
        spec = ERRORS[code]
        self.phase = Phase.GATEWAY_CLOSING
        if self.translation is not None:
            self._held.clear()  # audio waiting for a Billed goes nowhere now: read the client's close
        self._end(code, spec.close_code)
        actions: list[Action] = []
        if self.client.can_send:
            if not self._upstream.in_message:  # never split a message that is half delivered
                actions.append((Target.CLIENT, wsf.server_text_frame(error_event(code, self.request_id, detail))))
            actions.append((Target.CLIENT, wsf.server_close_frame(spec.close_code, spec.close_reason)))
            self.client.handle(LegEvent.SENT_CLOSE)
        return actions + self._close_upstream_after_drain(wsf.client_close_frame(1000))


def _flush(actions: list[Action], target: Target, chunk: bytes, span) -> None:
    if span is not None:
        start, end = span
        actions.append((target, chunk if (start == 0 and end == len(chunk)) else chunk[start:end]))


def _event_id(body: bytes) -> str | None:
    try:
        event = json.loads(body)
    except (ValueError, RecursionError):
        return None
    value = event.get("event_id") if isinstance(event, dict) else None
    return value if isinstance(value, str) else None


def _close_code(body: bytes) -> int:
    if len(body) >= 2:
        return int.from_bytes(body[:2], "big")
    return 1005
