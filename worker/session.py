"""A worker: one realtime session in one process, under anyio (asyncio or trio).

Order of events: parse the (key-stripped) request → connect upstream with the operator's key →
send the client its 101 (or the error frame and close) → tell the supervisor we're live →
relay until both legs are closed → report the end → exit. The relay logic is in `relay.py`;
this shell only moves bytes, keeps the clocks (idle, max length, drain) and the channel.

Ownership: the worker owns the client socket, its end of the control channel and the spool fd;
all are closed when `run` returns. Every usage increment is written to the spool and sent to the
supervisor before the frame carrying it is written to the client.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time

import anyio
from anyio.abc import ByteStream, SocketStream

from meshrt.shared import control
from meshrt.shared.control import Grant, Reattach, StopSession, UsageIncrement, WorkerEnded, WorkerLive
from meshrt.shared.errors import ERRORS, GatewayError
from meshrt.shared.handshake import (
    accept_bytes, error_frames, parse_request_bytes, parse_upgrade, upstream_headers, upstream_query,
)
from meshrt.shared.logs import session_log

from .relay import Phase, Relay, Target
from .upstream import connect_upstream, upstream_url

CLOSE_TIMEOUT_S = 2.0
REATTACH_INTERVAL_S = 0.2
REPORT_END_WAIT_S = 10.0


class WorkerSession:
    def __init__(self, grant: Grant, request: bytes, client: socket.socket, channel: socket.socket,
                 spool_fd: int, meter=None, may_carry_usage=None):
        self.grant = grant
        self.request = request
        self.client_sock = client
        self.channel = channel
        self.spool_fd = spool_fd
        self.log = session_log("meshrt.worker", grant.session_id, grant.request_id)
        self.relay = Relay(grant.request_id, grant.token_cap, grant.max_message_bytes, meter=meter,
                           **({"may_carry_usage": may_carry_usage} if may_carry_usage else {}))
        self.upgraded = False
        self._client: SocketStream | None = None
        self._upstream: ByteStream | None = None
        self._client_lock = anyio.Lock()
        self._upstream_lock = anyio.Lock()
        self._closing_started = False
        self._sending = 0  # writes in progress; the session is not torn down under one
        self._last_activity = time.monotonic()
        self.setup: dict[str, float] = {}  # where set-up time went, for the "session live" log

    # --- entry --------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except Exception:
            self.log.exception("worker failed")
            if self.relay.outcome.end_reason is None:
                self.relay.outcome.end_reason, self.relay.outcome.close_code = "internal_error", 1011
        finally:
            with anyio.CancelScope(shield=True):
                await self._report_end()
                for closeable in (self._client, self._upstream):
                    if closeable is not None:
                        await anyio.aclose_forcefully(closeable)
                if self._client is None:
                    self.client_sock.close()

    async def _run(self) -> None:
        self.setup["loop_ms"] = round((time.time() - self.grant.started_at) * 1000, 2)
        self.client_sock.setblocking(False)
        self.channel.setblocking(False)
        protocol, request = parse_request_bytes(self.request)
        upgrade = parse_upgrade(request)
        self._client = await SocketStream.from_socket(self.client_sock)  # takes ownership
        url = upstream_url(self.grant.upstream_url, upstream_query(upgrade))
        began = time.monotonic()
        try:
            upstream = await connect_upstream(url, upstream_headers(upgrade), self.grant.upstream_key,
                                              self.grant.upstream_connect_timeout_s,
                                              self.grant.upstream_attempts)
        except GatewayError as error:
            self.log.warning("upstream connect failed", fields={"code": error.code, "cause": repr(error.__cause__)})
            await self._refuse(protocol, request, error)
            return
        self._upstream = upstream.stream
        response, status = accept_bytes(protocol, request, self.grant.request_id)
        await self._client.send(response)
        if status != 101:
            self.relay.outcome.end_reason, self.relay.outcome.close_code = "client_closed", None
            return
        self.upgraded = True
        await control.asend(self.channel, WorkerLive(self.grant.session_id, os.getpid()))
        self.setup["upstream_ms"] = round((time.monotonic() - began) * 1000, 2)
        self.setup["since_grant_ms"] = round((time.time() - self.grant.started_at) * 1000, 2)
        self.log.info("session live", fields=self.setup)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if upstream.leftover:
                await self._execute(self.relay.from_upstream(upstream.leftover))
            tg.start_soon(self._pump, self._client, self.relay.from_client, self.relay.client_vanished, True)
            tg.start_soon(self._pump, self._upstream, self.relay.from_upstream, self.relay.upstream_vanished, False)
            tg.start_soon(self._watch_channel)
            tg.start_soon(self._watch_clocks)

    async def _refuse(self, protocol, request, error: GatewayError) -> None:
        """Accept the client's upgrade only to deliver the error frame and close (SPEC §5)."""
        response, status = accept_bytes(protocol, request, self.grant.request_id)
        data = response + (error_frames(protocol, error.code, self.grant.request_id, error.detail)
                           if status == 101 else b"")
        spec = ERRORS[error.code]
        self.relay.outcome.end_reason, self.relay.outcome.close_code = error.code, spec.close_code
        try:
            await self._client.send(data)
            with anyio.move_on_after(CLOSE_TIMEOUT_S):
                while await self._client.receive():  # until the client's close reply / EOF
                    pass
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            pass

    # --- relay --------------------------------------------------------------------------

    async def _pump(self, stream: ByteStream, feed, vanished, from_client: bool) -> None:
        while True:
            try:
                data = await stream.receive(262144)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await self._execute(vanished())
                return
            actions = feed(data)
            if from_client and self.relay.client_active:
                self.relay.client_active = False
                self._last_activity = time.monotonic()
            await self._execute(actions)
            if (self.relay.client_gone if from_client else self.relay.upstream_gone):
                return

    async def _execute(self, actions) -> None:
        for target, payload in actions:
            if target is Target.BILL:
                await self._bill(payload)
            elif target is Target.CLIENT:
                await self._send(self._client, self._client_lock, payload, self.relay.client_vanished)
            else:
                await self._send(self._upstream, self._upstream_lock, payload, self.relay.upstream_vanished)
        if self.relay.finished and self._sending == 0:  # a close still being written must land
            self._tg.cancel_scope.cancel()
        elif self.relay.phase is not Phase.OPEN and not self._closing_started:
            self._closing_started = True
            self._tg.start_soon(self._closing_deadline)

    async def _send(self, stream: ByteStream, lock: anyio.Lock, data: bytes, vanished) -> None:
        self._sending += 1
        try:
            async with lock:
                await stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self._sending -= 1
            await self._execute(vanished())
        else:
            self._sending -= 1

    async def _bill(self, increment) -> None:
        """Spool, then report: the increment is durable before its frame is delivered."""
        record = increment.to_json()
        line = json.dumps({"seq": increment.seq, "increment": record}, separators=(",", ":")) + "\n"
        os.write(self.spool_fd, line.encode())
        try:
            await control.asend(self.channel, UsageIncrement(self.grant.session_id, increment.seq, record))
        except OSError:
            self.log.warning("supervisor unreachable; increment kept in the spool", fields={"seq": increment.seq})

    async def _closing_deadline(self) -> None:
        """A closing session finishes within the usage drain plus the close handshake timeout."""
        if self.relay.draining:
            await anyio.sleep(self.grant.drain_usage_s)
            await self._execute(self.relay.drain_expired())
        await anyio.sleep(CLOSE_TIMEOUT_S)
        self._tg.cancel_scope.cancel()

    async def _end(self, code: str) -> None:
        await self._execute(self.relay.end(code))

    # --- clocks and channel -------------------------------------------------------------

    async def _watch_clocks(self) -> None:
        expires = time.monotonic() + self.grant.max_session_s
        while self.relay.phase is Phase.OPEN:
            idle_deadline = self._last_activity + self.grant.idle_timeout_s
            now = time.monotonic()
            if now >= expires:
                return await self._end("session_expired")
            if now >= idle_deadline:
                return await self._end("session_idle_timeout")
            await anyio.sleep(min(expires, idle_deadline) - now)

    async def _watch_channel(self) -> None:
        while True:
            try:
                message, fds = await control.arecv(self.channel)
            except (EOFError, OSError, control.ControlError):
                self.log.warning("supervisor channel lost; re-attaching")
                await self._reattach()
                continue
            for fd in fds:
                os.close(fd)
            if isinstance(message, StopSession):
                self.log.info("stop requested", fields={"code": message.code})
                await self._end(message.code)

    async def _reattach(self) -> None:
        """The supervisor died: keep relaying (the spool keeps every increment) and offer this
        session to its successor on the control socket until one takes it."""
        grant = dataclasses.replace(self.grant, upstream_key="")
        while True:
            await anyio.sleep(REATTACH_INTERVAL_S)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                sock.connect(self.grant.control_socket)
                sock.setblocking(False)
                await control.asend(sock, Reattach(grant, os.getpid(), self.upgraded))
            except OSError:
                sock.close()
                continue
            old, self.channel = self.channel, sock
            old.close()
            self.log.info("re-attached to the supervisor")
            return

    async def _report_end(self) -> None:
        """Record the end in the spool (durable even if no supervisor is listening), then tell
        the supervisor; if it is down, wait a bounded time for a successor to re-attach to."""
        outcome = self.relay.outcome
        message = WorkerEnded(self.grant.session_id, outcome.end_reason or "internal_error",
                              outcome.close_code, self.upgraded)
        end = {"end": {"end_reason": message.end_reason, "close_code": message.close_code}}
        os.write(self.spool_fd, (json.dumps(end, separators=(",", ":")) + "\n").encode())
        try:
            control.send(self.channel, message)
        except OSError:
            with anyio.move_on_after(REPORT_END_WAIT_S):
                await self._reattach()
                control.send(self.channel, message)
        self.log.info("session ended", fields={"end_reason": message.end_reason, "close_code": message.close_code})


def run(grant: Grant, request: bytes, client_fd: int, channel_fd: int, spool_fd: int) -> int:
    """Run one session to its end in this process; returns the exit code."""
    from .metering import build_meter

    forked_at = time.time()
    client = socket.socket(fileno=client_fd)
    channel = socket.socket(fileno=channel_fd)
    meter, may_carry_usage = build_meter(grant)
    session = WorkerSession(grant, request, client, channel, spool_fd, meter, may_carry_usage)
    session.setup["fork_ms"] = round((forked_at - grant.started_at) * 1000, 2)
    session.setup["meter_ms"] = round((time.time() - forked_at) * 1000, 2)
    try:
        backend, options = ("asyncio", {"use_uvloop": True}) if grant.backend == "uvloop" else (grant.backend, {})
        anyio.run(session.run, backend=backend, backend_options=options)
    finally:
        session.channel.close()
        os.close(spool_fd)
    return 0
