"""Control-channel messages between front door, supervisor, zygote and workers, and their codec.

Every channel is a unix SOCK_SEQPACKET socket: one datagram is one message, so there is no
framing to get wrong, and file descriptors ride along as SCM_RIGHTS. Messages are frozen
dataclasses, encoded as compact JSON with a `kind` tag; nothing but these types crosses a
process boundary. Ownership rule for fds: the sender closes its copy once `send` returned; the
receiver owns what `recv` returns and must close it (or hand it on) on every path. Every
message carries PROTOCOL_VERSION; one of another version is refused, not decoded.
"""

from __future__ import annotations

import array
import base64
import dataclasses
import json
import os
import socket
from dataclasses import dataclass
from dataclasses import field
from typing import ClassVar

import anyio

from .increments import Increment

MAX_MESSAGE = 256 * 1024
MAX_FDS = 4

# The control protocol's version, in every message (`v`). A message of another version is refused
# (VersionMismatch), never read as this version's: versions meet when a worker that outlived its
# supervisor re-attaches to one of a newer release, or a child restarted after an upgrade on disk
# talks to an older supervisor. Raise it whenever a message's fields or meaning change.
PROTOCOL_VERSION = 1


class ControlError(Exception):
    pass


class VersionMismatch(ControlError):
    """A message of another protocol version (0: from before messages carried one)."""

    def __init__(self, kind: str, version):
        super().__init__(
            f"{kind!r} message of control protocol version {version}; this process speaks {PROTOCOL_VERSION}"
        )
        self.kind, self.version = kind, version


@dataclass(frozen=True)
class Grant:
    """What the front door decided: this client may run this session, with these limits."""

    session_id: str
    request_id: str
    account_id: str
    api_key_id: str
    model: str
    token_cap: int
    rates: dict
    beta: bool = False
    client_addr: str = ""
    started_at: float = 0.0  # UTC epoch seconds
    balance_pico: int = 0  # the account's balance at admission: the supervisor's first estimate
    # An ephemeral key's session config: the worker sends it upstream as a session.update
    # before the client's first event (docs/protocol.md, Ephemeral keys). None for an rsk_ key.
    session_config: dict | None = None
    # "transcription" for `?intent=transcription` (no responses: nothing to pre-authorise, and
    # an announced transcription model must be priced); "realtime" otherwise.
    surface: str = "realtime"
    # A WebRTC call's id upstream (surface "webrtc": the worker meters it through its sideband;
    # surface "sideband": a tenant's own sideband to it, relayed and not billed)
    call_id: str = ""


@dataclass(frozen=True)
class WorkerConfig:
    """How this node runs every session's worker, set once by the supervisor from its settings.
    It holds the operator's upstream key, so it travels in one message only: Spawn, toward the
    worker (never back, never through the front door)."""

    upstream_url: str = ""
    upstream_key: str = field(default="", repr=False)
    idle_timeout_s: float = 300.0
    max_session_s: float = 3600.0
    max_message_bytes: int = 16 * 1024 * 1024
    drain_usage_s: float = 2.0
    upstream_connect_timeout_s: float = 10.0
    upstream_attempts: int = 3
    backend: str = "asyncio"
    memory_limit_mb: int = 0
    control_socket: str = ""  # where a worker re-attaches if its supervisor restarts
    orphan_limit_s: float = 15.0  # the node's lease: how long a worker relays with no supervisor
    preauth: bool = True  # responses start only once their cost is reserved (docs/billing.md)
    response_output_cap: int = 4096  # the output tokens a response is reserved for at most
    translation_bill_ahead_s: float = 1.0  # a translation session's audio billed ahead per increment
    translation_billing: str = "audio"  # audio | wall_clock (MESHRT_TRANSLATION_BILLING)
    sandbox: str = "off"  # off | on | require (shared/sandbox.py); the supervisor sets MESHRT_SANDBOX


# --- front door <-> supervisor -------------------------------------------------------------


@dataclass(frozen=True)
class Handoff:
    """Front door → supervisor, with fds [client socket]. Request bytes have the key stripped."""

    kind: ClassVar[str] = "handoff"
    grant: Grant
    request: bytes


@dataclass(frozen=True)
class HandoffAck:
    kind: ClassVar[str] = "handoff_ack"
    session_id: str
    error_code: str | None = None  # None: the supervisor owns the socket now


@dataclass(frozen=True)
class PlaceCall:
    """Front door → supervisor, no fds: an admitted WebRTC call. The supervisor posts the offer
    upstream with the operator's key, starts the call's worker and answers `CallPlaced`."""

    kind: ClassVar[str] = "place_call"
    grant: Grant
    offer: str  # the client's SDP offer
    session: dict  # the session config sent upstream with it (its model is the grant's)


@dataclass(frozen=True)
class CallPlaced:
    kind: ClassVar[str] = "call_placed"
    session_id: str
    error_code: str | None = None  # None: the call runs, metered by its worker
    detail: str = ""
    answer: str = ""  # upstream's SDP answer
    call_id: str = ""


@dataclass(frozen=True)
class HangUp:
    """Front door → supervisor: a tenant hangs its call up (the front door checked whose it is)."""

    kind: ClassVar[str] = "hang_up"
    call_id: str


