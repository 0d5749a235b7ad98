"""Pre-authorisation, sans-I/O: what a session's responses may still cost, and whether the
reservation its worker holds covers it.

A response may start only while the session holds, in its account's balance, what that
response and every other one in flight may cost at most (docs/billing.md, Pre-authorised
responses). A response's bound is

    input bound × the model's highest input rate + output cap × its highest output rate

where the output cap is the response's `max_output_tokens` (else the session's), never more
than the worker's configured cap, and the input bound is an upper bound of the tokens the
conversation can hold: the session's instructions and tools at one token per byte, every client
event at one token per byte except input audio (its duration at the session's audio format,
INPUT_AUDIO_TOKENS_PER_S), and every response's output tokens (they re-enter as input). Byte
counts over-estimate text (a token is at least one byte), so the bound holds; it is a
reservation, settled to the exact cost when the response is done.

Which client events can start a response: `response.create`, and, while the session creates
responses by itself (turn detection with `create_response`), `input_audio_buffer.append` (the
audio that voice-activity detection turns into a response). Only those are judged before they
are forwarded; the relay parses no other client event.

`Purse` keeps the numbers; the relay asks `admit(payload)` for each whole client text message
and tells it what upstream said (`response_created`, `response_done`, `session_event`). When a
message is not covered, `admit` returns False without changing anything, and the relay holds
the message until the supervisor answers the reservation `wanted()` asks for.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from meshrt.shared.money import Money
from meshrt.shared.pricing import MODALITIES
from meshrt.shared.pricing import ModelRates

INPUT_AUDIO_TOKENS_PER_S = 10  # OpenAI bills user audio at one token per 100 ms
UNKNOWN_AUDIO_BYTES_PER_S = 8_000  # G.711: the fewest bytes per second, so the most tokens per byte
HEADROOM_AUDIO_S = 30  # a reservation grows ahead by this much audio, so it is not asked per frame

_APPEND = b'"input_audio_buffer.append"'
_TYPE = b'"type"'
_COMPACT_APPEND = b'{"type":"input_audio_buffer.append","audio":"'  # then the audio, then `"}`
_APPEND_VALUE = re.compile(rb'\s*:\s*"input_audio_buffer\.append"')  # matched right after `"type"`
_CREATE = b'"response.create"'
_AUDIO_KEY = b'"audio"'
_ESCAPE = b"\\"
_DETECTION = b"turn_detection"


def _max_rate(rates: ModelRates, field_name: str) -> int:
    found = [getattr(rates.tokens(m), field_name) for m in MODALITIES]
    return max((rate.picodollars for rate in found if rate is not None), default=0)


def _audio_bytes_per_s(session: dict[str, Any]) -> int:
    """Bytes per second of the session's input audio (GA `audio.input.format`, beta
    `input_audio_format`); the densest-in-tokens guess when it cannot be told."""
    audio = session.get("audio")
    fmt = (
        audio.get("input", {}).get("format")
        if isinstance(audio, dict) and isinstance(audio.get("input"), dict)
        else None
    )
    if fmt is None:
        fmt = session.get("input_audio_format")
    if isinstance(fmt, dict):
        kind, rate = fmt.get("type"), fmt.get("rate", 24_000)
        if kind == "audio/pcm" and isinstance(rate, int) and rate >= 8_000:
            return rate * 2  # 16-bit mono
        return UNKNOWN_AUDIO_BYTES_PER_S
    return 48_000 if fmt == "pcm16" else UNKNOWN_AUDIO_BYTES_PER_S


def _output_limit(value: object) -> int | None:
    """A `max_output_tokens` value: an int, or None for "inf" / absent / unreadable."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


