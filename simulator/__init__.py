"""OpenAI Realtime upstream simulator (``meshrt sim``, docs/simulator.md).

A small WebSocket server that speaks the OpenAI Realtime protocol closely enough
that the official ``openai`` SDK runs a whole conversation against it. It is the
default upstream of ``meshrt dev`` and of the test suite; it never talks to OpenAI.

Run it::

    python -m meshrt.simulator --port 8765 [--api-key K] [--frame-log-dir D]
                               [--pace] [--fault NAME]

The endpoint is ``ws://HOST:PORT/v1/realtime`` and takes exactly one of
``?model=M``, ``?call_id=C`` or ``?intent=transcription``. GA event names are
used unless the client sends ``OpenAI-Beta: realtime=v1`` (or the subprotocol
``openai-beta.realtime-v1``), which selects beta names and the beta usage shape.

The same port serves OpenAI's WebRTC calls: ``POST /v1/realtime/calls`` (an SDP offer, answered
by an aiortc peer whose ``oai-events`` data channel carries the session), hangup, client secrets,
and sideband sockets ``?call_id=rtc_...`` that join a call.

The parts, each described in its module: ``usage`` (the usage formula), ``session`` (the sans-I/O
session model: conversation, events, responses), ``handshake`` (the upgrade request: auth,
per-connection options, fault injection), ``driver`` (a session's response streaming, whatever
the transport), ``framelog`` (the per-connection frame log), ``plainhttp`` (plain HTTP requests on
the WebSocket port), ``calls`` (WebRTC calls and their sidebands), ``server`` (the socket layer;
``serve``) and ``cli`` (the command line; ``main``).

See docs/simulator.md for the full description.
"""

from .cli import main
from .server import serve
from .session import SimSession

__all__ = ["SimSession", "main", "serve"]
