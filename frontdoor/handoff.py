"""The front door's upgrade path: a uvicorn WebSocket protocol class that never relays a frame.

uvicorn parses the HTTP request and, for an upgrade, switches the connection to this protocol
with the request bytes. We pause reading (bytes read here would be lost to the worker), run the
gate, and then either:
- hand off: send the supervisor the socket (SCM_RIGHTS), the request with the key stripped and
  the grant; after its ack, close our copy of the socket without shutdown() and without ever
  having written to it — the worker answers the client; or
- refuse: accept the upgrade, send the error frame and close (docs/errors.md; browsers cannot
  read a failed handshake's status, but they can read a frame).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import time
from typing import Any
from typing import Callable

import anyio

from meshrt.shared import control
from meshrt.shared.control import Handoff
from meshrt.shared.control import HandoffAck
from meshrt.shared.errors import ERRORS
from meshrt.shared.errors import GatewayError
from meshrt.shared.errors import http_error_body
from meshrt.shared.handshake import accept_bytes
from meshrt.shared.handshake import error_frames
from meshrt.shared.handshake import new_server_protocol
from meshrt.shared.handshake import parse_request_bytes
from meshrt.shared.handshake import parse_upgrade
from meshrt.shared.handshake import redact
from meshrt.shared.handshake import strip_credentials

log = logging.getLogger("meshrt.frontdoor")

MAX_REQUEST_HEAD = 16 * 1024
CLOSE_WAIT_S = 2.0
REALTIME_PATH = "/v1/realtime"


def http_response(status: int, reason: str, body: dict, request_id: str, extra: str = "") -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nx-request-id: {request_id}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode() + payload


# The node's own refusals (it drains, it is full): another node may take the session.
NODE_REFUSALS = ("server_shutting_down", "server_at_capacity")


class HandoffProtocol(asyncio.Protocol):
    """Instantiated by uvicorn per upgrade; `admit` and `new_request_id` are set by `protocol_class`."""

    admit: Callable[..., Any]
    new_request_id: Callable[[], str]
    control_socket: str
    on_refused: Callable[[str, str], None]
    give_back: Callable[[], None] = staticmethod(lambda: None)  # the connection's place in its peer's count
    trusted_proxies: tuple = ()  # MESHRT_FORWARDED_ALLOW_IPS

    def __init__(self, config, server_state, app_state, _loop=None):
        self.loop = _loop or asyncio.get_event_loop()
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.task: asyncio.Task | None = None
        self.released = False
        self.client_spoke = asyncio.Event()
        self.times: dict[str, float] = {}  # epoch seconds of this upgrade's steps: the set-up timeline

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.connections.add(self)
        self.times["t_accept"] = time.time()

    def data_received(self, data: bytes) -> None:
        if self.task is not None:  # after the handshake: only a refused client's close frame
            self.client_spoke.set()
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer or len(self.buffer) > MAX_REQUEST_HEAD:
            self.times["t_head"] = time.time()
            self.transport.pause_reading()
            self.task = self.loop.create_task(self._handle())
            self.tasks.add(self.task)
            self.task.add_done_callback(self.tasks.discard)

    def eof_received(self) -> bool | None:
        self.client_spoke.set()
        return None

    def connection_lost(self, exc) -> None:
        self.connections.discard(self)
        self.give_back()
        self.client_spoke.set()

    def shutdown(self) -> None:
        """uvicorn's shutdown: a connection still in the gate is simply closed."""
        if self.transport is not None and not self.released:
            self.transport.close()

    # --- the upgrade ------------------------------------------------------------------

    async def _handle(self) -> None:
        request_id = self.new_request_id()
        try:
            await self._upgrade(request_id)
        except Exception:
            log.exception("upgrade failed", extra={"request_id": request_id})
            if not self.released and not self.transport.is_closing():
                self.transport.close()

    async def _upgrade(self, request_id: str) -> None:
        try:
            protocol, request = parse_request_bytes(self.buffer)
        except ValueError:
            return self._http_error(400, "Bad Request", "invalid_request", "Malformed upgrade request.", request_id)
        upgrade = parse_upgrade(request)
        log.info("upgrade", extra={"request_id": request_id, "fields": {"path": redact(request.path)}})
        if upgrade.path != REALTIME_PATH and not upgrade.translation:
            # most often an SDK whose base URL lacks /v1: it asked for /realtime
            message = f"No WebSocket endpoint at {redact(upgrade.path)[:100]}: the realtime endpoint is {REALTIME_PATH}"
            message += " (an SDK's base URL ends in /v1)."
            return self._http_error(404, "Not Found", "not_found", message, request_id)
        _, status = accept_bytes(new_server_protocol(), request, request_id)  # validates the handshake
        if status != 101:
            return self._http_error(400, "Bad Request", "invalid_request", "Invalid WebSocket handshake.", request_id)
        stripped = strip_credentials(request)  # before the grant: nothing may fail between it and the handoff
        peer = self.transport.get_extra_info("peername")
        peer_ip = peer[0] if isinstance(peer, tuple) else None
        try:
            grant = await anyio.to_thread.run_sync(self._admit_timed, upgrade, peer_ip, request_id)
        except GatewayError as error:
            return await self._refuse(protocol, request, error.code, request_id, error.detail)
        self.times["t_admitted"] = time.time()
        ack = await self._hand_off(grant, stripped)
        self.times["t_ack"] = time.time()
        log.info(  # the front door's part of the set-up timeline (BENCHMARKS.md; bench/timeline.py)
            "handed off",
            extra={
                "request_id": request_id,
                "session_id": grant.session_id,
                "fields": {"t_grant": grant.started_at, **{k: round(v, 6) for k, v in self.times.items()}},
            },
        )
        if ack is None:  # sent, but no answer: the supervisor may own the socket now; let go of it
            return self._release()
        if ack.error_code is not None:
            self.on_refused(grant.session_id, ack.error_code)
            if ack.error_code in NODE_REFUSALS and self._forwarded(upgrade, peer_ip):
                # an edge proxy can send this upgrade to another node: tell it so, before any 101
                spec = ERRORS[ack.error_code]
                return self._http_error(503, "Service Unavailable", ack.error_code, spec.message, request_id)
            return await self._refuse(protocol, request, ack.error_code, request_id)
        self._release()

    def _forwarded(self, upgrade, peer_ip: str | None) -> bool:
        """Forwarded by an edge proxy of ours (a peer of MESHRT_FORWARDED_ALLOW_IPS that says whom
        for): it retries another node on a 503 (deploy/nginx.conf's proxy_next_upstream)."""
        try:
            peer = ipaddress.ip_address(peer_ip) if peer_ip else None
        except ValueError:
            return False
        trusted = peer is not None and any(peer in net for net in self.trusted_proxies)
        return trusted and bool(upgrade.headers.get_all("X-Forwarded-For"))

    def _admit_timed(self, upgrade, peer_ip, request_id):
        """In the admission thread: when it started (the wait for a thread and, on SQLite, for
        the admission lock shows between this and the grant's time)."""
        self.times["t_thread"] = time.time()
        return self.admit(upgrade, peer_ip, request_id)

    async def _hand_off(self, grant, request: bytes) -> HandoffAck | None:
        """The supervisor's answer; a refusal of our own if the handoff could not be sent; None if
        it was sent but not answered (the supervisor died or stalled with the socket in hand:
        refusing then would write onto a socket a worker may own, and end a row it may bill;
        its successor settles the row instead)."""
        ids = {"request_id": grant.request_id, "session_id": grant.session_id}
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            try:
                sock.connect(self.control_socket)
                sock.setblocking(False)
                fd = self.transport.get_extra_info("socket").fileno()
                await control.asend(sock, Handoff(grant, request), [fd])
            except OSError:
                log.exception("handoff failed", extra=ids)
                return HandoffAck(grant.session_id, "server_at_capacity")  # 1013: try again later
            try:
                with anyio.fail_after(10):
                    ack, fds = await control.arecv(sock)
            except (OSError, EOFError, TimeoutError, control.ControlError):
                log.exception("handoff sent but not answered; letting go of the socket", extra=ids)
                return None
            for extra in fds:
                socket.close(extra)
            return ack if isinstance(ack, HandoffAck) else HandoffAck(grant.session_id, "internal_error")
        finally:
            sock.close()

    def _release(self) -> None:
        """Let go of a handed-off socket: close our fd without writing or shutting it down."""
        self.released = True
        self.connections.discard(self)
        self.give_back()  # the socket is the worker's now, not this front door's
        self.transport.abort()  # no buffered bytes exist; abort() only closes this fd

    async def _refuse(self, protocol, request, code: str, request_id: str, detail: str | None = None) -> None:
        response, status = accept_bytes(protocol, request, request_id)
        self.transport.write(response + error_frames(protocol, code, request_id, detail))
        log.info("refused", extra={"request_id": request_id, "fields": {"code": code}})
        self.transport.resume_reading()
        with anyio.move_on_after(CLOSE_WAIT_S):
            await self.client_spoke.wait()
        self.transport.close()

    def _http_error(self, status: int, reason: str, code: str, message: str, request_id: str) -> None:
        kind = ERRORS[code].type if code in ERRORS else "invalid_request_error"
        body = http_error_body(code, message, kind, request_id)
        self.transport.write(http_response(status, reason, body, request_id))
        self.transport.close()


def protocol_class(
    admit, new_request_id, control_socket: str, on_refused, trusted_proxies: tuple = ()
) -> type[HandoffProtocol]:
    """A HandoffProtocol bound to this front door's gate (uvicorn wants a class, not an instance)."""
    return type(
        "BoundHandoffProtocol",
        (HandoffProtocol,),
        {
            "admit": staticmethod(admit),
            "new_request_id": staticmethod(new_request_id),
            "control_socket": control_socket,
            "on_refused": staticmethod(on_refused),
            "trusted_proxies": trusted_proxies,
        },
    )
