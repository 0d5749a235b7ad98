"""`meshrt bench`: what the gateway costs, each figure measured against a direct connection to
the same upstream simulator in the same run.

The harness starts its own upstream simulator and its own `meshrt serve` (temporary state
directory, SQLite, loopback only), creates an account and a key, and measures:

1. `measure_rtt` — added round-trip latency. Two connections in echo mode (`sim_echo=1`): one
   straight to the simulator, one through a gateway session. Each round sends the same frame on
   both, alternating which goes first, and times sendall → whole echoed frame received. Sizes:
   a 1 KB text event and a 32 KB `input_audio_buffer.append`-shaped event. Added = gateway
   percentile minus direct percentile; ratio = gateway / direct.
2. `measure_setup` — added connection set-up: TCP connect → 101 → `session.created` received.
   Sequential (one at a time, closed before the next, direct and gateway alternating) and in
   bursts of 100 concurrent opens (per-connection times and the burst's wall time).
3. `measure_memory` — USS and PSS (psutil `memory_full_info`) of every session's worker (the
   pid the gateway records for a live session) with M sessions idle, then the per-worker
   maximum over samples while they stream audio (below); USS/PSS of the supervisor, the front
   door, the zygote and any pre-forked worker still waiting for a session.
4. `measure_capacity` — a ramp of concurrent sessions, each sending 20 ms PCM16 24 kHz chunks
   (960 bytes → 1,280 base64 chars) as `input_audio_buffer.append` 50 times a second and a
   `response.create` every 3 s, receiving the simulator's deltas at its real pace
   (`sim_pace=1`, 1 s responses). The load runs in separate load-generator processes. While
   it runs, the measuring process probes echo round trips (1 KB) on a direct and a gateway
   connection, interleaved; a step passes when the probes' p99 added latency is under 5 ms,
   the direct probe's own p99 is too (else the box is saturated), every session is still
   open and the load generator kept up (≥ 95 % of 50 appends/s). CPU per session =
   Δ CPU time of supervisor + front door + zygote + workers / sessions / wall.
5. `measure_throughput` — one session, one way: 32 KB `input_audio_buffer.append` messages
   written as fast as the socket takes them, then `input_audio_buffer.clear`; the clock stops
   at `input_audio_buffer.cleared`, so every byte has crossed the relay. Direct and gateway
   rounds alternate.

Clients are deliberately lean so that they add the same small cost to both paths: blocking
sockets speaking raw RFC 6455 frames (pre-masked frames built once, no event loop in the timed
path) for 1, 2 (sequential) and 5; asyncio Protocols (uvloop when installed) for bursts and for
the load generator. Everything shares this machine's CPUs: the simulator and the load generator
compete with the gateway, so capacity is a lower bound; CPU per session is the portable figure.

Plans: full (default), `--quick` (< 60 s), and MESHRT_BENCH_SMOKE=1 (tiny counts, for tests).
MESHRT_BENCH_ONLY=rtt,setup,memory,throughput,capacity runs a subset; MESHRT_BENCH_PROFILE=DIR
records py-spy profiles while measuring (see `Profiler`). Progress goes to stderr; the table
(or with `meshrt --json bench` the JSON document) to stdout; `--out FILE` writes the JSON too.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import multiprocessing
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from websockets.frames import Close, Frame, Opcode

from meshrt.dev.children import ChildStartError, wait_for_line

P99_TARGET_US = 5000.0  # capacity: a step holds while the probes' p99 added latency is below this
APPEND_PCM_BYTES = 960  # 20 ms of PCM16 mono at 24 kHz
APPEND_PERIOD_S = 0.020
RESPONSE_EVERY_S = 3.0
RESPONSE_MS = 1000
MODEL = "gpt-realtime"
TARGETS = {
    "rtt_small_added_p50_us": 40, "rtt_small_added_p99_us": 120, "setup_added_p50_ms": 2.0,
    "worker_idle_uss_mib": 2.0, "worker_streaming_uss_mib": 4.0, "capacity_sessions": 1000,
}


class BenchError(RuntimeError):
    pass


# --- plans --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    name: str
    rtt_small: int  # interleaved round-trip pairs, 1 KB
    rtt_large: int  # interleaved round-trip pairs, 32 KB
    warmup: int
    setup_sequential: int  # sequential opens per path
    burst_size: int
    burst_rounds: int  # bursts per path
    memory_sessions: int
    stream_s: float  # memory sampling window while streaming
    capacity_steps: tuple[int, ...]
    settle_s: float
    hold_s: float
    capacity_budget_s: float  # the ramp starts no new step after this
    throughput_mb: int  # per round
    throughput_rounds: int
    loadgen_procs: int


FULL = Plan("full", rtt_small=20000, rtt_large=3000, warmup=500, setup_sequential=300, burst_size=100,
            burst_rounds=5, memory_sessions=50, stream_s=60.0,
            capacity_steps=(10, 20, 30, 40, 50, 60, 70, 80, 100, 125, 150, 200, 300, 400, 600, 800, 1000),
            settle_s=3.0, hold_s=5.0, capacity_budget_s=480, throughput_mb=64, throughput_rounds=5, loadgen_procs=2)
QUICK = Plan("quick", rtt_small=2000, rtt_large=300, warmup=200, setup_sequential=30, burst_size=100,
             burst_rounds=1, memory_sessions=10, stream_s=3.0, capacity_steps=(10, 25, 50, 100),
             settle_s=1.0, hold_s=2.0, capacity_budget_s=20, throughput_mb=16, throughput_rounds=2, loadgen_procs=1)
SMOKE = Plan("smoke", rtt_small=200, rtt_large=40, warmup=20, setup_sequential=5, burst_size=10,
             burst_rounds=1, memory_sessions=3, stream_s=1.5, capacity_steps=(3, 6),
             settle_s=0.5, hold_s=1.0, capacity_budget_s=15, throughput_mb=2, throughput_rounds=1, loadgen_procs=1)


def choose_plan(args) -> Plan:
    if os.environ.get("MESHRT_BENCH_SMOKE", "").strip() in ("1", "true", "yes"):
        return SMOKE
    return QUICK if getattr(args, "quick", False) else FULL


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- statistics ---------------------------------------------------------------------------


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not ordered:
        return float("nan")
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary(values: list[float], digits: int = 1) -> dict:
    ordered = sorted(values)
    out = {f"p{p}": round(percentile(ordered, p), digits) for p in (50, 90, 99)}
    out.update(mean=round(sum(ordered) / len(ordered), digits), min=round(ordered[0], digits),
               max=round(ordered[-1], digits), n=len(ordered))
    return out


def compare(direct: list[float], gateway: list[float], digits: int = 1) -> dict:
    """Direct and gateway distributions, the added cost at each percentile, and the ratio."""
    d, g = summary(direct, digits), summary(gateway, digits)
    return {
        "direct": d, "gateway": g,
        "added": {p: round(g[p] - d[p], digits) for p in ("p50", "p90", "p99")},
        "ratio": {p: round(g[p] / d[p], 2) if d[p] > 0 else None for p in ("p50", "p99")},
    }


# --- machine ------------------------------------------------------------------------------


def machine_info() -> dict:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model, "nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kernel": f"{platform.system()} {platform.release()}", "arch": platform.machine(),
        "versions": {name: _version(name) for name in ("websockets", "uvicorn", "anyio", "uvloop", "psutil")},
        "load_generator_loop": _loop_name(),
    }


def code_version() -> dict:
    """The commit under test, and whether the working tree differs from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(dirty)}


def tree_cpu_seconds() -> float:
    """CPU time of this process and everything under it, the reaped included."""
    total = 0.0
    for proc in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def foreign_cpu_cores(busy_before: float, busy_after: float, ours: float, wall: float) -> float:
    """Cores' worth of CPU that processes outside the benchmark used during the run (others'
    tests, builds …): the machine's busy time minus the benchmark's own, per second."""
    return round(max(0.0, (busy_after - busy_before) - ours) / wall, 2) if wall > 0 else 0.0


