"""The spool format: what the worker appends is what the supervisor reads back."""

import os

from meshrt.shared import spool


def test_increments_and_end_round_trip(tmp_path):
    fd = spool.open_for_worker(tmp_path, "sess_a")
    try:
        spool.append_increment(fd, 1, {"cost_picodollars": 5, "seq": 1})
        spool.append_increment(fd, 2, {"cost_picodollars": 7, "seq": 2})
        spool.append_end(fd, "client_closed", 1000)
    finally:
        os.close(fd)
    assert spool.session_ids(tmp_path) == {"sess_a"}
    assert oct(spool.path(tmp_path, "sess_a").stat().st_mode & 0o777) == "0o600"
    held = spool.read(spool.path(tmp_path, "sess_a"))
    assert held.increments == {1: {"cost_picodollars": 5, "seq": 1}, 2: {"cost_picodollars": 7, "seq": 2}}
    assert held.end == spool.SpoolEnd("client_closed", 1000)


def test_a_torn_last_line_is_skipped_and_an_absent_file_is_empty(tmp_path):
    file = spool.path(tmp_path, "sess_b")
    file.write_bytes(b'{"seq":1,"increment":{"cost_picodollars":5}}\n{"seq":2,"incr')
    held = spool.read(file)
    assert held.increments == {1: {"cost_picodollars": 5}} and held.end is None
    assert spool.read(spool.path(tmp_path, "nothing")) == spool.Spool()
