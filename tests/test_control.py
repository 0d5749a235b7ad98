"""The control-channel codec, through a real SOCK_SEQPACKET pair with fds attached: every
message kind comes back equal, fds arrive open, bad datagrams raise ControlError."""

from __future__ import annotations

import dataclasses
import os

import pytest

from meshrt.shared import control
from meshrt.shared.control import ControlError
from meshrt.shared.control import Grant
from meshrt.shared.control import Handoff
from meshrt.shared.control import HandoffAck
from meshrt.shared.control import Reattach
from meshrt.shared.control import Spawn
from meshrt.shared.control import Spawned
from meshrt.shared.control import StopSession
from meshrt.shared.control import UsageIncrement
from meshrt.shared.control import WorkerConfig
from meshrt.shared.control import WorkerEnded
from meshrt.shared.control import WorkerExited
from meshrt.shared.control import WorkerLive
from meshrt.shared.control import ZygoteReady
from meshrt.shared.increments import Increment

GRANT = Grant(
    "sess_1",
    "req_1",
    "acct_1",
    "key_1",
    "gpt-realtime",
    32000,
    {"model": {"input": {"text": "4000"}, "nested": [1, {"x": None}]}, "effective_date": "2026-01-01"},
    beta=True,
    client_addr="10.0.0.1",
    started_at=1.5,
    balance_pico=10**15,
)
CONFIG = WorkerConfig(
    upstream_url="wss://api.openai.com/v1/realtime", upstream_key="sk-x", control_socket="/run/c.sock"
)

MESSAGES = [
    Handoff(GRANT, b"GET / HTTP/1.1\r\n\r\n\x00\xff"),
    HandoffAck("sess_1"),
    HandoffAck("sess_1", "server_at_capacity"),
    Reattach(GRANT, 42, True),
    # an ephemeral key's session config rides in the grant (docs/protocol.md, Ephemeral keys)
    Spawn(dataclasses.replace(GRANT, session_config={"type": "realtime", "instructions": "é\u2028"}), CONFIG, b"GET"),
    Spawn(GRANT, CONFIG, b"GET"),
    Spawned("sess_1", 42),
    ZygoteReady(7),
    WorkerExited(42, None, 9),
    WorkerLive("sess_1", 42),
    UsageIncrement(
        "sess_1",
        Increment.from_json(
            {
                "seq": 3,
                "kind": "response",
                "model": "gpt-realtime",
                "usage": {"total_tokens": 5},
                "cost_picodollars": 7,
                "by_category_picodollars": {"text_input": 7},
                "total_tokens": 5,
                "response_id": "resp_1",
                "item_id": None,
                "unpriced": False,
            }
        ),
    ),
    WorkerEnded("sess_1", "client_closed", 1000, True),
    StopSession("insufficient_quota"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.kind)
def test_every_message_round_trips_with_an_fd(message, tmp_path):
    ours, theirs = control.seqpacket_pair()
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        control.send(ours, message, [fd])
        got, fds = control.recv(theirs)
        assert got == message and len(fds) == 1
        os.write(fds[0], b"ok")  # an open descriptor of the same file
        os.close(fds[0])
        assert (tmp_path / "f").read_bytes() == b"ok"
    finally:
        os.close(fd)
        ours.close()
        theirs.close()


@pytest.mark.parametrize(
    "datagram",
    [
        b"",
        b"{",
        b"[]",
        b'{"kind":"nope"}',
        b'{"kind":"spawned","pid":1}',
        b'{"kind":"spawn","grant":{"x":1},"request":{"b64":"AA=="}}',
    ],
)
def test_bad_datagrams_raise_control_error(datagram):
    with pytest.raises(ControlError):
        control.decode(datagram)
