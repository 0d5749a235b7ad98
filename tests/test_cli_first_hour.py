"""The first hour with the CLI (issue #14): every command works from a fresh directory, and every
failure a newcomer can cause — a database that is not there, a port in use — is one line on
stderr that says what to do, never a traceback. Each test runs the installed `meshrt` console
script in a fresh temporary directory, as a person would."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import PG_ENV
from sqlalchemy import create_engine
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from meshrt.storage import db

MESHRT = str(Path(sys.executable).parent / "meshrt")
ROOT = Path(__file__).resolve().parent.parent


def clean_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHRT_") and k != "OPENAI_API_KEY"}
    env.update(settings)
    return env


def meshrt(cwd: Path, *args: str, timeout: float = 60, **settings: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MESHRT, *args], cwd=cwd, env=clean_env(**settings), capture_output=True, text=True, timeout=timeout
    )


def assert_one_line(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """Exit `code`, and stderr is a single `meshrt: …` line containing every needle."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("meshrt: "), result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- PostgreSQL: a server to make databases on, or a skip ------------------------------------


def pg_server_url() -> str:
    """The maintenance database of the server the tests may use: MESHRT_TEST_DATABASE_URL's,
    else a local PostgreSQL as postgres."""
    base = os.environ.get(PG_ENV) or "postgresql://postgres@127.0.0.1:5432/postgres"
    return base.replace("postgresql://", "postgresql+psycopg://", 1).rsplit("/", 1)[0] + "/postgres"


