"""deploy/nginx.conf, the shipped file, run by a real nginx (a child process with its own prefix
under tmp_path) with a certificate made for the test, in front of a real `meshrt serve`:
sessions through it work and are billed, no key reaches any of its logs (upstream down
included), the operational endpoints are served on the internal listener only, and plain ws://
is refused with meshrt's `tls_required`.

nginx is Debian's (`apt-get install nginx`, as scripts/test.sh does); the module is skipped only
where there is none."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import _stop
from conftest import ended_record
from conftest import start_gateway
from conftest import wait_for
from realtime_client import connect_ws
from realtime_client import expect_refusal
from realtime_client import recv_until
from realtime_client import run

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "deploy" / "nginx.conf"
ADMIN = "admin-" + "n" * 30
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)

pytestmark = pytest.mark.skipif(NGINX is None, reason="no nginx (apt-get install nginx; scripts/test.sh does)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Edge:
    proc: subprocess.Popen | None
    prefix: Path
    conf: Path
    tls_port: int
    plain_port: int
    internal_port: int
    ca: object  # trustme.CA

    def client_ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def logs(self) -> dict[str, str]:
        return {p.name: p.read_text(errors="replace") for p in sorted((self.prefix / "logs").glob("*.log"))}


def render(
    prefix: Path, upstream_ports: list[int], tls_port: int, plain_port: int, internal_port: int, cert, key
) -> str:
    """The shipped file with this host's ports (a node per upstream port), certificate and log
    directory: each replaced string must be there exactly once, so the file cannot drift away
    from what is tested."""
    text = SHIPPED.read_text()
    nodes = "\n    ".join(f"server 127.0.0.1:{port};" for port in upstream_ports)
    for old, new, count in [
        ("listen 443 ssl;", f"listen 127.0.0.1:{tls_port} ssl;", 1),
        ("listen 80;", f"listen 127.0.0.1:{plain_port};", 1),
        ("listen 127.0.0.1:8081;", f"listen 127.0.0.1:{internal_port};", 1),
        ("server 127.0.0.1:8080;", nodes, 1),
        ("/etc/ssl/certs/realtime.example.com.pem", str(cert), 1),
        ("/etc/ssl/private/realtime.example.com.key", str(key), 1),
        ("/var/log/nginx/", f"{prefix}/logs/", 6),
    ]:
        assert text.count(old) == count, f"deploy/nginx.conf: expected {old!r} {count} time(s)"
        text = text.replace(old, new)
    return text


def main_conf(prefix: Path, site: Path) -> str:
    """What Debian's /etc/nginx/nginx.conf gives an http-context file in conf.d/, including a
    default access log in the `combined` format (with the request line): a server of the
    shipped file that forgot its own access_log would write keys there, and fail this test."""
    user = f"user {pwd.getpwuid(os.getuid()).pw_name};\n" if os.geteuid() == 0 else ""
    temp = prefix / "temp"
    return f"""{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/main.error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/logs/default.access.log;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {site};
}}
"""


def nginx_t(conf: Path, prefix: Path) -> subprocess.CompletedProcess:
    return subprocess.run([NGINX, "-t", "-p", str(prefix), "-c", str(conf)], capture_output=True, text=True, timeout=30)


def start_edge(tmp: Path, upstream_port: int | list[int]) -> Edge:
    import trustme

    prefix = tmp / "nginx"
    for sub in ("logs", "temp", "conf"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = prefix / "conf" / "edge.pem", prefix / "conf" / "edge.key"
    leaf.cert_chain_pems[0].write_to_path(cert)
    for extra in leaf.cert_chain_pems[1:]:
        extra.write_to_path(cert, append=True)
    leaf.private_key_pem.write_to_path(key)
    ports = free_port(), free_port(), free_port()
    site = prefix / "conf" / "meshrt.conf"
    upstream_ports = upstream_port if isinstance(upstream_port, list) else [upstream_port]
    site.write_text(render(prefix, upstream_ports, *ports, cert, key))
    conf = prefix / "conf" / "nginx.conf"
    conf.write_text(main_conf(prefix, site))
    checked = nginx_t(conf, prefix)
    assert checked.returncode == 0, checked.stderr
    proc = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=open(prefix / "logs" / "stderr.log", "ab"),
    )
    edge = Edge(proc, prefix, conf, *ports, ca)

    def listening():
        if proc.poll() is not None:
            raise AssertionError(f"nginx exited {proc.returncode}: {(prefix / 'logs' / 'stderr.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", edge.tls_port), 0.5).close()
            return True
        except OSError:
            return False

    wait_for(listening, 15, 0.05, "nginx listening")
    return edge


@pytest.fixture(scope="module")
def stack(tmp_path_factory, database_url, sim):
    """One gateway (no plain ws, admin API on) behind one nginx, for the whole module; the last
    test stops the gateway."""
    tmp = tmp_path_factory.mktemp("edge")
    gw = start_gateway(tmp, database_url, sim.url, MESHRT_ALLOW_PLAIN_WS="0", MESHRT_ADMIN_TOKEN=ADMIN)
    edge = None
    try:
        edge = start_edge(tmp, gw.port)
        yield gw, edge
    finally:
        if edge is not None:
            _stop(edge.proc, signal.SIGTERM, 10)
        _stop(gw.proc)


def assert_no_key_in_logs(edge: Edge, *keys: str) -> dict[str, str]:
    logs = edge.logs()
    assert "meshrt.access.log" in logs and "meshrt.error.log" in logs, sorted(logs)
    for name, text in logs.items():
        for secret in (*keys, "api_key", "rsk_"):
            assert secret not in text, f"{name} holds {secret[:12]}…:\n{text[-2000:]}"
    return logs


# --- the file itself --------------------------------------------------------------------------


def test_shipped_file_passes_nginx_t_as_debian_includes_it(tmp_path):
    """`nginx -t` on the file as shipped (its own certificate paths made to exist), inside
    Debian's own /etc/nginx/nginx.conf when there is one; nginx 1.22 refused `http2 off;` and a
    `log_format` inside `server`."""
    import trustme

    leaf = trustme.CA().issue_cert("realtime.example.com")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    text = SHIPPED.read_text()
    text = text.replace("/etc/ssl/certs/realtime.example.com.pem", str(cert))
    text = text.replace("/etc/ssl/private/realtime.example.com.key", str(key))
    text = text.replace("/var/log/nginx/", f"{tmp_path}/")
    site = tmp_path / "meshrt.conf"
    site.write_text(text)
    debian = Path("/etc/nginx/nginx.conf")
    if debian.is_file():
        main = debian.read_text().replace("include /etc/nginx/conf.d/*.conf;", f"include {site};")
        main = main.replace("include /etc/nginx/sites-enabled/*;", "")
        main = main.replace("pid /run/nginx.pid;", f"pid {tmp_path}/nginx.pid;")
        main = main.replace("/var/log/nginx/", f"{tmp_path}/")  # writable without root
        assert f"include {site};" in main
    else:
        main = main_conf(tmp_path, site)
    (tmp_path / "temp").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(main)
    checked = nginx_t(conf, tmp_path)
    assert checked.returncode == 0 and "test is successful" in checked.stderr, checked.stderr
    assert "warn" not in checked.stderr.replace('nginx: [warn] the "user" directive', ""), checked.stderr


# --- through the edge -------------------------------------------------------------------------


def sdk_session(edge: Edge, key: str) -> tuple[list[str], int]:
    """One session through the edge with the official Python SDK (wss://, the test's CA): the
    model ids it listed over https, and its text response's total tokens."""
    from openai import AsyncOpenAI
    from openai import DefaultAsyncHttpxClient

    base = f"localhost:{edge.tls_port}/v1"

    async def go():
        client = AsyncOpenAI(
            api_key=key,
            base_url=f"https://{base}",
            websocket_base_url=f"wss://{base}",
            max_retries=0,
            http_client=DefaultAsyncHttpxClient(verify=edge.client_ssl()),
        )
        models = await client.models.list()
        async with client.realtime.connect(
            model="gpt-realtime", websocket_connection_options={"ssl": edge.client_ssl()}
        ) as conn:
            await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
            await conn.response.create()
            async for event in conn:
                if event.type == "response.done":
                    return [m.id for m in models.data], event.response.usage.total_tokens

    return run(go(), 30)


def test_wss_session_through_nginx_with_the_sdk_and_a_query_key_is_relayed_and_billed(stack, make_tenant, engine):
    gw, edge = stack
    tenant = make_tenant()

    async def query_key_session():
        async with connect_ws(
            f"wss://localhost:{edge.tls_port}/v1/realtime", key=tenant.key, how="query", ssl=edge.client_ssl()
        ) as ws:
            await ws.send(json.dumps({"type": "response.create"}))
            await recv_until(ws, "response.done")
            return ws.response.headers["x-request-id"]

    in_path = httpx.get(f"https://localhost:{edge.tls_port}/v1/realtime/{tenant.key}", verify=edge.client_ssl())
    assert in_path.status_code == 404  # a confused client's key in the path: logged as [redacted]
    model_ids, tokens = sdk_session(edge, tenant.key)
    assert "gpt-realtime" in model_ids and tokens > 0
    request_id = run(query_key_session(), 30)
    record = ended_record(engine, request_id)
    assert record.end_reason == "client_closed" and record.responses == 1 and record.cost_pico > 0
    assert record.client_addr == "127.0.0.1"  # the proxy: the peer meshrt saw
    logs = assert_no_key_in_logs(edge, tenant.key)
    access = logs["meshrt.access.log"]
    assert '"GET /v1/realtime" 101' in access and '"GET /v1/models" 200' in access, access
    assert '"GET [redacted]" 404' in access, access


DISGUISED = [
    "/%6detrics",
    "//metrics",
    "/v1/../metrics",
    "/v1/%2e%2e/metrics",
    "/v1/..%2fmetrics",
    "/v1/..%2Fadmin/v1/accounts",
    "/dashboard/../admin/v1/accounts",
    "/v1/./../readyz",
    "/v1%2f..%2fmetrics",
]


def raw_get(edge: Edge, path: str, *headers: str) -> tuple[int, bytes]:
    """One GET over TLS with the path exactly as given; (status, body)."""
    with socket.create_connection(("127.0.0.1", edge.tls_port), 5) as raw:
        with edge.client_ssl().wrap_socket(raw, server_hostname="localhost") as tls:
            head = [f"GET {path} HTTP/1.1", "Host: localhost", "Connection: close", *headers]
            tls.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_operational_endpoints_only_on_the_internal_listener(stack):
    gw, edge = stack
    public = httpx.Client(base_url=f"https://localhost:{edge.tls_port}", verify=edge.client_ssl(), timeout=10)
    internal = httpx.Client(base_url=f"http://127.0.0.1:{edge.internal_port}", timeout=10)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for path in ("/metrics", "/readyz", "/healthz", "/admin/v1/accounts", "/METRICS", "/metrics/"):
        refused = public.get(path, headers=admin)
        assert refused.status_code == 404, (path, refused.status_code, refused.text[:200])
        assert "meshrt_" not in refused.text and "accounts" not in refused.text
    for path in DISGUISED:  # sent as written: an HTTP client would resolve the dots itself
        status, body = raw_get(edge, path, f"Authorization: Bearer {ADMIN}")
        assert status in (400, 404) and b"meshrt_" not in body and b'"object"' not in body, (path, status, body[:300])
    assert public.get("/dashboard").status_code == 200
    metrics = internal.get("/metrics")
    assert metrics.status_code == 200 and "meshrt_" in metrics.text
    assert internal.get("/readyz").json() == {"status": "ready"}
    assert internal.get("/healthz").json() == {"status": "ok"}
    accounts = internal.get("/admin/v1/accounts", headers=admin)
    assert accounts.status_code == 200 and accounts.json()["object"] == "list"
    assert internal.get("/admin/v1/accounts").status_code == 401  # the token still applies
    assert internal.get("/v1/models").status_code == 404  # tenants' routes are not here


def test_plain_ws_is_refused_with_tls_required(stack, make_tenant):
    gw, edge = stack
    tenant = make_tenant()
    for how, headers in (("query", {}), ("authorization", {"X-Forwarded-Proto": "https"})):  # forged, overwritten
        event, code, _ = run(
            expect_refusal(f"ws://127.0.0.1:{edge.plain_port}/v1/realtime", key=tenant.key, how=how, headers=headers)
        )
        assert event["error"]["code"] == "tls_required" and code == 1008, event
    direct = run(expect_refusal(gw.ws_url, key=tenant.key, how="query"))  # past the edge: refused too
    assert direct[0]["error"]["code"] == "tls_required"
    plain_api = httpx.get(f"http://127.0.0.1:{edge.plain_port}/v1/models", headers={"Authorization": "Bearer x"})
    assert plain_api.status_code == 403 and plain_api.json()["error"]["code"] == "tls_required"
    redirect = httpx.get(f"http://127.0.0.1:{edge.plain_port}/dashboard")
    assert redirect.status_code == 301 and redirect.headers["location"].startswith("https://")
    assert_no_key_in_logs(edge, tenant.key)


def test_no_key_in_any_log_while_the_gateway_is_down(stack, make_tenant):
    """Last in the module: stops the gateway. nginx's error log would write
    `request: "GET /v1/realtime?api_key=rsk_…"` for every refused upstream connect."""
    gw, edge = stack
    tenant = make_tenant()
    _stop(gw.proc)
    ctx = edge.client_ssl()
    url = f"wss://localhost:{edge.tls_port}/v1/realtime"

    async def attempts():
        statuses = []
        for _ in range(3):
            try:
                async with connect_ws(url, key=tenant.key, how="query", ssl=ctx):
                    statuses.append(101)
            except Exception as exc:  # noqa: BLE001 - InvalidStatus: the edge's 502
                statuses.append(getattr(getattr(exc, "response", None), "status_code", repr(exc)))
        async with httpx.AsyncClient(verify=ctx) as client:
            got = await client.get(f"https://localhost:{edge.tls_port}/v1/models?api_key={tenant.key}")
            statuses.append(got.status_code)
        got = httpx.get(f"http://127.0.0.1:{edge.plain_port}/v1/realtime?api_key={tenant.key}")
        statuses.append(got.status_code)
        got = httpx.get(f"http://127.0.0.1:{edge.internal_port}/readyz")
        statuses.append(got.status_code)
        return statuses

    assert run(attempts(), 30) == [502, 502, 502, 502, 502, 502]
    time.sleep(0.2)  # nginx writes its logs as each request ends; give the last a moment
    logs = assert_no_key_in_logs(edge, tenant.key)
    assert logs["meshrt.access.log"].count('"GET /v1/realtime" 502') == 4, logs["meshrt.access.log"]
    assert "upstream=127.0.0.1:" in logs["meshrt.access.log"]
    assert "connect() failed" in logs["meshrt.internal.error.log"]  # the outage shows, keyless
