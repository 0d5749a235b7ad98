"""OpenAI Realtime upstream simulator (``meshrt sim``, SPEC §8).

A small WebSocket server that speaks the OpenAI Realtime protocol closely enough
that the official ``openai`` SDK runs a whole conversation against it. It is the
default upstream of ``meshrt dev`` and of the test suite; it never talks to OpenAI.

Run it::

    python -m meshrt.simulator --port 8765 [--api-key K] [--frame-log-dir D]
                               [--pace] [--fault NAME]

The endpoint is ``ws://HOST:PORT/v1/realtime`` and takes exactly one of
``?model=M``, ``?call_id=C`` or ``?intent=transcription``. GA event names are
used unless the client sends ``OpenAI-Beta: realtime=v1`` (or the subprotocol
``openai-beta.realtime-v1``), which selects beta names and the beta usage shape.

Usage formula (deterministic; all divisions round UP)
-----------------------------------------------------
Audio is PCM16, 24 kHz, mono: 48,000 bytes per second.

* text tokens of a string = ceil(chars / 4)
* input audio tokens      = ceil(seconds * 10)   (= ceil(bytes / 4800))
* image tokens            = 85 per ``input_image`` content part (GA only)
* output audio tokens     = ceil(ms_sent / 50)   (20 per second; 1 per full chunk)
* output text tokens      = ceil(len(text or transcript actually sent) / 4)

The input of a response is ``[instructions] + every conversation item``:
instructions count as text; ``input_text``/``output_text``/``text`` parts as
text; ``input_audio`` parts with audio as input audio of their byte length, a
part with only a transcript as text; ``input_image`` parts as 85 image tokens;
``function_call`` arguments and ``function_call_output`` output as text.
A generated assistant item re-enters later inputs as the input audio of the
audio it sent (ceil(ms / 100)), or, for text-only responses, as its text.

Cached tokens: the longest common prefix (same instructions text, then same items
with the same token counts) between this response's input and the previous
response's input is reported as cached, split by modality. So the second response
of a session caches the instructions and the first turn's items (no 1,024-token
minimum as OpenAI has). ``cached_tokens`` is a subset of ``input_tokens``.

GA usage: ``{total_tokens, input_tokens, output_tokens, input_token_details{
text_tokens, audio_tokens, image_tokens, cached_tokens, cached_tokens_details{
text_tokens, audio_tokens, image_tokens}}, output_token_details{text_tokens,
audio_tokens}}``. Beta usage: ``input_token_details{cached_tokens, text_tokens,
audio_tokens}`` only (beta has no image input; cached is text + audio).

Input transcription (when ``audio.input.transcription.model`` / beta
``input_audio_transcription.model`` is set) follows each commit with
``conversation.item.input_audio_transcription.completed`` whose transcript is
``"Simulated transcript of N ms of audio."`` and whose usage is
``{type: "duration", seconds: bytes / 48000}`` for ``whisper-1`` and
``gpt-realtime-whisper``, else ``{type: "tokens", input_tokens = audio + prompt
text tokens, output_tokens = ceil(len(transcript) / 4), total_tokens,
input_token_details{text_tokens: prompt tokens, audio_tokens}}``.

Responses: ``sim_response_ms`` (default 1000) of output, one tick per 50 ms
(the last tick may be shorter). Each tick sends one audio delta (audio modality);
every 4th tick (0, 4, 8, ...) first sends one word of a fixed text as a transcript
(or text) delta. ``--pace`` / ``sim_pace=1`` sends one tick per 50 ms of wall time.

Fault injection (``sim_fault=NAME`` per connection, or ``--fault NAME`` /
``serve(fault=NAME)`` for every connection; ``sim_fault=none`` overrides):

* ``reject_401`` / ``reject_429`` / ``reject_500``: HTTP error with a JSON body
  instead of the upgrade.
* ``refuse``: the TCP connection is aborted before any HTTP response.
* ``slow_accept``: wait ``sim_delay_ms`` (default 2000) before accepting.
* ``close_mid_response``: on the first response, after 3 ticks, close 1011.
* ``drop_mid_response``: on the first response, after 3 ticks, abort TCP
  (no close frame).
* ``invalid_key_after_accept``: accept, send an ``invalid_api_key`` error
  event, close 3000 ``invalid_request_error.invalid_api_key``.

Other query parameters: ``sim_echo=1`` (echo every client message verbatim,
nothing else after ``session.created``), ``sim_max_session_s`` (default 3600;
then ``error`` ``session_expired`` and close 1000).

Frame log (``frame_log_dir``): one ``<session id>.jsonl`` per connection; first
line ``{"kind": "request", "path", "query", "headers": [[name, value], ...]}``,
then one line per WebSocket frame in wire order, ``{"dir": "in"|"out",
"opcode": "text"|"binary"|"continuation"|"ping"|"pong"|"close", "fin",
"payload_b64"}``, hooked at the frame layer so payloads are the exact bytes.
A handshake refused with an HTTP error adds ``{"kind": "response", "status"}``.

See docs/simulator.md for the full description.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import copy
import hmac
import itertools
import json
import logging
import math
import os
import secrets
import signal
import ssl
import struct
import sys
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response

log = logging.getLogger("meshrt.sim")

# --- constants of the usage formula and of the simulated stream -------------

BYTES_PER_SECOND = 48_000  # PCM16, 24 kHz, mono
CHARS_PER_TEXT_TOKEN = 4
INPUT_AUDIO_TOKENS_PER_S = 10
OUTPUT_AUDIO_TOKENS_PER_S = 20
IMAGE_TOKENS = 85
CHUNK_MS = 50
WORD_EVERY_TICKS = 4
DEFAULT_RESPONSE_MS = 1000
DEFAULT_MAX_SESSION_S = 3600.0
DEFAULT_DELAY_MS = 2000
FAULT_AFTER_TICKS = 3
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_MODEL = "gpt-realtime"
DEFAULT_INSTRUCTIONS = "You are a helpful assistant."
DURATION_TRANSCRIBERS = frozenset({"whisper-1", "gpt-realtime-whisper"})
WORDS = ("Hello", "from", "the", "meshrt", "simulator.", "This", "is", "a", "synthetic", "reply.")
FAULTS = (
    "reject_401",
    "reject_429",
    "reject_500",
    "refuse",
    "slow_accept",
    "close_mid_response",
    "drop_mid_response",
    "invalid_key_after_accept",
)
PCM_FORMAT = {"type": "audio/pcm", "rate": 24000}


def text_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TEXT_TOKEN)


def input_audio_tokens(n_bytes: int) -> int:
    return -(-n_bytes * INPUT_AUDIO_TOKENS_PER_S // BYTES_PER_SECOND)


def output_audio_tokens(ms: int) -> int:
    return -(-ms * OUTPUT_AUDIO_TOKENS_PER_S // 1000)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def _tone_chunk(ms: int = CHUNK_MS, hz: int = 440) -> bytes:
    n = 24 * ms  # 24 samples per ms
    return b"".join(struct.pack("<h", int(3000 * math.sin(2 * math.pi * hz * i / 24000))) for i in range(n))


TONE_CHUNK = _tone_chunk()
TONE_CHUNK_B64 = base64.b64encode(TONE_CHUNK).decode()


def _chunk_b64(ms: int) -> str:
    if ms == CHUNK_MS:
        return TONE_CHUNK_B64
    return base64.b64encode(TONE_CHUNK[: ms * 48]).decode()


def _word(k: int) -> str:
    word = WORDS[k % len(WORDS)]
    return word if k == 0 else " " + word


def _without_audio(part: Any) -> Any:
    return {k: v for k, v in part.items() if k != "audio"} if isinstance(part, dict) else part


def _deep_merge(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


# --- tokens and usage --------------------------------------------------------


@dataclass(frozen=True)
class Tokens:
    text: int = 0
    audio: int = 0
    image: int = 0

    @property
    def total(self) -> int:
        return self.text + self.audio + self.image

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(self.text + other.text, self.audio + other.audio, self.image + other.image)


def _part_tokens(part: dict) -> Tokens:
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return Tokens(text=text_tokens(part.get("text") or ""))
    if kind == "input_image":
        return Tokens(image=IMAGE_TOKENS)
    if kind in ("input_audio", "output_audio", "audio"):
        if part.get("audio"):
            return Tokens(audio=input_audio_tokens(len(base64.b64decode(part["audio"]))))
        return Tokens(text=text_tokens(part.get("transcript") or ""))
    return Tokens()


def item_tokens(item: dict, beta: bool = False) -> Tokens:
    """Input tokens an item contributes to every later response."""
    total = Tokens()
    for part in item.get("content") or []:
        if isinstance(part, dict):
            total = total + _part_tokens(part)
    for key in ("arguments", "output"):
        if isinstance(item.get(key), str):
            total = total + Tokens(text=text_tokens(item[key]))
    return Tokens(total.text, total.audio, 0) if beta else total


def ga_usage(inp: Tokens, cached: Tokens, out: Tokens) -> dict:
    return {
        "total_tokens": inp.total + out.total,
        "input_tokens": inp.total,
        "output_tokens": out.total,
        "input_token_details": {
            "text_tokens": inp.text,
            "audio_tokens": inp.audio,
            "image_tokens": inp.image,
            "cached_tokens": cached.total,
            "cached_tokens_details": {
                "text_tokens": cached.text,
                "audio_tokens": cached.audio,
                "image_tokens": cached.image,
            },
        },
        "output_token_details": {"text_tokens": out.text, "audio_tokens": out.audio},
    }


def beta_usage(inp: Tokens, cached: Tokens, out: Tokens) -> dict:
    return {
        "total_tokens": inp.total + out.total,
        "input_tokens": inp.total,
        "output_tokens": out.total,
        "input_token_details": {
            "cached_tokens": cached.total,
            "text_tokens": inp.text,
            "audio_tokens": inp.audio,
        },
        "output_token_details": {"text_tokens": out.text, "audio_tokens": out.audio},
    }


def transcription_usage(model: str, n_bytes: int, transcript: str, prompt: str) -> dict:
    if model in DURATION_TRANSCRIBERS:
        return {"type": "duration", "seconds": n_bytes / BYTES_PER_SECOND}
    audio, text, out = input_audio_tokens(n_bytes), text_tokens(prompt), text_tokens(transcript)
    return {
        "type": "tokens",
        "input_tokens": audio + text,
        "output_tokens": out,
        "total_tokens": audio + text + out,
        "input_token_details": {"text_tokens": text, "audio_tokens": audio},
    }


# --- the sans-I/O session model ----------------------------------------------


@dataclass
class ConvItem:
    id: str
    wire: dict
    tokens: Tokens

    def snapshot(self) -> dict:
        """A copy for an event: an event must not change when the item does later."""
        return copy.deepcopy(self.wire)


@dataclass
class ResponseRun:
    """One response being generated; counters hold what was actually sent."""

    id: str
    item: ConvItem
    audio: bool
    total_ms: int
    input: Tokens
    cached: Tokens
    in_conversation: bool
    metadata: Any = None
    ms_sent: int = 0
    text_sent: str = ""
    cancel_requested: bool = False

    @property
    def ticks(self) -> int:
        return -(-self.total_ms // CHUNK_MS)

    def output_tokens(self) -> Tokens:
        return Tokens(text=text_tokens(self.text_sent), audio=output_audio_tokens(self.ms_sent))


@dataclass
class StartResponse:
    """Command for the socket layer: stream this response."""

    run: ResponseRun


GA_NAMES = {
    "audio_delta": "response.output_audio.delta",
    "audio_done": "response.output_audio.done",
    "transcript_delta": "response.output_audio_transcript.delta",
    "transcript_done": "response.output_audio_transcript.done",
    "text_delta": "response.output_text.delta",
    "text_done": "response.output_text.done",
    "audio_part": "output_audio",
    "text_part": "output_text",
}
BETA_NAMES = {
    "audio_delta": "response.audio.delta",
    "audio_done": "response.audio.done",
    "transcript_delta": "response.audio_transcript.delta",
    "transcript_done": "response.audio_transcript.done",
    "text_delta": "response.text.delta",
    "text_done": "response.text.done",
    "audio_part": "audio",
    "text_part": "text",
}


class ProtocolError(Exception):
    """A client event the simulator answers with an in-band ``error`` event."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