@dataclass(frozen=True)
class HungUp:
    kind: ClassVar[str] = "hung_up"
    call_id: str
    status: int  # upstream's HTTP status; 0 when upstream could not be reached


@dataclass(frozen=True)
class Ping:
    """Front door → supervisor: are you there, and can this node take sessions?"""

    kind: ClassVar[str] = "ping"


@dataclass(frozen=True)
class Pong:
    kind: ClassVar[str] = "pong"
    problems: list  # why this node is not ready; empty when it is


@dataclass(frozen=True)
class Reattach:
    """Worker → a restarted supervisor, on a new connection to the control socket: this
    session is still live in this process."""

    kind: ClassVar[str] = "reattach"
    grant: Grant
    pid: int
    upgraded: bool


# --- supervisor <-> zygote ------------------------------------------------------------------


@dataclass(frozen=True)
class Spawn:
    """Supervisor → zygote, with fds [client socket, worker channel, spool file]."""

    kind: ClassVar[str] = "spawn"
    grant: Grant
    config: WorkerConfig
    request: bytes


@dataclass(frozen=True)
class Spawned:
    kind: ClassVar[str] = "spawned"
    session_id: str
    pid: int


@dataclass(frozen=True)
class ZygoteReady:
    kind: ClassVar[str] = "zygote_ready"
    pid: int


@dataclass(frozen=True)
class WorkerExited:
    kind: ClassVar[str] = "worker_exited"
    pid: int
    exit_code: int | None
    signal: int | None


@dataclass(frozen=True)
class PoolStatus:
    """Zygote → supervisor, once a second: its warm pool and its workers' memory (/metrics)."""

    kind: ClassVar[str] = "pool_status"
    idle: int  # idle workers forked ahead now
    target: int  # what the sizing rule wants (worker/pool.py)
    workers: int  # its children whose memory it reads (idle ones and sessions')
    pss_bytes: int  # their proportional set sizes summed: shared pages counted once in all
    idle_pss_bytes: int  # of which idle workers'
    arrival_rate: float  # sessions per second, as the pool is sized for
    setup_s: float  # a pool worker's fork and rehearsal, as measured
    mem_available: int  # bytes; -1: unknown
    read_s: float  # what reading every worker's smaps_rollup took last time
    from_pool: int = 0  # sessions handed to an idle worker since the zygote started
    forked: int = 0  # sessions that found no idle worker and were forked on the spot (pool misses)


@dataclass(frozen=True)
class WorkerMemory:
    """A new worker → the zygote, once, with fds [its own /proc/self/smaps_rollup]: only the
    process itself may open that file (workers are non-dumpable), and whoever holds the fd may
    read it after. `ready_at` (CLOCK_MONOTONIC): when a pool worker had rehearsed."""

    kind: ClassVar[str] = "worker_memory"
    pid: int
    ready_at: float


# --- worker <-> supervisor ------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerLive:
    """Worker → supervisor: upstream is connected and the client got its 101."""

    kind: ClassVar[str] = "worker_live"
    session_id: str
    pid: int


@dataclass(frozen=True)
class UsageIncrement:
    """Worker → supervisor: one billed usage event, already in the spool. Idempotent by seq.
    `settle_version` > 0: the session's reservation becomes `settle_pico` in the same write (the
    response this pays for no longer needs its reservation)."""

    kind: ClassVar[str] = "usage_increment"
    session_id: str
    increment: Increment
    settle_version: int = 0
    settle_pico: int = 0


@dataclass(frozen=True)
class Reserve:
    """Worker → supervisor: hold up to `want` picodollars of the account's balance for this
    session's responses, and at least `least`, or nothing more (docs/billing.md)."""

    kind: ClassVar[str] = "reserve"
    session_id: str
    version: int
    want: int
    least: int
    held: int  # what the worker holds as far as it knows (a provisional grant starts from it)


@dataclass(frozen=True)
class Reserved:
    """Supervisor → worker: what the session holds after its `Reserve` of this version."""

    kind: ClassVar[str] = "reserved"
    session_id: str
    version: int
    held: int
    granted: bool
    available: int  # the account's balance not held by any session, after this change
    reason: str = ""  # when not granted: "insufficient_quota" or "service_unavailable"


@dataclass(frozen=True)
class Billed:
    """Supervisor → worker: a translation session's increment `seq` is counted and its account
    could pay for it (the quota estimate is not past zero); the worker bills the next interval
    of audio only after this (docs/billing.md, Translation sessions)."""

    kind: ClassVar[str] = "billed"
    session_id: str
    seq: int


@dataclass(frozen=True)
class WorkerEnded:
    """Worker → supervisor, its last message: how the session ended."""

    kind: ClassVar[str] = "worker_ended"
    session_id: str
    end_reason: str
    close_code: int | None
    upgraded: bool


@dataclass(frozen=True)
class EndCall:
    """A call's worker → supervisor: hang my call up now (quota, a clock, a stop). The worker
    keeps metering its sideband until upstream closes it, so what started meanwhile is billed."""

    kind: ClassVar[str] = "end_call"
    session_id: str
    code: str


