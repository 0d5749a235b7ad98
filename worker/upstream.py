"""The upstream leg: connect to the Realtime API with the operator's key, with bounded retries.

The handshake goes through websockets' sans-I/O ClientProtocol, but only the response head is
fed to it: whatever upstream sent after its 101 (often `session.created`, in the same segment)
is returned untouched as `leftover`, because the relay forwards raw frames.
Errors: RetryableUpstream (unreachable, timeout, 429, 5xx) are retried; after the last attempt
they become `upstream_unavailable`. A definite rejection (401, 403, 404, bad accept key) is
`upstream_error` at once. Never retried: anything after the 101.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio
import sniffio
from tenacity import AsyncRetrying
from tenacity import retry_if_exception_type
from tenacity import stop_after_attempt
from tenacity import wait_exponential
from websockets.client import ClientProtocol
from websockets.http11 import Response
from websockets.uri import parse_uri

from meshrt.shared.errors import GatewayError

from .legs import Leg
from .legs import TlsLeg
from .legs import TlsTransportLeg
from .legs import TransportLeg
from .preconnect import Preconnected

MAX_RESPONSE_HEAD = 64 * 1024
FIRST_RETRY_WAIT_S = 0.1  # the backoff's first wait; it doubles, to 1 s at most


class RetryableUpstream(Exception):
    pass


class StalePreconnect(RetryableUpstream):
    """The connection opened ahead was closed or reset before any response: a fresh connect
    follows, not counted as an attempt."""


@dataclass
class UpstreamConnection:
    stream: Leg | TransportLeg
    leftover: bytes
    response: Response


def upstream_url(base: str, query: str, translation: bool = False) -> str:
    """`base` (MESHRT_UPSTREAM_URL, the realtime endpoint) with the client's query; a translation
    session's endpoint is `<base>/translations` (OpenAI's `/v1/realtime/translations`)."""
    if translation:
        head, mark, tail = base.partition("?")
        base = head.rstrip("/") + "/translations" + mark + tail
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}{query}" if query else base


async def _read_head(stream: Leg | TransportLeg) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_RESPONSE_HEAD:
            raise GatewayError("upstream_error", "oversized handshake response")
        try:
            data = await stream.receive()
        except OSError as exc:
            raise RetryableUpstream(f"connection closed during handshake: {exc!r}") from exc
        if not data:
            raise RetryableUpstream("connection closed during handshake")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _status(head: bytes) -> int:
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise GatewayError("upstream_error", "malformed handshake response") from None


async def _open_stream(url: str) -> Leg | TransportLeg:
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    if sniffio.current_async_library() == "asyncio":  # a uvloop transport, its TLS included
        try:
            return await TransportLeg.connect(parts.hostname, port, tls_context() if secure else None)
        except ssl.SSLCertVerificationError as exc:  # a definite rejection: retrying won't help
            raise GatewayError("upstream_error", "Upstream TLS certificate rejected.") from exc
        except OSError as exc:
            raise RetryableUpstream(f"cannot connect: {exc.strerror or exc!r}") from exc
    try:
        sock = await _connect_tcp(parts.hostname, port)
    except OSError as exc:
        raise RetryableUpstream(f"cannot connect: {exc.strerror or exc!r}") from exc
    if not secure:
        return Leg(sock)
    leg = TlsLeg(sock, tls_context(), parts.hostname)
    try:
        await leg.connect()
    except ssl.SSLCertVerificationError as exc:  # a definite rejection: retrying won't help
        leg.close()
        raise GatewayError("upstream_error", "Upstream TLS certificate rejected.") from exc
    except OSError as exc:
        leg.close()
        raise RetryableUpstream(f"TLS handshake failed: {exc!r}") from exc
    return leg


async def _adopt_stream(conn: Preconnected) -> Leg | TransportLeg:
    """The connection a pool worker opened ahead, as the leg `_open_stream` would have made."""
    try:
        if sniffio.current_async_library() == "asyncio":
            loop = asyncio.get_running_loop()
            if conn.tls is None:
                _, leg = await loop.connect_accepted_socket(TransportLeg, sock=conn.sock)
            else:
                factory = functools.partial(TlsTransportLeg, conn.tls, conn.incoming, conn.outgoing)
                _, leg = await loop.connect_accepted_socket(factory, sock=conn.sock)
            return leg
        if conn.tls is None:
            return Leg(conn.sock)
        return TlsLeg.adopt(conn.sock, conn.tls, conn.incoming, conn.outgoing)
    except OSError as exc:
        conn.close()
        raise StalePreconnect(f"pre-opened connection unusable: {exc!r}") from exc


async def _connect_tcp(host: str, port: int) -> socket.socket:
    """A non-blocking TCP connect to each resolved address in turn, with Nagle off."""
    try:  # an address literal needs no resolver (which would start a thread in the worker)
        ip = ipaddress.ip_address(host.strip("[]"))
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        infos = [(family, socket.SOCK_STREAM, 0, "", (str(ip), port))]
    except ValueError:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"{host} did not resolve")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            status = sock.connect_ex(address)
            if status not in (0, errno.EINPROGRESS):
                raise OSError(status, os.strerror(status))
            if status:
                await anyio.wait_writable(sock)
                status = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if status:
                    raise OSError(status, os.strerror(status))
            return sock
        except BaseException as exc:
            sock.close()
            if not isinstance(exc, OSError):
                raise
            error = exc
    raise error


def _upgrade_request(url: str, headers: list[tuple[str, str]], api_key: str) -> ClientProtocol:
    """websockets' client side of the handshake, its request ready in `data_to_send()`."""
    protocol = ClientProtocol(parse_uri(url), extensions=None)
    request = protocol.connect()
    for name, value in headers:
        request.headers[name] = value
    if api_key:
        request.headers["Authorization"] = f"Bearer {api_key}"
    protocol.send_request(request)
    return protocol