class SimSession:
    """Conversation state and the usage formula; produces server events as dicts.

    ``handle(raw)`` takes one client text message and returns a list of outputs:
    event dicts to send, or a :class:`StartResponse` command. The socket layer
    streams a response with ``response_head`` / ``response_tick`` /
    ``response_finish``.
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, beta: bool = False, kind: str = "realtime",
                 response_ms: int = DEFAULT_RESPONSE_MS):
        self.id = new_id("sess")
        self.conversation_id = new_id("conv")
        self.model, self.beta, self.kind, self.response_ms = model, beta, kind, response_ms
        self.names = BETA_NAMES if beta else GA_NAMES
        self.config = self._default_config()
        self.items: list[ConvItem] = []
        self.buffered_bytes = 0
        self.active: ResponseRun | None = None
        self.responses = 0
        self.tokens_used = 0
        self._last_input: list[tuple[tuple, Tokens]] = []
        self._event_seq = itertools.count(1)
        self._event_prefix = secrets.token_hex(4)

    # event plumbing

    def event(self, type_: str, **fields: Any) -> dict:
        return {"type": type_, "event_id": f"event_{self._event_prefix}{next(self._event_seq)}", **fields}

    def error(self, code: str, message: str, param: str | None = None, client_event_id: Any = None,
              type_: str = "invalid_request_error") -> dict:
        body = {"type": type_, "code": code, "message": message, "param": param, "event_id": client_event_id}
        return self.event("error", error=body)

    def created_event(self) -> dict:
        return self.event("session.created", session=self.config)

    def expired_event(self, max_session_s: float = DEFAULT_MAX_SESSION_S) -> dict:
        return self.error("session_expired",
                          f"Your session hit the maximum duration of {max_session_s / 60:g} minutes.")

    def _default_config(self) -> dict:
        expires_at = int(time.time()) + int(DEFAULT_MAX_SESSION_S)
        if self.beta:
            return self._beta_config(expires_at)
        audio_in = {"format": dict(PCM_FORMAT), "transcription": None, "noise_reduction": None,
                    "turn_detection": None}
        if self.kind == "transcription":
            return {"type": "transcription", "object": "realtime.transcription_session", "id": self.id,
                    "expires_at": expires_at, "include": None, "audio": {"input": audio_in}}
        return {
            "type": "realtime", "object": "realtime.session", "id": self.id, "model": self.model,
            "output_modalities": ["audio"], "instructions": DEFAULT_INSTRUCTIONS, "tools": [],
            "tool_choice": "auto", "max_output_tokens": "inf", "tracing": None, "truncation": "auto",
            "prompt": None, "expires_at": expires_at, "include": None,
            "audio": {"input": audio_in,
                      "output": {"format": dict(PCM_FORMAT), "voice": "alloy", "speed": 1.0}},
        }

    def _beta_config(self, expires_at: int) -> dict:
        return {
            "id": self.id, "object": "realtime.session", "model": self.model, "expires_at": expires_at,
            "modalities": ["text", "audio"], "instructions": DEFAULT_INSTRUCTIONS, "voice": "alloy",
            "input_audio_format": "pcm16", "output_audio_format": "pcm16",
            "input_audio_transcription": None, "input_audio_noise_reduction": None,
            "turn_detection": None, "tools": [], "tool_choice": "auto", "temperature": 0.8,
            "max_response_output_tokens": "inf", "speed": 1.0, "tracing": None,
        }

    # dispatch

    def handle(self, raw: str) -> list[Any]:
        try:
            event = json.loads(raw)
        except ValueError as exc:
            return [self.error("invalid_json", f"The server could not parse the JSON message: {exc}")]
        if not isinstance(event, dict):
            return [self.error("invalid_json", "A client event must be a JSON object.")]
        client_event_id = event.get("event_id")
        try:
            return self._dispatch(event)
        except ProtocolError as exc:
            return [self.error(exc.code, exc.message, exc.param, client_event_id)]

    def _dispatch(self, event: dict) -> list[Any]:
        type_ = event.get("type")
        if not isinstance(type_, str) or not type_:
            raise ProtocolError("missing_required_parameter", "Missing required parameter: 'type'.", "type")
        handler = self._handlers().get(type_)
        if handler is None:
            raise ProtocolError("invalid_value", f"Invalid value: '{type_}'. Unsupported client event type.",
                                "type")
        return handler(event)

    def _handlers(self) -> dict[str, Callable[[dict], list[Any]]]:
        handlers = {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit,
            "input_audio_buffer.clear": self._clear,
            "conversation.item.create": self._item_create,
            "conversation.item.delete": self._item_delete,
            "conversation.item.retrieve": self._item_retrieve,
            "conversation.item.truncate": self._item_truncate,
            "response.create": self._response_create,
            "response.cancel": self._response_cancel,
        }
        return handlers

    # session and audio buffer

    def _session_update(self, event: dict) -> list[Any]:
        update = event.get("session")
        if not isinstance(update, dict):
            raise ProtocolError("invalid_value", "'session' must be an object.", "session")
        given_type = update.get("type")
        if not self.beta and given_type is not None and given_type != self.config["type"]:
            raise ProtocolError("invalid_value", f"Cannot change the session type to '{given_type}'.",
                                "session.type")
        update = {k: v for k, v in update.items() if k not in ("id", "object", "expires_at")}
        _deep_merge(self.config, update)
        return [self.event("session.updated", session=self.config)]

    def _transcription(self) -> dict | None:
        if self.beta:
            config = self.config.get("input_audio_transcription")
        else:
            config = ((self.config.get("audio") or {}).get("input") or {}).get("transcription")
        return config if isinstance(config, dict) and config.get("model") else None

    def _append(self, event: dict) -> list[Any]:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise ProtocolError("missing_required_parameter", "Missing required parameter: 'audio'.", "audio")
        try:
            self.buffered_bytes += len(binascii.a2b_base64(audio, strict_mode=True))
        except (binascii.Error, ValueError):
            raise ProtocolError("invalid_value", "'audio' is not valid base64.", "audio") from None
        return []

    def _clear(self, event: dict) -> list[Any]:
        self.buffered_bytes = 0
        return [self.event("input_audio_buffer.cleared")]

    def _commit(self, event: dict) -> list[Any]:
        n_bytes, self.buffered_bytes = self.buffered_bytes, 0
        if n_bytes == 0:
            raise ProtocolError("input_audio_buffer_commit_empty",
                                "Error committing input audio buffer: the buffer is empty.")
        wire = {"id": new_id("item"), "type": "message", "object": "realtime.item", "status": "completed",
                "role": "user", "content": [{"type": "input_audio", "transcript": None}]}
        item = ConvItem(wire["id"], wire, Tokens(audio=input_audio_tokens(n_bytes)))
        previous = self._insert(item, self.items[-1].id if self.items else None)
        out = [self.event("input_audio_buffer.committed", previous_item_id=previous, item_id=item.id)]
        out += self._item_added_events(item, previous)
        return out + self._transcribe(item, n_bytes)

    def _transcribe(self, item: ConvItem, n_bytes: int) -> list[Any]:
        config = self._transcription()
        if config is None:
            return []
        transcript = f"Simulated transcript of {n_bytes * 1000 // BYTES_PER_SECOND} ms of audio."
        usage = transcription_usage(config["model"], n_bytes, transcript, config.get("prompt") or "")
        item.wire["content"][0]["transcript"] = transcript
        return [self.event("conversation.item.input_audio_transcription.completed", item_id=item.id,
                           content_index=0, transcript=transcript, usage=usage)]

    # conversation items

    def _insert(self, item: ConvItem, previous_item_id: str | None) -> str | None:
        """Insert after ``previous_item_id`` (None: at the end, "root": first)."""
        if previous_item_id is None or (self.items and previous_item_id == self.items[-1].id):
            previous = self.items[-1].id if self.items else None
            self.items.append(item)
            return previous
        if previous_item_id == "root":
            self.items.insert(0, item)
            return None
        index = self._index(previous_item_id, "previous_item_id")
        self.items.insert(index + 1, item)
        return previous_item_id

    def _index(self, item_id: Any, param: str) -> int:
        for index, item in enumerate(self.items):
            if item.id == item_id:
                return index
        raise ProtocolError("item_not_found", f"Item with item_id '{item_id}' not found.", param)

    def _item_added_events(self, item: ConvItem, previous: str | None) -> list[dict]:
        if self.beta:
            return [self.event("conversation.item.created", previous_item_id=previous, item=item.snapshot())]
        return [self.event("conversation.item.added", previous_item_id=previous, item=item.snapshot()),
                self.event("conversation.item.done", previous_item_id=previous, item=item.snapshot())]

    def _item_create(self, event: dict) -> list[Any]:
        given = event.get("item")
        if not isinstance(given, dict) or not isinstance(given.get("type"), str):
            raise ProtocolError("invalid_value", "'item' must be an object with a 'type'.", "item")
        if any(it.id == given.get("id") for it in self.items):
            raise ProtocolError("item_id_already_exists", f"Item '{given['id']}' already exists.", "item.id")
        try:
            tokens = item_tokens(given, self.beta)
        except (binascii.Error, ValueError):
            raise ProtocolError("invalid_value", "An audio content part is not valid base64.", "item") from None
        wire = {"id": given.get("id") or new_id("item"), "object": "realtime.item", "status": "completed",
                **{k: v for k, v in given.items() if k not in ("id", "object", "status")}}
        if isinstance(wire.get("content"), list):  # like OpenAI, do not echo audio bytes back
            wire["content"] = [_without_audio(part) for part in wire["content"]]
        item = ConvItem(wire["id"], wire, tokens)
        previous = self._insert(item, event.get("previous_item_id"))
        return self._item_added_events(item, previous)

    def _item_delete(self, event: dict) -> list[Any]:
        index = self._index(event.get("item_id"), "item_id")
        item = self.items.pop(index)
        return [self.event("conversation.item.deleted", item_id=item.id)]

    def _item_retrieve(self, event: dict) -> list[Any]:
        item = self.items[self._index(event.get("item_id"), "item_id")]
        return [self.event("conversation.item.retrieved", item=item.snapshot())]

    def _item_truncate(self, event: dict) -> list[Any]:
        item = self.items[self._index(event.get("item_id"), "item_id")]
        end_ms = event.get("audio_end_ms")
        if not isinstance(end_ms, int) or end_ms < 0:
            raise ProtocolError("invalid_value", "'audio_end_ms' must be a non-negative integer.",
                                "audio_end_ms")
        if item.wire.get("role") == "assistant" and item.tokens.audio:
            item.tokens = Tokens(audio=min(item.tokens.audio, input_audio_tokens(end_ms * 48)))
        return [self.event("conversation.item.truncated", item_id=item.id,
                           content_index=event.get("content_index", 0), audio_end_ms=end_ms)]

    # responses

    def _input(self, instructions: str) -> list[tuple[tuple, Tokens]]:
        seq = [(("instructions", instructions), Tokens(text=text_tokens(instructions)))]
        return seq + [(("item", it.id, it.tokens), it.tokens) for it in self.items]

    def _cached(self, seq: list[tuple[tuple, Tokens]]) -> Tokens:
        cached = Tokens()
        for (key, tokens), (old_key, _) in zip(seq, self._last_input):
            if key != old_key:
                break
            cached = cached + tokens
        return cached

    def _wants_audio(self, params: dict) -> bool:
        key = "modalities" if self.beta else "output_modalities"
        modalities = params.get(key) or self.config.get(key) or ["audio"]
        if not isinstance(modalities, list):
            raise ProtocolError("invalid_value", f"'{key}' must be a list.", f"response.{key}")
        return "audio" in modalities

    def _response_create(self, event: dict) -> list[Any]:
        if self.kind == "transcription":
            raise ProtocolError("response_not_supported", "Responses are not available in transcription sessions.")
        if self.active is not None:
            raise ProtocolError("conversation_already_has_active_response",
                                f"Conversation already has an active response in progress: {self.active.id}.")
        params = event.get("response") or {}
        if not isinstance(params, dict):
            raise ProtocolError("invalid_value", "'response' must be an object.", "response")
        instructions = params.get("instructions") or self.config.get("instructions") or ""
        seq = self._input(str(instructions))
        run = self._new_run(params, seq)
        self._last_input = seq
        self.active = run
        self.responses += 1
        return [StartResponse(run)]

    def _new_run(self, params: dict, seq: list[tuple[tuple, Tokens]]) -> ResponseRun:
        audio = self._wants_audio(params)
        part = {"type": self.names["audio_part"], "transcript": ""} if audio else \
            {"type": self.names["text_part"], "text": ""}
        wire = {"id": new_id("item"), "type": "message", "object": "realtime.item", "status": "in_progress",
                "role": "assistant", "content": [part]}
        total_input = Tokens()
        for _, tokens in seq:
            total_input = total_input + tokens
        return ResponseRun(id=new_id("resp"), item=ConvItem(wire["id"], wire, Tokens()), audio=audio,
                           total_ms=self.response_ms, input=total_input, cached=self._cached(seq),
                           in_conversation=params.get("conversation", "auto") != "none",
                           metadata=params.get("metadata"))

    def _response_cancel(self, event: dict) -> list[Any]:
        if self.active is None:
            raise ProtocolError("response_cancel_not_active", "Cancellation failed: no active response found.")
        self.active.cancel_requested = True
        return []

    def _response_object(self, run: ResponseRun, status: str, usage: dict | None) -> dict:
        details = {"type": "cancelled", "reason": "client_cancelled"} if status == "cancelled" else None
        obj: dict[str, Any] = {
            "object": "realtime.response", "id": run.id, "status": status, "status_details": details,
            "output": [run.item.snapshot()] if status != "in_progress" else [],
            "conversation_id": self.conversation_id if run.in_conversation else None,
            "max_output_tokens": "inf", "usage": usage, "metadata": run.metadata,
        }
        if self.beta:
            obj.update(modalities=["text", "audio"] if run.audio else ["text"], voice="alloy",
                       output_audio_format="pcm16", temperature=0.8)
        else:
            obj["output_modalities"] = ["audio"] if run.audio else ["text"]
            if run.audio:
                obj["audio"] = {"output": {"format": dict(PCM_FORMAT), "voice": "alloy"}}
        return obj

    def _where(self, run: ResponseRun) -> dict:
        return {"response_id": run.id, "item_id": run.item.id, "output_index": 0, "content_index": 0}

    def response_head(self, run: ResponseRun) -> list[dict]:
        out = [self.event("response.created", response=self._response_object(run, "in_progress", None)),
               self.event("response.output_item.added", response_id=run.id, output_index=0, item=run.item.snapshot())]
        if run.in_conversation:
            previous = self._insert(run.item, None)
            out.append(self.event("conversation.item.created" if self.beta else "conversation.item.added",
                                  previous_item_id=previous, item=run.item.snapshot()))
        part = {"type": "audio", "transcript": ""} if run.audio else {"type": "text", "text": ""}
        out.append(self.event("response.content_part.added", part=part, **self._where(run)))
        return out

    def response_tick(self, run: ResponseRun, tick: int) -> list[dict]:
        out = []
        if tick % WORD_EVERY_TICKS == 0:
            word = _word(tick // WORD_EVERY_TICKS)
            run.text_sent += word
            name = self.names["transcript_delta"] if run.audio else self.names["text_delta"]
            out.append(self.event(name, delta=word, **self._where(run)))
        ms = min(CHUNK_MS, run.total_ms - tick * CHUNK_MS)
        if run.audio:
            out.append(self.event(self.names["audio_delta"], delta=_chunk_b64(ms), **self._where(run)))
            run.ms_sent += ms
        return out

    def response_finish(self, run: ResponseRun, status: str) -> list[dict]:
        """Close the response; ``status`` is ``completed`` or ``cancelled``."""
        self.active = None
        self._finalise_item(run, status)
        out = self._content_done_events(run)
        out.append(self.event("response.output_item.done", response_id=run.id, output_index=0,
                              item=run.item.snapshot()))
        if run.in_conversation and not self.beta:
            out.append(self.event("conversation.item.done", previous_item_id=self._previous_of(run.item),
                                  item=run.item.snapshot()))
        output = run.output_tokens()
        usage = (beta_usage if self.beta else ga_usage)(run.input, run.cached, output)
        self.tokens_used += usage["total_tokens"]
        out.append(self.event("response.done", response=self._response_object(run, status, usage)))
        return out + [self._rate_limits_event()]

    def _finalise_item(self, run: ResponseRun, status: str) -> None:
        part = run.item.wire["content"][0]
        part["transcript" if run.audio else "text"] = run.text_sent
        run.item.wire["status"] = "completed" if status == "completed" else "incomplete"
        if run.audio:
            run.item.tokens = Tokens(audio=input_audio_tokens(run.ms_sent * 48))
        else:
            run.item.tokens = Tokens(text=text_tokens(run.text_sent))

    def _content_done_events(self, run: ResponseRun) -> list[dict]:
        where = self._where(run)
        if run.audio:
            part = {"type": "audio", "transcript": run.text_sent}
            out = [self.event(self.names["audio_done"], **where),
                   self.event(self.names["transcript_done"], transcript=run.text_sent, **where)]
        else:
            part = {"type": "text", "text": run.text_sent}
            out = [self.event(self.names["text_done"], text=run.text_sent, **where)]
        return out + [self.event("response.content_part.done", part=part, **where)]

    def _previous_of(self, item: ConvItem) -> str | None:
        for index, it in enumerate(self.items):
            if it is item:
                return self.items[index - 1].id if index else None
        return None

    def _rate_limits_event(self) -> dict:
        limits = [
            {"name": "requests", "limit": 5000, "remaining": max(0, 5000 - self.responses),
             "reset_seconds": 0.012},
            {"name": "tokens", "limit": 800_000, "remaining": max(0, 800_000 - self.tokens_used),
             "reset_seconds": 0.0},
        ]
        return self.event("rate_limits.updated", rate_limits=limits)


# --- frame log ----------------------------------------------------------------

OPCODE_NAMES = {
    Opcode.CONT: "continuation", Opcode.TEXT: "text", Opcode.BINARY: "binary",
    Opcode.CLOSE: "close", Opcode.PING: "ping", Opcode.PONG: "pong",
}


class FrameLog:
    """``<dir>/<connection id>.jsonl``: the request, then every frame, flushed per line."""

    def __init__(self, directory: str, conn_id: str):
        self.path = os.path.join(directory, f"{conn_id}.jsonl")
        self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict) -> None:
        if not self._file.closed:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def request(self, request: Request) -> None:
        parts = urlsplit(request.path)
        headers = [[name, value] for name, value in request.headers.raw_items()]
        self.write({"kind": "request", "path": parts.path, "query": parts.query, "headers": headers})

    def frame(self, direction: str, frame: Frame) -> None:
        self.write({"dir": direction, "opcode": OPCODE_NAMES.get(frame.opcode, str(frame.opcode)),
                    "fin": frame.fin, "payload_b64": base64.b64encode(bytes(frame.data)).decode()})

    def close(self) -> None:
        self._file.close()

    def hook(self, protocol: Any) -> None:
        """Log every frame the sans-I/O protocol parses or serialises, in wire order."""
        recv_frame, send_frame = protocol.recv_frame, protocol.send_frame

        def logged_recv(frame: Frame) -> None:
            self.frame("in", frame)
            recv_frame(frame)

        def logged_send(frame: Frame) -> None:
            self.frame("out", frame)
            send_frame(frame)

        protocol.recv_frame, protocol.send_frame = logged_recv, logged_send


# --- handshake: per-connection options -----------------------------------------


class HandshakeError(Exception):
    def __init__(self, status: int, code: str | None, message: str, type_: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.type, self.param = status, code, message, type_, param

    def response(self) -> Response:
        body = json.dumps({"error": {"message": self.message, "type": self.type, "param": self.param,
                                     "code": self.code}}).encode()
        headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                           ("Connection", "close"), ("x-request-id", new_id("req"))])
        if self.status == 429:
            headers["Retry-After"] = "1"
        return Response(self.status, HTTPStatus(self.status).phrase, headers, body)


@dataclass
class SimConfig:
    api_key: str | None = None
    frame_log_dir: str | None = None
    pace: bool = False
    fault: str | None = None


@dataclass
class ConnOptions:
    model: str
    kind: str
    beta: bool
    response_ms: int = DEFAULT_RESPONSE_MS
    pace: bool = False
    echo: bool = False
    fault: str | None = None
    delay_ms: int = DEFAULT_DELAY_MS
    max_session_s: float = DEFAULT_MAX_SESSION_S
    session: SimSession | None = field(default=None, repr=False)
    log: FrameLog | None = field(default=None, repr=False)


def _single(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise HandshakeError(400, "invalid_value", f"Query parameter '{name}' given more than once.", param=name)
    return values[0]


def _int_param(query: dict, name: str, default: int, high: int) -> int:
    raw = _single(query, name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > high:
        raise HandshakeError(400, "invalid_value", f"'{name}' must be an integer from 0 to {high}.", param=name)
    return int(raw)


def _bool_param(query: dict, name: str) -> bool:
    raw = _single(query, name)
    if raw is None or raw.lower() in ("0", "false", ""):
        return False
    if raw.lower() in ("1", "true"):
        return True
    raise HandshakeError(400, "invalid_value", f"'{name}' must be 0/1/true/false.", param=name)


def _max_session(query: dict) -> float:
    raw = _single(query, "sim_max_session_s")
    if raw is None:
        return DEFAULT_MAX_SESSION_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e9:
        raise HandshakeError(400, "invalid_value", "'sim_max_session_s' must be a positive number.",
                             param="sim_max_session_s")
    return value


def _target(query: dict) -> tuple[str, str]:
    """(model, kind) from exactly one of model / call_id / intent=transcription."""
    given = [name for name in ("model", "call_id", "intent") if name in query]
    if len(given) != 1:
        raise HandshakeError(400, "invalid_request", "Provide exactly one of the query parameters 'model', "
                                                     "'call_id' or 'intent=transcription'.")
    value = _single(query, given[0]) or ""
    if given[0] == "intent" and value != "transcription":
        raise HandshakeError(400, "invalid_value", "'intent' must be 'transcription'.", param="intent")
    if not value:
        raise HandshakeError(400, "invalid_value", f"'{given[0]}' must not be empty.", param=given[0])
    if given[0] == "model":
        return value, "realtime"
    return DEFAULT_MODEL, "transcription" if given[0] == "intent" else "realtime"


def _fault(query: dict, default: str | None) -> str | None:
    raw = _single(query, "sim_fault")
    if raw is None:
        return default
    if raw == "none":
        return None
    if raw not in FAULTS:
        raise HandshakeError(400, "invalid_value", f"Unknown sim_fault '{raw}'.", param="sim_fault")
    return raw


def _subprotocols(request: Request) -> list[str]:
    return [p.strip() for value in request.headers.get_all("Sec-WebSocket-Protocol") for p in value.split(",")]


def _is_beta(request: Request) -> bool:
    values = [v.strip() for h in request.headers.get_all("OpenAI-Beta") for v in h.split(",")]
    return "realtime=v1" in values or "openai-beta.realtime-v1" in _subprotocols(request)


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("Authorization")
    if auth is not None and auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    for proto in _subprotocols(request):
        if proto.startswith("openai-insecure-api-key."):
            return proto[len("openai-insecure-api-key."):]
    return None


def check_auth(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    key = _presented_key(request)
    if not key:
        raise HandshakeError(401, "missing_api_key", "You didn't provide an API key. Provide it in the "
                                                     "Authorization header (Authorization: Bearer YOUR_KEY).")
    if not hmac.compare_digest(key.encode(), api_key.encode()):
        raise HandshakeError(401, "invalid_api_key", "Incorrect API key provided.")


def parse_options(request: Request, config: SimConfig) -> ConnOptions:
    parts = urlsplit(request.path)
    if parts.path.rstrip("/") != "/v1/realtime":
        raise HandshakeError(404, "not_found", f"Unknown path '{parts.path}'. Use /v1/realtime.")
    check_auth(request, config.api_key)
    query = parse_qs(parts.query, keep_blank_values=True)
    model, kind = _target(query)
    return ConnOptions(
        model=model, kind=kind, beta=_is_beta(request),
        response_ms=_int_param(query, "sim_response_ms", DEFAULT_RESPONSE_MS, 3_600_000),
        pace=config.pace or _bool_param(query, "sim_pace"), echo=_bool_param(query, "sim_echo"),
        fault=_fault(query, config.fault), delay_ms=_int_param(query, "sim_delay_ms", DEFAULT_DELAY_MS, 600_000),
        max_session_s=_max_session(query),
    )


FAULT_REJECTIONS = {
    "reject_401": HandshakeError(401, "invalid_api_key", "Incorrect API key provided (simulated)."),
    "reject_429": HandshakeError(429, "rate_limit_exceeded", "Rate limit reached (simulated).", "requests"),
    "reject_500": HandshakeError(500, "server_error", "The server had an error (simulated).", "server_error"),
}


# --- socket layer -------------------------------------------------------------


class SimConnection(ServerConnection):
    """A websockets server connection carrying the simulator's per-connection options."""

    sim: ConnOptions | None = None


