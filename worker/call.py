"""A WebRTC call's worker: meters a call it never carries, through the call's sideband.

A browser's call runs between the browser and upstream (media and the `oai-events` data
channel); the supervisor placed it (`supervisor.calls`) and started this worker with the call's
id in its grant. The worker joins the call's sideband, `wss://<upstream>/v1/realtime?call_id=…`,
with the operator's key, and feeds what upstream sends there to the same sans-I/O relay as a
socket session, with no client leg (`Relay.without_client`): usage is billed exactly as on a
socket (spool, then the supervisor), responses are pre-authorised one ahead, the token cap and
the clocks end the session.

What it cannot do is hold an event back: the browser's events go straight to upstream. So the
call is ended instead (docs/billing.md, WebRTC calls): when the next response's reservation is
refused for want of balance, when the supervisor stops the session (quota, revocation, drain) or
when a clock runs out, the worker cancels the response in flight on the sideband and asks the
supervisor to hang the call up (`EndCall`), metering on until upstream closes the sideband, so
what started before the hangup landed is billed too. The supervisor also hangs up every call
whose worker it finalises, whatever ended the worker (a crash included): no call runs on
unmetered. (The token cap, decided inside the relay, closes the sideband at once.) The sideband
also keeps the session's `max_output_tokens` at most `WorkerConfig.response_output_cap`, which
is what bounds a response's cost once it has started.
"""

from __future__ import annotations

import json
import time
from urllib.parse import urlencode

import anyio

from meshrt.shared import sandbox
from meshrt.shared.control import EndCall
from meshrt.shared.errors import ERRORS
from meshrt.shared.errors import GatewayError

from .frames import client_text_frame
from .legs import TransportLeg
from .relay import Phase
from .relay import Target
from .session import CLOSE_TIMEOUT_S
from .session import WorkerSession
from .upstream import connect_upstream
from .upstream import upstream_url

HANGUP_WAIT_S = 10.0  # the supervisor retries an unreachable upstream for about this long
_CANCEL = json.dumps({"type": "response.cancel"}, separators=(",", ":")).encode()


class NoClient:
    """The client leg of a call's worker: there is none (the browser talks to upstream), so
    whatever the relay would deliver to a client is dropped."""

    def write(self, data: bytes) -> bool:
        return True

    async def send(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass

    async def closed(self) -> None:
        pass


def sideband_url(base: str, call_id: str) -> str:
    return upstream_url(base, urlencode([("call_id", call_id)]))


class CallSession(WorkerSession):
    """`WorkerSession` with the sideband as its upstream and no client."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.relay.without_client()
        self.client_sock.close()  # a placeholder: a call has no client socket here
        self._client = NoClient()
        self._capped_output = False  # a session.update lowering max_output_tokens is on its way
        self._end_after_response: str | None = None  # the next response is not covered: end then
        self._ending: str | None = None  # the call is being hung up, with this code
        if self.relay.purse is not None:
            self.relay.purse.one_ahead = True

    async def _run(self) -> None:
        self.setup["loop_ms"] = round((time.time() - self.grant.started_at) * 1000, 2)
        self.channel.setblocking(False)
        began = time.monotonic()
        try:
            upstream = await connect_upstream(
                sideband_url(self.config.upstream_url, self.grant.call_id),
                [],
                self.config.upstream_key,
                self.config.upstream_connect_timeout_s,
                self.config.upstream_attempts,
            )
        except GatewayError as error:
            self.log.warning("sideband connect failed", fields={"code": error.code, "cause": repr(error.__cause__)})
            self.relay.settle_outcome(error.code, None)
            return
        self._upstream = upstream.stream
        self.sandbox = sandbox.confine_worker(self.config.sandbox)
        await self._report_live()
        self.setup["sideband_ms"] = round((time.monotonic() - began) * 1000, 2)
        self.log.info("call metered", fields={**self.setup, "call_id": self.grant.call_id})
        async with anyio.create_task_group() as tg:
            self._start_watchers(tg)
            if isinstance(self._upstream, TransportLeg):
                leftover = upstream.leftover + self._upstream.relay(
                    self._guarded(self._from_upstream), self._guarded(self._upstream_lost)
                )
                if leftover:
                    self._from_upstream(leftover)
            else:
                if upstream.leftover:
                    self._from_upstream(upstream.leftover)
                tg.start_soon(self._pump, self._upstream, self._client, self._from_upstream, self._upstream_lost)
            await self._finished.wait()
            with anyio.move_on_after(CLOSE_TIMEOUT_S):
                await self._upstream.drain()
            tg.cancel_scope.cancel()

    def _from_upstream(self, data: bytes) -> None:
        # the call's events are its activity: a call nobody speaks in has none
        self._last_activity = time.monotonic()
        super()._from_upstream(data)
        if self._end_after_response and self.relay.responses_in_flight == 0:
            self._end(self._end_after_response)
        self._cap_output()

    def _cap_output(self) -> None:
        """Keep the session's output limit within what a response is reserved for: a response
        cannot be held back here, so its cost must be bounded before it starts."""
        purse = self.relay.purse
        if purse is None or not purse.session_seen or self.relay.phase is not Phase.OPEN:
            return
        limit, cap = purse.session_output, self.config.response_output_cap
        if limit is not None and limit <= cap:
            self._capped_output = False
            return
        if self._capped_output:
            return  # asked already; upstream's session.updated will say
        self._capped_output = True
        update = {"type": "session.update", "session": {"type": "realtime", "max_output_tokens": cap}}
        self._execute([(Target.UPSTREAM, client_text_frame(json.dumps(update, separators=(",", ":")).encode()))])

    def _end(self, code: str) -> None:
        """End the call: cancel what is in flight, ask the supervisor to hang the call up, and
        meter on until upstream closes the sideband, so a response that started before the
        hangup landed is billed too. If upstream has not closed it by the deadline (the hangup
        failed, the supervisor is away), close the sideband here; the supervisor hangs up again
        when it finalises the session."""
        if self._ending is not None or self.relay.phase is not Phase.OPEN:
            return
        self._ending = code
        self.relay.settle_outcome(code, ERRORS[code].close_code)
        if self.relay.responses_in_flight:
            self._execute([(Target.UPSTREAM, client_text_frame(_CANCEL))])
        self._send(EndCall(self.grant.session_id, code))
        self._tg.start_soon(self._close_unless_hung_up, code)

    async def _close_unless_hung_up(self, code: str) -> None:
        await anyio.sleep(self.config.drain_usage_s + HANGUP_WAIT_S)
        if not self._finished.is_set():
            self.log.warning("the call was not ended upstream in time; closing its sideband")
            self._execute(self.relay.end(code))

    def _reservation_answered(self, version: int, held: int, granted: bool, reason: str, available: int) -> None:
        super()._reservation_answered(version, held, granted, reason, available)
        if self.relay.purse.refusal != "insufficient_quota" or self._end_after_response or self._ending:
            return
        # the response in flight was covered by the previous reservation: it ends, the call with it
        self.log.info("next response not covered; ending the call", fields={"available": available})
        self._end_after_response = "insufficient_quota"
        if self.relay.responses_in_flight == 0:
            self._end(self._end_after_response)
