"""A session's spool: the durable copy of its usage, written by the worker before the frame that
carries the usage is delivered, read by the supervisor to bill what the database has not got.

One file per session, `<spool_dir>/<session_id>.jsonl`, opened O_APPEND by the supervisor and
handed to the worker as an fd (the worker knows no path). One JSON line per increment
(`{"seq": n, "increment": Increment.to_json()}`), and a last line with how the session ended
(`{"end": {"end_reason": ..., "close_code": ...}}`). The file is removed only after the session's
final record has committed: until then it is the truth. A torn last line (a crash mid-write) is
skipped; an increment appears at most once per seq.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from .increments import Increment

log = logging.getLogger("meshrt.spool")

SUFFIX = ".jsonl"


def path(spool_dir: Path, session_id: str) -> Path:
    return spool_dir / f"{session_id}{SUFFIX}"


def open_for_worker(spool_dir: Path, session_id: str) -> int:
    return os.open(path(spool_dir, session_id), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def session_ids(spool_dir: Path) -> set[str]:
    return {p.name[: -len(SUFFIX)] for p in spool_dir.glob(f"*{SUFFIX}")}


def _line(entry: dict) -> bytes:
    return (json.dumps(entry, separators=(",", ":")) + "\n").encode()


def append_increment(fd: int, increment: Increment) -> None:
    os.write(fd, _line({"seq": increment.seq, "increment": increment.to_json()}))


def append_end(fd: int, end_reason: str, close_code: int | None) -> None:
    os.write(fd, _line({"end": {"end_reason": end_reason, "close_code": close_code}}))


@dataclass
class SpoolEnd:
    end_reason: str
    close_code: int | None


@dataclass
class Spool:
    increments: dict[int, Increment] = field(default_factory=dict)
    end: SpoolEnd | None = None


def read(file: Path) -> Spool:
    """What the spool holds; an absent file is an empty spool."""
    spool = Spool()
    try:
        lines = file.read_bytes().splitlines()
    except FileNotFoundError:
        return spool
    for line in lines:
        try:
            entry = json.loads(line)
            if "end" in entry:
                spool.end = SpoolEnd(str(entry["end"]["end_reason"]), entry["end"]["close_code"])
            else:
                increment = Increment.from_json(entry["increment"])
                spool.increments[increment.seq] = increment
        except (ValueError, KeyError, TypeError):
            log.warning("torn spool line ignored", extra={"fields": {"spool": file.name}})
    return spool
