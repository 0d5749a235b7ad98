"""The sans-I/O session model: conversation state, the client events it handles and the server
events it produces, responses streamed tick by tick; usage from ``usage``.

Responses: ``sim_response_ms`` (default 1000) of output, one tick per 50 ms
(the last tick may be shorter). Each tick sends one audio delta (audio modality);
every 4th tick (0, 4, 8, ...) first sends one word of a fixed text as a transcript
(or text) delta. ``--pace`` / ``sim_pace=1`` sends one tick per 50 ms of wall time. As
OpenAI's, a response stops before its output tokens would pass ``max_output_tokens`` (the
response's, else the session's; beta: ``max_response_output_tokens``) with status
``incomplete``, reason ``max_output_tokens``.
"""

from __future__ import annotations

import base64
import binascii
import copy
import itertools
import json
import math
import secrets
import struct
import time
from dataclasses import dataclass
from typing import Any
from typing import Callable

from meshrt.shared.ids import new_id

from .usage import BYTES_PER_SECOND
from .usage import Tokens
from .usage import beta_usage
from .usage import ga_usage
from .usage import input_audio_tokens
from .usage import item_tokens
from .usage import output_audio_tokens
from .usage import text_tokens
from .usage import transcription_usage

CHUNK_MS = 50
TRANSLATION_FRAME_MS = 200  # a translation session's engine frame
WORD_EVERY_TICKS = 4
DEFAULT_RESPONSE_MS = 1000
DEFAULT_MAX_SESSION_S = 3600.0
DEFAULT_MODEL = "gpt-realtime"
DEFAULT_INSTRUCTIONS = "You are a helpful assistant."
WORDS = ("Hello", "from", "the", "meshrt", "simulator.", "This", "is", "a", "synthetic", "reply.")
PCM_FORMAT = {"type": "audio/pcm", "rate": 24000}


def _tone_chunk(ms: int = CHUNK_MS, hz: int = 440) -> bytes:
    n = 24 * ms  # 24 samples per ms
    return b"".join(struct.pack("<h", int(3000 * math.sin(2 * math.pi * hz * i / 24000))) for i in range(n))