@pytest.fixture
def pg_admin():
    engine = create_engine(pg_server_url(), isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        engine.dispose()
        pytest.skip(f"PostgreSQL unreachable at {db.display_url(pg_server_url())}: {exc.orig}")
    yield engine
    engine.dispose()


@pytest.fixture
def make_pg_database(pg_admin):
    """Empty databases on the server, each dropped after the test."""
    made: list[str] = []

    def make() -> str:
        name = f"meshrt_upgrade_{secrets.token_hex(4)}"
        with pg_admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return pg_server_url().rsplit("/", 1)[0] + f"/{name}"

    yield make
    with pg_admin.connect() as conn:
        for name in made:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# --- item 1: a fresh directory ---------------------------------------------------------------


def test_every_command_works_in_a_fresh_directory(tmp_path):
    upgraded = meshrt(tmp_path, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.startswith("schema created (") and ".meshrt/meshrt.db" in upgraded.stdout
    assert (tmp_path / ".meshrt").stat().st_mode & 0o777 == 0o700  # as `serve` makes it
    again = meshrt(tmp_path, "db", "upgrade")
    assert again.stdout.startswith("schema up to date at "), again.stdout

    account = json.loads(meshrt(tmp_path, "--json", "accounts", "create", "acme", "--balance", "5").stdout)
    key = meshrt(tmp_path, "keys", "create", account["id"])
    assert key.returncode == 0 and "rsk_" in key.stdout, key.stderr
    for command in (["accounts", "list"], ["keys", "list"], ["usage"], ["models"]):
        ran = meshrt(tmp_path, *command)
        assert ran.returncode == 0 and ran.stderr == "", (command, ran.stderr)


def test_a_state_dir_that_does_not_exist_yet_is_made(tmp_path):
    state = tmp_path / "not" / "yet" / "there"
    created = meshrt(tmp_path, "accounts", "create", "acme", MESHRT_STATE_DIR=str(state))
    assert created.returncode == 0, created.stderr
    assert created.stdout.split("\t")[1] == "acme" and (state / "meshrt.db").is_file()


def test_a_state_dir_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = meshrt(tmp_path, "db", "upgrade", MESHRT_STATE_DIR=str(blocker / "state"))
    assert_one_line(result, 1, "cannot create the state directory", "MESHRT_STATE_DIR")


# --- item 2: a database that is not there ----------------------------------------------------


def test_a_closed_postgresql_port_is_one_line(tmp_path):
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/meshrt"
    for command in (["db", "upgrade"], ["accounts", "list"]):
        result = meshrt(tmp_path, *command, MESHRT_DATABASE_URL=url)
        assert_one_line(result, 1, "nothing accepts connections at", url, "MESHRT_DATABASE_URL")


def test_a_sqlite_file_in_a_missing_directory_is_one_line(tmp_path):
    path = tmp_path / "missing" / "meshrt.db"
    result = meshrt(tmp_path, "accounts", "create", "acme", MESHRT_DATABASE_URL=f"sqlite:///{path}")
    assert_one_line(result, 1, f"cannot open the SQLite database {path}", "MESHRT_STATE_DIR")


def test_a_database_that_does_not_exist_is_one_line_naming_createdb(tmp_path, pg_admin):
    name = f"meshrt_missing_{secrets.token_hex(4)}"
    url = pg_server_url().replace("+psycopg", "").rsplit("/", 1)[0] + f"/{name}"
    result = meshrt(tmp_path, "db", "upgrade", MESHRT_DATABASE_URL=url)
    assert_one_line(result, 1, f"the database '{name}' does not exist", f"createdb {name}", "docs/postgresql.md")


def test_a_password_never_reaches_the_line(tmp_path):
    url = f"postgresql://meshrt:hunter2secret@127.0.0.1:{free_port()}/meshrt"
    line = assert_one_line(meshrt(tmp_path, "db", "upgrade", MESHRT_DATABASE_URL=url), 1)
    assert "hunter2secret" not in line and "meshrt:***@127.0.0.1" in line


# --- item 3: schema creation racing on an empty PostgreSQL database --------------------------


def test_concurrent_db_upgrades_on_an_empty_postgresql_database(tmp_path, make_pg_database):
    """Five `meshrt db upgrade` at once, on a fresh empty database, three times over: every one
    succeeds (no UniqueViolation on pg_type), exactly one created the schema, the rest found it
    up to date."""
    for _ in range(3):
        url = make_pg_database()
        with ThreadPoolExecutor(5) as pool:
            runs = [pool.submit(meshrt, tmp_path, "db", "upgrade", MESHRT_DATABASE_URL=url) for _ in range(5)]
            results = [run.result() for run in runs]
        for result in results:
            assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
        said = sorted(r.stdout.split(" at ")[0] for r in results)
        assert said[0].startswith("schema created (") and said[1:] == ["schema up to date"] * 4, said


def test_upgrade_adds_what_a_schema_lacks_and_says_so(tmp_path):
    state = tmp_path / "state"
    assert meshrt(tmp_path, "db", "upgrade", MESHRT_STATE_DIR=str(state)).returncode == 0
    engine = db.make_engine(f"sqlite:///{state / 'meshrt.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql('DROP INDEX "ix_realtime_session_account_state"')
        conn.exec_driver_sql('ALTER TABLE "realtime_session" DROP COLUMN "amended_at"')
    engine.dispose()
    result = meshrt(tmp_path, "db", "upgrade", MESHRT_STATE_DIR=str(state))
    assert result.stdout.startswith(
        "schema upgraded (added realtime_session.amended_at, index ix_realtime_session_account_state) at "
    ), result.stdout


# --- item 6: money as a person reads it ------------------------------------------------------


def test_negative_balances_read_minus_dollar(tmp_path):
    account = json.loads(meshrt(tmp_path, "--json", "accounts", "create", "acme").stdout)
    topped = meshrt(tmp_path, "accounts", "topup", account["id"], "-0.0001648")
    assert topped.stdout.strip() == f"{account['id']}\tbalance -$0.000165"
    listed = meshrt(tmp_path, "accounts", "list")
    assert listed.stdout.strip() == f"{account['id']}\tacme\t-$0.000165"
    exact = json.loads(meshrt(tmp_path, "--json", "accounts", "list").stdout)
    assert exact[0]["balance"] == "-0.0001648"  # data stays exact


# --- item 10: what a fresh checkout ignores --------------------------------------------------


@pytest.mark.parametrize("path", [".meshrt-dev/meshrt.db", ".meshrt/meshrt.db"])
def test_git_ignores_the_state_dirs(path):
    ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
    assert ignored.returncode == 0, f"{path} is not in .gitignore"


def test_a_reader_that_leaves_early_is_no_traceback(tmp_path):
    """`meshrt keys create ACCOUNT | head -n 1`: the reader is gone before meshrt prints."""
    account = json.loads(meshrt(tmp_path, "--json", "accounts", "create", "acme").stdout)
    proc = subprocess.Popen(
        [MESHRT, "keys", "create", account["id"]],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # as `head` does once it has its line
    assert proc.wait(60) == 141 and proc.stderr.read() == ""  # as a tool killed by SIGPIPE, quietly


def test_serve_on_a_port_another_process_holds_is_one_line_not_a_traceback(tmp_path):
    """`meshrt serve` waits a while for a port a dying predecessor may still hold, then says what
    is wrong in one line (exit 69, EX_UNAVAILABLE) instead of a supervisor's crash report."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = meshrt(
            tmp_path,
            "serve",
            "--port",
            str(port),
            timeout=90,
            OPENAI_API_KEY="sk-test",
            MESHRT_STATE_DIR=str(tmp_path / "state"),
            MESHRT_HOST="127.0.0.1",
        )
    assert result.returncode == 69, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    ours = [line for line in result.stderr.splitlines() if line.startswith("meshrt: ")]
    assert ours == [
        f"meshrt: cannot listen on 127.0.0.1:{port} (Address already in use): stop what holds it, or"
        " pick another port with --port P or MESHRT_PORT=P"
    ], result.stderr[-3000:]


def test_meshrt_sim_takes_every_flag_of_the_simulator(tmp_path):
    """`meshrt sim` is the simulator's own command line: its faults and WAN delay included."""
    proc = subprocess.Popen(
        [MESHRT, "sim", "--port", "0", "--fault", "slow_accept", "--handshake-delay-ms", "5"],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("meshrt sim listening on ws://127.0.0.1:"), line
    finally:
        proc.terminate()
        proc.wait(10)
    bad = meshrt(tmp_path, "sim", "--fault", "bogus")
    assert bad.returncode == 2 and "invalid choice: 'bogus'" in bad.stderr and "Traceback" not in bad.stderr