class _Driver:
    """Runs one simulated session on an accepted socket."""

    def __init__(self, ws: SimConnection, opts: ConnOptions):
        self.ws, self.opts = ws, opts
        self.session: SimSession = opts.session  # type: ignore[assignment]
        self.stream: asyncio.Task | None = None
        self.expiring = False

    async def send(self, event: dict) -> None:
        await self.ws.send(json.dumps(event, separators=(",", ":")))

    async def run(self) -> None:
        await self.send(self.session.created_event())
        expiry = asyncio.create_task(self._expire_later())
        try:
            async for message in self.ws:
                await self._on_message(message)
        except ConnectionClosed:
            pass
        finally:
            await self._stop(expiry)

    async def _stop(self, expiry: asyncio.Task) -> None:
        tasks = [expiry] + ([self.stream] if self.stream is not None else [])
        if not self.expiring:
            expiry.cancel()
        if self.stream is not None:  # the socket is gone: nothing more can be sent
            self.stream.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            await self.send(self.session.error("unsupported_binary_frame", "Binary frames are not supported; "
                                               "send client events as JSON text frames."))
            return
        for output in self.session.handle(message):
            if isinstance(output, StartResponse):
                await self._start(output.run)
            else:
                await self.send(output)

    async def _start(self, run: ResponseRun) -> None:
        for event in self.session.response_head(run):
            await self.send(event)
        self.stream = asyncio.create_task(self._stream(run))

    async def _stream(self, run: ResponseRun) -> None:
        try:
            if not await self._ticks(run):
                return
            status = "cancelled" if run.cancel_requested else "completed"
            for event in self.session.response_finish(run, status):
                await self.send(event)
        except ConnectionClosed:
            pass
        except Exception:  # pragma: no cover - a simulator bug; keep the socket alive for diagnosis
            log.exception("response stream failed")

    async def _ticks(self, run: ResponseRun) -> bool:
        """Send the deltas; False when a fault ended the connection."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for tick in range(run.ticks):
            if run.cancel_requested:
                break
            for event in self.session.response_tick(run, tick):
                await self.send(event)
            if tick == min(FAULT_AFTER_TICKS, run.ticks) - 1 and await self._mid_response_fault():
                return False
            delay = start + (tick + 1) * CHUNK_MS / 1000 - loop.time() if self.opts.pace else 0
            await asyncio.sleep(max(0.0, delay))
        return True

    async def _mid_response_fault(self) -> bool:
        if self.session.responses != 1 or self.opts.fault not in ("close_mid_response", "drop_mid_response"):
            return False
        if self.opts.fault == "drop_mid_response":
            self.ws.transport.abort()
        else:
            await self.ws.close(1011, "simulated upstream failure")
        return True

    async def _expire_later(self) -> None:
        await asyncio.sleep(self.opts.max_session_s)
        self.expiring = True
        if self.stream is not None:
            self.stream.cancel()
        try:
            await self.send(self.session.expired_event(self.opts.max_session_s))
            await self.ws.close(1000, "invalid_request_error.session_expired")
        except ConnectionClosed:
            pass


async def _echo(ws: SimConnection, session: SimSession) -> None:
    await ws.send(json.dumps(session.created_event(), separators=(",", ":")))
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass


async def _invalid_key_after_accept(ws: SimConnection, session: SimSession) -> None:
    event = session.error("invalid_api_key", "Incorrect API key provided.")
    try:
        await ws.send(json.dumps(event, separators=(",", ":")))
        await ws.close(3000, "invalid_request_error.invalid_api_key")
    except ConnectionClosed:
        pass


class Simulator:
    """Glue between websockets' server hooks and the per-connection driver."""

    def __init__(self, config: SimConfig):
        self.config = config

    async def process_request(self, ws: SimConnection, request: Request) -> Response | None:
        try:
            opts = parse_options(request, self.config)
        except HandshakeError as exc:
            self._log_rejection(ws, request, exc.status)
            return exc.response()
        opts.session = SimSession(opts.model, beta=opts.beta, kind=opts.kind, response_ms=opts.response_ms)
        if self.config.frame_log_dir:
            opts.log = FrameLog(self.config.frame_log_dir, opts.session.id)
            opts.log.request(request)
            opts.log.hook(ws.protocol)
        ws.sim = opts
        return await self._handshake_fault(ws, opts)

    def _log_rejection(self, ws: SimConnection, request: Request, status: int) -> None:
        if self.config.frame_log_dir:
            frame_log = FrameLog(self.config.frame_log_dir, new_id("conn"))
            frame_log.request(request)
            frame_log.write({"kind": "response", "status": status})
            frame_log.close()

    async def _handshake_fault(self, ws: SimConnection, opts: ConnOptions) -> Response | None:
        if opts.fault in FAULT_REJECTIONS:
            if opts.log:
                opts.log.write({"kind": "response", "status": FAULT_REJECTIONS[opts.fault].status})
                opts.log.close()
            return FAULT_REJECTIONS[opts.fault].response()
        if opts.fault == "refuse":
            if opts.log:
                opts.log.close()
            ws.transport.abort()
            return HandshakeError(503, "refused", "refused").response()  # never reaches the client
        if opts.fault == "slow_accept":
            await asyncio.sleep(opts.delay_ms / 1000)
        return None

    async def handler(self, ws: SimConnection) -> None:
        opts = ws.sim
        assert opts is not None and opts.session is not None
        try:
            if opts.fault == "invalid_key_after_accept":
                await _invalid_key_after_accept(ws, opts.session)
            elif opts.echo:
                await _echo(ws, opts.session)
            else:
                await _Driver(ws, opts).run()
        finally:
            await ws.close()
            if opts.log:
                await ws.wait_closed()
                opts.log.close()


