"""The spool format: what the worker appends is what the supervisor reads back."""

import json
import os

from meshrt.shared import spool
from meshrt.shared.increments import Increment


def increment(seq: int, cost: int) -> Increment:
    return Increment.from_json(
        {
            "seq": seq,
            "kind": "response",
            "model": "gpt-realtime",
            "usage": {"total_tokens": 1},
            "cost_picodollars": cost,
            "by_category_picodollars": {"text_input": cost},
            "total_tokens": 1,
            "response_id": None,
            "item_id": None,
            "unpriced": False,
        }
    )


def test_increments_and_end_round_trip(tmp_path):
    fd = spool.open_for_worker(tmp_path, "sess_a")
    try:
        spool.append_increment(fd, increment(1, 5))
        spool.append_increment(fd, increment(2, 7))
        spool.append_end(fd, "client_closed", 1000)
    finally:
        os.close(fd)
    assert spool.session_ids(tmp_path) == {"sess_a"}
    assert oct(spool.path(tmp_path, "sess_a").stat().st_mode & 0o777) == "0o600"
    held = spool.read(spool.path(tmp_path, "sess_a"))
    assert held.increments == {1: increment(1, 5), 2: increment(2, 7)}
    assert held.end == spool.SpoolEnd("client_closed", 1000)


def test_a_torn_last_line_is_skipped_and_an_absent_file_is_empty(tmp_path):
    file = spool.path(tmp_path, "sess_b")
    whole = json.dumps({"seq": 1, "increment": increment(1, 5).to_json()}).encode()
    file.write_bytes(whole + b'\n{"seq":2,"incr')
    held = spool.read(file)
    assert held.increments == {1: increment(1, 5)} and held.end is None
    assert spool.read(spool.path(tmp_path, "nothing")) == spool.Spool()
