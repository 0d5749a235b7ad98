"""Translation sessions' metering, sans-I/O: the client's input audio in, increments out.

A translation session (`/v1/realtime/translations?model=…`) has no usage events upstream; meshrt
meters the audio its client sends, from each `session.input_audio_buffer.append` event (and,
beside it, the realtime API's `input_audio_buffer.append`): decoded bytes ÷ the input format's
byte rate, priced per minute (docs/billing.md, Translation sessions).

Audio is counted in ticks of 1/48 000 s (TICKS_PER_SECOND): one byte of PCM16 at 24 kHz mono, a
sixth of a byte of G.711 (8 kHz, one byte a sample), so the seconds of any append are an exact
whole number of ticks. The session's cumulative ticks are billed ahead, before the audio goes
upstream: when an append would pass what increments already cover, one increment covers it and
`bill_ahead_ticks` more (MESHRT_TRANSLATION_BILL_AHEAD_S), so most appends are forwarded with
no increment at all. An append past what is covered waits (`HOLD`; the relay holds the client's
frames) while the previous increment is not yet acknowledged by the supervisor
(`control.Billed`: counted, and the account's estimate is not past zero), or until the shell's
deadline of one interval: so audio runs at most one interval ahead of what the account was
known to pay for, however fast a client sends. When the session ends, `settle()` bills the difference between what was
covered and what was forwarded (a negative increment), so the record is the audio forwarded.
With MESHRT_TRANSLATION_BILLING=wall_clock the session's time since it went live is billed
ahead the same way (the shell calls `clock_to` once per bill-ahead interval) when it is more
than the audio sent.

The one rounding: the cost of the cumulative ticks `t` is `round_half_up(rate × t / (60 ×
TICKS_PER_SECOND))` picodollars, and an increment covering ticks `a` to `b` costs `C(b) − C(a)`:
a session's total is rounded once, at its total audio, however it was batched.

`append_audio_bytes` finds the `"audio"` string without parsing the JSON (as preauth's
`_is_append` does): base64 has no quotes or backslashes, so memchr finds its end; anything else
(an escape, a second `"audio"` key) is parsed in full.
"""

from __future__ import annotations

import json
import re
from typing import Any

from meshrt.shared.increments import AUDIO_TICKS_PER_SECOND
from meshrt.shared.increments import Increment
from meshrt.shared.increments import IncrementKind
from meshrt.shared.money import Money

from .meter import Bill

TICKS_PER_SECOND = AUDIO_TICKS_PER_SECOND
PCM16_TICKS_PER_BYTE = 1  # 24 kHz, 2 bytes a sample: 48 000 bytes/s
G711_TICKS_PER_BYTE = 6  # 8 kHz, 1 byte a sample: 8 000 bytes/s
CATEGORY = "translation_audio_input"
APPEND_TYPES = ("session.input_audio_buffer.append", "input_audio_buffer.append")

_AUDIO_KEY = b'"audio"'
_TYPE = b'"type"'
_ESCAPE = b"\\"
_APPEND_VALUE = re.compile(rb'\s*:\s*"(?:session\.)?input_audio_buffer\.append"')
_APPEND_MARK = b'input_audio_buffer.append"'
_B64_PAD = ord("=")
HOLD = "hold"  # client_event's answer for an append that must wait for the supervisor's Billed


def ticks_per_byte(session: object) -> int | None:
    """Ticks per byte of a session config's input audio format (GA `audio.input.format`, beta
    `input_audio_format`); None when the config names none. PCM at a rate that is no divisor
    of 24 kHz counts as G.711 (the most seconds per byte: never under-billed)."""
    if not isinstance(session, dict):
        return None
    audio = session.get("audio")
    audio_in = audio.get("input") if isinstance(audio, dict) else None
    fmt = audio_in.get("format") if isinstance(audio_in, dict) else None
    if fmt is None:
        fmt = session.get("input_audio_format")
    if fmt is None:
        return None
    if isinstance(fmt, dict):
        kind, rate = fmt.get("type"), fmt.get("rate", 24_000)
        if kind == "audio/pcm":
            if isinstance(rate, int) and not isinstance(rate, bool) and rate > 0 and 24_000 % rate == 0:
                return 24_000 // rate  # 16-bit mono: 2 × rate bytes a second
            return G711_TICKS_PER_BYTE
        return G711_TICKS_PER_BYTE  # audio/pcmu, audio/pcma, or unknown
    return PCM16_TICKS_PER_BYTE if fmt == "pcm16" else G711_TICKS_PER_BYTE


