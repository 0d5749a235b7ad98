"""The live-session registry: what the supervisor knows about each session it handed to a worker."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from meshrt.shared.control import Grant, WorkerEnded


@dataclass
class LiveSession:
    grant: Grant
    channel: socket.socket | None  # None: recovered from its spool, no worker
    pid: int | None = None
    ended: WorkerEnded | None = None
    reported: dict = field(default_factory=dict)  # seq -> increment dict, as the worker reported it
    stop_sent: str | None = None
    finalized: bool = False  # the final record committed: nothing of this session is left to write


class Registry:
    def __init__(self):
        self._sessions: dict[str, LiveSession] = {}
        self._by_pid: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, session: LiveSession) -> None:
        self._sessions[session.grant.session_id] = session

    def get(self, session_id: str) -> LiveSession | None:
        return self._sessions.get(session_id)

    def set_pid(self, session_id: str, pid: int) -> None:
        session = self._sessions.get(session_id)
        if session is not None:
            session.pid = pid
            self._by_pid[pid] = session_id

    def by_pid(self, pid: int) -> LiveSession | None:
        session_id = self._by_pid.get(pid)
        return self._sessions.get(session_id) if session_id else None

    def remove(self, session_id: str) -> LiveSession | None:
        session = self._sessions.pop(session_id, None)
        if session is not None and session.pid is not None:
            self._by_pid.pop(session.pid, None)
        return session

    def sessions(self) -> list[LiveSession]:
        return list(self._sessions.values())

    def of_account(self, account_id: str) -> list[LiveSession]:
        return [s for s in self._sessions.values() if s.grant.account_id == account_id]
