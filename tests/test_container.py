"""The image users get: deploy/Dockerfile, built by `scripts/build-image.sh --local-base` (a base
made from Debian's packages by debootstrap, since no image registry is reachable here), run by
a real Docker engine (Debian's docker.io; started here if none answers). One container, on the
host's network, serves a session to the simulator: it runs as uid 10001 under tini, its
HEALTHCHECK reports healthy, its supervisor is SIGKILLed mid-session and the keeper starts
another (the worker relays on and re-attaches), the record has every response, priced as the
simulator's frame log says, and `docker stop` drains and ends it with exit code 0."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import tomllib
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import OPERATOR_KEY
from conftest import ended_record
from conftest import wait_for
from realtime_client import connect_ws
from realtime_client import recv_json
from realtime_client import recv_until
from realtime_client import run
from simlog import expected_from
from simlog import same_usage
from simlog import sim_reports

from meshrt.shared.money import Money
from meshrt.storage import accounts
from meshrt.storage import db

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"meshrt:{VERSION}"
IMAGE_UID = 10001  # deploy/Dockerfile's user
pytestmark = pytest.mark.slow


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"docker {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


def engine_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def docker_engine(tmp_path_factory):
    """A Docker engine: the running one, or dockerd started for these tests (and stopped after)."""
    if shutil.which("docker") is None:
        pytest.fail("the container test needs Docker: apt-get install docker.io (scripts/test.sh does)")
    started = None
    if not engine_answers():
        dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
        if os.geteuid() != 0 or not os.path.exists(dockerd):
            pytest.fail(
                "no Docker engine answers and none can be started here: run dockerd (apt-get install docker.io)"
            )
        log = open(tmp_path_factory.mktemp("dockerd") / "dockerd.log", "wb")  # noqa: SIM115 - closed at teardown
        started = subprocess.Popen([dockerd], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(engine_answers, 60, 0.5, "dockerd to answer")
    yield
    if started is not None:
        started.terminate()
        started.wait(60)
        log.close()


@pytest.fixture(scope="module")
def image(docker_engine) -> str:
    """deploy/Dockerfile built as README and docs/operations.md say, on a base made here (the
    engine's cache makes a second build quick)."""
    env = {**os.environ, "BUILD_OPTS": "--network host"}
    done = subprocess.run(
        [str(ROOT / "scripts/build-image.sh"), "--local-base"], env=env, capture_output=True, text=True, timeout=1500
    )
    assert done.returncode == 0, f"build-image.sh failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return IMAGE


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def container_database(tmp_path: Path, database_url: str) -> tuple[str, list[str]]:
    """The database the container uses (the test's PostgreSQL, reached over the host's network;
    or a SQLite file in a directory shared with it, owned by the image's user), and the
    `docker run` arguments that share it."""
    if not database_url.startswith("sqlite"):
        return database_url, []
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, IMAGE_UID, IMAGE_UID)
    return f"sqlite:///{data}/meshrt.db", ["-v", f"{data}:{data}"]


def supervisor_of(container: str) -> psutil.Process:
    """The container's supervisor: tini (its pid 1) → the keeper → the supervisor."""
    init = psutil.Process(int(docker("inspect", "-f", "{{.State.Pid}}", container).stdout))
    (keeper,) = init.children()
    live = [c for c in keeper.children() if c.status() != psutil.STATUS_ZOMBIE]
    assert len(live) == 1, live
    return live[0]


def test_the_image_serves_survives_a_supervisor_kill_and_stops_cleanly(image, tmp_path, database_url, sim):
    url, share = container_database(tmp_path, database_url)
    engine = db.make_engine(url)
    db.create_schema(engine)
    account = accounts.create_account(engine, f"container-{secrets.token_hex(3)}", Money.from_usd("5"), None)
    key = accounts.create_key(engine, account.id, "container").plaintext
    if share:  # the schema and the tenant were written as root: the image's user takes the files over
        for path in Path(share[1].split(":")[0]).iterdir():
            os.chown(path, IMAGE_UID, IMAGE_UID)
    port, name, tag = free_port(), f"meshrt-test-{secrets.token_hex(4)}", f"container-{secrets.token_hex(3)}"
    settings = {
        "MESHRT_PORT": str(port),
        "MESHRT_DATABASE_URL": url,
        "MESHRT_UPSTREAM_URL": sim.url,
        "MESHRT_ALLOW_PLAIN_WS": "1",
        "OPENAI_API_KEY": OPERATOR_KEY,  # the simulator's
        "MESHRT_DRAIN_S": "20",
    }
    environment = [arg for k, v in settings.items() for arg in ("-e", f"{k}={v}")]
    docker("run", "-d", "--name", name, "--network", "host", "--stop-timeout", "40", *share, *environment, image)
    try:
        wait_for(lambda: _healthz(port), 60, 0.2, "the container's /healthz")
        assert docker("exec", name, "id", "-u").stdout.strip() == str(IMAGE_UID)
        assert docker("inspect", "-f", "{{.Config.User}}", name).stdout.strip() == f"{IMAGE_UID}:{IMAGE_UID}"
        first = supervisor_of(name)

        async def session():
            async with connect_ws(f"ws://127.0.0.1:{port}/v1/realtime", key=key, query=f"fault_tag={tag}") as ws:
                await recv_json(ws)
                await ws.send(json.dumps({"type": "response.create"}))
                await recv_until(ws, "response.done")
                first.kill()  # SIGKILL: the keeper starts another; the worker relays on alone
                first.wait(10)
                await ws.send(json.dumps({"type": "response.create"}))
                await recv_until(ws, "response.done")
                wait_for(lambda: "worker re-attached" in _logs(name), 30, 0.2, "the worker to re-attach")
                await ws.send(json.dumps({"type": "response.create"}))
                await recv_until(ws, "response.done")
                return ws.response.headers["x-request-id"]

        request_id = run(session(), 90)
        row = ended_record(engine, request_id, timeout=30)
        (payloads,) = sim_reports(sim)[tag]
        usage, cost, responses = expected_from(payloads, row.rates)
        assert (row.end_reason, row.responses, responses) == ("client_closed", 3, 3)
        assert row.cost_pico == cost > 0 and same_usage(row.usage, usage)
        assert supervisor_of(name).pid != first.pid
        # the HEALTHCHECK in the image: healthy once its first probe ran (interval 10 s)
        wait_for(
            lambda: docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip() == "healthy",
            40,
            0.5,
            "the image's HEALTHCHECK to report healthy",
        )
        docker("stop", name, timeout=90)  # SIGTERM to tini, to the keeper, to the supervisor: a drain
        state = json.loads(docker("inspect", "-f", "{{json .State}}", name).stdout)
        assert (state["Status"], state["ExitCode"], state["OOMKilled"]) == ("exited", 0, False), state
        assert "Traceback" not in _logs(name)
    finally:
        docker("rm", "-f", name, check=False)
        engine.dispose()


def _healthz(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _logs(container: str) -> str:
    done = docker("logs", container, check=False)
    return done.stdout + done.stderr