def decoded_length(n_chars: int, pad: int) -> int:
    """Bytes that `n_chars` of base64 (`pad` of them `=`) decode to."""
    return (n_chars - pad) * 3 // 4


def append_audio_bytes(payload: bytes) -> int | None:
    """The decoded length of the audio of an append event, or None if `payload` is not one.
    Fast path: one `"audio"` key, its string skipped by memchr, one `"type"` key naming an
    append, no escape outside the audio; else (rare) the event is parsed."""
    key = payload.find(_AUDIO_KEY)
    if key >= 0:
        start = payload.find(b'"', key + len(_AUDIO_KEY))
        end = payload.find(b'"', start + 1) if start > 0 else -1
        if end > 0 and payload[key + len(_AUDIO_KEY) : start].strip() == b":":
            rest_head, rest_tail = payload[:key], payload[end:]
            if (
                _ESCAPE not in rest_head
                and _ESCAPE not in rest_tail
                and _AUDIO_KEY not in rest_tail
                and payload.find(_ESCAPE, start, end) < 0
            ):
                rest = rest_head + rest_tail
                if rest.count(_TYPE) == 1:
                    if _APPEND_VALUE.match(rest, rest.find(_TYPE) + len(_TYPE)) is None:
                        return None
                    pad = (payload[end - 1] == _B64_PAD) + (payload[end - 2] == _B64_PAD)
                    return decoded_length(end - start - 1, pad)
    if _APPEND_MARK not in payload and _ESCAPE not in payload:
        return None  # no append can be spelled without its name or an escape
    return _parsed_audio_bytes(payload)


def _parsed_audio_bytes(payload: bytes) -> int | None:
    try:
        event = json.loads(payload)
    except (ValueError, RecursionError):
        return None  # upstream refuses it: no audio goes into the buffer
    if not isinstance(event, dict) or event.get("type") not in APPEND_TYPES:
        return None
    audio = event.get("audio")
    if not isinstance(audio, str):
        return 0
    stripped = audio.rstrip("=")
    return decoded_length(len(audio), len(audio) - len(stripped))


def audio_cost(per_minute: Money, ticks: int) -> Money:
    """The cost of `ticks` of audio from the session's start: rate × ticks / (60 × 48 000),
    rounded half up (away from zero) to the picodollar."""
    numerator, denominator = per_minute.picodollars * ticks, 60 * TICKS_PER_SECOND
    rounded = (2 * abs(numerator) + denominator) // (2 * denominator)  # ⌊|n|/d + ½⌋, in integers
    return Money(rounded if numerator >= 0 else -rounded)


def bill_audio(per_minute: Money | None, usage: dict[str, Any]) -> Bill:
    """An audio increment's bill from its usage (`ticks_from`, `ticks_to`): the worker's and the
    supervisor's (`session_meter.bill_again`) by the same rule."""
    start, end = usage.get("ticks_from"), usage.get("ticks_to")
    if per_minute is None or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (start, end)):
        return Bill(Money.ZERO, {}, 0, True)
    cost = audio_cost(per_minute, end) - audio_cost(per_minute, start)
    return Bill(cost, {CATEGORY: cost}, 0, False)


