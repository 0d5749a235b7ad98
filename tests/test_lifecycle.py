"""The supervisor's session lifecycle table: every stage handles its events or refuses them."""

import pytest

from meshrt.shared.control import Grant
from meshrt.supervisor.registry import TRANSITIONS
from meshrt.supervisor.registry import LifecycleError
from meshrt.supervisor.registry import LiveSession
from meshrt.supervisor.registry import SessionEvent
from meshrt.supervisor.registry import Stage


def session() -> LiveSession:
    grant = Grant(
        session_id="sess_x", request_id="req_x", account_id="acct", api_key_id="key", model="m", token_cap=1, rates={}
    )
    return LiveSession(grant, None)


def test_the_table_covers_every_stage():
    assert set(TRANSITIONS) == set(Stage)


def test_a_session_goes_live_is_stopped_ends_and_is_billed():
    live = session()
    assert [
        live.handle(e)
        for e in (SessionEvent.WORKER_LIVE, SessionEvent.STOP, SessionEvent.WORKER_GONE, SessionEvent.RECORD_COMMITTED)
    ] == [Stage.LIVE, Stage.STOPPING, Stage.ENDED, Stage.BILLED]
    assert live.billed


def test_a_record_cannot_commit_while_its_worker_runs_and_nothing_follows_billing():
    live = session()
    live.handle(SessionEvent.WORKER_LIVE)
    with pytest.raises(LifecycleError):
        live.handle(SessionEvent.RECORD_COMMITTED)
    live.handle(SessionEvent.WORKER_GONE)
    live.handle(SessionEvent.RECORD_COMMITTED)
    for event in (SessionEvent.WORKER_LIVE, SessionEvent.WORKER_GONE, SessionEvent.RECORD_COMMITTED):
        with pytest.raises(LifecycleError):
            live.handle(event)