def busy_seconds() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0)


def cpu_steal_pct(before, after) -> float | None:
    """Share of CPU time the hypervisor took from this VM between two psutil.cpu_times()."""
    if not hasattr(before, "steal"):
        return None
    total = sum(after) - sum(before)
    return round(100 * (after.steal - before.steal) / total, 2) if total > 0 else None


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401

        return "uvloop"
    except ImportError:
        return "asyncio"


# --- frames and events --------------------------------------------------------------------


def client_frame(payload: bytes) -> bytes:
    """A masked text frame, built once and written as often as needed."""
    return Frame(Opcode.TEXT, payload).serialize(mask=True, extensions=[])


CLOSE_FRAME = Frame(Opcode.CLOSE, Close(1000, "").serialize()).serialize(mask=True, extensions=[])


def text_event(size: int) -> bytes:
    """A `conversation.item.create` with a text part, padded to exactly `size` bytes."""
    head = ('{"type":"conversation.item.create","item":{"type":"message","role":"user",'
            '"content":[{"type":"input_text","text":"')
    tail = '"}]}}'
    return (head + "x" * (size - len(head) - len(tail)) + tail).encode()


def append_event(size: int | None = None, pcm_bytes: int | None = None) -> bytes:
    """An `input_audio_buffer.append` of PCM16 (a byte ramp), either `pcm_bytes` of audio
    or padded to at most `size` bytes overall (the base64 kept a multiple of 4: valid audio)."""
    wrapper = len('{"type":"input_audio_buffer.append","audio":""}')
    if pcm_bytes is None:
        pcm_bytes = (size - wrapper) // 4 * 3
    pcm = bytes((i * 7) & 0xFF for i in range(pcm_bytes))
    return json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()},
                      separators=(",", ":")).encode()


def server_frame_len(payload_len: int) -> int:
    return payload_len + 2 + (2 if 126 <= payload_len < 65536 else 8 if payload_len >= 65536 else 0)


def upgrade_request(port: int, query: str, key: str) -> bytes:
    return (f"GET /v1/realtime?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {key}\r\n\r\n").encode()


@dataclass(frozen=True)
class Target:
    """Where a client connects: the simulator directly, or the gateway."""

    name: str  # "direct" | "gateway"
    port: int
    key: str

    def query(self, extra: str = "") -> str:
        return f"model={MODEL}" + (f"&{extra}" if extra else "")


# --- the blocking client ------------------------------------------------------------------


