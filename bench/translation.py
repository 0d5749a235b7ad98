"""`meshrt bench`'s translation measurement: what metering a translation session's appends costs
the worker, per 200 ms chunk of PCM16 (9 600 bytes, a 12 800-character base64 string), next to
the unparsed relay a conversation session's client frames take. Sans-I/O, in this process: the
relay core fed masked client frames one read at a time, as the worker's read callback does.

- `unparsed`: `Relay.from_client` of a conversation session without pre-authorisation (the
  frame's header scanned, the same bytes forwarded; no payload read);
- `translation`: the same with the session's TranslationMeter (the payload unmasked, the audio
  string's decoded length told without a JSON parse, an increment billed ahead once per 1 s of
  audio: one chunk in six, and the supervisor's `Billed` for it handled);
- `translation + spool`: that, plus writing each increment to a spool file (the shell's BILL:
  `shared.spool.append_increment`), amortised over the chunks;
- `unbatched`: that with an increment for every append (no bill-ahead), for comparison;
- `length only` and `json.loads`: the decoded length of one unmasked payload, by the fast path
  and by a full parse, for scale.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import time

from meshrt.shared import spool
from meshrt.shared.pricing import load_price_table
from meshrt.worker.frames import client_text_frame
from meshrt.worker.meter import Meter
from meshrt.worker.relay import Relay
from meshrt.worker.relay import Target
from meshrt.worker.translation import append_audio_bytes
from meshrt.worker.translation import build_translation_meter

from .plans import log

CHUNK_BYTES = 9_600  # 200 ms of 24 kHz PCM16 mono
MODEL = "gpt-realtime-translate"


def _chunk_event(i: int) -> bytes:
    audio = bytes((i + j * 7) % 256 for j in range(CHUNK_BYTES))
    b64 = base64.b64encode(audio).decode()
    event = {"type": "session.input_audio_buffer.append", "event_id": f"evt_{i}", "audio": b64}
    return json.dumps(event, separators=(",", ":")).encode()


def _relay(translation: bool, bill_ahead_s: float):
    relay = Relay("req_bench", 10**12, 1 << 24)
    if translation:
        table = load_price_table()
        relay.translation = build_translation_meter(Meter(table.get(MODEL), table), bill_ahead_s)
    return relay


def _per_chunk_us(
    frames: list[bytes], translation: bool, spool_fd: int | None = None, bill_ahead_s: float = 1.0
) -> tuple[float, int]:
    relay = _relay(translation, bill_ahead_s)
    bills = 0
    began = time.perf_counter()
    for frame in frames:
        for target, payload in relay.from_client(frame):
            if target is Target.BILL:
                bills += 1
                if spool_fd is not None:
                    spool.append_increment(spool_fd, payload)
                relay.billed(payload.seq)  # the supervisor's answer, which the worker handles too
    elapsed = time.perf_counter() - began
    if translation:  # every append metered and forwarded, none held for a Billed
        assert relay.translation.appends == len(frames) and not relay.holding
    return elapsed * 1e6 / len(frames), bills


def _best(samples: list[float]) -> float:
    return round(min(samples), 2)


def measure_translation(plan) -> dict:
    chunks = max(500, min(5_000, plan.rtt_small // 4))
    rounds = 5
    payloads = [_chunk_event(i) for i in range(50)]
    frames = [client_text_frame(payloads[i % len(payloads)]) for i in range(chunks)]
    log(f"translation: {chunks} appends of 200 ms PCM16 ({len(frames[0])} bytes a frame), {rounds} rounds")
    unparsed, parsed, spooled, unbatched, length_only, full_parse = [], [], [], [], [], []
    bills = 0
    with tempfile.TemporaryDirectory(prefix="meshrt-bench-") as tmp:
        fd = os.open(os.path.join(tmp, "spool"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for _ in range(rounds):
                unparsed.append(_per_chunk_us(frames, False)[0])
                us, bills = _per_chunk_us(frames, True)
                parsed.append(us)
                spooled.append(_per_chunk_us(frames, True, fd)[0])
                unbatched.append(_per_chunk_us(frames, True, fd, bill_ahead_s=1e-9)[0])
                began = time.perf_counter()
                for payload in payloads * 10:
                    append_audio_bytes(payload)
                length_only.append((time.perf_counter() - began) * 1e6 / (len(payloads) * 10))
                began = time.perf_counter()
                for payload in payloads * 10:
                    json.loads(payload)
                full_parse.append((time.perf_counter() - began) * 1e6 / (len(payloads) * 10))
        finally:
            os.close(fd)
    result = {
        "chunks": chunks,
        "frame_bytes": len(frames[0]),
        "increments_per_chunk": round(bills / chunks, 3),
        "unparsed_relay_us_per_chunk": _best(unparsed),
        "translation_relay_us_per_chunk": _best(parsed),
        "translation_relay_with_spool_us_per_chunk": _best(spooled),
        "added_us_per_chunk": round(_best(spooled) - _best(unparsed), 2),
        "unbatched_with_spool_us_per_chunk": _best(unbatched),
        "length_only_us": _best(length_only),
        "json_loads_us": _best(full_parse),
        "note": "best of 5 rounds, one process, no sockets; a 200 ms chunk arrives 5 times a second per session",
    }
    log(
        f"translation: unparsed {result['unparsed_relay_us_per_chunk']} µs, metered "
        f"{result['translation_relay_us_per_chunk']} µs, "
        f"with spool {result['translation_relay_with_spool_us_per_chunk']} µs"
    )
    return result


def render_translation(t: dict) -> list[str]:
    return [
        f"Translation appends (µs per 200 ms PCM16 chunk, {t['frame_bytes']}-byte frame, best of 5 × {t['chunks']})",
        f"   unparsed relay (conversation)   {t['unparsed_relay_us_per_chunk']:>8}",
        f"   translation relay (metered)     {t['translation_relay_us_per_chunk']:>8}",
        f"   + spooled increments            {t['translation_relay_with_spool_us_per_chunk']:>8}"
        f"   ({t['increments_per_chunk']} increments a chunk)",
        f"   an increment every append       {t['unbatched_with_spool_us_per_chunk']:>8}   (no bill-ahead, spooled)",
        f"   decoded length alone            {t['length_only_us']:>8}   (json.loads of the same: {t['json_loads_us']})",
    ]