class TranslationMeter:
    """One translation session's audio account: ticks forwarded and ticks covered by increments
    (seq numbers shared with the session's Meter, so a session's increments stay 1, 2, 3…)."""

    def __init__(self, meter, model: str, per_minute: Money, bill_ahead_ticks: int, by_clock: bool = False):
        self.meter = meter  # worker.meter.Meter: numbers increments
        self.model = model
        self.per_minute = per_minute
        self.bill_ahead_ticks = max(0, bill_ahead_ticks)
        # MESHRT_TRANSLATION_BILLING=wall_clock: bill the session's wall-clock time since it went
        # live, or the audio sent when that is more (docs/billing.md, Translation sessions)
        self.by_clock = by_clock
        self.clock = 0  # ticks of wall-clock time since the session went live (by_clock)
        self.announced = PCM16_TICKS_PER_BYTE  # upstream's format (default: 24 kHz PCM16 mono)
        self.requested: int | None = None  # a client's session.update not yet answered
        self.ticks_per_byte = PCM16_TICKS_PER_BYTE
        self.forwarded = 0  # ticks of audio forwarded upstream (or about to be, in this batch)
        self.covered = 0  # ticks billed by increments issued
        self.appends = 0
        self.audio_bytes = 0
        # the seq of the last increment the supervisor has not yet said the account could pay
        # (control.Billed): audio past what is covered waits for it (`HOLD`)
        self.awaiting: int | None = None

    def client_event(self, payload: bytes) -> Increment | None:
        """A whole client text message about to go upstream: an append counts its audio and
        returns the increment that must be billed before it (None: already covered)."""
        n_bytes = append_audio_bytes(payload)
        if n_bytes is None:
            if b"session.update" in payload or _ESCAPE in payload:
                self._client_update(payload)
            return None
        ticks = n_bytes * self.ticks_per_byte
        if self.awaiting is not None and max(self.forwarded + ticks, self.clock) > self.covered:
            return HOLD  # nothing counted: the relay holds it and asks again once answered
        self.appends += 1
        self.audio_bytes += n_bytes
        return self._forward(ticks)

    def acknowledged(self, seq: int) -> None:
        """The supervisor counted increment `seq` and the account could pay (control.Billed);
        or, with seq 0, no answer came in time (the shell's deadline): audio may go on."""
        if self.awaiting is not None and (seq == 0 or seq >= self.awaiting):
            self.awaiting = None

    def fragment(self, n_payload_bytes: int) -> Increment | None:
        """A fragment of a fragmented client text message (rare): billed as if all of it were
        base64 audio, the most it can hold (docs/billing.md)."""
        return self._forward(-(-n_payload_bytes * 3 // 4) * self.ticks_per_byte)

    @property
    def basis(self) -> int:
        """What the session owes so far, in ticks: the audio forwarded, or (by_clock) its
        wall-clock time when that is more."""
        return max(self.forwarded, self.clock) if self.by_clock else self.forwarded

    def _forward(self, ticks: int) -> Increment | None:
        self.forwarded += ticks
        if self.basis <= self.covered:
            return None
        return self._issue(self.basis + self.bill_ahead_ticks)

    def clock_to(self, seconds: float, bill: bool = True) -> Increment | None:
        """(by_clock) The session has been live `seconds`: bill its time ahead before it is
        spent, so increments cover the clock until the next call (one `bill_ahead` later)."""
        if not self.by_clock:
            return None
        self.clock = max(self.clock, int(seconds * TICKS_PER_SECOND))
        if not bill or self.covered >= self.clock + self.bill_ahead_ticks:
            return None
        return self._issue(max(self.basis, self.clock + 2 * self.bill_ahead_ticks))

    def _client_update(self, payload: bytes) -> None:
        """A client's session.update that sets the input format applies to the appends after
        it (upstream handles a session's events in order)."""
        try:
            event = json.loads(payload)
        except (ValueError, RecursionError):
            return
        if isinstance(event, dict) and event.get("type") == "session.update":
            found = ticks_per_byte(event.get("session"))
            if found is not None:
                self.requested = found
                self._rate()

    def session_event(self, kind: object, session: object) -> None:
        """Upstream's session.created / session.updated: the format it applies. Until upstream
        answers a client's format change, appends count at the denser of the two (never less
        than upstream may take them for)."""
        found = ticks_per_byte(session)
        if found is not None:
            self.announced = found
        if kind == "session.updated":
            self.requested = None
        self._rate()

    def _rate(self) -> None:
        self.ticks_per_byte = max(self.announced, self.requested or 0)

    def settle(self) -> Increment | None:
        """At the end: bill what was covered but not forwarded back (a negative increment)."""
        if self.covered == self.basis:
            return None
        return self._issue(self.basis)

    def _issue(self, to: int) -> Increment:
        usage = {"type": "audio", "ticks_from": self.covered, "ticks_to": to, "ticks_per_second": TICKS_PER_SECOND}
        bill = bill_audio(self.per_minute, usage)
        self.meter._seq += 1
        if to > self.covered:
            self.awaiting = self.meter._seq
        self.covered = to
        return Increment(
            seq=self.meter._seq,
            kind=IncrementKind.AUDIO,
            model=self.model,
            usage=usage,
            cost=bill.cost,
            by_category=bill.by_category,
            total_tokens=0,
        )


def build_translation_meter(meter, bill_ahead_s: float, billing: str = "audio") -> TranslationMeter:
    """The audio meter of a translation session whose Meter has its model's (per-minute) rates;
    `billing` is MESHRT_TRANSLATION_BILLING (`audio` or `wall_clock`)."""
    rates = meter.rates
    ahead = round(bill_ahead_s * TICKS_PER_SECOND)
    return TranslationMeter(meter, rates.model, rates.per_minute, ahead, by_clock=billing == "wall_clock")