@dataclass
class Purse:
    """One session's pre-authorisation state. All amounts are picodollars; token counts ints."""

    input_rate: int  # the model's highest input rate per token
    output_rate: int  # its highest output rate per token
    output_cap: int  # the most output tokens a response is reserved for
    held: int = 0  # granted by the database for this session
    version: int = 0  # the number of the last reservation change sent
    waiting: bool = False  # a Reserve is on its way; the relay holds the client's events
    refusal: str | None = None  # the last Reserve was refused: the code events are refused with
    auto_response: bool = True  # until upstream tells the session's turn detection
    session_output: int | None = None  # the session's max_output_tokens; None: inf
    audio_bytes_per_s: int = UNKNOWN_AUDIO_BYTES_PER_S
    session_tokens: int = 0  # instructions and tools, at a token per byte
    conversation_tokens: int = 0  # what clients added and responses produced
    in_flight: list[int] = field(default_factory=list)  # bounds of responses started or asked for
    requested: list[str | None] = field(default_factory=list)  # event ids of forwarded response.create
    available: int | None = None  # the account's unreserved balance, as last answered
    refill_due: bool = False  # a response started: the reservation may need topping up
    _blocked: int = 0  # what the message being held needs held
    transcription_only: bool = False  # `?intent=transcription`: no responses, never auto_response
    session_seen: bool = False  # upstream has told the session's settings (session.created/updated)
    # A WebRTC call's purse: nothing can be held back, so every top-up must cover the responses
    # in flight and the next one, or it is refused (and the call ended: worker/call.py)
    one_ahead: bool = False

    @classmethod
    def for_rates(cls, rates: ModelRates, output_cap: int, transcription_only: bool = False) -> Purse:
        """`transcription_only`: a transcription session's purse, which holds nothing for its
        audio from the start (not only once upstream's session.created says so)."""
        purse = cls(_max_rate(rates, "input"), _max_rate(rates, "output"), output_cap)
        if transcription_only:
            purse.transcription_only, purse.auto_response = True, False
        return purse

    # --- bounds -------------------------------------------------------------------------

    def bound(self, max_output: int | None = None) -> int:
        """What one response starting now may cost at most. `max_output`: the response's own
        limit, which replaces the session's (as on OpenAI, even when higher); None: the session's."""
        limit = max_output if max_output is not None else self.session_output
        cap = self.output_cap if limit is None else min(limit, self.output_cap)
        return (self.session_tokens + self.conversation_tokens) * self.input_rate + cap * self.output_rate

    def need(self, extra: int = 0) -> int:
        """What the session must hold: every response in flight, the next one it creates by
        itself (if it does), and `extra`."""
        return sum(self.in_flight) + (self.bound() if self.auto_response else 0) + extra

    def audio_tokens(self, n_bytes: int) -> int:
        """Tokens of a base64 audio string of `n_bytes` at the session's format, rounded up."""
        return -(-(n_bytes * 3 // 4) * INPUT_AUDIO_TOKENS_PER_S // self.audio_bytes_per_s)

    @property
    def free(self) -> bool:
        """Nothing to hold: a model with no token rates (a transcription model) is not reserved."""
        return self.input_rate == 0 and self.output_rate == 0

    # --- client events ------------------------------------------------------------------

    def admit(self, payload: bytes) -> bool:
        """Whether a whole client text message may go upstream now. True: it is counted (the
        caller forwards it). False: the session must hold more first; nothing was counted."""
        if self.free:
            return True
        if _is_append(payload):  # 50 a second in a voice session: told first, without a parse
            return self._admit_append(self.audio_tokens(len(payload)))
        event = None
        if _CREATE not in payload and _AUDIO_KEY not in payload and _ESCAPE not in payload:
            kind, tokens = None, len(payload)  # most events: a token per byte, no parse
        else:  # (an escape may spell any name: `"response\u002ecreate"` is a response.create)
            event = _parse(payload)
            kind, tokens = event.get("type"), self._event_tokens(event, payload)
        if kind == "input_audio_buffer.append":
            return self._admit_append(tokens)
        may_detect = _DETECTION in payload or (kind == "session.update" and _ESCAPE in payload)
        if may_detect and not self.transcription_only:
            # it may turn automatic responses on: assume so until upstream's session.updated says
            # (a transcription session's turn detection commits audio and never starts a response)
            self.auto_response = True
        if kind != "response.create":
            self.conversation_tokens += tokens
            return True
        params = event.get("response") if isinstance(event.get("response"), dict) else {}
        given = params.get("max_output_tokens", params.get("max_response_output_tokens"))
        # the response's own limit replaces the session's; its "inf" means the cap, not the session's
        max_output = None if given is None else (_output_limit(given) or self.output_cap)
        self.conversation_tokens += tokens  # its own instructions and input count for it
        bound = self.bound(max_output)
        if self.need(extra=bound) > self.held:
            self.conversation_tokens -= tokens
            return self._block(self.need(extra=bound + tokens * self.input_rate))
        self.in_flight.append(bound)
        self.refill_due = True
        event_id = event.get("event_id")
        self.requested.append(event_id if isinstance(event_id, str) else None)
        return True

    def _admit_append(self, tokens: int) -> bool:
        """An input_audio_buffer.append of `tokens`: it may start a response while the session
        creates them by itself (turn detection), so then it must be covered."""
        self.conversation_tokens += tokens
        if self.auto_response and self.need() > self.held:
            self.conversation_tokens -= tokens
            return self._block(self.need(extra=tokens * self.input_rate))
        return True

    def admit_unknown(self) -> bool:
        """A fragmented text message, judged at its first fragment: as if it were a
        response.create with no output limit (the worst it can be)."""
        if self.free:
            return True
        if self.need(extra=self.bound()) > self.held:
            return self._block(self.need(extra=self.bound()))
        return True

    def count_fragment(self, n_bytes: int) -> None:
        """A fragment of a message admitted by `admit_unknown`: text at a token per byte."""
        self.conversation_tokens += n_bytes

    def _block(self, needed: int) -> bool:
        self._blocked = needed
        return False

    def _event_tokens(self, event: dict[str, Any], payload: bytes) -> int:
        """A client event's tokens: a token per byte, but audio inside it at its duration."""
        audio = list(_audio_strings(event))
        audio_bytes = sum(len(a) for a in audio)
        return len(payload) - audio_bytes + sum(self.audio_tokens(len(a)) for a in audio)

    # --- the reservation ----------------------------------------------------------------

    def wanted(self) -> tuple[int, int, int, int]:
        """(version, want, least, held) of the Reserve the held message needs: at least that,
        and room ahead — one more response and more audio — so the next response starts without
        waiting for the database, and audio is not asked for frame by frame."""
        self.version += 1
        self.waiting = True
        least = max(self._blocked, self.need())
        return self.version, least + self.headroom(), least, self.held

    def headroom(self) -> int:
        return self.bound() + HEADROOM_AUDIO_S * INPUT_AUDIO_TOKENS_PER_S * self.input_rate

    def refill(self) -> tuple[int, int, int, int] | None:
        """After a response started: if what is left for the next one runs short, the Reserve
        (version, want, least, held) that tops it up, asked while nothing waits on it."""
        if self.free or self.waiting or self.refusal is not None:
            return None
        need = self.need()
        if self.held >= need + self.bound():
            return None
        self.version += 1
        self.waiting = True
        self._blocked = need
        least = need + self.bound() if self.one_ahead else min(need, self.held)
        return self.version, need + self.headroom(), least, self.held

    def answered(self, version: int, held: int, granted: bool, reason: str, available: int = 0) -> bool:
        """The supervisor's answer to `wanted()`; False when it is not the awaited one."""
        if not self.waiting or version != self.version:
            return False
        self.waiting = False
        if held >= 0:
            self.held = held
            self.available = available
        self.refusal = None if granted else (reason or "insufficient_quota")
        return True

    def refusal_detail(self) -> str:
        """What a refused event needed, for its error message (amounts in USD)."""
        needed = Money(max(0, self._blocked - self.held)).display()
        if self.refusal == "insufficient_quota" and self.available is not None:
            return f"It needs {needed} more reserved; {Money(max(0, self.available)).display()} is available."
        return f"It needs {needed} more reserved."

    def settle(self) -> tuple[int, int] | None:
        """After a response is done: (version, amount) to lower the reservation to, carried by
        that response's increment; None when there is nothing worth releasing or a Reserve is
        on its way (its absolute amount would race the release)."""
        if self.waiting:
            return None
        keep = self.need() + self.headroom()
        if self.held <= keep:
            return None
        self.version += 1
        self.held = keep
        return self.version, keep

    # --- upstream events ----------------------------------------------------------------

    def response_created(self) -> None:
        if self.requested:
            self.requested.pop(0)  # one the client asked for: its bound is in flight already
        else:
            self.in_flight.append(self.bound())  # one the session created by itself
            self.refill_due = True

    def response_done(self, output_tokens: int | None) -> None:
        if self.in_flight:
            self.in_flight.remove(min(self.in_flight))  # the smallest: what stays held is never less
        self.conversation_tokens += output_tokens if output_tokens is not None else self.output_cap

    def response_failed(self, event_id: str | None) -> None:
        """Upstream refused a response.create (an `error` event): it will not start."""
        if event_id in self.requested:
            self.requested.remove(event_id)
            if self.in_flight:
                self.in_flight.remove(max(self.in_flight))

    def session_event(self, session: dict[str, Any]) -> None:
        """session.created / session.updated: the turn detection, output limit and audio format
        in force, and the instructions and tools every response reads."""
        self.session_seen = True
        audio = session.get("audio")
        audio_input = audio.get("input") if isinstance(audio, dict) else None
        if isinstance(audio_input, dict) and "turn_detection" in audio_input:
            detection = audio_input["turn_detection"]
        else:
            detection = session.get("turn_detection", "unknown")
        if detection != "unknown":
            self.auto_response = isinstance(detection, dict) and detection.get("create_response", True) is not False
        limit = session.get("max_output_tokens", session.get("max_response_output_tokens", "unknown"))
        if limit != "unknown":
            self.session_output = _output_limit(limit)
        if isinstance(audio_input, dict) and "format" in audio_input or "input_audio_format" in session:
            self.audio_bytes_per_s = _audio_bytes_per_s(session)
        self.session_tokens = len(json.dumps([session.get("instructions"), session.get("tools")]).encode())
        if self.transcription_only:  # its turn detection commits audio; it creates no response
            self.auto_response = False


def _is_append(payload: bytes) -> bool:
    """An `input_audio_buffer.append` event, told without parsing or scanning its audio twice:
    the `"audio"` string is skipped (base64 has no quotes; memchr finds its end), and what is
    left must hold one `"type"` key, whose value is that name, and no escape (which may spell
    any name: `"response\u002ecreate"`)."""
    if payload.startswith(_COMPACT_APPEND) and payload.endswith(b'"}'):
        # the usual shape, as clients serialise it: the same answer in two memchr calls
        return payload.find(b'"', len(_COMPACT_APPEND)) == len(payload) - 2
    key = payload.find(_AUDIO_KEY)
    if key < 0:
        return False
    start = payload.find(b'"', key + len(_AUDIO_KEY))
    end = payload.find(b'"', start + 1) if start > 0 else -1
    if end < 0 or payload[key + len(_AUDIO_KEY) : start].strip() != b":":
        return False
    rest = payload[:start] + payload[end:]
    if _ESCAPE in rest or rest.count(_TYPE) != 1:
        return False
    return _APPEND_VALUE.match(rest, rest.find(_TYPE) + len(_TYPE)) is not None


def _parse(payload: bytes) -> dict[str, Any]:
    try:
        event = json.loads(payload)
    except (ValueError, RecursionError):
        return {}  # upstream answers it with an error; counted at a token per byte
    return event if isinstance(event, dict) else {}


def _audio_strings(value: Any, key: str = ""):
    """The base64 audio strings inside a client event (`audio` fields, at any depth)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _audio_strings(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _audio_strings(v, key)
    elif isinstance(value, str) and key == "audio":
        yield value