@dataclass(frozen=True)
class StopSession:
    """Supervisor → worker: end the session with this error code (quota ran out, draining)."""

    kind: ClassVar[str] = "stop_session"
    code: str


@dataclass(frozen=True)
class VersionRefused:
    """The answer to a message of another protocol version, before the connection is closed.
    Read whatever version sent it (its shape never changes): a worker that gets it ends its
    session as on supervisor loss instead of offering it again."""

    kind: ClassVar[str] = "version_refused"
    speaks: int  # the refuser's version
    got: int  # the version refused


MESSAGES = {
    cls.kind: cls
    for cls in (
        Handoff,
        HandoffAck,
        PlaceCall,
        CallPlaced,
        HangUp,
        HungUp,
        Ping,
        Pong,
        Reattach,
        Spawn,
        Spawned,
        ZygoteReady,
        WorkerExited,
        PoolStatus,
        WorkerMemory,
        WorkerLive,
        UsageIncrement,
        Reserve,
        Reserved,
        Billed,
        WorkerEnded,
        EndCall,
        StopSession,
        VersionRefused,
    )
}


def encode(message) -> bytes:
    body = {"kind": message.kind, "v": PROTOCOL_VERSION}
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if isinstance(value, bytes):
            value = {"b64": base64.b64encode(value).decode()}
        elif isinstance(value, Increment):
            value = value.to_json()
        elif isinstance(value, (Grant, WorkerConfig)):  # shallow: asdict would deep-copy the rates (0.2 ms a hop)
            value = {g.name: getattr(value, g.name) for g in dataclasses.fields(value)}
        body[f.name] = value
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ControlError(f"{message.kind} message too large ({len(data)} bytes)")
    return data


def decode(data: bytes):
    try:
        body = json.loads(data)
        kind, version = body.pop("kind"), body.pop("v", 0)
        if version != PROTOCOL_VERSION and kind != VersionRefused.kind:
            raise VersionMismatch(str(kind)[:40], version if isinstance(version, int) else str(version)[:20])
        cls = MESSAGES[kind]
        kwargs = {}
        for f in dataclasses.fields(cls):
            value = body[f.name]
            if isinstance(value, dict) and set(value) == {"b64"}:
                value = base64.b64decode(value["b64"])
            elif f.name == "grant":
                value = Grant(**value)
            elif f.name == "config":
                value = WorkerConfig(**value)
            elif f.name == "increment":
                value = Increment.from_json(value)
            kwargs[f.name] = value
        return cls(**kwargs)
    except (ValueError, KeyError, TypeError) as exc:
        raise ControlError(f"malformed control message: {exc}") from exc


# --- I/O: blocking and async shells over the same codec ------------------------------------


def send(sock: socket.socket, message, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Blocking send of one message (and fds). The caller still owns and must close `fds`."""
    send_datagram(sock, encode(message), fds)


def send_datagram(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send an encoded message as it is (one received with `recv_undecoded`, passed on)."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


def _datagram(data: bytes, ancdata, flags: int) -> tuple[bytes, list[int]]:
    """A received datagram and the fds that came with it; on any error the fds are closed."""
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - (len(payload) % arr.itemsize)])
            fds.extend(arr)
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for fd in fds:
            os.close(fd)
        raise ControlError("control message truncated")
    if not data:
        for fd in fds:
            os.close(fd)
        raise EOFError("control channel closed")
    return data, fds


def _unpack(data: bytes, ancdata, flags: int):
    data, fds = _datagram(data, ancdata, flags)
    try:
        return decode(data), fds
    except ControlError:
        for fd in fds:
            os.close(fd)
        raise


def recv(sock: socket.socket):
    """Blocking receive: (message, fds). Raises EOFError when the peer closed the channel."""
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4))
    return _unpack(data, ancdata, flags)


def recv_undecoded(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Blocking receive of one datagram, not decoded: (bytes, fds), for passing a message on."""
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4))
    return _datagram(data, ancdata, flags)


def recv_nowait(sock: socket.socket):
    """Receive one message if one is waiting: (message, fds), or None. EOFError when closed."""
    try:
        data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except ConnectionResetError:
        raise EOFError("control channel reset") from None
    return _unpack(data, ancdata, flags)


async def asend(sock: socket.socket, message, fds=()) -> None:
    """Send on a non-blocking socket from any anyio backend."""
    while True:
        try:
            return send(sock, message, fds)
        except BlockingIOError:
            await anyio.wait_writable(sock)


async def arecv(sock: socket.socket):
    """Receive on a non-blocking socket from any anyio backend."""
    while True:
        try:
            data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4))
        except BlockingIOError:
            await anyio.wait_readable(sock)
            continue
        except ConnectionResetError:
            raise EOFError("control channel reset") from None
        return _unpack(data, ancdata, flags)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end (SO_PEERCRED): only our own user may hand off."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    _pid, uid, _gid = array.array("i", creds)
    return uid


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end (SO_PEERCRED, set by the kernel at connect): what
    a re-attaching worker says its pid is must be this."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    pid, _uid, _gid = array.array("i", creds)
    return pid


def seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
