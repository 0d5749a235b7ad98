"""The supervisor: parent of the front door and the zygote, owner of the listening socket,
keeper of the live-session registry, and the only writer of final usage records.

Shape (after gunicorn's arbiter): signals become messages into one task group; children are
restarted when they die; every session is finalised exactly once, when its worker's channel
closes — however the worker ended — from the increments applied for it plus its spool.
Start-up order matters for isolation: the zygote is started (with a scrubbed environment)
before the database is opened or the upstream key is read.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio

from meshrt.shared import control
from meshrt.shared.control import (
    Handoff, HandoffAck, Reattach, Spawn, Spawned, StopSession, UsageIncrement, WorkerEnded, WorkerExited,
    WorkerLive, ZygoteReady,
)
from meshrt.shared.settings import Settings, scrubbed_env, settings_env

from . import db, ledger
from .metrics import Metrics
from .registry import LiveSession, Registry

log = logging.getLogger("meshrt.supervisor")

RESTART_BACKOFF_S = 0.5
ORPHAN_GRACE_S = 2.0  # a dead front door's last handoffs are served well within this
REATTACH_GRACE_S = 3.0
BIND_WAIT_S = 10.0
METRICS_INTERVAL_S = 1.0
FINALIZE_TIMEOUT_S = 60.0


class Supervisor:
    def __init__(self, settings: Settings, node: str | None = None):
        self.settings = settings
        self.node = node or socket.gethostname()
        self.registry = Registry()
        self.metrics = Metrics()
        self.finalizing = 0  # sessions whose record is being written
        self.balances: dict[str, list[int]] = {}  # account -> [last known balance, pending debits]
        self.draining = False
        self.stopping = False
        self.run_dir = settings.state_dir / "run"
        self.frontdoor: subprocess.Popen | None = None
        self.zygote: subprocess.Popen | None = None
        self.zygote_channel: socket.socket | None = None
        # Handoffs are served concurrently; when the zygote lags (its channel holds only a few
        # datagrams) two senders waiting to write would crash the task group (BusyResourceError)
        self.zygote_send_lock = anyio.Lock()
        self.control_socket_path = str(settings.control_socket.resolve())  # once, not per session
        self.engine = None

    # --- start-up -------------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        for path in (self.settings.state_dir, self.run_dir, self.settings.spool_dir):
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o700)
        for stale in ("draining", "zygote.ready"):
            (self.run_dir / stale).unlink(missing_ok=True)

    def _start_zygote(self) -> None:
        ours, theirs = control.seqpacket_pair()
        self.zygote = subprocess.Popen(
            [sys.executable, "-m", "meshrt.worker.zygote", "--channel-fd", str(theirs.fileno()),
             "--log-level", self.settings.log_level, "--warm", str(self.settings.warm_workers)],
            pass_fds=[theirs.fileno()], env=scrubbed_env(), stdin=subprocess.DEVNULL)
        theirs.close()
        ours.setblocking(False)
        self.zygote_channel = ours
        log.info("zygote started", extra={"pid": self.zygote.pid})

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
                    raise
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
        return listener, handoffs

    def _start_frontdoor(self, listener: socket.socket) -> None:
        env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
        env.update(settings_env(self.settings))
        env.pop("OPENAI_API_KEY", None)
        fd = listener.fileno()
        self.frontdoor = subprocess.Popen(
            [sys.executable, "-m", "meshrt.supervisor.frontdoor", "--fd", str(fd), "--node", self.node,
             "--parent-pid", str(os.getpid())],
            pass_fds=[fd], env=env, stdin=subprocess.DEVNULL)
        log.info("front door started", extra={"pid": self.frontdoor.pid})

    # --- the main loop --------------------------------------------------------------------

    async def run(self) -> int:
        self._prepare_dirs()
        self._start_zygote()
        self.engine = db.make_engine(self.settings.db_url)
        await anyio.to_thread.run_sync(db.create_schema, self.engine)
        self.writer = ledger.LedgerWriter(self.engine)
        listener, handoffs = await self._bind()
        self._start_frontdoor(listener)
        print(f"meshrt listening on http://{self.settings.host}:{listener.getsockname()[1]}", flush=True)
        async with anyio.create_task_group() as tg:
            self.tg = tg
            tg.start_soon(self.writer.run)
            tg.start_soon(self._recover)
            tg.start_soon(self._publish_metrics)
            tg.start_soon(self._accept_handoffs, handoffs)
            tg.start_soon(self._read_zygote)
            tg.start_soon(self._watch_frontdoor, listener)
            tg.start_soon(self._watch_signals)
        return 0

    async def _publish_metrics(self) -> None:
        path = self.run_dir / "metrics.json"
        while True:
            self.metrics.gauges["meshrt_live_sessions"] = len(self.registry)
            self.metrics.publish(path)
            await anyio.sleep(METRICS_INTERVAL_S)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal received; draining", extra={"fields": {"signal": signum}})
                await self.drain()
                return

    async def _watch_frontdoor(self, listener: socket.socket) -> None:
        while not self.stopping:
            code = await anyio.to_thread.run_sync(self.frontdoor.wait, abandon_on_cancel=True)
            if self.stopping:
                return
            log.warning("front door exited; restarting", extra={"fields": {"exit_code": code}})
            await self.tg.start(self._end_orphaned_grants)  # its snapshot precedes the new front door
            await anyio.sleep(RESTART_BACKOFF_S)
            self._start_frontdoor(listener)

    async def _end_orphaned_grants(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        """A front door that died between admitting an upgrade (its row inserted, `granted`) and
        handing the socket over left a row no worker will ever end; it would count against the
        account's concurrent sessions until the next supervisor restart. Once every handoff it
        sent has been served, end those rows (nothing was relayed, nothing billed). Only rows
        granted before its successor starts are candidates: the snapshot is taken first."""
        try:
            rows = await anyio.to_thread.run_sync(ledger.granted_sessions, self.engine, self.node)
        except Exception:  # noqa: BLE001 - the database is down: the next restart's recovery ends them
            log.exception("could not list granted sessions")
            rows = []
        task_status.started()
        await anyio.sleep(ORPHAN_GRACE_S)
        for row in rows:
            if self.registry.get(row.id) is not None or self._spool_path(row.id).exists():
                continue  # handed over: a worker has it, or its record is being written
            try:
                ended = await self.writer.submit(ledger.end_orphaned_grant, row.id, "internal_error")
            except Exception:  # noqa: BLE001 - logged by the writer
                continue
            if ended:
                log.warning("ended a session its dead front door never handed over",
                            extra={"session_id": row.id, "request_id": row.request_id})

    # --- handoffs -------------------------------------------------------------------------

    async def _accept_handoffs(self, handoffs: socket.socket) -> None:
        while True:
            await anyio.wait_readable(handoffs)
            try:
                conn, _ = handoffs.accept()
            except BlockingIOError:
                continue
            if control.peer_uid(conn) != os.getuid():
                log.warning("handoff from another user refused")
                conn.close()
                continue
            conn.setblocking(False)
            self.tg.start_soon(self._serve_handoff, conn)

    async def _serve_handoff(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            message, fds = await control.arecv(conn)
            if isinstance(message, Reattach) and not fds:
                await self._adopt(message, conn)
                conn = None  # now the session's channel
                return
            if not isinstance(message, Handoff) or len(fds) != 1:
                return
            code = self._refusal()
            if code is None:
                await self._spawn(message, fds[0])
                self.metrics.inc("meshrt_sessions_started_total")
            else:
                self.metrics.inc("meshrt_handoffs_refused_total", code=code)
            await control.asend(conn, HandoffAck(message.grant.session_id, code))
        except (EOFError, OSError, control.ControlError):
            log.exception("handoff failed")
        finally:
            for fd in fds:
                os.close(fd)
            if conn is not None:
                conn.close()

    def _refusal(self) -> str | None:
        if self.draining:
            return "server_shutting_down"
        if len(self.registry) >= self.settings.max_sessions:
            log.warning("node at capacity", extra={"fields": {"live": len(self.registry),
                                                              "max_sessions": self.settings.max_sessions}})
            return "server_at_capacity"
        return None

    def _spool_path(self, session_id: str) -> Path:
        return self.settings.spool_dir / f"{session_id}.jsonl"

    async def _spawn(self, handoff: Handoff, client_fd: int) -> None:
        """Send the session to the zygote: fds [client, worker channel, spool]. The caller
        closes its copy of client_fd; ours of the other two are closed here once sent."""
        s = self.settings
        grant = dataclasses.replace(
            handoff.grant, upstream_url=s.upstream_url, upstream_key=s.openai_api_key,
            idle_timeout_s=s.idle_timeout_s, max_session_s=s.max_session_s,
            max_message_bytes=s.max_message_bytes, drain_usage_s=s.drain_usage_s,
            upstream_connect_timeout_s=s.upstream_connect_timeout_s,
            upstream_attempts=s.upstream_attempts, backend=s.worker_backend,
            memory_limit_mb=s.worker_memory_mb, control_socket=self.control_socket_path)
        spool_fd = os.open(self._spool_path(grant.session_id),
                           os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        ours, theirs = control.seqpacket_pair()
        try:
            async with self.zygote_send_lock:
                await control.asend(self.zygote_channel, Spawn(grant, handoff.request),
                                    [client_fd, theirs.fileno(), spool_fd])
        finally:
            theirs.close()
            os.close(spool_fd)
        ours.setblocking(False)
        live = LiveSession(grant, ours)
        self.registry.add(live)
        self.tg.start_soon(self._watch_worker, live)

    # --- zygote and workers ---------------------------------------------------------------

    async def _read_zygote(self) -> None:
        while True:
            try:
                message, fds = await control.arecv(self.zygote_channel)
            except (EOFError, control.ControlError):
                if self.stopping:
                    return
                log.error("zygote channel lost; restarting the zygote")
                self.zygote.kill()
                await anyio.to_thread.run_sync(self.zygote.wait)
                self.zygote_channel.close()
                self._start_zygote()
                continue
            for fd in fds:
                os.close(fd)
            if isinstance(message, ZygoteReady):
                (self.run_dir / "zygote.ready").write_text(str(message.pid))
            elif isinstance(message, Spawned):
                self.registry.set_pid(message.session_id, message.pid)
            elif isinstance(message, WorkerExited):
                level = logging.INFO if message.exit_code == 0 else logging.WARNING
                log.log(level, "worker exited", extra={"pid": message.pid, "fields": {
                    "exit_code": message.exit_code, "signal": message.signal}})

    async def _watch_worker(self, live: LiveSession) -> None:
        try:
            while True:
                try:
                    message, fds = await control.arecv(live.channel)
                except (EOFError, control.ControlError):
                    return
                for fd in fds:
                    os.close(fd)
                if isinstance(message, WorkerLive):
                    live.live, live.pid = True, message.pid
                    self.writer.enqueue(ledger.mark_live, message.session_id, message.pid)
                elif isinstance(message, UsageIncrement):
                    await self._apply(live, message.seq, message.increment)
                elif isinstance(message, WorkerEnded):
                    live.ended = message
        finally:
            with anyio.move_on_after(FINALIZE_TIMEOUT_S, shield=True):  # bounded even in shutdown
                await self._finalize(live)

    async def _apply(self, live: LiveSession, seq: int, increment: dict) -> None:
        """Debit one increment. Its write is queued now (so it lands before the session's
        finalisation); the stop decision does not wait for it: it uses the balance estimate
        (last balance the database returned, minus debits still queued), so a slow database
        never lets an account run on past zero. The database stays the authority."""
        grant = live.grant
        live.increments[seq] = increment
        cost = int(increment["cost_picodollars"])
        job = self.writer.enqueue(ledger.apply_increment, grant.session_id, grant.account_id, seq, increment)
        balances = self.balances.setdefault(grant.account_id, [grant.balance_pico, 0])  # [known, pending]
        balances[1] += cost
        self.tg.start_soon(self._settle, grant.account_id, cost, job, balances)
        if balances[0] - balances[1] <= 0:
            await self._stop_account(grant.account_id, "insufficient_quota")

    async def _settle(self, account_id: str, cost: int, job, balances: list[int]) -> None:
        try:
            balance = await job.wait()
        except Exception:  # noqa: BLE001 - logged by the writer; the spool still has it
            balance = None
        finally:
            balances[1] -= cost
        if balance is None:
            return
        self.metrics.inc("meshrt_usage_increments_total")
        self.metrics.inc("meshrt_usage_cost_picodollars_total", cost)
        balances[0] = balance
        if balance - balances[1] <= 0:
            await self._stop_account(account_id, "insufficient_quota")

    async def _stop_account(self, account_id: str, code: str) -> None:
        for other in self.registry.of_account(account_id):
            await self._stop(other, code)

    async def _stop(self, live: LiveSession, code: str) -> None:
        if live.stop_sent is not None:
            return
        live.stop_sent = code
        try:
            await control.asend(live.channel, StopSession(code))
        except OSError:
            pass

    def _read_spool(self, session_id: str) -> tuple[dict[int, dict], dict | None]:
        """The session's spool: increments by seq, and the worker's end line if it wrote one."""
        increments: dict[int, dict] = {}
        end = None
        try:
            lines = self._spool_path(session_id).read_bytes().splitlines()
        except FileNotFoundError:
            return increments, end
        for line in lines:
            try:
                entry = json.loads(line)
                if "end" in entry:
                    end = entry["end"]
                else:
                    increments[int(entry["seq"])] = entry["increment"]
            except (ValueError, KeyError, TypeError):
                log.warning("torn spool line ignored", extra={"session_id": session_id})
        return increments, end

    async def _replay_spool(self, live: LiveSession) -> dict | None:
        """Apply whatever the spool holds that was not applied through the channel."""
        increments, end = self._read_spool(live.grant.session_id)
        for seq, increment in sorted(increments.items()):
            if seq not in live.increments:
                await self._apply(live, seq, increment)
        return end

    async def _finalize(self, live: LiveSession) -> None:
        """The worker is gone: bill what its spool holds that the channel did not deliver, then
        write the record (once). Node capacity frees at once; the billing may queue a little."""
        grant = live.grant
        self.registry.remove(grant.session_id)
        live.channel.close()
        self.finalizing += 1
        try:
            await self._write_final(live)
        finally:
            self.finalizing -= 1

    async def _write_final(self, live: LiveSession) -> None:
        grant = live.grant
        spooled_end = await self._replay_spool(live)
        if live.ended is not None:
            reason, code = live.ended.end_reason, live.ended.close_code
        elif spooled_end is not None:
            reason, code = spooled_end["end_reason"], spooled_end["close_code"]
        else:
            reason, code = "internal_error", 1011  # the worker died without a word
            self.metrics.inc("meshrt_worker_crashes_total")
        if await self.writer.submit(ledger.finalize, grant.session_id, reason, code):
            self.metrics.inc("meshrt_sessions_ended_total", end_reason=reason)
        self._spool_path(grant.session_id).unlink(missing_ok=True)
        if not self.registry.of_account(grant.account_id):
            self.balances.pop(grant.account_id, None)
        log.info("session finalised", extra={"session_id": grant.session_id, "request_id": grant.request_id,
                                              "fields": {"end_reason": reason, "close_code": code}})

    # --- recovery and drain ---------------------------------------------------------------

    async def _recover(self) -> None:
        """Sessions this node left unfinished (the previous supervisor died): their workers
        re-attach within the grace period; the others are finalised from their spools."""
        rows = await anyio.to_thread.run_sync(ledger.unfinished_sessions, self.engine, self.node)
        if not rows:
            return
        log.warning("unfinished sessions found; waiting for their workers",
                    extra={"fields": {"sessions": len(rows)}})
        await anyio.sleep(REATTACH_GRACE_S)
        for row in rows:
            if self.registry.get(row.id) is not None:
                continue  # re-attached: it will be finalised when it ends
            grant = control.Grant(session_id=row.id, request_id=row.request_id, account_id=row.account_id,
                                  api_key_id=row.api_key_id, model=row.model, token_cap=0, rates=row.rates)
            await self._finalize(LiveSession(grant, socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)))
            log.warning("finalised a session whose worker did not return", extra={"session_id": row.id})

    async def _adopt(self, message: Reattach, conn: socket.socket) -> None:
        """A worker of a previous supervisor offers its live session: take it over."""
        live = LiveSession(message.grant, conn, pid=message.pid, live=message.upgraded)
        self.registry.add(live)
        await self._replay_spool(live)
        log.info("worker re-attached", extra={"session_id": message.grant.session_id, "pid": message.pid})
        self.tg.start_soon(self._watch_worker, live)

    async def drain(self) -> None:
        """SIGTERM: refuse new sessions, let live ones run up to drain_s, end the rest, exit."""
        self.draining = True
        (self.run_dir / "draining").touch()
        deadline = time.monotonic() + self.settings.drain_s
        while len(self.registry) and time.monotonic() < deadline:
            await anyio.sleep(0.05)
        for live in self.registry.sessions():
            await self._stop(live, "server_shutting_down")
        deadline = time.monotonic() + self.settings.drain_usage_s + 5
        while len(self.registry) and time.monotonic() < deadline:
            await anyio.sleep(0.05)
        await self.shutdown()

    async def shutdown(self) -> None:
        self.stopping = True
        if self.frontdoor is not None and self.frontdoor.poll() is None:
            self.frontdoor.terminate()
            await anyio.to_thread.run_sync(self.frontdoor.wait)
        for live in self.registry.sessions():
            if live.pid:
                try:
                    os.kill(live.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        with anyio.move_on_after(2):
            while len(self.registry):
                await anyio.sleep(0.05)
        with anyio.move_on_after(10):  # records of the last sessions, then exit
            while self.finalizing:
                await anyio.sleep(0.02)
            await self.writer.idle()
        self.zygote_channel.close()
        await anyio.to_thread.run_sync(self.zygote.wait)
        self.settings.control_socket.unlink(missing_ok=True)
        (self.run_dir / "zygote.ready").unlink(missing_ok=True)
        self.tg.cancel_scope.cancel()


def serve(settings: Settings) -> int:
    return anyio.run(Supervisor(settings).run)
