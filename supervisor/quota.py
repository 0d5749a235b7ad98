"""What an account can still spend, as this node can tell without waiting for the database.

The balance is the database's (top-ups from any node included); this node's increments that the
database has not acknowledged yet are subtracted from it. Reads and writes go through the one
FIFO ledger writer, so each balance carries the number of the job that read it, and an increment
acknowledged by job n is in every balance read by a job numbered n or later: it is subtracted
exactly until a balance that includes it arrives — never twice, however replies interleave, and
a replayed increment the database already had is no exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field

Key = tuple[str, int]  # (session_id, seq)


@dataclass
class QuotaEstimate:
    balance: int | None = None  # None: not read since this supervisor started (no decision yet)
    as_of: int = -1  # the writer job that read `balance`
    reserved: int = 0  # the account's reservations (every node's) as read with `balance`
    provisional: int = 0  # reservations this node granted while the database did not answer
    _unsettled: dict[Key, tuple[int, int | None]] = field(default_factory=dict)  # cost, acknowledged by job

    def observe_balance(self, balance: int, as_of: int, reserved: int = 0) -> None:
        if as_of >= self.as_of:
            self.balance, self.as_of, self.reserved = balance, as_of, reserved
            self._prune()

    def add(self, key: Key, cost: int) -> None:
        self._unsettled.setdefault(key, (cost, None))

    def acknowledged(self, key: Key, job: int) -> None:
        """The database has this increment, as of job `job` (applied by it, or found applied)."""
        if key in self._unsettled:
            self._unsettled[key] = (self._unsettled[key][0], job)
            self._prune()

    @property
    def settled(self) -> bool:
        """Every increment of this node's is acknowledged: nothing is lost by forgetting it."""
        return self.provisional == 0 and all(job is not None for _, job in self._unsettled.values())

    @property
    def pending(self) -> int:
        return sum(cost for cost, job in self._unsettled.values() if job is None or job > self.as_of)

    @property
    def available(self) -> int | None:
        return None if self.balance is None else self.balance - self.pending

    @property
    def room(self) -> int:
        """What this node may reserve without the database: the balance as last read, less this
        node's unacknowledged usage, every reservation read with it, and what it granted since."""
        available = self.available
        return 0 if available is None else available - self.reserved - self.provisional

    @property
    def exhausted(self) -> bool:
        """Spent past zero. Responses are pre-authorised, so this is the backstop for usage no
        reservation covered (a transcription, a response longer than its bound); a balance at
        exactly zero only refuses new responses in-band (docs/billing.md)."""
        available = self.available
        return available is not None and available < 0

    def _prune(self) -> None:
        for key in [k for k, (_, job) in self._unsettled.items() if job is not None and job <= self.as_of]:
            del self._unsettled[key]
