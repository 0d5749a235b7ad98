"""The supervisor: parent of the front door and the zygote, owner of the listening socket,
keeper of the live-session registry, and the only writer of final usage records.

Shape (after gunicorn's arbiter): signals become messages into one task group; children are
restarted when they die; every session is finalised exactly once, when its worker's channel
closes — however the worker ended — from its spool, which stays the truth until the final
record commits. Database writes that fail are retried with backoff (every write is safe to
repeat); anything else that fails takes the whole supervisor down with a non-zero exit, so its
restarter and the workers' re-attachment take over — a half-dead supervisor never lingers.
Start-up order matters for isolation: the zygote is started (with a scrubbed environment)
before the database is opened or the upstream key is read.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import hashlib
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import anyio
from tenacity import AsyncRetrying
from tenacity import retry_if_exception
from tenacity import wait_exponential

from meshrt.shared import control
from meshrt.shared import sandbox
from meshrt.shared import spool
from meshrt.shared.control import Billed
from meshrt.shared.control import CallPlaced
from meshrt.shared.control import EndCall
from meshrt.shared.control import Handoff
from meshrt.shared.control import HandoffAck
from meshrt.shared.control import HangUp
from meshrt.shared.control import HungUp
from meshrt.shared.control import Ping
from meshrt.shared.control import PlaceCall
from meshrt.shared.control import Pong
from meshrt.shared.control import PoolStatus
from meshrt.shared.control import Reattach
from meshrt.shared.control import Reserve
from meshrt.shared.control import Reserved
from meshrt.shared.control import Spawn
from meshrt.shared.control import Spawned
from meshrt.shared.control import StopSession
from meshrt.shared.control import UsageIncrement
from meshrt.shared.control import VersionRefused
from meshrt.shared.control import WorkerConfig
from meshrt.shared.control import WorkerEnded
from meshrt.shared.control import WorkerExited
from meshrt.shared.control import WorkerLive
from meshrt.shared.control import ZygoteReady
from meshrt.shared.errors import ERRORS
from meshrt.shared.errors import EndReason
from meshrt.shared.errors import GatewayError
from meshrt.shared.increments import Increment
from meshrt.shared.logs import one_line
from meshrt.shared.metrics import Metrics
from meshrt.shared.settings import SECRET_VARIABLES
from meshrt.shared.settings import CommandError
from meshrt.shared.settings import Settings
from meshrt.shared.settings import node_identity
from meshrt.storage import db
from meshrt.storage import ledger
from meshrt.storage.accounts import prune_ephemeral_keys
from meshrt.storage.ledger import Finalized
from meshrt.worker.session_meter import GrantPriceTable
from meshrt.worker.session_meter import repriced

from . import calls
from . import processes
from .lease import NodeLease
from .quota import QuotaEstimate
from .registry import LiveSession
from .registry import Registry
from .registry import SessionEvent
from .registry import Stage
from .registry import Tally

log = logging.getLogger("meshrt.supervisor")

ORPHAN_GRACE_S = 2.0  # a dead front door's last handoffs are served well within this
REATTACH_GRACE_S = 3.0
BIND_WAIT_S = 10.0
METRICS_INTERVAL_S = 1.0
BALANCE_REFRESH_S = 0.5  # top-ups made on any node reach the quota decision within this
RETRY_MAX_WAIT_S = 2.0  # backoff ceiling of a failed database write
RESERVE_PROVISIONAL_S = 1.0  # a reservation the database has not made by then is decided here
EXIT_SANDBOX = 78  # EX_CONFIG: MESHRT_SANDBOX=require and a layer cannot be installed here
EXIT_CANNOT_SERVE = 69  # EX_UNAVAILABLE: the port is taken (or not ours to take); the keeper tries again
PRUNE_INTERVAL_S = 300.0  # how often expired ephemeral keys are looked for (at most)
CALL_ID_WAIT_S = 2.0  # a placed call's answer waits this long at most for its id to be written
DATABASE_STALE_S = 3.0  # no successful write for this long after a failure: not ready


def _retrying(give_up) -> AsyncRetrying:
    """Backoff for a database write: retried while `give_up()` is false (every ledger write is
    safe to repeat: increments by (session_id, seq), the record by its state)."""
    return AsyncRetrying(
        wait=wait_exponential(multiplier=0.05, max=RETRY_MAX_WAIT_S),
        retry=retry_if_exception(lambda exc: isinstance(exc, Exception) and not give_up()),
        sleep=anyio.sleep,
        reraise=True,
    )


class RunState(enum.Enum):
    STARTING = "starting"  # the schema, the node's lease, the sockets
    SERVING = "serving"
    DRAINING = "draining"  # SIGTERM: refusing new sessions, live ones run on up to drain_s
    STOPPING = "stopping"  # ending what is left; writes that fail now are left to the spools


class Supervisor:
    def __init__(self, settings: Settings, node: str | None = None):
        self.settings = settings
        self.node = node  # set from the state dir in run() if not given
        self.registry = Registry()
        self.metrics = Metrics()
        self.finalizing = Tally()  # sessions whose record is being written
        self.quota: dict[str, QuotaEstimate] = {}  # account -> what it can still spend
        self.lease: NodeLease | None = None
        self.state = RunState.STARTING
        self.run_dir = settings.state_dir / "run"
        self.frontdoor: processes.Child | None = None
        # pid -> when it exited (None: running): only this node's front doors may hand off sessions
        self.frontdoor_pids: dict[int, float | None] = {}
        self.zygote: processes.Child | None = None
        self.zygote_channel: socket.socket | None = None
        self.zygote_ready = False
        self.pool: PoolStatus | None = None  # the zygote's last word on its pool and its workers' memory
        # Handoffs are served concurrently; when the zygote lags (its channel holds only a few
        # datagrams) two senders waiting to write would crash the task group (BusyResourceError)
        self.zygote_send_lock = anyio.Lock()
        # a call's worker joins its sideband with the worker's own connect budget (and backoff)
        self.call_join_wait_s = settings.upstream_connect_budget_s + 3.0
        self.worker_config = WorkerConfig(  # the same for every session: built once
            upstream_url=settings.upstream_url,
            upstream_key=settings.openai_api_key,
            idle_timeout_s=settings.idle_timeout_s,
            max_session_s=settings.max_session_s,
            max_message_bytes=settings.max_message_bytes,
            drain_usage_s=settings.drain_usage_s,
            upstream_connect_timeout_s=settings.upstream_connect_timeout_s,
            upstream_attempts=settings.upstream_attempts,
            backend=settings.worker_backend,
            memory_limit_mb=settings.worker_memory_mb,
            control_socket=str(settings.control_socket.resolve()),
            # half the lease: the lease may have been renewed last up to a quarter of it before the
            # worker lost its supervisor, and no other node may free the slot of a session still running
            orphan_limit_s=settings.node_lease_s / 2,
            preauth=settings.preauth,
            translation_bill_ahead_s=settings.translation_bill_ahead_s,
            translation_billing=settings.translation_billing,
            response_output_cap=settings.max_response_output_tokens,
            sandbox=settings.sandbox,
        )
        self.engine = None
        self.reattach_listener: socket.socket | None = None  # workers under their own uids
        self.tg = None
        self._drain_wait: anyio.CancelScope | None = None  # a second signal cancels it
        self.checking_quota: set[str] = set()  # accounts whose balance is being confirmed
        self.unfinished_rows: dict = {}  # this node's sessions not ended, as read at start-up

    # --- start-up -------------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        """The state dir, the run dir and the spools: this node's alone (0700; with workers under
        uids of their own, none of them can open anything in there)."""
        for path in (self.settings.state_dir, self.run_dir, self.settings.spool_dir):
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o700)

    def _may_connect(self, uid: int) -> bool:
        """Who may connect to the control socket: this node's own processes, and its workers
        (to re-attach; a Handoff is taken only from its front door, by pid)."""
        uids = self.settings.worker_uid_range
        return uid == os.getuid() or (uids is not None and uids[0] <= uid <= uids[1])

    async def _start_zygote(self) -> None:
        self.zygote, self.zygote_channel = await processes.start_zygote(self.settings)
        self.zygote_ready = False
        self.pool = None

    async def _bind(self) -> tuple[socket.socket, socket.socket]:
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + BIND_WAIT_S
        while True:  # a dying predecessor's front door may still hold the port for a moment
            try:
                listener.bind((self.settings.host, self.settings.port))
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    listener.close()
                    raise CommandError(
                        f"cannot listen on {self.settings.host}:{self.settings.port} ({exc.strerror}): stop what"
                        " holds it, or pick another port with --port P or MESHRT_PORT=P"
                    ) from None
                await anyio.sleep(0.1)
        listener.listen(2048)
        path = self.settings.control_socket
        path.unlink(missing_ok=True)
        handoffs = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            handoffs.bind(str(path))
        finally:
            os.umask(old_umask)
        handoffs.listen(512)
        handoffs.setblocking(False)
        if self.settings.worker_uid_range is not None:
            self.reattach_listener = self._bind_reattach()
        return listener, handoffs

    def _bind_reattach(self) -> socket.socket:
        """Workers under uids of their own cannot open anything in the state dir, the control
        socket's included: they re-attach through an abstract socket (no file, so no permission
        but the connecting uid's, which `_may_connect` checks) named after this node and state dir."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.bind(self.worker_config.control_socket)
        sock.listen(512)
        sock.setblocking(False)
        return sock

    async def _start_frontdoor(self, listener: socket.socket) -> None:
        self.frontdoor = await processes.start_frontdoor(self.settings, listener, self.node)
        self.frontdoor_pids = {
            pid: gone for pid, gone in self.frontdoor_pids.items() if gone is None or not self._long_gone(gone)
        }
        self.frontdoor_pids[self.frontdoor.pid] = None

    # --- the main loop --------------------------------------------------------------------

    async def run(self) -> int:
        self._prepare_dirs()
        self.node = self.node or node_identity(self.settings)
        if self.settings.worker_uid_range is not None:
            self.worker_config = dataclasses.replace(self.worker_config, control_socket=reattach_address(self))
        await self._start_zygote()
        try:
            return await self._run()
        except CommandError as error:  # the operator's to fix (a port in use): one line, no traceback
            self._kill_children()
            log.error(str(error))
            print(f"meshrt: {error}", file=sys.stderr, flush=True)
            return EXIT_CANNOT_SERVE
        except BaseException as error:
            self._kill_children()
            if processes.contains(error, processes.CrashLoop):
                log.critical("a child process is in a crash loop; exiting", exc_info=True)
                return processes.EXIT_CHILD_CRASH_LOOP
            log.critical("supervisor failed; exiting so that a fresh one takes over", exc_info=True)
            return processes.EXIT_CRASHED

    async def _run(self) -> int:
        s = self.settings
        self.engine = db.make_engine(s.db_url, s.db_timeout_s)
        self.lease = NodeLease(s.db_url, s.db_timeout_s, self.node, s.node_lease_s, self.metrics)
        await self._until_done("create the schema", anyio.to_thread.run_sync, db.create_schema, self.engine)
        await self.lease.join(self._until_done)
        self.writer = ledger.LedgerWriter(self.engine, batch_deadline_s=3 * s.db_timeout_s)
        self.calls = calls.Upstream(s.upstream_url, s.openai_api_key, s.upstream_connect_timeout_s, s.upstream_attempts)
        listener, handoffs = await self._bind()
        await self._start_frontdoor(listener)
        print(f"meshrt listening on http://{s.host}:{listener.getsockname()[1]}", flush=True)
        log.info("node up", extra={"fields": {"node": self.node, "incarnation": self.lease.lease.incarnation}})
        self.state = RunState.SERVING
        async with anyio.create_task_group() as tg:
            self.tg = tg
            tg.start_soon(self.writer.run)
            tg.start_soon(self._recover)
            tg.start_soon(self.lease.hold, self._lost_lease, self._until_done)
            tg.start_soon(self._refresh_balances)
            if s.ephemeral_key_retention_s:
                tg.start_soon(self._prune_ephemeral_keys)
            tg.start_soon(self._publish_metrics)
            tg.start_soon(self._accept_handoffs, handoffs)
            if self.reattach_listener is not None:
                tg.start_soon(self._accept_handoffs, self.reattach_listener)
            tg.start_soon(self._read_zygote)
            tg.start_soon(self._watch_frontdoor, listener)
            tg.start_soon(self._watch_signals)
        await self.calls.aclose()  # its pooled connections to upstream close, not just vanish at exit
        return 0

    def _giving_up(self) -> bool:
        """Stopping (or crashing): a write that fails now is left to the spool and the next start."""
        return self.state is RunState.STOPPING or (self.tg is not None and self.tg.cancel_scope.cancel_called)

    def _kill_children(self) -> None:
        for child in (self.frontdoor, self.zygote):
            if child is not None:
                child.kill()

    async def _until_done(self, what: str, call, *args):
        """Retry a start-up step until the database lets it through (or the supervisor stops)."""
        attempt = 0
        async for attempt_state in _retrying(self._giving_up):
            with attempt_state:
                attempt += 1
                try:
                    return await call(*args)
                except Exception as exc:
                    log.warning(
                        f"could not {what}; retrying", extra={"fields": {"attempt": attempt, "error": one_line(exc)}}
                    )
                    raise

    async def _publish_metrics(self) -> None:
        path = self.run_dir / "metrics.json"
        while True:
            self.metrics.gauges["meshrt_live_sessions"] = len(self.registry)
            self.metrics.gauges["meshrt_max_sessions"] = self.settings.max_sessions
            self.metrics.gauges.update(pool_gauges(self.pool))
            if self.pool is not None:  # the zygote counts them; a restarted one starts again from 0
                self.metrics.counters["meshrt_sessions_from_pool_total"][()] = self.pool.from_pool
                self.metrics.counters["meshrt_sessions_forked_total"][()] = self.pool.forked
            self.metrics.publish(path)
            await anyio.sleep(METRICS_INTERVAL_S)

    async def _watch_signals(self) -> None:
        """The first SIGTERM/SIGINT drains (up to drain_s, an hour by default); another one while
        live sessions run ends them now, billed, as a drain that ran out does."""
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if self.state is not RunState.DRAINING and self.state is not RunState.STOPPING:
                    log.info(
                        "signal received; draining",
                        extra={"fields": {"signal": signum, "drain_s": self.settings.drain_s}},
                    )
                    self.tg.start_soon(self.drain)
                elif self._drain_wait is not None and not self._drain_wait.cancel_called:
                    log.info("second signal received; ending live sessions now", extra={"fields": {"signal": signum}})
                    self._drain_wait.cancel()

    async def _watch_frontdoor(self, listener: socket.socket) -> None:
        policy = processes.RestartPolicy("front door")
        while self.state is not RunState.STOPPING:
            code = await self.frontdoor.exited()
            self.frontdoor_pids[self.frontdoor.pid] = time.monotonic()
            if self.state is RunState.STOPPING:
                return
            backoff = policy.after_exit(self.frontdoor.lived_s(), code)
            log.warning("front door exited; restarting", extra={"fields": {"exit_code": code, "backoff_s": backoff}})
            await self.tg.start(self._end_orphaned_grants)  # its snapshot precedes the new front door
            await anyio.sleep(backoff)
            await self._start_frontdoor(listener)

    async def _end_orphaned_grants(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        """A front door that died between admitting an upgrade (its row inserted, `granted`) and
        handing the socket over left a row no worker will ever end; it would count against the
        account's concurrent sessions until the next supervisor restart. Once every handoff it
        sent has been served, end those rows (nothing was relayed, nothing billed). Only rows
        granted before its successor starts are candidates: the snapshot is taken first."""
        try:
            rows = await anyio.to_thread.run_sync(ledger.granted_sessions, self.engine, self.node)
        except Exception as exc:  # noqa: BLE001 - the database is down: the next restart's recovery ends them
            log.warning("could not list granted sessions", extra={"fields": {"error": one_line(exc)}})
            rows = []
        task_status.started()
        await anyio.sleep(ORPHAN_GRACE_S)
        for row in rows:
            if self.registry.get(row.id) is not None or self._spool_path(row.id).exists():
                continue  # handed over: a worker has it, or its record is being written
            ended, _ = await self._write(ledger.end_orphaned_grant, row.id, "internal_error")
            if ended:
                log.warning(
                    "ended a session its dead front door never handed over",
                    extra={"session_id": row.id, "request_id": row.request_id},
                )

    # --- handoffs -------------------------------------------------------------------------

    async def _accept_handoffs(self, handoffs: socket.socket) -> None:
        while True:
            await anyio.wait_readable(handoffs)
            try:
                conn, _ = handoffs.accept()
            except BlockingIOError:
                continue
            if not self._may_connect(control.peer_uid(conn)):
                log.warning("handoff from another user refused")
                conn.close()
                continue
            conn.setblocking(False)
            self.tg.start_soon(self._serve_handoff, conn)

    async def _serve_handoff(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            message, fds = await control.arecv(conn)
            if isinstance(message, Ping):
                await control.asend(conn, Pong(self.problems()))
                return
            if isinstance(message, Reattach) and not fds:
                await self._adopt(message, conn)
                conn = None  # now the session's channel
                return
            if isinstance(message, (PlaceCall, HangUp)) and not fds:
                if self._from_front_door(conn):
                    await self._serve_call(message, conn)
                return
            if not isinstance(message, Handoff) or len(fds) != 1:
                return
            if not self._from_front_door(conn):
                return
            code = self._refusal()
            if code is None:
                received = time.time()
                await self._spawn(message, fds[0])
                self.metrics.inc("meshrt_sessions_started_total")
                log.info(  # the supervisor's part of the set-up timeline (bench/timeline.py)
                    "spawn sent",
                    extra={
                        "session_id": message.grant.session_id,
                        "fields": {"t_handoff": round(received, 6), "t_spawn": round(time.time(), 6)},
                    },
                )
            else:
                self.metrics.inc("meshrt_handoffs_refused_total", code=code)
            await control.asend(conn, HandoffAck(message.grant.session_id, code))
        except control.VersionMismatch as mismatch:
            self._refuse_version(conn, mismatch)
        except (EOFError, OSError, control.ControlError):
            log.exception("handoff failed")
        finally:
            for fd in fds:
                os.close(fd)
            if conn is not None:
                conn.close()

    # --- WebRTC calls -----------------------------------------------------------------------

    async def _serve_call(self, message: PlaceCall | HangUp, conn: socket.socket) -> None:
        if isinstance(message, HangUp):
            status = await self.calls.hang_up(message.call_id)
            log.info("call hung up by its tenant", extra={"fields": {"call_id": message.call_id, "status": status}})
            await control.asend(conn, HungUp(message.call_id, status))
            return
        await control.asend(conn, await self._place_call(message))

    async def _place_call(self, message: PlaceCall) -> CallPlaced:
        """Place an admitted call upstream, then start its worker (docs/billing.md, WebRTC
        calls). A call whose worker cannot be started is hung up at once: none runs unmetered."""
        grant = message.grant
        code = self._refusal()
        if code is not None:
            self.metrics.inc("meshrt_handoffs_refused_total", code=code)
            return CallPlaced(grant.session_id, code)
        try:
            placed = await self.calls.place(message.offer, {**message.session, "model": grant.model})
        except GatewayError as error:
            log.warning(
                "call not placed upstream", extra={"session_id": grant.session_id, "fields": {"code": error.code}}
            )
            return CallPlaced(grant.session_id, error.code, error.detail or "")
        grant = dataclasses.replace(grant, call_id=placed.call_id)
        placeholder, other = socket.socketpair()  # a call's worker has no client socket
        try:
            live = await self._spawn(Handoff(grant, b""), placeholder.fileno())
        except (OSError, control.ControlError):
            log.exception("call's worker not started; hanging the call up", extra={"session_id": grant.session_id})
            await self.calls.hang_up(placed.call_id)
            return CallPlaced(grant.session_id, "internal_error")
        finally:
            placeholder.close()
            other.close()
        self.metrics.inc("meshrt_sessions_started_total")
        self.metrics.inc("meshrt_calls_placed_total")
        await self._record_call_id(grant.session_id, placed.call_id)
        code = await self._joined(live)
        if code is not None:  # its finalisation hangs the call up: the caller's peer never connected
            return CallPlaced(grant.session_id, code)
        return CallPlaced(grant.session_id, None, answer=placed.answer, call_id=placed.call_id)

    async def _joined(self, live: LiveSession) -> str | None:
        """Wait until a call's worker is on the call's sideband: the answer lets the caller's
        peer connect, and what the call does first (its session.created, a first response, the
        reservation made on it) must not happen before it is metered. None once joined, else
        the code the call is refused with (its worker gone, or not joined in time: stopped)."""
        with anyio.move_on_after(self.call_join_wait_s):
            await live.settled.wait()
        if live.stage is Stage.LIVE:
            return None
        if live.stage is Stage.STARTING:
            log.warning("call's worker did not join the sideband in time", extra={"session_id": live.grant.session_id})
            await self._stop(live, EndReason.UPSTREAM_UNAVAILABLE.value)
            return EndReason.UPSTREAM_UNAVAILABLE.value
        ended = live.end_report.end_reason if live.end_report is not None else None
        return ended if ended in ERRORS else (live.stop_code or EndReason.UPSTREAM_UNAVAILABLE.value)

    async def _record_call_id(self, session_id: str, call_id: str) -> None:
        """Write the call's id on its row, retried like a ledger write until it commits: a call
        whose row lacks it could not be hung up by a supervisor started after a crash, and would
        run on upstream unmetered. Its tenant hears of the call once the write is in, or after
        CALL_ID_WAIT_S of a database that does not answer (its sideband waits for the write)."""
        written = anyio.Event()

        async def write() -> None:
            _, number = await self._write(ledger.record_call_id, session_id, call_id)
            if number is None:
                log.error("call id not recorded", extra={"session_id": session_id, "fields": {"call_id": call_id}})
            written.set()

        self.tg.start_soon(write)
        with anyio.move_on_after(CALL_ID_WAIT_S):
            await written.wait()
        if not written.is_set():
            log.warning("call id not recorded yet; retrying", extra={"session_id": session_id})

    async def _hang_up(self, live: LiveSession, why: str) -> None:
        """Hang a call up upstream: its worker asked (and meters on until the sideband closes),
        or the worker is gone (ended, crashed, stopped) and the call must not run on unmetered."""
        grant = live.grant
        live.hung_up = status = await self.calls.hang_up(grant.call_id)
        fields = {"call_id": grant.call_id, "status": status, "why": why}
        log.info("call hung up", extra={"session_id": grant.session_id, "fields": fields})

    def _refuse_version(self, conn: socket.socket, mismatch: control.VersionMismatch) -> None:
        """A process of another release spoke on the control socket (a worker re-attaching after
        an upgrade, most likely): refuse it in words every version reads, and say so."""
        self.metrics.inc("meshrt_control_version_refused_total")
        pid = control.peer_pid(conn)
        what = "a worker's re-attach" if mismatch.kind == Reattach.kind else f"a {mismatch.kind!r} message"
        log.error(
            f"refused {what} of control protocol version {mismatch.version}: this supervisor speaks "
            f"version {control.PROTOCOL_VERSION}"
            + (
                "; the worker ends its session as on supervisor loss (node_lost)" if mismatch.kind == "reattach" else ""
            ),
            extra={"pid": pid, "fields": {"kind": mismatch.kind, "version": mismatch.version}},
        )
        try:
            control.send(conn, VersionRefused(control.PROTOCOL_VERSION, mismatch.version))
            # what it sent after (a re-attaching worker re-sends its Reserve at once) is read and
            # dropped: a unix socket closed with unread data resets its peer, and the reset would
            # reach the worker before the refusal does
            while conn.recv(control.MAX_MESSAGE):
                pass
        except OSError:  # BlockingIOError: nothing more
            pass

    @staticmethod
    def _long_gone(exited_at: float) -> bool:
        return time.monotonic() - exited_at > ORPHAN_GRACE_S

    def _from_front_door(self, conn: socket.socket) -> bool:
        """Whether a Handoff comes from this node's front door (running, or exited within the
        grace its last handoffs have): a grant names the account billed and its rates, so a
        worker (same uid, and allowed to connect here to re-attach) must not be able to send one."""
        pid = control.peer_pid(conn)
        exited_at = self.frontdoor_pids.get(pid, 0.0)
        if exited_at is None or (exited_at and not self._long_gone(exited_at)):
            return True
        self.metrics.inc("meshrt_handoffs_refused_total", code="not_front_door")
        log.error("handoff from a process that is not this node's front door refused", extra={"pid": pid})
        return False

    def problems(self) -> list[str]:
        """Why this node should not be sent sessions now (what the front door's /readyz says)."""
        problems = []
        if self.state is not RunState.SERVING:
            problems.append(self.state.value)
        if not self.zygote_ready:
            problems.append("zygote not ready")
        if len(self.registry) >= self.settings.max_sessions:  # a load balancer sends the next one elsewhere
            problems.append(f"at capacity ({len(self.registry)} of {self.settings.max_sessions} sessions)")
        if not self.lease.valid:
            problems.append("node lease not renewed (database unreachable?)")
        failed, succeeded = self.writer.last_failure, self.writer.last_success
        if (
            failed is not None
            and (succeeded is None or succeeded < failed)
            and time.monotonic() - failed < DATABASE_STALE_S
        ):
            problems.append("database writes failing")
        return problems

    def _refusal(self) -> str | None:
        if self.state is not RunState.SERVING:
            return "server_shutting_down"
        if len(self.registry) >= self.settings.max_sessions:
            log.warning(
                "node at capacity",
                extra={"fields": {"live": len(self.registry), "max_sessions": self.settings.max_sessions}},
            )
            return "server_at_capacity"
        return None

    def _spool_path(self, session_id: str) -> Path:
        return spool.path(self.settings.spool_dir, session_id)

    async def _spawn(self, handoff: Handoff, client_fd: int) -> LiveSession:
        """Send the session to the zygote: fds [client, worker channel, spool]. The caller
        closes its copy of client_fd; ours of the other two are closed here once sent."""
        grant = handoff.grant
        spool_fd = spool.open_for_worker(self.settings.spool_dir, grant.session_id)
        ours, theirs = control.seqpacket_pair()
        try:
            async with self.zygote_send_lock:
                await control.asend(
                    self.zygote_channel,
                    Spawn(grant, self.worker_config, handoff.request),
                    [client_fd, theirs.fileno(), spool_fd],
                )
        finally:
            theirs.close()
            os.close(spool_fd)
        ours.setblocking(False)
        live = LiveSession(grant, ours)
        self.registry.add(live)
        # the balance admission read: a first estimate until the next refresh (a stop is confirmed first)
        self._estimate(grant.account_id).observe_balance(grant.balance_pico, -1)
        self.tg.start_soon(self._watch_worker, live)
        return live

    # --- zygote and workers ---------------------------------------------------------------

    async def _read_zygote(self) -> None:
        policy = processes.RestartPolicy("zygote")
        while True:
            try:
                message, fds = await control.arecv(self.zygote_channel)
            except (EOFError, control.ControlError):
                if self.state is RunState.STOPPING:
                    return
                self.zygote.kill()
                code = await self.zygote.exited()
                backoff = policy.after_exit(self.zygote.lived_s(), code)
                log.error(
                    "zygote channel lost; restarting the zygote",
                    extra={"fields": {"exit_code": code, "backoff_s": backoff}},
                )
                self.zygote_channel.close()
                await anyio.sleep(backoff)
                await self._start_zygote()
                continue
            for fd in fds:
                os.close(fd)
            if isinstance(message, ZygoteReady):
                self.zygote_ready = True
            elif isinstance(message, PoolStatus):
                self.pool = message
            elif isinstance(message, Spawned):
                self.registry.set_pid(message.session_id, message.pid)
            elif isinstance(message, WorkerExited):
                if message.signal == sandbox.VIOLATION_SIGNAL:
                    self.metrics.inc("meshrt_sandbox_violations_total")
                    log.error(
                        "worker killed by its sandbox (a forbidden system call)",
                        extra={"pid": message.pid, "fields": {"signal": message.signal}},
                    )
                level = logging.INFO if message.exit_code == 0 else logging.WARNING
                log.log(
                    level,
                    "worker exited",
                    extra={"pid": message.pid, "fields": {"exit_code": message.exit_code, "signal": message.signal}},
                )

    async def _watch_worker(self, live: LiveSession) -> None:
        try:
            while True:
                try:
                    message, fds = await control.arecv(live.channel)
                except (EOFError, control.ControlError):
                    return
                for fd in fds:
                    os.close(fd)
                if message.session_id != live.grant.session_id:
                    log.warning(
                        "worker spoke for another session; ignored", extra={"session_id": live.grant.session_id}
                    )
                elif isinstance(message, WorkerLive):
                    live.pid = message.pid
                    live.handle(SessionEvent.WORKER_LIVE)
                    live.settled.set()
                    self.tg.start_soon(self._write, ledger.mark_live, message.session_id, message.pid)
                elif isinstance(message, UsageIncrement):
                    settle = None
                    if message.settle_version:
                        settle = ledger.ReserveChange(message.settle_version, message.settle_pico, 0)
                    await self._apply(live, message.increment, settle=settle)
                elif isinstance(message, Reserve) and not live.reserving:
                    # one at a time: a worker waits for each answer, and one that floods is
                    # untrusted (ignored; it refuses its own event when no answer comes)
                    live.reserving = True
                    self.tg.start_soon(self._reserve, live, message)
                elif isinstance(message, EndCall) and live.grant.call_id and live.hung_up is None:
                    live.hung_up = 0
                    self.tg.start_soon(self._hang_up, live, message.code)
                elif isinstance(message, WorkerEnded):
                    live.end_report = message
        finally:
            with anyio.CancelScope(shield=True):  # ends by itself when the record commits or we stop
                await self._finalize(live)

    # --- money ----------------------------------------------------------------------------

    async def _write(self, call, *args, give_up=None):
        """Run one ledger write, retrying with backoff until it commits (or `give_up()`, or the
        supervisor stops: what is left is in a spool, and the next start finishes it). Returns
        (result, job number), or (None, None) when it gave up."""
        give_up = give_up or (lambda: False)
        try:
            async for attempt in _retrying(lambda: self._giving_up() or give_up()):
                with attempt:
                    job = self.writer.enqueue(call, *args)
                    return await job.wait(), job.number
        except Exception:  # noqa: BLE001 - each failure was logged by the writer
            return None, None

    def _estimate(self, account_id: str) -> QuotaEstimate:
        estimate = self.quota.get(account_id)
        if estimate is None:
            estimate = self.quota[account_id] = QuotaEstimate()
        return estimate

    async def _apply(
        self, live: LiveSession, increment: Increment, check: bool = True, settle: ledger.ReserveChange | None = None
    ) -> None:
        """Bill one increment: it counts against the account's estimate at once, and its write
        is retried until the database acknowledges it; the spool keeps it meanwhile."""
        if increment.seq in live.reported:
            return
        increment = self._priced(live, increment)
        live.reported[increment.seq] = increment
        grant = live.grant
        estimate = self._estimate(grant.account_id)
        estimate.add((grant.session_id, increment.seq), increment.cost.picodollars)
        self.tg.start_soon(self._commit, live, increment, settle)
        if grant.surface == "translation" and not estimate.exhausted:
            # the worker forwards no audio past this increment until told the account could pay
            self.tg.start_soon(self._tell, live, Billed(grant.session_id, increment.seq))
        if check:
            self._check_quota_soon(grant.account_id)

    def _priced(self, live: LiveSession, increment: Increment) -> Increment:
        """The increment as this supervisor prices it, from the rates of the grant it issued
        (the worker's cost is its claim, not the bill): a difference is logged and counted."""
        try:
            if live.prices is None:
                live.prices = GrantPriceTable(live.grant.rates)
            fixed = repriced(live.prices, increment)
        except Exception:  # noqa: BLE001 - the grant's rates unreadable: bill what was reported
            log.exception("increment not re-priced", extra={"session_id": live.grant.session_id})
            return increment
        if fixed is None:
            return increment
        self.metrics.inc("meshrt_repriced_increments_total")
        log.warning(
            "worker's cost differs from the grant's rates; billed at the supervisor's",
            extra={
                "session_id": live.grant.session_id,
                "fields": {
                    "seq": increment.seq,
                    "worker_picodollars": increment.cost.picodollars,
                    "picodollars": fixed.cost.picodollars,
                },
            },
        )
        return fixed

    def _count_billed(self, increment: Increment) -> None:
        """The usage counters, for an increment whose write committed (here or at finalisation)."""
        self.metrics.inc("meshrt_usage_increments_total")
        cost = increment.cost.picodollars
        if cost >= 0:
            self.metrics.inc("meshrt_usage_cost_picodollars_total", cost)
        else:  # a translation session's settle: audio billed ahead and not sent (a counter never falls)
            self.metrics.inc("meshrt_usage_credit_picodollars_total", -cost)

    async def _commit(self, live: LiveSession, increment: Increment, settle: ledger.ReserveChange | None) -> None:
        grant = live.grant
        balance, job = await self._write(
            ledger.apply_increment, grant.session_id, grant.account_id, increment, settle, give_up=lambda: live.billed
        )
        if job is None:
            return  # finalisation took it over (it applies the whole spool)
        estimate = self._estimate(grant.account_id)
        if balance is not None:  # None: the database had it already (a replay)
            self._count_billed(increment)
            estimate.observe_balance(balance, job)
        estimate.acknowledged((grant.session_id, increment.seq), job)
        self._check_quota_soon(grant.account_id, just_read=balance is not None)

    def _check_quota_soon(self, account_id: str, just_read: bool = False) -> None:
        """Stop the account's sessions when it cannot pay for more. An estimate at zero is
        confirmed by a fresh read first (a top-up may have landed since the last refresh) unless
        its balance was `just_read`; with the database unreachable, the estimate decides. Off the
        caller's path: a worker's messages are never held behind the database."""
        if (
            self._estimate(account_id).exhausted
            and account_id not in self.checking_quota
            and self.registry.of_account(account_id)
        ):
            self.checking_quota.add(account_id)
            self.tg.start_soon(self._confirm_exhausted, account_id, just_read)

    async def _confirm_exhausted(self, account_id: str, just_read: bool) -> None:
        try:
            if not just_read:
                await self._read_balances([account_id])
            if self._estimate(account_id).exhausted:
                await self._stop_account(account_id, "insufficient_quota")
            else:  # a top-up landed: translation sessions waiting for their last increment go on
                for live in self.registry.of_account(account_id):
                    if live.grant.surface == "translation" and live.reported:
                        await self._tell(live, Billed(live.grant.session_id, max(live.reported)))
        finally:
            self.checking_quota.discard(account_id)

    async def _read_balances(self, account_ids: list[str]) -> None:
        """Read the accounts' standing afresh; end the sessions whose key was revoked or whose
        account was deactivated since they started (docs/errors.md: key_revoked,
        account_deactivated) — on every node, within BALANCE_REFRESH_S of the change."""
        key_ids = sorted({live.grant.api_key_id for a in account_ids for live in self.registry.of_account(a)})
        job = self.writer.enqueue(ledger.standing, account_ids, key_ids)
        try:
            found = await job.wait()
        except Exception:  # noqa: BLE001 - logged by the writer; the estimate stands meanwhile
            return
        for account_id, (balance, reserved, active) in found.accounts.items():
            self._estimate(account_id).observe_balance(balance, job.number, reserved)
            if not active:
                await self._stop_account(account_id, "account_deactivated")
        for account_id in account_ids:
            for live in self.registry.of_account(account_id):
                if live.grant.api_key_id in found.revoked_keys:
                    await self._stop(live, "key_revoked")

    async def _refresh_balances(self) -> None:
        """Balances of the accounts with live sessions here, read often: top-ups on any node count."""
        while True:
            await anyio.sleep(BALANCE_REFRESH_S)
            accounts = sorted({live.grant.account_id for live in self.registry.sessions()})
            for gone in set(self.quota) - set(accounts):
                if self.quota[gone].settled:
                    del self.quota[gone]
            if accounts:
                await self._read_balances(accounts)
                for account_id in accounts:
                    self._check_quota_soon(account_id, just_read=True)

    async def _prune_ephemeral_keys(self) -> None:
        """Delete ek_ keys expired for longer than MESHRT_EPHEMERAL_KEY_RETENTION_S, a batch at a
        time (every node of a fleet does it; a key deleted twice is deleted once)."""
        retention = self.settings.ephemeral_key_retention_s
        interval = min(PRUNE_INTERVAL_S, max(1.0, retention / 4))
        while True:
            await anyio.sleep(interval)
            try:
                pruned = await anyio.to_thread.run_sync(prune_ephemeral_keys, self.engine, time.time() - retention)
            except Exception as exc:  # noqa: BLE001 - tried again next time; nothing depends on it
                log.warning("expired ephemeral keys not pruned", extra={"fields": {"error": one_line(exc)}})
                continue
            if pruned:
                log.info("expired ephemeral keys pruned", extra={"fields": {"count": pruned}})

    async def _stop_account(self, account_id: str, code: str) -> None:
        for other in self.registry.of_account(account_id):
            await self._stop(other, code)

    async def _stop(self, live: LiveSession, code: str) -> None:
        if live.stage not in (Stage.STARTING, Stage.LIVE) or live.channel is None:
            return
        live.handle(SessionEvent.STOP)
        live.stop_code = code
        await self._tell(live, StopSession(code))

    async def _tell(self, live: LiveSession, message) -> None:
        """Send to a session's worker; a worker that is gone is the channel watcher's to notice."""
        async with live.send_lock:
            try:
                await control.asend(live.channel, message)
            except OSError:
                pass

    async def _reserve(self, live: LiveSession, message: Reserve) -> None:
        """A worker asks to hold part of its account's balance before a response starts (it
        holds the client's event meanwhile). The database decides, atomically across nodes. If
        it does not answer within RESERVE_PROVISIONAL_S (an outage), this node decides from its
        estimate of the account instead — a provisional grant, counted against what it may
        grant next — while the write goes on being retried until it commits."""
        grant = live.grant
        change = ledger.ReserveChange(message.version, message.want, message.least)
        written = anyio.Event()
        outcome = {}

        async def write() -> None:
            outcome["result"], _ = await self._write(
                ledger.reserve, grant.session_id, grant.account_id, change, give_up=lambda: live.billed
            )
            written.set()

        self.tg.start_soon(write)
        with anyio.move_on_after(RESERVE_PROVISIONAL_S):
            await written.wait()
        result = outcome.get("result")
        if result is not None:
            reason = "" if result.granted else "insufficient_quota"
            reply = Reserved(grant.session_id, message.version, result.held, result.granted, result.available, reason)
        else:
            reply = self._reserve_provisionally(live, message, written)
        self.metrics.inc("meshrt_reservations_total", outcome=reply.reason or "granted")
        live.reserving = False
        if live.channel is not None:
            await self._tell(live, reply)

    def _reserve_provisionally(self, live: LiveSession, message: Reserve, written: anyio.Event) -> Reserved:
        """The database did not answer: grant from the estimate (the balance and reservations as
        last read, less this node's unacknowledged usage and provisional grants). Other nodes
        may grant from the same balance meanwhile: docs/billing.md states that bound."""
        estimate = self._estimate(live.grant.account_id)
        if estimate.balance is None:
            return Reserved(live.grant.session_id, message.version, -1, False, 0, "service_unavailable")
        room = max(0, estimate.room)
        if message.held + room < message.least:
            return Reserved(live.grant.session_id, message.version, -1, False, room, "insufficient_quota")
        delta = max(0, min(message.want - message.held, room))
        estimate.provisional += delta

        async def settle_when_written() -> None:  # the database has it (or it was given up)
            await written.wait()
            estimate.provisional -= delta

        self.tg.start_soon(settle_when_written)
        log.warning(
            "reservation granted provisionally: the database did not answer",
            extra={"session_id": live.grant.session_id, "fields": {"picodollars": delta}},
        )
        return Reserved(live.grant.session_id, message.version, message.held + delta, True, room - delta)

    async def _replay_spool(self, live: LiveSession) -> None:
        """Count what the spool holds that the channel did not deliver (an adopted session's)."""
        held = spool.read(self._spool_path(live.grant.session_id))
        for _, increment in sorted(held.increments.items()):
            await self._apply(live, increment, check=False)

    async def _finalize(self, live: LiveSession) -> None:
        """The worker is gone: write the record from its spool. Node capacity frees at once; the
        record is retried until it commits, and only then is the spool removed."""
        grant = live.grant
        self.registry.remove(grant.session_id)
        live.handle(SessionEvent.WORKER_GONE)
        live.settled.set()
        if grant.surface == "webrtc" and grant.call_id and live.hung_up not in (200, 404):
            self.tg.start_soon(self._hang_up, live, "worker gone")  # whatever ended it: none runs unmetered
        if live.channel is not None:
            live.channel.close()
        with self.finalizing:
            await self._write_final(live)

    async def _write_final(self, live: LiveSession) -> None:
        grant = live.grant
        held = spool.read(self._spool_path(grant.session_id))
        # the worker wrote the spool: each increment is billed as this supervisor prices it
        held.increments.update(
            {seq: live.reported.get(seq) or self._priced(live, inc) for seq, inc in held.increments.items()}
        )
        estimate = self._estimate(grant.account_id)
        for seq, increment in held.increments.items():
            if seq not in live.reported:  # delivered by the spool only: counts until the record commits
                estimate.add((grant.session_id, seq), increment.cost.picodollars)
        if live.end_report is not None:
            reason, code = EndReason.of(live.end_report.end_reason), live.end_report.close_code
        elif held.end is not None:
            reason, code = EndReason.of(held.end.end_reason), held.end.close_code
        else:
            reason, code = EndReason.INTERNAL_ERROR, 1011  # the worker died without a word
            self.metrics.inc("meshrt_worker_crashes_total")
        applied_here: list[int] = []  # increments whose own write had not committed: counted now
        outcome, job = await self._write(
            ledger.finalize, grant.session_id, reason, code, held.increments, None, applied_here
        )
        if job is None:
            log.warning(
                "session record not written; its spool is kept for the next start",
                extra={"session_id": grant.session_id},
            )
            return
        live.handle(SessionEvent.RECORD_COMMITTED)
        for seq in applied_here:
            self._count_billed(held.increments[seq])
        for seq in set(held.increments) | set(live.reported):
            estimate.acknowledged((grant.session_id, seq), job)
        if outcome is Finalized.MISSING:
            log.error("spool of a session the database does not know; kept", extra={"session_id": grant.session_id})
            return
        self._spool_path(grant.session_id).unlink(missing_ok=True)
        if outcome is Finalized.WRITTEN:
            self.metrics.inc("meshrt_sessions_ended_total", end_reason=reason.value)
        if outcome is Finalized.AMENDED:
            log.warning("record amended late with usage from the spool", extra={"session_id": grant.session_id})
        log.info(
            "session finalised",
            extra={
                "session_id": grant.session_id,
                "request_id": grant.request_id,
                "fields": {"end_reason": reason.value, "close_code": code, "record": outcome.value},
            },
        )

    async def _lost_lease(self) -> None:
        """Another node declared this one lost (its lease expired while the database was out of
        reach) and ended its sessions' records, freeing their slots: those sessions stop now;
        their usage still reaches the records (amended late)."""
        for live in self.registry.sessions():
            await self._stop(live, "node_lost")

    # --- recovery and drain ---------------------------------------------------------------

    async def _recover(self) -> None:
        """Sessions this node left unfinished (the previous supervisor died): their workers
        re-attach within the grace period; the others are finalised from their spools. Spools
        of sessions another node ended meanwhile (this node was declared lost) amend them."""
        rows = await self._until_done(
            "list unfinished sessions", anyio.to_thread.run_sync, ledger.unfinished_sessions, self.engine, self.node
        )
        self.unfinished_rows = {row.id: row for row in rows}  # what re-attaching workers are matched against
        candidates = {row.id for row in rows} | spool.session_ids(self.settings.spool_dir)
        if not candidates:
            return
        log.warning(
            "unfinished sessions found; waiting for their workers", extra={"fields": {"sessions": len(candidates)}}
        )
        await anyio.sleep(REATTACH_GRACE_S)
        known = await self._until_done(
            "read session rows", anyio.to_thread.run_sync, ledger.session_rows, self.engine, sorted(candidates)
        )
        for session_id in sorted(candidates):
            if self.registry.get(session_id) is not None:
                continue  # re-attached: it will be finalised when it ends
            row = known.get(session_id)
            if row is None:
                log.error("spool of a session the database does not know; kept", extra={"session_id": session_id})
                continue
            await self._finalize(LiveSession(grant_from_row(row), None, stage=Stage.LIVE))
            log.warning("finalised a session whose worker did not return", extra={"session_id": row.id})

    async def _adopt(self, message: Reattach, conn: socket.socket) -> None:
        """A worker of a previous supervisor offers its live session: take it over, if the
        database agrees that this session is this node's and ran in that process (the peer's pid
        as the kernel saw it connect). Workers are not trusted: the grant (account, key, model,
        rates) is rebuilt from the session's row, never taken from the message. Its account's
        balance is read afresh before any quota decision; its spool is counted once."""
        claimed = message.grant
        pid = control.peer_pid(conn)
        try:
            # the rows read at start-up, before workers re-attach, serve once each: no read per worker
            cached = self.unfinished_rows.pop(claimed.session_id, None)
            rows = {claimed.session_id: cached} if cached is not None else None
            if rows is None:
                rows = await anyio.to_thread.run_sync(ledger.session_rows, self.engine, [claimed.session_id])
        except Exception as exc:  # noqa: BLE001 - it asks again in 0.2 s
            log.warning(
                "re-attach not decided: the session's row cannot be read",
                extra={"session_id": claimed.session_id, "pid": pid, "fields": {"error": one_line(exc)}},
            )
            conn.close()
            return
        row = rows.get(claimed.session_id)
        refusal = reattach_refusal(row, message, pid, self.node) or (
            "the session is attached already" if self.registry.get(claimed.session_id) is not None else None
        )
        if refusal is not None:
            self.metrics.inc("meshrt_reattach_refused_total")
            log.error(
                "re-attach refused", extra={"session_id": claimed.session_id, "pid": pid, "fields": {"reason": refusal}}
            )
            conn.close()
            return
        grant = grant_from_row(row, claimed)
        if grant.rates != claimed.rates:
            log.warning(
                "re-attaching worker sent rates other than its row's; the row's are used",
                extra={"session_id": grant.session_id, "pid": pid},
            )
        live = LiveSession(grant, conn, pid=pid, stage=Stage.LIVE if message.upgraded else Stage.STARTING)
        self.registry.add(live)
        await self._replay_spool(live)
        log.info("worker re-attached", extra={"session_id": grant.session_id, "pid": pid})
        self.tg.start_soon(self._watch_worker, live)
        if row.state == db.SessionState.ENDED:  # another node ended it while this one was lost
            await self._stop(live, "node_lost")

    async def drain(self) -> None:
        """SIGTERM: refuse new sessions, let live ones run up to drain_s, end the rest, exit."""
        self.state = RunState.DRAINING
        with anyio.move_on_after(self.settings.drain_s) as self._drain_wait:  # sessions end by themselves
            await self.registry.wait_empty()
        for live in self.registry.sessions():
            await self._stop(live, "server_shutting_down")
        with anyio.move_on_after(self.settings.drain_usage_s + 5):  # their cancelled responses' usage
            await self.registry.wait_empty()
        await self.shutdown()

    async def shutdown(self) -> None:
        self.state = RunState.STOPPING
        self.lease.stopping = True
        if self.frontdoor is not None and self.frontdoor.running():
            self.frontdoor.terminate()
            await self.frontdoor.exited()
        for live in self.registry.sessions():
            if live.pid:
                try:
                    os.kill(live.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        with anyio.move_on_after(2):  # their channels close as they die
            await self.registry.wait_empty()
        with anyio.move_on_after(10):  # records of the last sessions, then exit
            await self.finalizing.wait_zero()
            await self.writer.idle()
        await self.lease.leave()
        self.zygote_channel.close()
        await self.zygote.exited()
        self.settings.control_socket.unlink(missing_ok=True)
        self.tg.cancel_scope.cancel()


def pool_gauges(status: PoolStatus | None) -> dict[str, float]:
    """/metrics' view of the zygote's PoolStatus (zeros until its first, or after it restarted)."""
    if status is None:
        return {name: 0 for name in POOL_GAUGES.values()}
    return {name: getattr(status, field) for field, name in POOL_GAUGES.items()}


POOL_GAUGES = {
    "idle": "meshrt_warm_workers",
    "target": "meshrt_warm_workers_target",
    "workers": "meshrt_workers",
    "pss_bytes": "meshrt_workers_pss_bytes",
    "idle_pss_bytes": "meshrt_warm_workers_pss_bytes",
    "arrival_rate": "meshrt_session_arrival_rate",
    "setup_s": "meshrt_warm_worker_setup_seconds",
    "mem_available": "meshrt_memory_available_bytes",
    "read_s": "meshrt_workers_memory_read_seconds",
}


def reattach_refusal(row, message: Reattach, pid: int, node: str) -> str | None:
    """Why a re-attaching worker is refused, or None: the session must be this node's, and have
    run in the process that connected (its pid as the kernel reports it, and as the row has it)."""
    if row is None:
        return "no such session"
    if row.node != node:
        return f"the session is node {row.node!r}'s"
    if message.pid != pid:
        return f"the worker says it is pid {message.pid}, the kernel says {pid}"
    if row.pid is not None and row.pid != pid:
        return f"the session's worker is pid {row.pid}"
    if row.pid is None and row.state != db.SessionState.GRANTED:
        return f"a session {getattr(row.state, 'value', row.state)} without a worker pid"
    claimed = message.grant
    if (claimed.account_id, claimed.api_key_id, claimed.model) != (row.account_id, row.api_key_id, row.model):
        return "the grant sent is not the session's"
    return None


def grant_from_row(row, claimed: control.Grant | None = None) -> control.Grant:
    """The grant of a session as the database has it (what this node's front door issued). Only
    what is not money comes from the worker's copy: its token cap and beta flag."""
    return control.Grant(
        session_id=row.id,
        request_id=row.request_id,
        account_id=row.account_id,
        api_key_id=row.api_key_id,
        model=row.model,
        token_cap=claimed.token_cap if claimed is not None else 0,
        rates=row.rates,
        beta=claimed.beta if claimed is not None else False,
        client_addr=row.client_addr,
        surface=row.surface,
        call_id=row.call_id or "",
    )


def sandbox_start(settings: Settings) -> bool:
    """Harden this process, probe the workers' layers and say in one line which are active.
    False: MESHRT_SANDBOX=require and a layer cannot be installed (the node must not start)."""
    mode = settings.sandbox
    if mode == "off":
        log.warning("sandbox: off (MESHRT_SANDBOX=off); no layer is active")
        return True
    try:
        own = sandbox.harden_process(mode, SECRET_VARIABLES)
    except sandbox.SandboxError as exc:
        log.critical("sandbox: %s; refusing to start (MESHRT_SANDBOX=require)", exc)
        return False
    workers = sandbox.probe(mode, settings.max_session_s, settings.worker_uid_range)
    missing = {layer: why for layer, why in workers.items() if why is not None}
    log.info(
        "sandbox: %s; processes: %s; workers: %s%s",
        mode,
        ", ".join(own) or "none",
        ", ".join(layer for layer, why in workers.items() if why is None) or "none",
        "".join(f"; {layer} NOT active: {why}" for layer, why in missing.items()),
        extra={"fields": {"mode": mode, "process_layers": own, "worker_layers": workers}},
    )
    if missing and mode == "require":
        log.critical("sandbox: a worker layer cannot be installed; refusing to start (MESHRT_SANDBOX=require)")
        return False
    return True


def reattach_address(supervisor: Supervisor) -> str:
    """The abstract unix socket workers under uids of their own re-attach through: the same for
    every supervisor of this node and state dir, another for any other."""
    digest = hashlib.sha256(f"{supervisor.node}\0{supervisor.settings.state_dir.resolve()}".encode()).hexdigest()
    return f"\0meshrt-reattach-{digest[:24]}"


def serve(settings: Settings) -> int:
    # everything this node writes is its own: a worker under another uid opens none of it
    os.umask(0o077)
    if not sandbox_start(settings):
        return EXIT_SANDBOX
    return anyio.run(Supervisor(settings).run)


def exit_process(code: int) -> None:
    """End the process now, not by a normal interpreter exit: a thread abandoned on a database
    that stopped answering would hold that for ever (worker threads are joined at exit)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