def send_upgrade_ahead(conn: Preconnected, url: str, headers: list[tuple[str, str]], api_key: str) -> bool:
    """Write the upgrade request on a pre-opened connection now, before the worker builds its
    meter and starts its event loop: upstream answers while the worker gets ready (the two
    overlap; `_attempt` then only reads the answer). False when the connection does not serve
    `url` or would not take the request at once (then nothing was sent, or it is closed as
    stale): the session connects as without it."""
    if not conn.serves(url):
        return False
    protocol = _upgrade_request(url, headers, api_key)
    data = b"".join(protocol.data_to_send())
    try:
        if conn.tls is not None:
            conn.tls.write(data)
            data = conn.outgoing.read()
        sent = conn.sock.send(data)  # non-blocking; a new connection's send buffer takes it whole
    except (OSError, ssl.SSLError):
        conn.close()  # reset or closed while it waited: stale, whatever was written
        return False
    if sent != len(data):
        conn.close()  # half a request went: this connection cannot carry another
        return False
    conn.upgrade = (url, protocol)
    return True


async def _attempt(
    url: str, headers: list[tuple[str, str]], api_key: str, preconnected: Preconnected | None = None
) -> UpstreamConnection:
    ahead = preconnected.upgrade if preconnected is not None else None
    if ahead is not None:
        protocol, request_bytes = ahead[1], b""  # written by send_upgrade_ahead
    else:
        protocol = _upgrade_request(url, headers, api_key)
        request_bytes = b"".join(protocol.data_to_send())
    stream = await (_adopt_stream(preconnected) if preconnected is not None else _open_stream(url))
    try:
        try:
            if request_bytes:
                await stream.send(request_bytes)
            head, leftover = await _read_head(stream)
        except (RetryableUpstream, OSError) as exc:  # closed or reset before any response
            if preconnected is None or isinstance(exc, StalePreconnect):
                raise
            raise StalePreconnect(f"pre-opened connection went stale: {exc!r}") from exc
        status = _status(head)
        if status == 429 or status >= 500:
            raise RetryableUpstream(f"upstream answered HTTP {status}")
        if status != 101:
            raise GatewayError("upstream_error", f"Upstream answered HTTP {status}.")
        protocol.receive_data(head)
        events = protocol.events_received()
        if protocol.handshake_exc is not None or not events:
            raise GatewayError("upstream_error", "Upstream handshake failed.")
        return UpstreamConnection(stream, leftover, events[0])
    except BaseException:
        stream.close()
        raise


async def connect_upstream(
    url: str,
    headers: list[tuple[str, str]],
    api_key: str,
    timeout_s: float,
    attempts: int,
    preconnected: Preconnected | None = None,
) -> UpstreamConnection:
    """Connect and complete the upstream handshake. Raises GatewayError on failure.
    `preconnected` (a pool worker's connection opened ahead, worker/preconnect.py) is tried first:
    stale, it gives way to a fresh connect uncounted; answered with a retryable status, that
    counts as the first attempt."""
    if preconnected is not None and not (
        preconnected.serves(url) and (preconnected.upgrade is None or preconnected.upgrade[0] == url)
    ):
        preconnected.close()
        preconnected = None
    if preconnected is not None:
        try:
            return await _attempt_with_deadline(url, headers, api_key, timeout_s, preconnected)
        except StalePreconnect:
            pass  # a fresh connect, with every attempt
        except RetryableUpstream as exc:
            if attempts <= 1:
                raise GatewayError("upstream_unavailable") from exc
            attempts -= 1
            await anyio.sleep(FIRST_RETRY_WAIT_S)
    retrying = AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=FIRST_RETRY_WAIT_S, max=1.0),
        retry=retry_if_exception_type(RetryableUpstream),
        sleep=anyio.sleep,
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                return await _attempt_with_deadline(url, headers, api_key, timeout_s)
    except RetryableUpstream as exc:
        raise GatewayError("upstream_unavailable") from exc
    raise AssertionError("unreachable")


async def _attempt_with_deadline(url, headers, api_key, timeout_s, preconnected=None) -> UpstreamConnection:
    try:
        with anyio.fail_after(timeout_s):
            return await _attempt(url, headers, api_key, preconnected)
    except TimeoutError as exc:
        raise RetryableUpstream(f"no handshake within {timeout_s} s") from exc


_TLS_CONTEXT: ssl.SSLContext | None = None


def tls_context() -> ssl.SSLContext:
    """Built once (loading CA certificates costs milliseconds), in the zygote before forking."""
    global _TLS_CONTEXT
    if _TLS_CONTEXT is None:
        _TLS_CONTEXT = ssl.create_default_context()
    return _TLS_CONTEXT