def _select_subprotocol(ws: ServerConnection, offered: Any) -> str | None:
    return "realtime" if "realtime" in offered else None


async def serve(host: str = "127.0.0.1", port: int = 8765, api_key: str | None = None,
                frame_log_dir: str | None = None, pace: bool = False,
                ready: Callable[[int], None] | None = None, fault: str | None = None,
                tls: ssl.SSLContext | None = None) -> None:
    """Run the simulator until cancelled; ``ready(port)`` is called once listening.
    With ``tls`` it serves wss://, like the real API."""
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; expected one of {', '.join(FAULTS)}")
    if frame_log_dir:
        os.makedirs(frame_log_dir, exist_ok=True)
    sim = Simulator(SimConfig(api_key=api_key, frame_log_dir=frame_log_dir, pace=pace, fault=fault))
    async with ws_serve(sim.handler, host, port, process_request=sim.process_request,
                        select_subprotocol=_select_subprotocol, create_connection=SimConnection,
                        compression=None, max_size=MAX_MESSAGE_BYTES, ping_interval=None,
                        server_header="meshrt-sim", ssl=tls) as server:
        actual_port = server.sockets[0].getsockname()[1]
        if ready is not None:
            ready(actual_port)
        await asyncio.Future()


# --- command line ---------------------------------------------------------------


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected an integer from 0 to 65535")
    return int(text)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="meshrt sim", description="OpenAI Realtime upstream simulator.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8765, help="port to bind, 0 = ephemeral (default 8765)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: any key)")
    parser.add_argument("--frame-log-dir", default=None, help="write a JSONL frame log per connection here")
    parser.add_argument("--pace", action="store_true", help="send output audio in real time")
    parser.add_argument("--fault", choices=FAULTS, default=None, help="inject this fault on every connection")
    parser.add_argument("--tls-cert", default=None, help="serve wss:// with this PEM certificate (chain)")
    parser.add_argument("--tls-key", default=None, help="the certificate's PEM private key")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    args.tls = None
    if args.tls_cert:
        args.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            args.tls.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            parser.error(f"cannot load --tls-cert/--tls-key: {exc}")
    if not args.host.strip():
        parser.error("--host must not be empty")
    if args.api_key is not None and not args.api_key.strip():
        parser.error("--api-key must not be empty")
    if args.frame_log_dir:
        try:
            os.makedirs(args.frame_log_dir, exist_ok=True)
        except OSError as exc:
            parser.error(f"--frame-log-dir {args.frame_log_dir!r} cannot be created: {exc.strerror}")
        if not os.access(args.frame_log_dir, os.W_OK):
            parser.error(f"--frame-log-dir {args.frame_log_dir!r} is not writable")
    return args


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def ready(port: int) -> None:
        scheme = "wss" if args.tls else "ws"
        print(f"meshrt sim listening on {scheme}://{_url_host(args.host)}:{port}/v1/realtime", flush=True)

    server = asyncio.create_task(serve(args.host, args.port, args.api_key, args.frame_log_dir, args.pace,
                                       ready, args.fault, args.tls))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({server, stopper}, return_when=asyncio.FIRST_COMPLETED)
    for task in (server, stopper):
        task.cancel()
    if server.done() and not server.cancelled() and server.exception() is not None:
        raise server.exception()  # type: ignore[misc]


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="meshrt sim: %(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.CRITICAL)
    try:
        asyncio.run(_run(args))
    except OSError as exc:
        print(f"meshrt sim: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