TONE_CHUNK = _tone_chunk()
TONE_CHUNK_B64 = base64.b64encode(TONE_CHUNK).decode()
TRANSLATION_AUDIO_B64 = base64.b64encode(_tone_chunk(TRANSLATION_FRAME_MS)).decode()


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
    max_output: int | None = None  # max_output_tokens; None: "inf"
    limit_reached: bool = False  # the next delta would have passed max_output: status incomplete

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

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        beta: bool = False,
        kind: str = "realtime",
        response_ms: int = DEFAULT_RESPONSE_MS,
    ):
        self.id = new_id("sess")
        self.conversation_id = new_id("conv")
        self.model, self.beta, self.kind, self.response_ms = model, beta, kind, response_ms
        self.names = BETA_NAMES if beta else GA_NAMES
        self.config = self._default_config()
        self.items: list[ConvItem] = []
        self.buffered_bytes = 0
        self.translated_bytes = 0  # a translation session's input audio received, decoded
        self.translation_frames = 0
        self.active: ResponseRun | None = None
        self.responses = 0
        self.tokens_used = 0
        self.speaking = False  # turn detection heard speech since the last commit
        self._last_input: list[tuple[tuple, Tokens]] = []
        self._event_seq = itertools.count(1)
        self._event_prefix = secrets.token_hex(4)

    # event plumbing

    def event(self, type_: str, **fields: Any) -> dict:
        return {"type": type_, "event_id": f"event_{self._event_prefix}{next(self._event_seq)}", **fields}

    def error(
        self,
        code: str,
        message: str,
        param: str | None = None,
        client_event_id: Any = None,
        type_: str = "invalid_request_error",
    ) -> dict:
        body = {"type": type_, "code": code, "message": message, "param": param, "event_id": client_event_id}
        return self.event("error", error=body)

    def created_event(self) -> dict:
        return self.event("session.created", session=self.config)

    def expired_event(self, max_session_s: float = DEFAULT_MAX_SESSION_S) -> dict:
        return self.error(
            "session_expired", f"Your session hit the maximum duration of {max_session_s / 60:g} minutes."
        )

    def _default_config(self) -> dict:
        expires_at = int(time.time()) + int(DEFAULT_MAX_SESSION_S)
        if self.beta:
            return self._beta_config(expires_at)
        audio_in = {"format": dict(PCM_FORMAT), "transcription": None, "noise_reduction": None, "turn_detection": None}
        if self.kind == "translation":
            return {
                "type": "translation",
                "id": self.id,
                "model": self.model,
                "expires_at": expires_at,
                # `format` is the simulator's own (OpenAI's WebSocket translation takes 24 kHz PCM16
                # only): a session.update to audio/pcmu or audio/pcma makes it take G.711
                "audio": {
                    "input": {"format": dict(PCM_FORMAT), "transcription": None, "noise_reduction": None},
                    "output": {"language": "es"},
                },
            }
        if self.kind == "transcription":
            return {
                "type": "transcription",
                "object": "realtime.transcription_session",
                "id": self.id,
                "expires_at": expires_at,
                "include": None,
                "audio": {"input": audio_in},
            }
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.id,
            "model": self.model,
            "output_modalities": ["audio"],
            "instructions": DEFAULT_INSTRUCTIONS,
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
            "tracing": None,
            "truncation": "auto",
            "prompt": None,
            "expires_at": expires_at,
            "include": None,
            "audio": {"input": audio_in, "output": {"format": dict(PCM_FORMAT), "voice": "alloy", "speed": 1.0}},
        }

    def _beta_config(self, expires_at: int) -> dict:
        return {
            "id": self.id,
            "object": "realtime.session",
            "model": self.model,
            "expires_at": expires_at,
            "modalities": ["text", "audio"],
            "instructions": DEFAULT_INSTRUCTIONS,
            "voice": "alloy",
            "input_audio_format": "pcm16",
            "output_audio_format": "pcm16",
            "input_audio_transcription": None,
            "input_audio_noise_reduction": None,
            "turn_detection": None,
            "tools": [],
            "tool_choice": "auto",
            "temperature": 0.8,
            "max_response_output_tokens": "inf",
            "speed": 1.0,
            "tracing": None,
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
            raise ProtocolError("invalid_value", f"Invalid value: '{type_}'. Unsupported client event type.", "type")
        return handler(event)

    def _handlers(self) -> dict[str, Callable[[dict], list[Any]]]:
        if self.kind == "translation":
            return {
                "session.update": self._session_update,
                "session.input_audio_buffer.append": self._translate,
                "session.close": self._translation_close,
            }
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
            raise ProtocolError("invalid_value", f"Cannot change the session type to '{given_type}'.", "session.type")
        update = {k: v for k, v in update.items() if k not in ("id", "object", "expires_at")}
        _deep_merge(self.config, update)
        return [self.event("session.updated", session=self.config)]

    # translation sessions: each 200 ms of input audio answered with transcript and audio deltas

    def _input_bytes_per_s(self) -> int:
        fmt = ((self.config.get("audio") or {}).get("input") or {}).get("format") or {}
        if isinstance(fmt, dict) and fmt.get("type") in ("audio/pcmu", "audio/pcma"):
            return 8_000
        return 48_000

    def _translate(self, event: dict) -> list[Any]:
        """Buffer the audio; each whole 200 ms frame of it (at the session's input format) gets
        an output transcript delta and an output audio delta (200 ms of PCM16), as OpenAI's
        translation engine answers frame by frame. No usage event: translation reports none."""
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise ProtocolError("missing_required_parameter", "Missing required parameter: 'audio'.", "audio")
        try:
            decoded = binascii.a2b_base64(audio, strict_mode=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("invalid_value", "'audio' is not valid base64.", "audio") from None
        self.buffered_bytes += len(decoded)
        self.translated_bytes += len(decoded)
        frame = self._input_bytes_per_s() * TRANSLATION_FRAME_MS // 1000
        out: list[Any] = []
        while self.buffered_bytes >= frame:
            self.buffered_bytes -= frame
            elapsed = self.translation_frames * TRANSLATION_FRAME_MS
            if ((self.config["audio"].get("input") or {}).get("transcription") or {}).get("model"):
                out.append(
                    self.event(
                        "session.input_transcript.delta", delta=_word(self.translation_frames), elapsed_ms=elapsed
                    )
                )
            out.append(
                self.event("session.output_transcript.delta", delta=_word(self.translation_frames), elapsed_ms=elapsed)
            )
            out.append(self.event("session.output_audio.delta", delta=TRANSLATION_AUDIO_B64, elapsed_ms=elapsed))
            self.translation_frames += 1
        return out

    def _translation_close(self, event: dict) -> list[Any]:
        return [self.event("session.closed")]

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
            pcm = binascii.a2b_base64(audio, strict_mode=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("invalid_value", "'audio' is not valid base64.", "audio") from None
        self.buffered_bytes += len(pcm)
        return self._detect_turn(pcm)

    def _turn_detection(self) -> dict | None:
        if self.beta:
            config = self.config.get("turn_detection")
        else:
            config = ((self.config.get("audio") or {}).get("input") or {}).get("turn_detection")
        return config if isinstance(config, dict) else None

    def _detect_turn(self, pcm: bytes) -> list[Any]:
        """Voice activity detection, simplified: audio with any non-zero sample is speech, an
        all-zero chunk after speech ends the turn — committed, and answered with a response
        when `create_response` is not false (and none is active)."""
        config = self._turn_detection()
        if config is None or not pcm:
            return []
        if any(pcm):
            if self.speaking:
                return []
            self.speaking = True
            return [self.event("input_audio_buffer.speech_started", audio_start_ms=0, item_id=new_id("item"))]
        if not self.speaking:
            return []
        self.speaking = False
        out = [self.event("input_audio_buffer.speech_stopped", audio_end_ms=0, item_id=new_id("item"))]
        out += self._commit({})
        # a transcription session's turns are committed and transcribed, never answered
        if self.kind != "transcription" and config.get("create_response", True) is not False and self.active is None:
            out += self._response_create({})
        return out

    def _clear(self, event: dict) -> list[Any]:
        self.buffered_bytes = 0
        return [self.event("input_audio_buffer.cleared")]

    def _commit(self, event: dict) -> list[Any]:
        n_bytes, self.buffered_bytes = self.buffered_bytes, 0
        if n_bytes == 0:
            raise ProtocolError(
                "input_audio_buffer_commit_empty", "Error committing input audio buffer: the buffer is empty."
            )
        wire = {
            "id": new_id("item"),
            "type": "message",
            "object": "realtime.item",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
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
        return [
            self.event(
                "conversation.item.input_audio_transcription.completed",
                item_id=item.id,
                content_index=0,
                transcript=transcript,
                usage=usage,
            )
        ]

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
        return [
            self.event("conversation.item.added", previous_item_id=previous, item=item.snapshot()),
            self.event("conversation.item.done", previous_item_id=previous, item=item.snapshot()),
        ]

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
        wire = {
            "id": given.get("id") or new_id("item"),
            "object": "realtime.item",
            "status": "completed",
            **{k: v for k, v in given.items() if k not in ("id", "object", "status")},
        }
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
            raise ProtocolError("invalid_value", "'audio_end_ms' must be a non-negative integer.", "audio_end_ms")
        if item.wire.get("role") == "assistant" and item.tokens.audio:
            item.tokens = Tokens(audio=min(item.tokens.audio, input_audio_tokens(end_ms * 48)))
        return [
            self.event(
                "conversation.item.truncated",
                item_id=item.id,
                content_index=event.get("content_index", 0),
                audio_end_ms=end_ms,
            )
        ]

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
            raise ProtocolError(
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: {self.active.id}.",
            )
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
        part = (
            {"type": self.names["audio_part"], "transcript": ""}
            if audio
            else {"type": self.names["text_part"], "text": ""}
        )
        wire = {
            "id": new_id("item"),
            "type": "message",
            "object": "realtime.item",
            "status": "in_progress",
            "role": "assistant",
            "content": [part],
        }
        total_input = Tokens()
        for _, tokens in seq:
            total_input = total_input + tokens
        return ResponseRun(
            id=new_id("resp"),
            item=ConvItem(wire["id"], wire, Tokens()),
            audio=audio,
            total_ms=self.response_ms,
            input=total_input,
            cached=self._cached(seq),
            in_conversation=params.get("conversation", "auto") != "none",
            metadata=params.get("metadata"),
            max_output=self._max_output(params),
        )

    def _max_output(self, params: dict) -> int | None:
        """The response's output limit, else the session's; "inf" (the default) is None."""
        key = "max_response_output_tokens" if self.beta else "max_output_tokens"
        value = params.get(key, self.config.get(key, "inf"))
        if value == "inf":
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 4096:
            raise ProtocolError("invalid_value", f"'{key}' must be an integer from 1 to 4096 or \"inf\".", key)
        return value

    def _response_cancel(self, event: dict) -> list[Any]:
        if self.active is None:
            raise ProtocolError("response_cancel_not_active", "Cancellation failed: no active response found.")
        self.active.cancel_requested = True
        return []

    def _response_object(self, run: ResponseRun, status: str, usage: dict | None) -> dict:
        details = {
            "cancelled": {"type": "cancelled", "reason": "client_cancelled"},
            "incomplete": {"type": "incomplete", "reason": "max_output_tokens"},
        }.get(status)
        obj: dict[str, Any] = {
            "object": "realtime.response",
            "id": run.id,
            "status": status,
            "status_details": details,
            "output": [run.item.snapshot()] if status != "in_progress" else [],
            "conversation_id": self.conversation_id if run.in_conversation else None,
            "max_output_tokens": "inf" if run.max_output is None else run.max_output,
            "usage": usage,
            "metadata": run.metadata,
        }
        if self.beta:
            obj.update(
                modalities=["text", "audio"] if run.audio else ["text"],
                voice="alloy",
                output_audio_format="pcm16",
                temperature=0.8,
            )
        else:
            obj["output_modalities"] = ["audio"] if run.audio else ["text"]
            if run.audio:
                obj["audio"] = {"output": {"format": dict(PCM_FORMAT), "voice": "alloy"}}
        return obj

    def _where(self, run: ResponseRun) -> dict:
        return {"response_id": run.id, "item_id": run.item.id, "output_index": 0, "content_index": 0}

    def response_head(self, run: ResponseRun) -> list[dict]:
        out = [
            self.event("response.created", response=self._response_object(run, "in_progress", None)),
            self.event("response.output_item.added", response_id=run.id, output_index=0, item=run.item.snapshot()),
        ]
        if run.in_conversation:
            previous = self._insert(run.item, None)
            out.append(
                self.event(
                    "conversation.item.created" if self.beta else "conversation.item.added",
                    previous_item_id=previous,
                    item=run.item.snapshot(),
                )
            )
        part = {"type": "audio", "transcript": ""} if run.audio else {"type": "text", "text": ""}
        out.append(self.event("response.content_part.added", part=part, **self._where(run)))
        return out

    def response_tick(self, run: ResponseRun, tick: int) -> list[dict]:
        out = []
        word = _word(tick // WORD_EVERY_TICKS) if tick % WORD_EVERY_TICKS == 0 else ""
        ms = min(CHUNK_MS, run.total_ms - tick * CHUNK_MS)
        if run.max_output is not None:  # as OpenAI: output stops before it passes the limit
            after = text_tokens(run.text_sent + word) + output_audio_tokens(run.ms_sent + (ms if run.audio else 0))
            if after > run.max_output:
                run.limit_reached = True
                return out
        if word:
            run.text_sent += word
            name = self.names["transcript_delta"] if run.audio else self.names["text_delta"]
            out.append(self.event(name, delta=word, **self._where(run)))
        if run.audio:
            out.append(self.event(self.names["audio_delta"], delta=_chunk_b64(ms), **self._where(run)))
            run.ms_sent += ms
        return out

    def response_finish(self, run: ResponseRun, status: str) -> list[dict]:
        """Close the response; ``status`` is ``completed`` or ``cancelled``."""
        self.active = None
        self._finalise_item(run, status)
        out = self._content_done_events(run)
        out.append(
            self.event("response.output_item.done", response_id=run.id, output_index=0, item=run.item.snapshot())
        )
        if run.in_conversation and not self.beta:
            out.append(
                self.event(
                    "conversation.item.done", previous_item_id=self._previous_of(run.item), item=run.item.snapshot()
                )
            )
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
            out = [
                self.event(self.names["audio_done"], **where),
                self.event(self.names["transcript_done"], transcript=run.text_sent, **where),
            ]
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
            {"name": "requests", "limit": 5000, "remaining": max(0, 5000 - self.responses), "reset_seconds": 0.012},
            {"name": "tokens", "limit": 800_000, "remaining": max(0, 800_000 - self.tokens_used), "reset_seconds": 0.0},
        ]
        return self.event("rate_limits.updated", rate_limits=limits)
