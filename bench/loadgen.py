"""The load generator: audio-rate sessions through the gateway, in separate processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import signal
import time

from .clients import AsyncSession
from .clients import Target
from .clients import append_event
from .clients import client_frame
from .clients import close_sessions
from .clients import run_async
from .plans import BenchError

APPEND_PCM_BYTES = 960  # 20 ms of PCM16 mono at 24 kHz
APPEND_PERIOD_S = 0.020
RESPONSE_EVERY_S = 3.0
RESPONSE_MS = 1000
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
        stats = {
            "live": len(live),
            "dropped": self.dropped,
            "failed": self.failed,
            "appends": self.appends,
            "responses": self.responses,
            "rx_bytes": sum(s.rx_bytes for s in self.sessions) - self.rx0,
            "late_slots": self.late_slots,
            "skipped_slots": self.skipped_slots,
            "max_lag_ms": round(self.max_lag_s * 1000, 2),
            "elapsed_s": elapsed,
            "cpu_s": time.process_time() - self.cpu0,
        }
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
        out = {
            k: sum(r[k] for r in replies)
            for k in (
                "live",
                "dropped",
                "failed",
                "appends",
                "responses",
                "rx_bytes",
                "late_slots",
                "skipped_slots",
                "cpu_s",
            )
        }
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
