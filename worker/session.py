"""A worker: one realtime session in one process, under anyio (asyncio or trio).

Order of events: parse the (key-stripped) request → connect upstream with the operator's key →
send the client its 101 (or the error frame and close) → tell the supervisor we're live →
relay until both legs are closed → report the end → exit. The relay logic is in `relay.py`;
this shell only moves bytes (`legs.py`), keeps the clocks (idle, max length, drain) and the
channel. On asyncio the legs are uvloop transports and frames are relayed inside the loop's
read callbacks; on trio a task per leg reads. Both feed one synchronous
path, so a relayed frame never waits on anything but the kernel.

Ownership: the worker owns the client socket, its end of the control channel and the spool fd;
all are closed when `run` returns. Every usage increment is written to the spool (durable) and
handed to the supervisor's channel before the frame carrying it is written to the client; if the
channel is momentarily full the increment waits in order in a backlog (the supervisor replays the
spool at the session's end, so nothing is lost either way).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from collections import deque

import anyio

from meshrt.shared import control
from meshrt.shared import sandbox
from meshrt.shared import spool
from meshrt.shared.control import Billed
from meshrt.shared.control import Grant
from meshrt.shared.control import Reattach
from meshrt.shared.control import Reserve
from meshrt.shared.control import Reserved
from meshrt.shared.control import StopSession
from meshrt.shared.control import UsageIncrement
from meshrt.shared.control import VersionRefused
from meshrt.shared.control import WorkerConfig
from meshrt.shared.control import WorkerEnded
from meshrt.shared.control import WorkerLive
from meshrt.shared.errors import ERRORS
from meshrt.shared.errors import GatewayError
from meshrt.shared.handshake import accept_bytes
from meshrt.shared.handshake import error_frames
from meshrt.shared.handshake import parse_request_bytes
from meshrt.shared.handshake import parse_upgrade
from meshrt.shared.handshake import upstream_headers
from meshrt.shared.handshake import upstream_query
from meshrt.shared.logs import session_log

from .frames import client_text_frame
from .legs import Leg
from .legs import TransportLeg
from .relay import Phase
from .relay import Relay
from .relay import Target
from .upstream import connect_upstream
from .upstream import send_upgrade_ahead
from .upstream import upstream_url

POOLED = False  # set in a warm pool worker (worker/zygote.py): its session did not wait for a fork

CLOSE_TIMEOUT_S = 2.0
RESERVE_WAIT_S = 5.0  # no answer to a Reserve by then (the supervisor gives up at 3 s): refused
RESERVE_RETRY_S = 1.0  # while refused, the reservation is asked again this often (a top-up)
REATTACH_INTERVAL_S = 0.2
REPORT_END_WAIT_S = 10.0
_CLIENT, _UPSTREAM = Target.CLIENT, Target.UPSTREAM


class WorkerSession:
    def __init__(
        self,
        grant: Grant,
        config: WorkerConfig,
        request: bytes,
        client: socket.socket,
        channel: socket.socket,
        spool_fd: int,
        meter=None,
        may_carry_usage=None,
        purse=None,
    ):
        self.grant = grant
        self.config = config
        self.request = request
        self.client_sock = client
        self.channel = channel
        self.spool_fd = spool_fd
        self.log = session_log("meshrt.worker", grant.session_id, grant.request_id)
        self.relay = Relay(
            grant.request_id,
            grant.token_cap,
            config.max_message_bytes,
            meter=meter,
            purse=purse,
            **({"may_carry_usage": may_carry_usage} if may_carry_usage else {}),
        )
        self.upgraded = False
        self._handshake = None  # (protocol, request) once parsed: what a refusal answers
        self._answered = False  # the client has had its HTTP response
        self._client: Leg | TransportLeg | None = None
        self._upstream: Leg | TransportLeg | None = None
        self._finished = anyio.Event()  # both legs closed (or the closing deadline passed)
        self._closing = anyio.Event()  # the relay left Phase.OPEN: the closing deadline runs
        self._channel_backlog: deque[UsageIncrement | Reserve] = deque()  # what the channel would not take yet
        self._reservation_asked = anyio.Event()
        self._billed_awaited = anyio.Event()  # a translation's audio is held for the supervisor's Billed
        self._asking: Reserve | None = None  # the last Reserve sent: sent again to a new supervisor
        self._asked_at = 0.0  # monotonic: when it was last sent to a supervisor that is there
        self._reattaching = False  # no supervisor: the fence (half the lease) bounds what waits for one
        self._channel_ready = anyio.Event()
        self._draining: set[Leg] = set()  # legs whose backlog a background task is flushing
        self._last_activity = time.monotonic()
        self._live_at: float | None = None  # the client's 101 was sent (a translation's wall clock)
        self._closed_at: float | None = None  # the relay left Phase.OPEN
        self.setup: dict[str, float] = {}  # where set-up time went, for the "session live" log
        self.sandbox: list[str] = []  # the seccomp layer, once loaded
        self._refused_version = False  # the supervisor speaks another control protocol: none to report to
        self.preconnected = None  # the pool worker's upstream connection opened ahead (worker/preconnect.py)
        self.target: tuple | None = None  # upstream_target's answer, once parsed (in `run` if sent ahead)

    # --- entry --------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except Exception:
            self.log.exception("worker failed")
            self.relay.settle_outcome("internal_error", 1011)
            if self._handshake is not None and not self._answered:  # the client still gets its frame
                self._client = self._client or Leg(self.client_sock)
                with anyio.CancelScope(shield=True):
                    await self._refuse(*self._handshake, GatewayError("internal_error"))
        finally:
            with anyio.CancelScope(shield=True):
                translation = self.relay.translation
                if translation is not None and self._live_at is not None:  # wall_clock: the session's time
                    translation.clock_to((self._closed_at or time.monotonic()) - self._live_at, bill=False)
                settle = self.relay.settle_translation()
                if settle is not None:  # audio billed ahead but never forwarded is billed back
                    self._bill(settle)
                end = self._spool_end()
                await self._close_legs()  # the client is not held while a supervisor is awaited
                await self._report_end(end)

    def _upstream_target(self) -> tuple:
        """(the client's handshake, its parsed upgrade, the upstream URL), parsed once."""
        if self.target is None:
            self.target = upstream_target(self.request, self.grant, self.config)
        self._handshake = self.target[0]
        return self.target

    async def _run(self) -> None:
        self.setup["t_loop"] = round(time.time(), 6)
        self.setup["loop_ms"] = round((self.setup["t_loop"] - self.grant.started_at) * 1000, 2)
        self.channel.setblocking(False)
        (protocol, request), upgrade, url = self._upstream_target()
        self._client = Leg(self.client_sock)
        began = time.monotonic()
        preconnected, self.preconnected = self.preconnected, None
        if preconnected is not None:
            self.setup["preconnected_s"] = round(began - preconnected.opened_at, 3)  # its age
        try:
            upstream = await connect_upstream(
                url,
                upstream_headers(upgrade),
                self.config.upstream_key,
                self.config.upstream_connect_timeout_s,
                self.config.upstream_attempts,
                preconnected,
            )
        except GatewayError as error:
            self.log.warning("upstream connect failed", fields={"code": error.code, "cause": repr(error.__cause__)})
            await self._refuse(protocol, request, error)
            return
        self._upstream = upstream.stream
        self.setup["t_upstream"] = round(time.time(), 6)
        if self.grant.session_config:  # an ephemeral key's config: upstream has it before any client event
            update = {"type": "session.update", "session": self.grant.session_config}
            await self._upstream.send(client_text_frame(json.dumps(update, separators=(",", ":")).encode()))
        sandboxed = time.monotonic()
        # from here on the worker needs nothing but the fds it holds (shared/sandbox.py)
        self.sandbox = sandbox.confine_worker(self.config.sandbox)
        self.setup["sandbox_ms"] = round((time.monotonic() - sandboxed) * 1000, 2)
        response, status = accept_bytes(protocol, request, self.grant.request_id)
        self._answered = True
        await self._client.send(response)
        if status != 101:
            self.relay.settle_outcome("client_closed", None)
            return
        self._live_at = time.monotonic()
        await self._report_live()
        self.setup["upstream_ms"] = round((time.monotonic() - began) * 1000, 2)
        self.setup["t_live"] = round(time.time(), 6)
        self.setup["since_grant_ms"] = round((self.setup["t_live"] - self.grant.started_at) * 1000, 2)
        self.log.info("session live", fields=self.setup)
        async with anyio.create_task_group() as tg:
            self._start_watchers(tg)
            if self.relay.translation is not None:
                tg.start_soon(self._watch_billed)
                if self.relay.translation.by_clock:
                    tg.start_soon(self._bill_clock)
            if isinstance(self._upstream, TransportLeg):
                await self._relay_on_transports(upstream.leftover)
            else:
                await self._relay_with_pumps(tg, upstream.leftover)
            await self._finished.wait()
            with anyio.move_on_after(CLOSE_TIMEOUT_S):  # what is still being written must land
                await self._client.drain()
                await self._upstream.drain()
            tg.cancel_scope.cancel()

    async def _report_live(self) -> None:
        """Upgraded: tell the supervisor the session is live (`WorkerLive`)."""
        self.upgraded = True
        try:
            await control.asend(self.channel, WorkerLive(self.grant.session_id, os.getpid()))
        except OSError:  # the supervisor died just now: relay on; the channel watcher re-attaches
            self.log.warning("supervisor unreachable at go-live")

    def _start_watchers(self, tg) -> None:
        """The session's background tasks: its channel, its clocks, the closing deadline, the
        channel's backlog and, with a purse, unanswered reservations."""
        self._tg = tg
        tg.start_soon(self._watch_channel)
        tg.start_soon(self._watch_clocks)
        tg.start_soon(self._watch_closing)
        tg.start_soon(self._flush_channel_backlog)
        if self.relay.purse is not None:
            tg.start_soon(self._watch_reservations)

    async def _refuse(self, protocol, request, error: GatewayError) -> None:
        """Accept the client's upgrade only to deliver the error frame and close (docs/errors.md)."""
        response, status = accept_bytes(protocol, request, self.grant.request_id)
        self._answered = True
        data = response + (
            error_frames(protocol, error.code, self.grant.request_id, error.detail) if status == 101 else b""
        )
        spec = ERRORS[error.code]
        self.relay.settle_outcome(error.code, spec.close_code)
        try:
            await self._client.send(data)
            with anyio.move_on_after(CLOSE_TIMEOUT_S):
                while await self._client.receive():  # until the client's close reply / EOF
                    pass
        except OSError:
            pass

    async def _close_legs(self) -> None:
        for leg in (self._upstream, self._client):
            if leg is not None:
                leg.close()
        if self._client is None:
            self.client_sock.close()
        with anyio.move_on_after(CLOSE_TIMEOUT_S):  # a transport flushes its buffer, then closes
            for leg in (self._upstream, self._client):
                if leg is not None:
                    await leg.closed()

    # --- relay: the I/O shells around the sans-I/O Relay ----------------------------------
    # Both shells feed the same synchronous path: bytes in → relay actions → writes that never
    # wait. They differ in how bytes arrive and how backpressure is applied.

    async def _relay_on_transports(self, leftover: bytes) -> None:
        """asyncio (uvloop): both legs are transports; bytes arrive by callback, so a relayed
        frame wakes no task. Backpressure: a leg whose buffer is full pauses the other's reading."""
        self._client = await TransportLeg.adopt(self.client_sock)
        self._client.peer, self._upstream.peer = self._upstream, self._client
        early = self._client.relay(self._guarded(self._from_client), self._guarded(self._client_lost))
        if early:
            self._from_client(early)
        leftover += self._upstream.relay(self._guarded(self._from_upstream), self._guarded(self._upstream_lost))
        if leftover:
            self._from_upstream(leftover)

    def _guarded(self, handler):
        """A failure inside a loop callback ends the session as internal_error, not silently."""

        def call(*args):
            try:
                handler(*args)
            except Exception:
                self.log.exception("worker failed")
                self._execute(self.relay.end("internal_error"))
                self._finished.set()

        return call

    async def _relay_with_pumps(self, tg, leftover: bytes) -> None:
        """trio: one task per leg reads and relays; after relaying it waits for
        the other leg's backlog to drain before reading more (backpressure)."""
        if leftover:
            self._from_upstream(leftover)
        tg.start_soon(self._pump, self._client, self._upstream, self._from_client, self._client_lost)
        tg.start_soon(self._pump, self._upstream, self._client, self._from_upstream, self._upstream_lost)

    async def _pump(self, leg: Leg, other: Leg, relay_in, lost) -> None:
        while not self._finished.is_set():
            try:
                data = await leg.receive()
            except OSError:
                data = b""
            if not data:
                return lost()
            relay_in(data)
            while leg is self._client and self.relay.holding and not self._finished.is_set():
                await anyio.sleep(0.005)  # its events wait for a reservation: read no more meanwhile
            try:
                await other.drain()
            except OSError:
                (self._upstream_lost if other is self._upstream else self._client_lost)()

    def _from_client(self, data: bytes) -> None:
        relay = self.relay
        self._execute(relay.from_client(data))
        if relay.take_client_activity():
            self._last_activity = time.monotonic()
        if relay.holding:
            if isinstance(self._client, TransportLeg) and not self._client.held:
                self._client.hold(True)
            if self.relay.awaiting_billed is not None:  # a translation's audio waits for Billed
                self._billed_awaited.set()

    def _from_upstream(self, data: bytes) -> None:
        self._execute(self.relay.from_upstream(data))

    def _client_lost(self) -> None:
        self._execute(self.relay.client_vanished())

    def _upstream_lost(self) -> None:
        self._execute(self.relay.upstream_vanished())

    def _execute(self, actions) -> None:
        """Carry out relay actions in order, without waiting: bills go to the spool and the
        channel, frames to the legs. A transport flushes its own buffer; a raw socket's backlog
        (its kernel buffer was full) is flushed by a background task."""
        # Runs for every relayed frame: locals, and the vanished-handler looked up only on failure.
        relay = self.relay
        for target, payload in actions:
            if target is _UPSTREAM or target is _CLIENT:
                leg = self._upstream if target is _UPSTREAM else self._client
                try:
                    if not leg.write(payload) and leg not in self._draining:
                        self._draining.add(leg)  # a full socket buffer: flush in the background
                        self._tg.start_soon(self._drain, leg, self._vanished(target))
                except OSError:
                    self._execute(self._vanished(target)())
            elif target is Target.BILL:
                self._bill(payload)
            else:  # Target.RESERVE
                self._ask(Reserve(self.grant.session_id, *payload))
                self._reservation_asked.set()
        if relay.phase is not Phase.OPEN or relay.client.done:  # (finished needs client.done)
            if relay.finished:
                self._finished.set()
            elif relay.phase is not Phase.OPEN:
                self._closing.set()

    def _vanished(self, target: Target):
        return self.relay.client_vanished if target is _CLIENT else self.relay.upstream_vanished

    async def _drain(self, leg: Leg, lost) -> None:
        try:
            await leg.drain()
        except OSError:
            self._execute(lost())
        finally:
            self._draining.discard(leg)

    def _bill(self, increment) -> None:
        """Spool, then report: the increment is durable before its frame is delivered. A
        response's increment also lowers the session's reservation, in the same write."""
        spool.append_increment(self.spool_fd, increment)
        settle = self.relay.settles.pop(increment.seq, (0, 0))
        self._send(UsageIncrement(self.grant.session_id, increment, *settle))

    def _send(self, message: UsageIncrement | Reserve) -> None:
        """To the supervisor, in order, without waiting: a full channel queues it."""
        if not self._channel_backlog:
            try:
                return control.send(self.channel, message)
            except BlockingIOError:
                pass  # the supervisor is behind: keep order, send when the channel has room
            except OSError:  # an increment is in the spool; a Reserve is answered by the deadline
                self.log.warning("supervisor unreachable", fields={"message": message.kind})
                return
        self._channel_backlog.append(message)
        self._channel_ready.set()

    def _translation_billed(self, seq: int) -> None:
        """The supervisor's Billed (seq 0: none came in time): held audio goes on."""
        self._execute(self.relay.billed(seq))
        if not self.relay.holding and isinstance(self._client, TransportLeg) and self._client.held:
            self._client.hold(False)

    async def _watch_billed(self) -> None:
        """A translation session's audio waits for the supervisor's Billed at most one bill-ahead
        interval: without a supervisor (restarting) it still runs at real time or faster."""
        while True:
            await self._billed_awaited.wait()
            self._billed_awaited = anyio.Event()
            seq = self.relay.awaiting_billed
            if seq is None:
                continue
            await anyio.sleep(self.config.translation_bill_ahead_s)
            if self.relay.awaiting_billed == seq:
                self.log.warning("no Billed in time; audio goes on", fields={"seq": seq})
                self._translation_billed(0)

    def _reservation_answered(self, version: int, held: int, granted: bool, reason: str, available: int) -> None:
        self._execute(self.relay.reserved(version, held, granted, reason, available))
        if not self.relay.holding and isinstance(self._client, TransportLeg) and self._client.held:
            self._client.hold(False)

    def _ask(self, reserve: Reserve) -> None:
        self._asking, self._asked_at = reserve, time.monotonic()
        self._send(reserve)

    async def _watch_reservations(self) -> None:
        """A Reserve the supervisor does not answer within RESERVE_WAIT_S of its last sending is
        refused (service_unavailable). While there is no supervisor it waits for the next one,
        which gets it again (`_reattach`): the worker's fence (half the node's lease) bounds that
        wait, since the worker ends its session when no supervisor came back within it. While the account cannot cover
        what the session needs, the reservation is asked again every RESERVE_RETRY_S, so a
        top-up lets the session go on."""
        purse = self.relay.purse
        while True:
            await self._reservation_asked.wait()
            self._reservation_asked = anyio.Event()
            while purse.waiting or purse.refusal is not None:
                version = purse.version
                if purse.waiting:
                    await anyio.sleep(max(self._asked_at + RESERVE_WAIT_S - time.monotonic(), REATTACH_INTERVAL_S))
                    # (read _asked_at again: a Reserve sent again meanwhile has a wait of its own)
                    unanswered = time.monotonic() >= self._asked_at + RESERVE_WAIT_S
                    if purse.waiting and purse.version == version and not self._reattaching and unanswered:
                        self.log.warning("reservation unanswered", fields={"version": version})
                        self._reservation_answered(version, -1, False, "service_unavailable", 0)
                    continue
                await anyio.sleep(RESERVE_RETRY_S)
                if not purse.waiting:
                    again = self.relay.retry_refused()
                    if again is not None:
                        self._ask(Reserve(self.grant.session_id, *again))

    async def _flush_channel_backlog(self) -> None:
        while True:
            await self._channel_ready.wait()
            self._channel_ready = anyio.Event()
            while self._channel_backlog:
                try:
                    await control.asend(self.channel, self._channel_backlog[0])
                except OSError:  # the supervisor is gone: its successor replays the spool
                    self.log.warning("supervisor unreachable; increments kept in the spool")
                    self._channel_backlog.clear()
                    break
                self._channel_backlog.popleft()

    async def _watch_closing(self) -> None:
        """A closing session finishes within the usage drain plus the close handshake timeout."""
        await self._closing.wait()
        self._closed_at = time.monotonic()
        if self.relay.draining:
            await anyio.sleep(self.config.drain_usage_s)
            self._execute(self.relay.drain_expired())
        await anyio.sleep(CLOSE_TIMEOUT_S)
        self._finished.set()

    def _end(self, code: str) -> None:
        self._execute(self.relay.end(code))
        if not self.relay.holding and isinstance(self._client, TransportLeg) and self._client.held:
            self._client.hold(False)  # a translation's held audio was dropped: its close reply is read

    async def _bill_clock(self) -> None:
        """MESHRT_TRANSLATION_BILLING=wall_clock: the session's time is billed ahead once per
        bill-ahead interval, before it is spent (docs/billing.md, Translation sessions)."""
        interval = max(self.config.translation_bill_ahead_s, 0.05)
        while self.relay.phase is Phase.OPEN:
            self._execute(self.relay.translation_clock(time.monotonic() - self._live_at))
            await anyio.sleep(interval)

    # --- clocks and channel -------------------------------------------------------------

    async def _watch_clocks(self) -> None:
        expires = time.monotonic() + self.config.max_session_s
        while self.relay.phase is Phase.OPEN:
            idle_deadline = self._last_activity + self.config.idle_timeout_s
            now = time.monotonic()
            if now >= expires:
                return self._end("session_expired")
            if now >= idle_deadline:
                return self._end("session_idle_timeout")
            await anyio.sleep(min(expires, idle_deadline) - now)

    async def _watch_channel(self) -> None:
        while True:
            try:
                message, fds = await control.arecv(self.channel)
            except (EOFError, OSError, control.ControlError):
                if self._refused_version:
                    return
                self.log.warning("supervisor channel lost; re-attaching")
                await self._reattach(fence_after_s=self.config.orphan_limit_s)
                continue
            for fd in fds:
                os.close(fd)
            if isinstance(message, VersionRefused):
                # a supervisor of another release: it cannot adopt this session, and no other
                # will come; end it as on supervisor loss (the spool keeps its usage and end)
                self.log.error(
                    f"re-attach refused: the supervisor speaks control protocol version {message.speaks}, "
                    f"this worker {control.PROTOCOL_VERSION}; ending the session",
                    fields={"supervisor_version": message.speaks, "worker_version": control.PROTOCOL_VERSION},
                )
                self._refused_version = True
                self._end("node_lost")
                return
            if isinstance(message, StopSession):
                self.log.info("stop requested", fields={"code": message.code})
                self._end(message.code)
            elif isinstance(message, Billed):
                self._translation_billed(message.seq)
            elif isinstance(message, Reserved):
                self._reservation_answered(
                    message.version, message.held, message.granted, message.reason, message.available
                )

    async def _reattach(self, fence_after_s: float | None = None) -> None:
        """The supervisor died: keep relaying (the spool keeps every increment) and offer this
        session to its successor on the control socket until one takes it. With no supervisor
        for `fence_after_s` (the node's lease), end the session: another node is about to
        declare this one lost and free the session's slot, so it must not run on beyond it."""
        fence_at = None if fence_after_s is None else time.monotonic() + fence_after_s
        self._reattaching = True
        while True:
            await anyio.sleep(REATTACH_INTERVAL_S)
            if fence_at is not None and time.monotonic() >= fence_at:
                fence_at = None
                self.log.warning("no supervisor for the node's lease; ending the session")
                self._end("node_lost")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                sock.connect(self.config.control_socket)
                sock.setblocking(False)
                await control.asend(sock, Reattach(self.grant, os.getpid(), self.upgraded))
            except OSError:
                sock.close()
                continue
            old, self.channel = self.channel, sock
            old.close()
            self.log.info("re-attached to the supervisor")
            purse = self.relay.purse
            self._reattaching = False
            if purse is not None and purse.waiting and self._asking is not None:
                self._ask(self._asking)  # its answer died with the old supervisor: this one's own wait
            return

    def _spool_end(self) -> WorkerEnded:
        """Record the end in the spool: durable even if no supervisor is listening."""
        outcome = self.relay.outcome
        message = WorkerEnded(
            self.grant.session_id, outcome.end_reason or "internal_error", outcome.close_code, self.upgraded
        )
        spool.append_end(self.spool_fd, message.end_reason, message.close_code)
        return message

    async def _report_end(self, message: WorkerEnded) -> None:
        """Tell the supervisor how the session ended; if it is down, wait a bounded time for a
        successor to re-attach to (the spool has the end either way)."""
        try:
            control.send(self.channel, message)
        except OSError:
            if self._refused_version:
                return  # no supervisor of this version to tell; the spool has the end
            with anyio.move_on_after(REPORT_END_WAIT_S):
                await self._reattach()
                control.send(self.channel, message)
        fields = {"end_reason": message.end_reason, "close_code": message.close_code}
        meter = getattr(self.relay.meter, "meter", None)
        if meter is not None:  # what the meter saw: parsed, unreadable and unpriced usage (never content)
            fields["meter"] = dataclasses.asdict(meter.stats)
        self.log.info("session ended", fields=fields)


def upstream_target(request: bytes, grant: Grant, config: WorkerConfig) -> tuple:
    """(the client's handshake as parsed, its upgrade, the upstream URL)."""
    protocol, parsed = parse_request_bytes(request)
    upgrade = parse_upgrade(parsed)
    url = upstream_url(config.upstream_url, upstream_query(upgrade, grant.model), upgrade.translation)
    return (protocol, parsed), upgrade, url


def _upgrade_ahead(grant: Grant, config: WorkerConfig, request: bytes, preconnected) -> tuple:
    """First thing in a pool worker whose upstream connection is open: the upgrade goes out now,
    so upstream answers while the meter and the event loop are built (worker/upstream.py).
    Returns (the parsed target or None, the connection or None if found stale, sent)."""
    try:
        target = upstream_target(request, grant, config)
        sent = send_upgrade_ahead(preconnected, target[2], upstream_headers(target[1]), config.upstream_key)
    except Exception:  # noqa: BLE001 - only a head start: the session meets the same request and answers it
        return None, preconnected, False
    return target, None if preconnected.closed else preconnected, sent


def run(
    grant: Grant,
    config: WorkerConfig,
    request: bytes,
    client_fd: int,
    channel_fd: int,
    spool_fd: int,
    preconnected=None,
) -> int:
    """Run one session to its end in this process; returns the exit code. `preconnected`: an
    upstream connection this pool worker opened ahead (worker/preconnect.py), or None."""
    from .preauth import Purse
    from .session_meter import build_meter
    from .translation import build_translation_meter

    forked_at = time.time()
    kind = WorkerSession
    if grant.surface == "webrtc":
        from .call import CallSession

        kind = CallSession
    target, sent = None, None
    if preconnected is not None and kind is not WorkerSession:
        preconnected.close()  # a call's worker joins its sideband by its own connect
        preconnected = None
    if preconnected is not None:
        target, preconnected, sent = _upgrade_ahead(grant, config, request, preconnected)
    client = socket.socket(fileno=client_fd)
    channel = socket.socket(fileno=channel_fd)
    meter, may_carry_usage = build_meter(grant)
    transcription_only = grant.surface == "transcription"
    translation = None
    purse = None
    if grant.surface == "translation":  # billed per audio sent: no responses to reserve
        translation = build_translation_meter(meter.meter, config.translation_bill_ahead_s, config.translation_billing)
    elif config.preauth and grant.surface != "sideband":
        purse = Purse.for_rates(meter.meter.rates, config.response_output_cap, transcription_only)
    if grant.surface == "sideband":  # a tenant's own sideband to a call its call's worker bills
        meter, may_carry_usage = None, None
    session = kind(grant, config, request, client, channel, spool_fd, meter, may_carry_usage, purse)
    session.relay.translation = translation
    session.target = target
    if sent is not None:
        session.setup["upgrade_ahead"] = sent
    session.preconnected = preconnected
    session.setup["t_grant"], session.setup["t_run"] = grant.started_at, round(forked_at, 6)
    session.setup["pooled"] = POOLED
    session.setup["fork_ms"] = round((forked_at - grant.started_at) * 1000, 2)
    session.setup["meter_ms"] = round((time.time() - forked_at) * 1000, 2)
    try:
        backend, options = ("asyncio", {"use_uvloop": True}) if config.backend == "uvloop" else (config.backend, {})
        anyio.run(session.run, backend=backend, backend_options=options)
    finally:
        session.channel.close()
        os.close(spool_fd)
    return 0
