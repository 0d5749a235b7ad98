"""The live-session registry: what the supervisor knows about each session it handed to a
worker, and each session's lifecycle as a transition table (h11's `_state.py` is the model).

    STARTING --worker_live--> LIVE --stop--> STOPPING
       |                        |               |
       +------------------------+--worker_gone--+--> ENDED --record_committed--> BILLED

In the session row: STARTING is `granted`, LIVE and STOPPING are `live`, BILLED is `ended`; an
ENDED session's row is still open while its record is written (retried until it commits).
"""

from __future__ import annotations

import enum
import socket
from dataclasses import dataclass
from dataclasses import field

import anyio

from meshrt.shared.control import Grant
from meshrt.shared.control import WorkerEnded


class Stage(enum.Enum):
    STARTING = "starting"  # handed to the zygote; no word from its worker yet
    LIVE = "live"  # its worker relays
    STOPPING = "stopping"  # its worker was asked to end it (quota, drain, lost lease)
    ENDED = "ended"  # its worker is gone; the record is being written
    BILLED = "billed"  # the record committed: nothing of it is left to write


class SessionEvent(enum.Enum):
    WORKER_LIVE = "worker_live"
    STOP = "stop"
    WORKER_GONE = "worker_gone"
    RECORD_COMMITTED = "record_committed"


_E = SessionEvent
# A table reads best one row a line: the formatter leaves it alone.
# fmt: off
TRANSITIONS: dict[Stage, dict[SessionEvent, Stage]] = {
    Stage.STARTING: {_E.WORKER_LIVE: Stage.LIVE, _E.STOP: Stage.STOPPING, _E.WORKER_GONE: Stage.ENDED},
    Stage.LIVE: {_E.STOP: Stage.STOPPING, _E.WORKER_GONE: Stage.ENDED},
    # a worker asked to stop while starting may still report going live; a second stop is moot
    Stage.STOPPING: {_E.WORKER_LIVE: Stage.STOPPING, _E.STOP: Stage.STOPPING, _E.WORKER_GONE: Stage.ENDED},
    Stage.ENDED: {_E.STOP: Stage.ENDED, _E.RECORD_COMMITTED: Stage.BILLED},
    Stage.BILLED: {_E.STOP: Stage.BILLED},
}
# fmt: on


class LifecycleError(RuntimeError):
    """An event the table does not allow in the session's stage: a supervisor bug."""


class Tally:
    """A count of things in progress that can be waited on to reach zero."""

    def __init__(self):
        self.count = 0
        self._zero = anyio.Event()
        self._zero.set()

    def __enter__(self) -> "Tally":
        if self._zero.is_set():
            self._zero = anyio.Event()
        self.count += 1
        return self

    def __exit__(self, *exc) -> None:
        self.count -= 1
        if not self.count:
            self._zero.set()

    async def wait_zero(self) -> None:
        await self._zero.wait()


@dataclass
class LiveSession:
    grant: Grant
    channel: socket.socket | None  # None: recovered from its spool, no worker
    pid: int | None = None
    stage: Stage = Stage.STARTING
    end_report: WorkerEnded | None = None  # the worker's own word on how it ended
    reported: dict = field(default_factory=dict)  # seq -> Increment, as the worker reported it
    stop_code: str | None = None  # why it was asked to stop
    # tasks answer a worker on its channel (a stop, a reservation): one send at a time
    send_lock: anyio.Lock = field(default_factory=anyio.Lock)
    reserving: bool = False  # a Reserve of its worker is being decided: one at a time
    prices: object = field(default=None, repr=False)  # the grant's rates, parsed when first needed
    hung_up: int | None = None  # a call's: upstream's answer to its hangup, once asked
    # set once its worker reported live (a call's: its sideband joined) or is gone: what a
    # call's answer waits for, so that no event of the call happens before it is metered
    settled: anyio.Event = field(default_factory=anyio.Event)

    def handle(self, event: SessionEvent) -> Stage:
        try:
            self.stage = TRANSITIONS[self.stage][event]
        except KeyError:
            raise LifecycleError(f"{event.value} in stage {self.stage.value}") from None
        return self.stage

    @property
    def billed(self) -> bool:
        return self.stage is Stage.BILLED


class Registry:
    """The sessions whose worker this supervisor watches, by id; `wait_empty` is what a drain waits on."""

    def __init__(self):
        self._sessions: dict[str, LiveSession] = {}
        self._empty = anyio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, session: LiveSession) -> None:
        if self._empty.is_set():
            self._empty = anyio.Event()
        self._sessions[session.grant.session_id] = session

    async def wait_empty(self) -> None:
        await self._empty.wait()

    def get(self, session_id: str) -> LiveSession | None:
        return self._sessions.get(session_id)

    def set_pid(self, session_id: str, pid: int) -> None:
        session = self._sessions.get(session_id)
        if session is not None:
            session.pid = pid

    def remove(self, session_id: str) -> LiveSession | None:
        session = self._sessions.pop(session_id, None)
        if not self._sessions:
            self._empty.set()
        return session

    def sessions(self) -> list[LiveSession]:
        return list(self._sessions.values())

    def of_account(self, account_id: str) -> list[LiveSession]:
        return [s for s in self._sessions.values() if s.grant.account_id == account_id]
