"""The usage formula: the tokens of text, audio and images, and the usage objects the simulator
reports (GA, beta, input transcription).

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
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

BYTES_PER_SECOND = 48_000  # PCM16, 24 kHz, mono
CHARS_PER_TEXT_TOKEN = 4
INPUT_AUDIO_TOKENS_PER_S = 10
OUTPUT_AUDIO_TOKENS_PER_S = 20
IMAGE_TOKENS = 85
DURATION_TRANSCRIBERS = frozenset({"whisper-1", "gpt-realtime-whisper"})


def text_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TEXT_TOKEN)


def input_audio_tokens(n_bytes: int) -> int:
    return -(-n_bytes * INPUT_AUDIO_TOKENS_PER_S // BYTES_PER_SECOND)


def output_audio_tokens(ms: int) -> int:
    return -(-ms * OUTPUT_AUDIO_TOKENS_PER_S // 1000)


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


def _usage(inp: Tokens, out: Tokens, input_details: dict) -> dict:
    """A response.done usage object: the totals both protocols share, then their own details."""
    return {
        "total_tokens": inp.total + out.total,
        "input_tokens": inp.total,
        "output_tokens": out.total,
        "input_token_details": input_details,
        "output_token_details": {"text_tokens": out.text, "audio_tokens": out.audio},
    }


def ga_usage(inp: Tokens, cached: Tokens, out: Tokens) -> dict:
    cached_details = {"text_tokens": cached.text, "audio_tokens": cached.audio, "image_tokens": cached.image}
    return _usage(
        inp,
        out,
        {
            "text_tokens": inp.text,
            "audio_tokens": inp.audio,
            "image_tokens": inp.image,
            "cached_tokens": cached.total,
            "cached_tokens_details": cached_details,
        },
    )


def beta_usage(inp: Tokens, cached: Tokens, out: Tokens) -> dict:
    return _usage(inp, out, {"cached_tokens": cached.total, "text_tokens": inp.text, "audio_tokens": inp.audio})


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
