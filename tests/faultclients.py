"""The clients of the fault suites (tests/test_faults.py, tests/test_db_faults.py): a number of
slots, each running sessions one after another until told to stop — connect with a unique
`fault_tag=<tag>` (retrying with a fresh tag per attempt while the gateway refuses or is away),
`response.create` → wait for `response.done`, a seeded number of times, then close (sometimes
with a response still in flight). The tags are what tests/simlog.py finds the simulator's report
of a connection by.

What differs between the suites is a parameter or a method a suite's subclass overrides: the tag
prefix, budgets and timeouts, the session plan (`plan`: each suite's own seeded choices), what
happens once a session is admitted (`started`: the kill suite looks up its worker), how an
in-band refusal is recorded (`refused`), and whether a running session can be told to close at
once (`closable`: the database suite closes a few as a fault starts, `Conn.close_now`).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from dataclasses import field

from realtime_client import connect_ws
from realtime_client import recv_json
from realtime_client import recv_until
from websockets.exceptions import ConnectionClosed
from websockets.exceptions import InvalidHandshake


@dataclass
class Conn:
    """One client session that got past the handshake (session.created received)."""

    tag: str
    request_id: str
    ws: object = field(repr=False)
    usages: list = field(default_factory=list)  # usage of every response.done the client received
    done_at: list = field(default_factory=list)  # when each of those arrived
    pid: int | None = None  # its worker's, when the suite looks it up
    state: str = "running"  # running -> closing -> done
    killed: bool = False  # its worker was SIGKILLed by the test
    close_now: asyncio.Event = field(default_factory=asyncio.Event, repr=False)  # set: close at once
    told_to_close: bool = False  # it closed because close_now was set
    cut_short: bool = False  # the client closed with a response in flight
    lost: str | None = None  # the connection broke without the test having killed its worker
    connected_at: float = 0.0
    ended_at: float = 0.0


class FaultClients:
    """`slots` client tasks (`run`), each running sessions one after another until told to stop
    or past `budget_s`. `url()` is called for every connect (the gateway may move); tags are
    `<prefix>-<name>-a<n>`, n the attempt; sessions ask the simulator for paced responses of
    `response_ms`."""

    def __init__(
        self,
        url,
        key: str,
        prefix: str,
        *,
        slots: int,
        budget_s: float,
        response_ms: int,
        connect_timeout_s: float,
        connect_retry_s: float,
        closable: bool = False,
    ):
        self.url, self.key, self.prefix, self.slots = url, key, prefix, slots
        self.response_ms, self.closable = response_ms, closable
        self.connect_timeout_s, self.connect_retry_s = connect_timeout_s, connect_retry_s
        self.conns: list[Conn] = []
        self.attempts: list[str] = []  # every tag tried, successful or not
        self.refusals: list[tuple] = []  # (tag, error code, ...) of attempts refused in-band (`refused`)
        self.failures: list[tuple[str, str]] = []  # (tag, error) of attempts with no session and no error frame
        self.stopping = False
        self.deadline = time.monotonic() + budget_s

    # --- what a suite overrides ---------------------------------------------------------------

    def plan(self, index: int, n: int) -> tuple[random.Random, int, bool]:
        """Slot `index`'s session number n: (its seeded rng, responses, whether it closes with
        the last one in flight)."""
        raise NotImplementedError

    async def started(self, conn: Conn) -> None:
        """A session was admitted, before its first response.create."""

    async def refused(self, tag: str, first: dict, ws) -> None:
        """The attempt's first frame was not session.created (an error frame, then the close)."""
        self.refusals.append((tag, first.get("error", {}).get("code", first.get("type"))))
        await ws.close()

    # --- the clients --------------------------------------------------------------------------

    def running(self) -> list[Conn]:
        """Sessions running that the test has neither killed nor told to close."""
        return [c for c in self.conns if c.state == "running" and not c.killed and not c.close_now.is_set()]

    async def attempt(self, tag: str) -> Conn | None:
        """One connect with `tag` (no retry): the session, or None (a refusal or a failure)."""
        self.attempts.append(tag)
        query = f"sim_pace=1&sim_response_ms={self.response_ms}&fault_tag={tag}"
        try:
            ws = await asyncio.wait_for(connect_ws(self.url(), key=self.key, query=query), self.connect_timeout_s)
        except (OSError, asyncio.TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
            self.failures.append((tag, f"connect: {type(exc).__name__}: {exc}"))
            return None
        try:
            first = await recv_json(ws, 10)
        except (ConnectionClosed, asyncio.TimeoutError) as exc:
            self.failures.append((tag, f"first frame: {type(exc).__name__}: {exc}"))
            await ws.close()
            return None
        if first.get("type") != "session.created":
            await self.refused(tag, first, ws)
            return None
        conn = Conn(tag, ws.response.headers["x-request-id"], ws, connected_at=time.monotonic())
        self.conns.append(conn)
        return conn

    async def connect(self, name: str) -> Conn | None:
        """Attempts with a fresh tag each until one is admitted, for connect_retry_s at the most."""
        give_up = time.monotonic() + self.connect_retry_s
        n = 0
        while time.monotonic() < give_up and not self.stopping:
            n += 1
            conn = await self.attempt(f"{self.prefix}-{name}-a{n}")
            if conn is not None:
                return conn
            await asyncio.sleep(0.1)
        return None

    async def slot(self, index: int) -> None:
        n = 0
        while not self.stopping and time.monotonic() < self.deadline:
            n += 1
            rng, responses, cut_short = self.plan(index, n)
            conn = await self.connect(f"s{index}n{n}")
            if conn is None:
                return
            await self.started(conn)
            await self.converse(conn, rng, responses, cut_short)

    async def response_done(self, conn: Conn) -> list[dict] | None:
        """The events up to the next response.done; None if the session was told to close first
        (closable only)."""
        if not self.closable:
            return await recv_until(conn.ws, "response.done", 20)
        done = asyncio.ensure_future(recv_until(conn.ws, "response.done", 20))
        told = asyncio.ensure_future(conn.close_now.wait())
        await asyncio.wait({done, told}, return_when=asyncio.FIRST_COMPLETED)
        told.cancel()
        if not done.done():
            done.cancel()
            await asyncio.wait({done})
            return None
        return done.result()  # raises what broke it

    async def converse(self, conn: Conn, rng: random.Random, responses: int, cut_short: bool) -> None:
        ws = conn.ws
        try:
            for i in range(responses):
                await ws.send(json.dumps({"type": "response.create"}))
                if cut_short and (i == responses - 1 or self.stopping):
                    await asyncio.sleep(rng.uniform(0, self.response_ms / 1000 * 0.75))
                    conn.cut_short = True
                    break
                events = await self.response_done(conn)
                if events is None:  # told to close: close now, mid-response
                    conn.cut_short = conn.told_to_close = True
                    break
                conn.usages.append(events[-1]["response"]["usage"])
                conn.done_at.append(time.monotonic())
                if self.stopping:
                    break
                if conn.close_now.is_set():  # told to close as the response ended
                    conn.told_to_close = True
                    break
            conn.state = "closing"  # from here on the test leaves it alone (no await before)
            await ws.close()
        except (ConnectionClosed, OSError, asyncio.TimeoutError) as exc:
            if not conn.killed:
                conn.lost = f"{type(exc).__name__}: {exc}"
            try:
                await ws.close()
            except Exception:  # noqa: BLE001 - already broken
                pass
        finally:
            conn.state, conn.ended_at = "done", time.monotonic()

    async def run(self, driver) -> None:
        """The slots run while `driver(self)` does (the killer, the faults); then they are told to
        stop and waited for."""
        slots = [asyncio.create_task(self.slot(i)) for i in range(self.slots)]
        try:
            await driver(self)
        finally:
            self.stopping = True
            await asyncio.wait_for(asyncio.gather(*slots), 40)
