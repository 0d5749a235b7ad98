"""SQLite's write lock (storage/db.py): every transaction's BEGIN IMMEDIATE is polled, not left to
SQLite's busy handler, whose sleeps grow to 100 ms and let a waiter miss the gaps between another
process's short transactions; the wait stays bounded by MESHRT_DB_TIMEOUT_S, with the same error.
These run on SQLite whatever database the rest of the suite uses: the lock is SQLite's alone."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from meshrt.storage.db import make_engine

HOLD_S = 0.040  # another process's transaction, as the supervisor's ledger writes come
GAP_S = 0.004  # and the moment between two of them


class _Holder(threading.Thread):
    """Takes the write lock again and again on its own connection, with short gaps between."""

    def __init__(self, path: str, hold_s: float, gap_s: float, cycles: int):
        super().__init__(daemon=True)
        self.conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
        self.hold_s, self.gap_s, self.cycles = hold_s, gap_s, cycles
        self.locked = threading.Event()
        self.stop = threading.Event()
        self.gaps = 0  # gaps offered before `stop`

    def run(self) -> None:
        for _ in range(self.cycles):
            self.conn.execute("BEGIN IMMEDIATE")
            self.locked.set()
            time.sleep(self.hold_s)
            self.conn.execute("COMMIT")
            if self.stop.is_set():
                break
            self.gaps += 1
            time.sleep(self.gap_s)
        self.conn.close()


def _engine(tmp_path, timeout_s: float):
    path = tmp_path / "lock.db"
    engine = make_engine(f"sqlite:///{path}", timeout_s)
    with engine.begin() as db:
        db.execute(text("CREATE TABLE IF NOT EXISTS t (x INTEGER)"))
    return engine, str(path)


def test_a_writer_behind_short_transactions_gets_in_at_one_of_the_first_gaps(tmp_path):
    engine, path = _engine(tmp_path, timeout_s=10)
    waited = []
    for offset_ms in range(0, 36, 7):  # the writer arrives at different moments of a hold
        holder = _Holder(path, HOLD_S, GAP_S, cycles=80)
        holder.start()
        assert holder.locked.wait(5)
        time.sleep(offset_ms / 1000)
        try:
            with engine.begin() as db:  # waits for the lock
                holder.stop.set()
                db.execute(text("INSERT INTO t VALUES (1)"))
        finally:
            holder.stop.set()
            holder.join(10)
        waited.append(holder.gaps)
    # polled every 2 ms at most, the writer takes the first gap (here 6 of 6 on a quiet machine);
    # SQLite's own handler, asleep 20–100 ms at a time by then, waited 1–53 gaps, 4 or more in 5 of 12
    assert max(waited) <= 3, f"gaps of {GAP_S * 1000:.0f} ms the writer waited through: {waited}"


def test_a_lock_held_past_the_timeout_fails_as_database_locked_and_the_connection_recovers(tmp_path):
    engine, path = _engine(tmp_path, timeout_s=0.5)
    holder = _Holder(path, hold_s=1.5, gap_s=0, cycles=1)
    holder.start()
    assert holder.locked.wait(5)
    began = time.monotonic()
    with pytest.raises(OperationalError, match="database is locked"):
        with engine.begin() as db:
            db.execute(text("SELECT 1"))
    waited = time.monotonic() - began
    assert 0.45 <= waited < 1.4, waited  # MESHRT_DB_TIMEOUT_S, not more, not at once
    holder.join(10)
    with engine.begin() as db:  # the same pool's connections work, with their busy timeout back
        db.execute(text("INSERT INTO t VALUES (2)"))
        assert db.execute(text("PRAGMA busy_timeout")).scalar_one() == 500
    with engine.begin() as db:
        assert db.execute(text("SELECT count(*) FROM t")).scalar_one() == 1