class Conn:
    """A blocking RFC 6455 client: no event loop, frame headers only. `setup_ns` is the time
    from before connect() to the end of the first frame (`session.created`)."""

    def __init__(self, target: Target, extra_query: str = "", timeout: float = 15.0):
        t0 = time.perf_counter_ns()
        self.sock = socket.create_connection(("127.0.0.1", target.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.sock.sendall(upgrade_request(target.port, target.query(extra_query), target.key))
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        if not head.startswith(b"HTTP/1.1 101"):
            self.sock.close()
            raise BenchError(f"{target.name}: upgrade refused: {head.splitlines()[0]!r}")
        opcode, first = self.recv_frame()
        self.setup_ns = time.perf_counter_ns() - t0
        if opcode != 0x1 or b'"session.created"' not in first[:60]:
            self.sock.close()
            raise BenchError(f"{target.name}: expected session.created, got {first[:200]!r}")

    def _more(self) -> None:
        chunk = self.sock.recv(262144)
        if not chunk:
            raise BenchError("connection closed by the peer")
        self.buf += chunk

    def recv_frame(self) -> tuple[int, bytes]:
        while len(self.buf) < 2:
            self._more()
        b0, length, head = self.buf[0], self.buf[1] & 0x7F, 2
        if length >= 126:
            head = 4 if length == 126 else 10
            while len(self.buf) < head:
                self._more()
            length = int.from_bytes(self.buf[2:head], "big")
        while len(self.buf) < head + length:
            self._more()
        payload = bytes(self.buf[head:head + length])
        del self.buf[:head + length]
        return b0 & 0x0F, payload

    def roundtrip_ns(self, frame: bytes, payload_len: int) -> int:
        """Send one frame; return the ns until its echo has been received whole."""
        t0 = time.perf_counter_ns()
        self.sock.sendall(frame)
        need = server_frame_len(payload_len)
        while len(self.buf) < need:
            self._more()
        elapsed = time.perf_counter_ns() - t0
        if (self.buf[0] & 0x0F) != 0x1:
            raise BenchError(f"expected an echoed text frame, got opcode {self.buf[0] & 0x0F}")
        del self.buf[:need]
        return elapsed

    def recv_until(self, marker: bytes) -> bytes:
        while True:
            opcode, payload = self.recv_frame()
            if opcode == 0x8:
                raise BenchError(f"closed while waiting for {marker!r}: {payload!r}")
            if marker in payload[:80]:
                return payload

    def close(self) -> None:
        """Close handshake: send close, wait (bounded) for the peer's close, then drop."""
        try:
            self.sock.sendall(CLOSE_FRAME)
            self.sock.settimeout(2.0)
            while self.recv_frame()[0] != 0x8:
                pass
        except (OSError, BenchError):
            pass
        finally:
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- the asyncio client (bursts and load generation) --------------------------------------


class AsyncSession(asyncio.Protocol):
    """A raw WebSocket client session on an asyncio transport: writes pre-built frames, counts
    what it receives (frame headers only). `opened` resolves at the end of the first frame."""

    def __init__(self, target: Target, extra_query: str = ""):
        self.target, self.extra_query = target, extra_query
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future | None = None
        self.closed: asyncio.Future | None = None
        self.t0 = self.open_ns = 0
        self.upgraded = False
        self.closing = False
        self.buf = b""
        self.skip = 0
        self.opcode = 0
        self.rx_bytes = self.rx_frames = 0
        self.next_response = 0.0

    async def open(self, timeout: float = 30.0) -> int:
        loop = asyncio.get_running_loop()
        self.opened, self.closed = loop.create_future(), loop.create_future()
        self.t0 = time.perf_counter_ns()
        await asyncio.wait_for(loop.create_connection(lambda: self, "127.0.0.1", self.target.port), timeout)
        await asyncio.wait_for(self.opened, timeout)
        return self.open_ns - self.t0

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(upgrade_request(self.target.port, self.target.query(self.extra_query), self.target.key))

    def data_received(self, data: bytes) -> None:
        self.rx_bytes += len(data)
        if not self.upgraded:
            self.buf += data
            if b"\r\n\r\n" not in self.buf:
                return
            head, _, data = self.buf.partition(b"\r\n\r\n")
            self.buf = b""
            if not head.startswith(b"HTTP/1.1 101"):
                self._fail(BenchError(f"upgrade refused: {head.splitlines()[0]!r}"))
                return
            self.upgraded = True
        self._scan(data)

    def _scan(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos, size = 0, len(buf)
        while True:
            if self.skip:
                take = min(self.skip, size - pos)
                pos += take
                self.skip -= take
                if self.skip:
                    break
                self._frame_done()
                continue
            if size - pos < 2:
                break
            length, head = buf[pos + 1] & 0x7F, 2
            if length >= 126:
                head = 4 if length == 126 else 10
                if size - pos < head:
                    break
                length = int.from_bytes(buf[pos + 2:pos + head], "big")
            self.opcode = buf[pos] & 0x0F
            pos += head
            self.skip = length
            if length == 0:
                self._frame_done()
        self.buf = buf[pos:] if pos < size else b""

    def _frame_done(self) -> None:
        self.rx_frames += 1
        if self.opened is not None and not self.opened.done():
            self.open_ns = time.perf_counter_ns()
            self.opened.set_result(True)
        if self.opcode == 0x8 and self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        if self.opened is not None and not self.opened.done():
            self.opened.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self._fail(BenchError(f"connection lost before session.created: {exc!r}"))
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(self.closing)

    def start_close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(CLOSE_FRAME)


async def close_sessions(sessions: list[AsyncSession], timeout: float = 5.0) -> None:
    for s in sessions:
        s.start_close()
    waiting = [s.closed for s in sessions if s.closed is not None and not s.closed.done()]
    if waiting:
        await asyncio.wait(waiting, timeout=timeout)
    for s in sessions:
        if s.transport is not None and not s.transport.is_closing():
            s.transport.abort()


async def open_burst(target: Target, n: int) -> tuple[list[float], float]:
    """Open n sessions at once; returns (per-connection set-up ms, wall ms of the burst)."""
    sessions = [AsyncSession(target) for _ in range(n)]
    t0 = time.perf_counter_ns()
    try:
        times = await asyncio.gather(*(s.open() for s in sessions))
        wall = time.perf_counter_ns() - t0
    finally:
        await close_sessions(sessions)
    return [t / 1e6 for t in times], wall / 1e6


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def run_async(coro):
    loop = new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


# --- the load generator (separate processes) ----------------------------------------------

APPEND_FRAME = client_frame(append_event(pcm_bytes=APPEND_PCM_BYTES))
RESPONSE_FRAME = client_frame(b'{"type":"response.create"}')
LOAD_QUERY = f"sim_pace=1&sim_response_ms={RESPONSE_MS}"
SLOTS = 10  # the 20 ms period is cut in 10 slots; sessions are spread over them
OPEN_TIMEOUT_S = 10.0


class LoadGenChild:
    """Runs inside a load-generator process: opens audio-rate sessions through the gateway
    and, while streaming, writes each one's 20 ms append on its slot and a response.create
    every RESPONSE_EVERY_S. Commands arrive on a multiprocessing pipe."""

    def __init__(self, conn, target: Target):
        self.conn, self.target = conn, target
        self.sessions: list[AsyncSession] = []
        self.slots: list[list[AsyncSession]] = [[] for _ in range(SLOTS)]
        self.pacer: asyncio.Task | None = None
        self.dropped = self.failed = 0
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.appends = self.responses = self.late_slots = self.skipped_slots = 0
        self.max_lag_s = 0.0
        self.rx0 = sum(s.rx_bytes for s in self.sessions)
        self.t_reset = time.monotonic()
        self.cpu0 = time.process_time()

    async def run(self) -> None:
        while True:
            command, arg = await asyncio.to_thread(self.conn.recv)
            if command == "exit":
                await self._close_all()
                return
            handler = getattr(self, f"_cmd_{command}")
            self.conn.send(await handler(arg))

    async def _cmd_open(self, target_count: int) -> dict:
        """Open sessions 20 at a time up to `target_count`; stop at the first failed batch
        (an open taking over OPEN_TIMEOUT_S counts as failed: the gateway is past saturation)."""
        loop = asyncio.get_running_loop()
        failed = 0
        while len(self._live()) < target_count and not failed:
            batch = [AsyncSession(self.target, LOAD_QUERY) for _ in range(min(20, target_count - len(self._live())))]
            results = await asyncio.gather(*(s.open(OPEN_TIMEOUT_S) for s in batch), return_exceptions=True)
            for s, result in zip(batch, results):
                if isinstance(result, BaseException):
                    failed += 1
                    if s.transport is not None:
                        s.transport.abort()
                    continue
                s.next_response = loop.time() + random.uniform(0, RESPONSE_EVERY_S)
                self.slots[len(self.sessions) % SLOTS].append(s)
                self.sessions.append(s)
        self.failed += failed
        return {"live": len(self._live()), "failed": failed}

    def _live(self) -> list[AsyncSession]:
        live = []
        for s in self.sessions:
            if s.closed.done():
                if not s.closing:
                    self.dropped += 1
                    s.closing = True  # count once
            else:
                live.append(s)
        return live

    async def _cmd_stream(self, on: bool) -> dict:
        if on and self.pacer is None:
            self.pacer = asyncio.create_task(self._pace())
        elif not on and self.pacer is not None:
            self.pacer.cancel()
            await asyncio.gather(self.pacer, return_exceptions=True)
            self.pacer = None
        return {"streaming": self.pacer is not None}

    async def _pace(self) -> None:
        loop = asyncio.get_running_loop()
        slot_s = APPEND_PERIOD_S / SLOTS
        due, k = loop.time(), 0
        while True:
            due += slot_s
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.late_slots += 1
                self.max_lag_s = max(self.max_lag_s, -delay)
                if -delay > APPEND_PERIOD_S:  # a whole period behind: skip ahead, don't burst
                    skipped = int(-delay / slot_s)
                    self.skipped_slots += skipped
                    due += skipped * slot_s
                    k = (k + skipped) % SLOTS
                await asyncio.sleep(0)  # never starve the loop: reads and commands go on
            now = loop.time()
            for s in self.slots[k]:
                if s.closing or s.transport is None or s.transport.is_closing():
                    continue
                s.transport.write(APPEND_FRAME)
                self.appends += 1
                if now >= s.next_response:
                    s.transport.write(RESPONSE_FRAME)
                    s.next_response += RESPONSE_EVERY_S
                    self.responses += 1
            k = (k + 1) % SLOTS

    async def _cmd_stats(self, reset: bool) -> dict:
        live = self._live()
        elapsed = time.monotonic() - self.t_reset
        stats = {"live": len(live), "dropped": self.dropped, "failed": self.failed, "appends": self.appends,
                 "responses": self.responses, "rx_bytes": sum(s.rx_bytes for s in self.sessions) - self.rx0,
                 "late_slots": self.late_slots, "skipped_slots": self.skipped_slots,
                 "max_lag_ms": round(self.max_lag_s * 1000, 2),
                 "elapsed_s": elapsed, "cpu_s": time.process_time() - self.cpu0}
        if reset:
            self._reset_counters()
        return stats

    async def _cmd_close_all(self, _arg) -> dict:
        await self._close_all()
        return {"live": 0}

    async def _close_all(self) -> None:
        if self.pacer is not None:
            await self._cmd_stream(False)
        await close_sessions([s for s in self.sessions if not s.closed.done()])
        self.sessions = []
        self.slots = [[] for _ in range(SLOTS)]


def loadgen_main(conn, target: Target) -> None:
    """Entry point of a load-generator process (multiprocessing, spawn)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run_async(LoadGenChild(conn, target).run())


class LoadGen:
    """The parent's handle on the load-generator processes; sessions are split evenly."""

    def __init__(self, procs: int, target: Target):
        ctx = multiprocessing.get_context("spawn")
        self.pipes, self.procs = [], []
        for _ in range(procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=loadgen_main, args=(child, target), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    def _all(self, command: str, args: list, timeout: float = 120.0) -> list[dict]:
        for pipe, arg in zip(self.pipes, args):
            pipe.send((command, arg))
        replies = []
        for pipe in self.pipes:
            if not pipe.poll(timeout):
                raise BenchError(f"load generator did not answer {command!r} within {timeout} s")
            replies.append(pipe.recv())
        return replies

    def open(self, total: int) -> dict:
        n = len(self.pipes)
        shares = [total // n + (1 if i < total % n else 0) for i in range(n)]
        replies = self._all("open", shares)
        return {"live": sum(r["live"] for r in replies), "failed": sum(r["failed"] for r in replies)}

    def stream(self, on: bool) -> None:
        self._all("stream", [on] * len(self.pipes))

    def stats(self, reset: bool = False) -> dict:
        replies = self._all("stats", [reset] * len(self.pipes))
        out = {k: sum(r[k] for r in replies) for k in ("live", "dropped", "failed", "appends", "responses",
                                                       "rx_bytes", "late_slots", "skipped_slots", "cpu_s")}
        out["elapsed_s"] = max(r["elapsed_s"] for r in replies)
        out["max_lag_ms"] = max(r["max_lag_ms"] for r in replies)
        return out

    def close_all(self) -> None:
        self._all("close_all", [None] * len(self.pipes))

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("exit", None))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


# --- the stack under test -----------------------------------------------------------------


def _read_line(proc: subprocess.Popen, pattern: str, timeout: float, what: str) -> re.Match:
    try:
        return wait_for_line(proc, pattern, timeout, what)
    except ChildStartError as exc:
        raise BenchError(str(exc)) from None


def _stop_process(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class Stack:
    """The simulator and a gateway (`meshrt serve`) as processes, plus an account and a key.
    `direct` and `gateway` are the two targets every measurement compares."""

    def __init__(self, settings, plan: Plan):
        self.settings, self.plan = settings, plan
        self.tmp = Path(tempfile.mkdtemp(prefix="meshrt-bench-"))
        self.operator_key = "sk-bench-" + secrets.token_hex(16)
        self.sim = self.gw = self.floor_relay = None
        self.direct = self.gateway = self.floor = None

    def start(self) -> "Stack":
        self.sim = subprocess.Popen(
            [sys.executable, "-m", "meshrt.simulator", "--port", "0", "--api-key", self.operator_key],
            stdout=subprocess.PIPE, stderr=open(self.tmp / "sim.err", "ab"), text=True, stdin=subprocess.DEVNULL)
        sim_port = int(_read_line(self.sim, r"listening on ws://[^:]+:(\d+)", 20, "the simulator").group(1))
        self.direct = Target("direct", sim_port, self.operator_key)
        self.floor_relay = subprocess.Popen(
            [sys.executable, "-m", "meshrt.bench.floor", "--upstream-port", str(sim_port)],
            stdout=subprocess.PIPE, stderr=open(self.tmp / "floor.err", "ab"), text=True, stdin=subprocess.DEVNULL)
        floor_port = int(_read_line(self.floor_relay, r"listening on (\d+)", 20, "the floor relay").group(1))
        self.floor = Target("floor", floor_port, self.operator_key)
        db_url = f"sqlite:///{self.tmp / 'meshrt.db'}"
        key = self._tenant_key(db_url)
        self.gw = subprocess.Popen(
            [sys.executable, "-m", "meshrt.supervisor.cli", "serve"], env=self._gateway_env(db_url, sim_port),
            stdout=subprocess.PIPE, stderr=open(self.tmp / "gateway.err", "ab"), text=True,
            stdin=subprocess.DEVNULL)
        port = int(_read_line(self.gw, r"listening on http://[^:]+:(\d+)", 30, "the gateway").group(1))
        self.gateway = Target("gateway", port, key)
        self._wait_ready(port)
        return self

    def _tenant_key(self, db_url: str) -> str:
        from meshrt.shared.money import Money
        from meshrt.supervisor import accounts, db

        engine = db.make_engine(db_url)
        try:
            db.create_schema(engine)
            account = accounts.create_account(engine, "bench", Money.from_usd("1000000"),
                                              max_concurrent_sessions=100_000)
            return accounts.create_key(engine, account.id, "bench").plaintext
        finally:
            engine.dispose()

    def _gateway_env(self, db_url: str, sim_port: int) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHRT_") and k != "OPENAI_API_KEY"}
        env.update({
            "MESHRT_STATE_DIR": str(self.tmp / "state"), "MESHRT_DATABASE_URL": db_url,
            "MESHRT_UPSTREAM_URL": f"ws://127.0.0.1:{sim_port}/v1/realtime", "OPENAI_API_KEY": self.operator_key,
            "MESHRT_ALLOW_PLAIN_WS": "1", "MESHRT_HOST": "127.0.0.1", "MESHRT_PORT": "0",
            "MESHRT_MAX_SESSIONS": str(max(self.plan.capacity_steps) + 200),
            "MESHRT_MAX_CONCURRENT_SESSIONS": "100000", "MESHRT_DRAIN_S": "2",
            "MESHRT_WORKER_BACKEND": self.settings.worker_backend,
            "MESHRT_FRONTDOOR_WORKERS": str(self.settings.frontdoor_workers),
            "MESHRT_WARM_WORKERS": str(self.settings.warm_workers),
            "MESHRT_LOG_LEVEL": self.settings.log_level,
        })
        return env

    def _wait_ready(self, port: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.gw.poll() is not None:
                break
            time.sleep(0.05)
        raise BenchError(f"the gateway did not become ready; see {self.tmp / 'gateway.err'}")

    # processes by role

    def _child(self, marker: str) -> psutil.Process | None:
        for child in psutil.Process(self.gw.pid).children():
            try:
                if marker in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        return None

    def roles(self) -> dict[str, psutil.Process]:
        out = {"supervisor": psutil.Process(self.gw.pid)}
        for role, marker in (("frontdoor", "meshrt.supervisor.frontdoor"), ("zygote", "meshrt.worker.zygote")):
            proc = self._child(marker)
            if proc is not None:
                out[role] = proc
        return out

    def zygote_children(self) -> list[psutil.Process]:
        """Every worker process: those running a session and any pre-forked idle ones."""
        zygote = self._child("meshrt.worker.zygote")
        if zygote is None:
            return []
        return [p for p in zygote.children() if _alive(p)]

    def _session_rows(self) -> list[tuple[str, int | None]]:
        """(state, pid) of the sessions the gateway has not finalised, from its database."""
        with closing(sqlite3.connect(self.tmp / "meshrt.db", timeout=10)) as conn:
            return conn.execute("SELECT state, pid FROM realtime_session WHERE state != 'ended'").fetchall()

    def workers(self) -> list[psutil.Process]:
        """The processes of live sessions: the pid the supervisor recorded for each (warm,
        pre-forked workers without a session are not counted)."""
        pids = {pid for state, pid in self._session_rows() if state == "live" and pid}
        return [p for p in self.zygote_children() if p.pid in pids]

    def wait_live(self, n: int, timeout: float = 15) -> list[psutil.Process]:
        """Wait until n sessions are recorded live (the record trails session.created a little)."""
        deadline = time.monotonic() + timeout
        while True:
            workers = self.workers()
            if len(workers) >= n or time.monotonic() > deadline:
                return workers
            time.sleep(0.02)

    def wait_sessions_ended(self, timeout: float = 30) -> None:
        """Wait until every session is finalised, so that teardown doesn't overlap what's next."""
        deadline = time.monotonic() + timeout
        while self._session_rows() and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self, keep: bool = False) -> None:
        _stop_process(self.gw)
        _stop_process(self.floor_relay)
        _stop_process(self.sim)
        if not keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def cpu_seconds(procs: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def memory_mib(proc: psutil.Process) -> dict | None:
    try:
        info = proc.memory_full_info()
    except psutil.Error:
        return None
    return {"uss": info.uss / 2**20, "pss": info.pss / 2**20, "rss": info.rss / 2**20}


def alternate(i: int, a, b):
    """Both items, the order flipping every round: drift hits both paths alike."""
    return (a, b) if i % 2 == 0 else (b, a)


# --- optional profiles (MESHRT_BENCH_PROFILE=DIR) -----------------------------------------


class Profiler:
    """py-spy CPU samples (`--gil`: only while a thread runs Python, so idle waits don't count)
    of chosen processes while a measurement runs: folded stacks in DIR/<name>.txt and the
    hottest frames in DIR/<name>.summary.txt. Off unless MESHRT_BENCH_PROFILE names a
    directory; py-spy must be installed (`pip install py-spy`). py-spy pauses the process for
    each sample (exact stacks, slower process), so take the numbers of a run without profiles
    and the profiles of another."""

    def __init__(self, directory: str | None):
        self.dir = Path(directory) if directory else None
        self.capacity_profiled = False
        self.spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if self.dir is not None:
            if not Path(self.spy).exists():
                raise BenchError("MESHRT_BENCH_PROFILE is set but py-spy is not installed (pip install py-spy)")
            self.dir.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def record(self, name: str, procs: list[psutil.Process]):
        if self.dir is None or not procs:
            yield
            return
        parts = [self.dir / f"{name}-{p.pid}.txt" for p in procs]
        spies = [subprocess.Popen([self.spy, "record", "-p", str(p.pid), "-r", "997", "--gil",
                                   "-f", "raw", "-o", str(part)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for p, part in zip(procs, parts)]
        time.sleep(1.0)  # attached
        try:
            yield
        finally:
            for spy in spies:
                spy.send_signal(signal.SIGINT)
            for spy in spies:
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
            merged = "".join(part.read_text() for part in parts if part.exists())
            for part in parts:
                part.unlink(missing_ok=True)
            (self.dir / f"{name}.txt").write_text(merged)
            (self.dir / f"{name}.summary.txt").write_text(summarize_folded(merged))
            log(f"profile {name}: {self.dir / (name + '.summary.txt')}")


def summarize_folded(folded: str, top: int = 40) -> str:
    """Inclusive and self share of samples per frame (file:line), from py-spy's raw output."""
    inclusive, leaf, total = {}, {}, 0
    for line in folded.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n, frames = int(count), [_short_frame(f) for f in stack.split(";")]
        total += n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
        leaf[frames[-1]] = leaf.get(frames[-1], 0) + n
    if not total:
        return "no samples\n"
    out = [f"{total} samples (py-spy --gil: CPU running Python)", "", "inclusive:"]
    out += [f"{100 * n / total:6.1f}%  {f}" for f, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]]
    out += ["", "self:"]
    out += [f"{100 * n / total:6.1f}%  {f}" for f, n in sorted(leaf.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(out) + "\n"


def _short_frame(frame: str) -> str:
    return re.sub(r"\((?:.*/)?(site-packages|python3\.\d+|main)/", "(", frame)


# --- 1. round-trip latency ------------------------------------------------------------------


def _per(after: dict, before: dict, pid: int | None, count: int) -> float | None:
    """µs of CPU per operation; None when the clock (10 ms ticks) saw too little to tell."""
    if pid not in after or pid not in before or after[pid] - before[pid] < 0.02:
        return None
    return round(1e6 * (after[pid] - before[pid]) / count, 1)


def measure_rtt(stack: Stack, plan: Plan, profiler: Profiler) -> dict:
    """Added round-trip latency through a session vs direct, echo mode, 1 KB and 32 KB events.

    One connection to each path stays open; each round times one echo on both, in alternating
    order (pairs interleaved, so drift cancels). Percentiles in µs; added = gateway − direct.
    A third connection goes through a byte-copying uvloop relay (bench/floor.py), timed in the
    same rounds: its added time is the floor for any Python relay on this machine."""
    cases = (("small_1k", text_event(1024), plan.rtt_small), ("large_32k", append_event(size=32768), plan.rtt_large))
    out = {}
    with Conn(stack.direct, "sim_echo=1") as direct, Conn(stack.gateway, "sim_echo=1") as gateway, \
            Conn(stack.floor, "sim_echo=1") as floor:
        watched = stack.wait_live(1)[:1] + [psutil.Process(stack.sim.pid)]
        for name, payload, pairs in cases:
            frame = client_frame(payload)
            for _ in range(plan.warmup):
                direct.roundtrip_ns(frame, len(payload))
                gateway.roundtrip_ns(frame, len(payload))
                floor.roundtrip_ns(frame, len(payload))
            times = {"direct": [], "gateway": [], "floor": []}
            with profiler.record(f"rtt-{name}-worker", watched[:-1]):
                cpu0 = cpu_seconds(watched)
                for i in range(pairs):
                    for conn, key in alternate(i, (direct, "direct"), (gateway, "gateway")):
                        times[key].append(conn.roundtrip_ns(frame, len(payload)) / 1000)
                    times["floor"].append(floor.roundtrip_ns(frame, len(payload)) / 1000)
                cpu1 = cpu_seconds(watched)
            worker_pid, sim_pid = (watched[0].pid if len(watched) == 2 else None), stack.sim.pid
            out[name] = {"bytes": len(payload), "pairs": pairs, "unit": "us",
                         **compare(times["direct"], times["gateway"]),
                         "floor_added": compare(times["direct"], times["floor"])["added"],
                         # CPU behind the numbers: the gateway worker per round trip (two frames
                         # relayed), the simulator per echo (both paths use it)
                         "worker_cpu_us_per_roundtrip": _per(cpu1, cpu0, worker_pid, pairs),
                         "sim_cpu_us_per_echo": _per(cpu1, cpu0, sim_pid, 2 * pairs)}
            log(f"rtt {name}: added p50 {out[name]['added']['p50']} µs, p99 {out[name]['added']['p99']} µs")
    stack.wait_sessions_ended()
    return out


# --- 2. connection set-up -----------------------------------------------------------------


def measure_setup(stack: Stack, plan: Plan, profiler: Profiler) -> dict:
    """Added set-up time, connect → `session.created`, sequential and in concurrent bursts.

    Sequential: one connection at a time, closed (close handshake) before the next, direct and
    gateway alternating; a short pause lets the previous session's teardown finish. Bursts:
    `burst_size` opens at once on an asyncio client, per-connection times and the burst's wall
    time; the gateway's workers are left to exit before the next burst. Milliseconds."""
    seq = {"direct": [], "gateway": []}
    roles = stack.roles()
    with profiler.record("setup-frontdoor", [roles["frontdoor"]]), \
            profiler.record("setup-supervisor", [roles["supervisor"]]):
        for i in range(plan.setup_sequential):
            for target in alternate(i, stack.direct, stack.gateway):
                conn = Conn(target)
                seq[target.name].append(conn.setup_ns / 1e6)
                conn.close()
            time.sleep(0.02)
    stack.wait_sessions_ended()
    burst = {"direct": [], "gateway": []}
    walls = {"direct": [], "gateway": []}
    for r in range(plan.burst_rounds):
        for target in alternate(r, stack.direct, stack.gateway):
            times, wall = run_async(open_burst(target, plan.burst_size))
            burst[target.name] += times
            walls[target.name].append(wall)
            stack.wait_sessions_ended()
            time.sleep(0.2)
    out = {
        "unit": "ms",
        "sequential": {"connections": plan.setup_sequential, **compare(seq["direct"], seq["gateway"], 3)},
        "burst": {"size": plan.burst_size, "rounds": plan.burst_rounds,
                  **compare(burst["direct"], burst["gateway"], 3),
                  "wall_ms": {k: round(sum(v) / len(v), 1) for k, v in walls.items()}},
    }
    log(f"setup: sequential added p50 {out['sequential']['added']['p50']} ms; "
        f"burst added p50 {out['burst']['added']['p50']} ms")
    return out


# --- 3. memory ----------------------------------------------------------------------------


def _memory_table(samples: list[dict]) -> dict:
    return {k: summary([s[k] for s in samples], 2) for k in ("uss", "pss", "rss")}


def measure_memory(stack: Stack, plan: Plan) -> dict:
    """USS/PSS per worker with `memory_sessions` sessions open and idle, then the per-worker
    maximum over samples (30 of them, ≥ 0.5 s apart) while they stream audio at 50 appends/s and receive
    paced responses; plus the supervisor, front door and zygote, and the zygote's pre-forked
    idle workers (no session yet) if it keeps any. MiB (2^20 bytes)."""
    loadgen = LoadGen(1, stack.gateway)
    try:
        opened = loadgen.open(plan.memory_sessions)
        if opened["live"] < plan.memory_sessions:
            raise BenchError(f"memory: opened only {opened['live']} of {plan.memory_sessions} sessions")
        time.sleep(1.0)
        workers = stack.wait_live(plan.memory_sessions)
        idle = [m for m in map(memory_mib, workers) if m]
        session_pids = {p.pid for p in workers}
        warm = [m for m in map(memory_mib, (p for p in stack.zygote_children() if p.pid not in session_pids)) if m]
        roles_idle = {role: memory_mib(p) for role, p in stack.roles().items()}
        loadgen.stream(True)
        peak: dict[int, dict] = {}
        deadline = time.monotonic() + plan.stream_s
        while time.monotonic() < deadline:
            time.sleep(max(0.5, plan.stream_s / 30))
            for proc in stack.workers():
                m = memory_mib(proc)
                if m:
                    old = peak.get(proc.pid)
                    peak[proc.pid] = m if old is None else {k: max(old[k], m[k]) for k in m}
        stats = loadgen.stats()
        roles_streaming = {role: memory_mib(p) for role, p in stack.roles().items()}
        loadgen.close_all()
    finally:
        loadgen.stop()
    stack.wait_sessions_ended()
    out = {
        "unit": "MiB", "sessions": plan.memory_sessions, "stream_s": plan.stream_s,
        "responses_during_streaming": stats["responses"],
        "worker_idle": _memory_table(idle), "worker_streaming": _memory_table(list(peak.values())),
        "warm_workers": len(warm), "warm_worker": _memory_table(warm) if warm else None,
        "processes_idle": {r: {k: round(v, 2) for k, v in m.items()} for r, m in roles_idle.items() if m},
        "processes_streaming": {r: {k: round(v, 2) for k, v in m.items()} for r, m in roles_streaming.items() if m},
    }
    log(f"memory: worker USS idle p50 {out['worker_idle']['uss']['p50']} MiB, "
        f"streaming p50 {out['worker_streaming']['uss']['p50']} MiB")
    return out


# --- 4. capacity --------------------------------------------------------------------------


def probe(direct: Conn, gateway: Conn, seconds: float, interval_s: float = 0.005) -> tuple[list, list]:
    """Interleaved 1 KB echo round trips on both paths for `seconds`, one pair per interval."""
    payload = text_event(1024)
    frame = client_frame(payload)
    times = {"direct": [], "gateway": []}
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < seconds:
        for conn, key in alternate(i, (direct, "direct"), (gateway, "gateway")):
            times[key].append(conn.roundtrip_ns(frame, len(payload)) / 1000)
        i += 1
        pause = start + i * interval_s - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    return times["direct"], times["gateway"]


def _capacity_step(stack: Stack, plan: Plan, loadgen: LoadGen, n: int, direct: Conn, gateway: Conn,
                   profiler: Profiler) -> dict:
    opened = loadgen.open(n)
    time.sleep(plan.settle_s)
    loadgen.stats(reset=True)
    roles = stack.roles()
    gateway_procs = list(roles.values()) + stack.zygote_children()
    others = [psutil.Process(stack.sim.pid), psutil.Process()] + [psutil.Process(pid) for pid in loadgen.pids()]
    # profiles (when asked for) of the first step with ≥ 30 sessions: four workers, the supervisor
    profiled = n >= 30 and not profiler.capacity_profiled
    profiler.capacity_profiled |= profiled
    with profiler.record(f"capacity-{n}-workers", stack.workers()[:4] if profiled else []), \
            profiler.record(f"capacity-{n}-supervisor", [stack.roles()["supervisor"]] if profiled else []):
        cpu0, other0, busy0, t0 = cpu_seconds(gateway_procs), cpu_seconds(others), busy_seconds(), time.monotonic()
        d, g = probe(direct, gateway, plan.hold_s)
        wall = time.monotonic() - t0
        cpu1, other1, busy1 = cpu_seconds(gateway_procs), cpu_seconds(others), busy_seconds()
    stats = loadgen.stats(reset=True)
    role_of = {proc.pid: role for role, proc in roles.items()}
    by_role: dict[str, float] = {}
    for pid in cpu1:
        if pid in cpu0:
            role = role_of.get(pid, "workers")
            by_role[role] = by_role.get(role, 0.0) + cpu1[pid] - cpu0[pid]
    gateway_cpu = sum(by_role.values())
    other_cpu = sum(other1[pid] - other0[pid] for pid in other1 if pid in other0)
    rtt = compare(d, g)
    live = stats["live"]
    rate = stats["appends"] / max(live, 1) / stats["elapsed_s"]
    step = {
        "sessions": n, "live": live, "dropped": stats["dropped"], "failed_opens": opened["failed"],
        "appends_per_session_s": round(rate, 1),
        "rx_kb_per_session_s": round(stats["rx_bytes"] / max(live, 1) / stats["elapsed_s"] / 1000, 1),
        "responses": stats["responses"], "loadgen_max_lag_ms": stats["max_lag_ms"],
        "loadgen_skipped_slots": stats["skipped_slots"],
        "probe_pairs": len(d), "probe_us": rtt,
        "gateway_cpu_cores": round(gateway_cpu / wall, 3),
        "cpu_per_session_pct": round(100 * gateway_cpu / wall / max(live, 1), 3),
        "cpu_per_session_pct_by_role": {role: round(100 * cpu / wall / max(live, 1), 3)
                                        for role, cpu in sorted(by_role.items())},
        "sim_and_loadgen_cpu_cores": round(other_cpu / wall, 3),  # and the probing client
        "foreign_cpu_cores": foreign_cpu_cores(busy0, busy1, gateway_cpu + other_cpu, wall),
    }
    step["held"] = live == n and stats["dropped"] == 0 and rate >= 0.95 / APPEND_PERIOD_S
    # Past this the box itself (simulator, load generator and gateway share its CPUs) is
    # saturated: the direct baseline is over the threshold and "added" means nothing any more.
    step["baseline_ok"] = rtt["direct"]["p99"] < P99_TARGET_US
    step["pass"] = step["held"] and step["baseline_ok"] and rtt["added"]["p99"] < P99_TARGET_US
    return step


def measure_capacity(stack: Stack, plan: Plan, profiler: Profiler) -> dict:
    """Ramp audio-rate sessions (see the module docstring) through the steps of the plan; at
    each step, after a settle time, probe 1 KB echo round trips (direct and gateway) for
    `hold_s` and account the gateway's CPU. A step passes when every session is held at audio
    rate (≥ 95 % of 50 appends/s), the probes' p99 added latency is under the threshold and the
    direct probe's own p99 is too (else the box, shared by simulator, load generator and
    gateway, is saturated and no "added" figure means anything). Stops after two failing steps
    in a row, a step not held, a p99 (added or direct) past 2× the threshold, or once the time
    budget is spent. Reports the most sessions of a passing step."""
    loadgen = LoadGen(plan.loadgen_procs, stack.gateway)
    steps: list[dict] = []
    stopped = "cap reached"
    started = time.monotonic()
    try:
        with Conn(stack.direct, "sim_echo=1") as direct, Conn(stack.gateway, "sim_echo=1") as gateway:
            probe(direct, gateway, 0.3)  # warm-up
            loadgen.stream(True)
            fails = 0
            for n in plan.capacity_steps:
                if time.monotonic() - started > plan.capacity_budget_s:
                    stopped = f"time budget ({plan.capacity_budget_s:g} s) spent"
                    break
                try:
                    step = _capacity_step(stack, plan, loadgen, n, direct, gateway, profiler)
                except (OSError, BenchError) as exc:  # a probe lost its echo: far past saturation
                    stopped = f"probe failed at {n} sessions: {exc!r}"
                    break
                steps.append(step)
                log(f"capacity {n}: live {step['live']}, appends/s {step['appends_per_session_s']}, "
                    f"added p99 {step['probe_us']['added']['p99']} µs, CPU/session "
                    f"{step['cpu_per_session_pct']} %, {'pass' if step['pass'] else 'FAIL'}")
                fails = 0 if step["pass"] else fails + 1
                if not step["held"]:
                    stopped = f"sessions not held at audio rate at {n}"
                    break
                if fails >= 2 or step["probe_us"]["added"]["p99"] > 2 * P99_TARGET_US \
                        or step["probe_us"]["direct"]["p99"] > 2 * P99_TARGET_US:
                    stopped = (f"p99 past the threshold at {n}" if step["baseline_ok"]
                               else f"the direct baseline's own p99 past the threshold at {n} (box saturated)")
                    break
            loadgen.close_all()
    finally:
        loadgen.stop()
    stack.wait_sessions_ended(timeout=60)
    passing = [s for s in steps if s["pass"]]
    best = max(passing, key=lambda s: s["sessions"]) if passing else None
    if not steps:
        raise BenchError(f"capacity: no step completed ({stopped})")
    return {
        "threshold_p99_added_us": P99_TARGET_US, "cap": max(plan.capacity_steps),
        "append_bytes": len(append_event(pcm_bytes=APPEND_PCM_BYTES)), "appends_per_s": 1 / APPEND_PERIOD_S,
        "response_every_s": RESPONSE_EVERY_S, "response_ms": RESPONSE_MS, "loadgen_procs": plan.loadgen_procs,
        "max_sessions": best["sessions"] if best else 0,
        "cpu_per_session_pct": best["cpu_per_session_pct"] if best else None,
        # sessions one core could carry at the measured gateway CPU per session
        "sessions_per_core": (round(100 / best["cpu_per_session_pct"], 1)
                              if best and best["cpu_per_session_pct"] else None),
        "stopped": stopped, "steps": steps,
    }


# --- 5. throughput ------------------------------------------------------------------------


def _one_way(stack: Stack, target: Target, frame: bytes, payload_len: int, count: int) -> tuple[float, float]:
    """One round: (MB/s, CPU seconds per MB of the process doing the relaying's far end:
    the gateway worker for the gateway path, the simulator for the direct path)."""
    clear = client_frame(b'{"type":"input_audio_buffer.clear"}')
    with Conn(target) as conn:
        watched = stack.wait_live(1)[:1] if target.name == "gateway" else [psutil.Process(stack.sim.pid)]
        cpu0 = cpu_seconds(watched)
        t0 = time.perf_counter_ns()
        for _ in range(count):
            conn.sock.sendall(frame)
        conn.sock.sendall(clear)
        conn.recv_until(b'"input_audio_buffer.cleared"')
        elapsed = (time.perf_counter_ns() - t0) / 1e9
        cpu1 = cpu_seconds(watched)
    megabytes = payload_len * count / 1e6
    cpu = sum(cpu1[pid] - cpu0[pid] for pid in cpu1 if pid in cpu0)
    return megabytes / elapsed, (cpu / megabytes if cpu >= 0.02 else None)  # CPU clocks tick at 10 ms


def measure_throughput(stack: Stack, plan: Plan) -> dict:
    """One session, one way (client → upstream): 32 KB append messages back to back, then a
    clear; the clock stops at `cleared`. MB/s (10^6 bytes) of message payload; rounds alternate."""
    payload = append_event(size=32768)
    frame = client_frame(payload)
    count = max(1, plan.throughput_mb * 1_000_000 // len(payload))
    _one_way(stack, stack.direct, frame, len(payload), max(1, count // 10))  # warm-up
    _one_way(stack, stack.gateway, frame, len(payload), max(1, count // 10))
    stack.wait_sessions_ended()
    rates, cpu = {"direct": [], "gateway": []}, {"direct": [], "gateway": []}
    for r in range(plan.throughput_rounds):
        for target in alternate(r, stack.direct, stack.gateway):
            rate, cpu_per_mb = _one_way(stack, target, frame, len(payload), count)
            rates[target.name].append(rate)
            cpu[target.name].append(cpu_per_mb)
            stack.wait_sessions_ended()
    best = {k: round(max(v), 1) for k, v in rates.items()}
    cpu = {k: [x for x in v if x is not None] for k, v in cpu.items()}
    worker_ms_per_mb = 1000 * min(cpu["gateway"]) if cpu["gateway"] else None
    out = {"unit": "MB/s", "message_bytes": len(payload), "messages_per_round": count,
           "rounds": plan.throughput_rounds, "direct_mb_s": best["direct"], "gateway_mb_s": best["gateway"],
           "direct_rounds": [round(x, 1) for x in rates["direct"]],
           "gateway_rounds": [round(x, 1) for x in rates["gateway"]],
           "ratio": round(best["gateway"] / best["direct"], 2) if best["direct"] else None,
           # what bounds each path: CPU per MB of the simulator (direct) and of the worker (gateway);
           # 1000 / worker ms per MB is the relay's own ceiling with a CPU to itself
           "sim_cpu_ms_per_mb": round(1000 * min(cpu["direct"]), 2) if cpu["direct"] else None,
           "worker_cpu_ms_per_mb": round(worker_ms_per_mb, 2) if worker_ms_per_mb else None,
           "worker_ceiling_mb_s": round(1000 / worker_ms_per_mb, 1) if worker_ms_per_mb else None}
    log(f"throughput: direct {out['direct_mb_s']} MB/s, gateway {out['gateway_mb_s']} MB/s")
    return out


# --- report -------------------------------------------------------------------------------


def targets_report(doc: dict) -> dict:
    """Each headline figure next to its target (only for the measurements that ran)."""
    rows = {}
    if "rtt" in doc:
        small = doc["rtt"]["small_1k"]["added"]
        rows.update(rtt_small_added_p50_us=small["p50"], rtt_small_added_p99_us=small["p99"])
    if "setup" in doc:
        rows["setup_added_p50_ms"] = doc["setup"]["sequential"]["added"]["p50"]
    if "memory" in doc:
        rows["worker_idle_uss_mib"] = doc["memory"]["worker_idle"]["uss"]["p50"]
        rows["worker_streaming_uss_mib"] = doc["memory"]["worker_streaming"]["uss"]["p50"]
    if "capacity" in doc:
        rows["capacity_sessions"] = doc["capacity"]["max_sessions"]
    out = {}
    for name, value in rows.items():
        target = TARGETS[name]
        met = value >= target if name == "capacity_sessions" else value <= target
        out[name] = {"value": value, "target": target, "met": met}
    return out


def _row(label: str, d: dict, width: int = 44) -> str:
    return f"   {label:<{width}}{d['p50']:>10} {d['p90']:>10} {d['p99']:>10}"


def _comparison(label: str, r: dict, unit: str) -> list[str]:
    return [f"  {label}", _row(f"  direct, {unit}", r["direct"]), _row(f"  gateway, {unit}", r["gateway"]),
            _row(f"  added, {unit}", r["added"])
            + f"   (gateway/direct p50 ×{r['ratio']['p50']}, p99 ×{r['ratio']['p99']})"]


def _render_rtt(r: dict) -> list[str]:
    lines = [f"1. Round trip through a session vs direct (echo){'':<6}{'p50':>10} {'p90':>10} {'p99':>10}"]
    for name, label in (("small_1k", "1 KB text event"), ("large_32k", "32 KB audio append")):
        case = r[name]
        lines += _comparison(f"{label}, {case['pairs']} interleaved pairs", case, "µs")
        if "floor_added" in case:
            lines.append(_row("  floor: byte-copying uvloop relay, added", case["floor_added"]))
        lines.append(f"     CPU: gateway worker {case['worker_cpu_us_per_roundtrip']} µs per round trip; "
                     f"simulator {case['sim_cpu_us_per_echo']} µs per echo")
    return lines


def _render_setup(s: dict) -> list[str]:
    lines = [f"2. Set-up, connect → session.created{'':<18}{'p50':>10} {'p90':>10} {'p99':>10}"]
    lines += _comparison(f"sequential, {s['sequential']['connections']} each", s["sequential"], "ms")
    lines += _comparison(f"bursts of {s['burst']['size']} concurrent, {s['burst']['rounds']} each", s["burst"], "ms")
    lines.append(f"     burst wall time: direct {s['burst']['wall_ms']['direct']} ms, "
                 f"gateway {s['burst']['wall_ms']['gateway']} ms")
    return lines


def _render_memory(mem: dict) -> list[str]:
    lines = [f"3. Memory, MiB, {mem['sessions']} sessions{'':<24}{'USS p50':>10} {'USS max':>10} "
             f"{'PSS p50':>10} {'PSS max':>10}"]
    for key, label in (("worker_idle", "worker, idle"), ("worker_streaming", "worker, streaming (peak)"),
                       ("warm_worker", f"pre-forked worker without a session ({mem.get('warm_workers', 0)})")):
        w = mem.get(key)
        if not w:
            continue
        lines.append(f"   {label:<44}{w['uss']['p50']:>10} {w['uss']['max']:>10} "
                     f"{w['pss']['p50']:>10} {w['pss']['max']:>10}")
    lines.append(f"   {'':<44}{'USS idle':>10} {'streaming':>10} {'PSS idle':>10} {'streaming':>10}")
    for role, proc in mem["processes_streaming"].items():
        idle = mem["processes_idle"].get(role, proc)
        lines.append(f"   {role:<44}{idle['uss']:>10.2f} {proc['uss']:>10.2f} "
                     f"{idle['pss']:>10.2f} {proc['pss']:>10.2f}")
    return lines


def _render_capacity(cap: dict) -> list[str]:
    lines = [f"4. Capacity: sessions at audio rate (50 × {cap['append_bytes']} B appends/s, a paced "
             f"{cap['response_ms'] / 1000:g} s response every {cap['response_every_s']:g} s); "
             f"a step passes at probe p99 added < {cap['threshold_p99_added_us'] / 1000:g} ms",
             "   sessions  appends/s  added p50 µs  added p99 µs  direct p99 µs  gateway cores  CPU/session"
             "  sim+loadgen cores  other cores"]
    for st in cap["steps"]:
        probe_us = st["probe_us"]
        lines.append(f"   {st['live']:>4}/{st['sessions']:<4}{st['appends_per_session_s']:>10} "
                     f"{probe_us['added']['p50']:>13} {probe_us['added']['p99']:>13} {probe_us['direct']['p99']:>14} "
                     f"{st['gateway_cpu_cores']:>14} {st['cpu_per_session_pct']:>10} % "
                     f"{st['sim_and_loadgen_cpu_cores']:>18} "
                     f"{st['foreign_cpu_cores']:>12}  {'pass' if st['pass'] else 'FAIL'}")
    lines.append(f"   most sessions held: {cap['max_sessions']} (cap {cap['cap']}; stopped: {cap['stopped']}); "
                 f"gateway CPU per session {cap['cpu_per_session_pct']} % of a core → "
                 f"{cap['sessions_per_core']} per core")
    if cap["steps"] and cap["steps"][-1].get("cpu_per_session_pct_by_role"):
        last = cap["steps"][-1]
        shares = ", ".join(f"{role} {pct} %" for role, pct in last["cpu_per_session_pct_by_role"].items())
        lines.append(f"   CPU per session by role at {last['live']} sessions: {shares}")
    return lines


def _render_throughput(t: dict) -> list[str]:
    return [f"5. Throughput, one session, {t['message_bytes']} B messages one way (best of {t['rounds']})",
            f"   direct {t['direct_mb_s']} MB/s, gateway {t['gateway_mb_s']} MB/s (×{t['ratio']}); CPU per MB: "
            f"simulator {t['sim_cpu_ms_per_mb']} ms, gateway worker {t['worker_cpu_ms_per_mb']} ms "
            f"(worker ceiling ≈ {t['worker_ceiling_mb_s']} MB/s)"]


def render(doc: dict) -> str:
    """The human-readable report (the JSON document holds the same and more)."""
    m, code = doc["machine"], doc["code"]
    lines = [
        f"meshrt bench, {doc['plan']} plan, {doc['duration_s']} s — commit {(code['commit'] or '?')[:10]}"
        f"{' (+ uncommitted changes)' if code['dirty'] else ''}",
        f"machine: {m['cpu_model']}, {m['nproc']} CPUs, {m['memory_gib']} GiB, {m['python']}, {m['kernel']}",
        f"during the run: CPU steal {m.get('cpu_steal_pct_during_run')} %, other processes "
        f"{m.get('foreign_cpu_cores_during_run')} cores, load average {m.get('loadavg_at_start')} → "
        f"{m.get('loadavg_at_end')}",
        f"worker backend {doc['config']['worker_backend']}; load generator on {m['load_generator_loop']}",
    ]
    for key, part in (("rtt", _render_rtt), ("setup", _render_setup), ("memory", _render_memory),
                      ("capacity", _render_capacity), ("throughput", _render_throughput)):
        if key in doc:
            lines += [""] + part(doc[key])
    lines += ["", "Targets"]
    for name, row in doc["targets"].items():
        verdict = "met" if row["met"] else "MISSED"
        lines.append(f"   {name:<28} {row['value']:>10}  target {row['target']:>6}  {verdict}")
    return "\n".join(lines)


# --- entry --------------------------------------------------------------------------------


@contextmanager
def _stack(settings, plan: Plan):
    stack = Stack(settings, plan)
    ok = False
    try:
        yield stack.start()
        ok = True
    finally:
        stack.stop(keep=not ok)
        if not ok:
            log(f"logs kept in {stack.tmp}")


def selected_measurements(known) -> list[str]:
    """All of them, or those MESHRT_BENCH_ONLY lists (e.g. "rtt,capacity"), in the usual order."""
    raw = os.environ.get("MESHRT_BENCH_ONLY", "").strip()
    if not raw:
        return list(known)
    wanted = {w.strip() for w in raw.split(",") if w.strip()}
    unknown = wanted - set(known)
    if unknown:
        raise BenchError(f"MESHRT_BENCH_ONLY: unknown measurement(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(known)}")
    return [name for name in known if name in wanted]


def run_bench(settings, args) -> int:
    plan = choose_plan(args)
    started = time.monotonic()
    doc = {"meshrt_bench": 1, "plan": plan.name, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": machine_info(), "code": code_version(),
           "config": {"worker_backend": settings.worker_backend, "plan": asdict(plan)}}
    cpu_before, busy_before, ours_before = psutil.cpu_times(), busy_seconds(), tree_cpu_seconds()
    doc["machine"]["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    try:
        with _stack(settings, plan) as stack:
            log(f"simulator on :{stack.direct.port}, gateway on :{stack.gateway.port} ({plan.name} plan)")
            profiler = Profiler(os.environ.get("MESHRT_BENCH_PROFILE"))
            doc["profiles"] = str(profiler.dir) if profiler.dir else None
            measurements = {"rtt": lambda: measure_rtt(stack, plan, profiler),
                            "setup": lambda: measure_setup(stack, plan, profiler),
                            "memory": lambda: measure_memory(stack, plan),
                            "throughput": lambda: measure_throughput(stack, plan),
                            "capacity": lambda: measure_capacity(stack, plan, profiler)}
            for name in selected_measurements(measurements):
                doc[name] = measurements[name]()
            # what the rest of the machine did meanwhile, taken before the stack's processes go
            ours, busy_after, measured_s = tree_cpu_seconds() - ours_before, busy_seconds(), time.monotonic() - started
            doc["machine"]["cpu_steal_pct_during_run"] = cpu_steal_pct(cpu_before, psutil.cpu_times())
            doc["machine"]["foreign_cpu_cores_during_run"] = foreign_cpu_cores(busy_before, busy_after, ours,
                                                                               measured_s)
    except (BenchError, OSError) as exc:
        print(f"meshrt bench: {exc}", file=sys.stderr)
        return 1
    doc["duration_s"] = round(time.monotonic() - started, 1)
    doc["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    doc["targets"] = targets_report(doc)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2) if args.json else render(doc))
    return 0
