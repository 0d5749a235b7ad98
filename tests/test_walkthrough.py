"""README.md's First run and docs/postgresql.md, run as written in a fresh directory: a command
there that fails makes this test fail.

The page's code blocks become one bash script (`set -euo pipefail`), run in an empty temporary
directory. What the walk changes, and why — nothing else:

- `python3 -m venv .venv` and `.venv/bin/pip install …` are not run: `.venv` is a symlink to the
  venv running these tests, which has meshrt (editable) and the `openai[realtime]` test extra
  installed; installing again would download for minutes. The test checks those lines are on
  the page and that the SDK imports.
- Ports 8080 and 8765 become free ports (`MESHRT_PORT` is set to the first, the default the page
  relies on), and the database `meshrt` a fresh one, dropped after: the walk runs beside other
  tests and never touches a database of anyone's.
- A command that keeps running (`meshrt dev`, `serve`, `sim`: what a reader starts in another
  terminal) runs in the background; the walk waits for its `listening on` line and goes on. At
  the end each gets SIGTERM and must exit 0.
- A file the page asks the reader to save is saved: a ```python block whose first line is
  `# <name>.py`; and `example.py`, the lines `meshrt dev` prints between its two markers.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from meshrt.dev.demo import EXAMPLE_END
from meshrt.dev.demo import EXAMPLE_START

ROOT = Path(__file__).resolve().parent.parent
LONG_RUNNING = re.compile(r"(^|\s)(\S*/)?meshrt (dev|serve|sim)\b")
INSTALLS = re.compile(r"^(python3 -m venv \.venv|\.venv/bin/pip install )")
DOC_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"  # the server docs/postgresql.md uses

WAIT_FOR_LISTENING = r"""
wait_listening() {  # a background command's stdout file, until it says where it listens
  for _ in $(seq 600); do
    grep -q 'listening on' "$1" && return 0
    sleep 0.1
  done
  echo "no 'listening on' in $1 after 60 s:" >&2; cat "$1" "${1%.out}.err" >&2; return 1
}
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def code_blocks(markdown: str) -> list[tuple[str, str]]:
    """(language, code) of each block: ``` fences with their language, 4-space indented blocks as sh."""
    blocks, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if fence:
            end = lines.index("```", i + 1)
            blocks.append((fence.group(1) or "sh", "\n".join(lines[i + 1 : end])))
            i = end + 1
        elif lines[i].startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            block = []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                block.append(lines[i][4:])
                i += 1
            blocks.append(("sh", "\n".join(block).strip("\n")))
        else:
            i += 1
    return blocks


def section(markdown: str, title: str) -> str:
    return markdown.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def walk_script(blocks: list[tuple[str, str]], saves_example: bool) -> str:
    out = ["set -euo pipefail", WAIT_FOR_LISTENING, "set -x"]
    background = 0
    for language, code in blocks:
        if language == "python":
            name = re.fullmatch(r"# (\S+\.py)", code.splitlines()[0])
            assert name, f"a python block must start with '# <file>.py': {code.splitlines()[0]!r}"
            out += [f"cat > {name.group(1)} <<'MESHRT_WALK_EOF'", code, "MESHRT_WALK_EOF"]
            continue
        assert language == "sh", language
        for line in code.splitlines():
            if INSTALLS.match(line):
                out.append(f": not run, the test venv has it: {line!r}")
            elif LONG_RUNNING.search(line) and not line.lstrip().startswith("#"):
                background += 1
                log = f"background-{background}"
                out += [f"{line} > {log}.out 2> {log}.err &", "echo $! >> .walk-pids", f"wait_listening {log}.out"]
                if saves_example and " dev" in line:  # what README asks: save the printed example
                    out.append(f"sed -n '/^{EXAMPLE_START}$/,/^{EXAMPLE_END}$/p' {log}.out > example.py")
            else:
                out.append(line)
    out += [
        "set +x",
        "for pid in $(cat .walk-pids); do kill -TERM $pid; done",
        'for pid in $(cat .walk-pids); do wait $pid || { echo "background pid $pid exited $?" >&2; exit 1; }; done',
    ]
    return "\n".join(out) + "\n"


def walk(tmp_path: Path, page: str, blocks, substitutions: dict[str, str], **env: str) -> str:
    script = walk_script(blocks, saves_example="example.py" in page)
    for old, new in substitutions.items():
        script = script.replace(old, new)
    workdir = tmp_path / "fresh"
    workdir.mkdir()
    (workdir / ".venv").symlink_to(sys.prefix)
    (tmp_path / "walk.sh").write_text(script)
    unset = ("MESHRT_", "VIRTUAL_ENV", "OPENAI_API_KEY")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(unset)}
    proc = subprocess.Popen(
        ["bash", str(tmp_path / "walk.sh")],
        cwd=workdir,
        env={**clean, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # one group: whatever is left is killed at the end
    )
    try:
        output, _ = proc.communicate(timeout=240)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
    failed = f"the walk failed (exit {proc.returncode}); its script and output:\n{script}\n{output[-6000:]}"
    assert proc.returncode == 0, failed
    return output


def test_readme_first_run_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    first_run = section(readme, "First run")
    blocks = code_blocks(first_run)
    commands = "\n".join(code for _, code in blocks)
    # the install lines the walk does not run are there, and what they install is
    assert "python3 -m venv .venv && .venv/bin/pip install -e ." in commands
    assert '.venv/bin/pip install "openai[realtime]"' in commands
    subprocess.run([sys.executable, "-c", "import openai, websockets"], check=True)
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert required == ">=3.11" and "Python 3.11 or newer" in first_run

    port = str(free_port())
    output = walk(tmp_path, first_run, blocks, {"8080": port}, MESHRT_PORT=port)
    assert "session.created" in output and "response.done" in output, output[-3000:]
    assert re.search(r"total_tokens=[1-9]", output), output[-3000:]  # the example printed its usage


@pytest.fixture
def doc_database():
    """A fresh database name on the docs' server, dropped after; a skip if that server is down."""
    if shutil.which("createdb") is None:
        pytest.skip("createdb (PostgreSQL's client tools) is not installed")
    admin = create_engine(f"{DOC_SERVER}/postgres", isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL unreachable at 127.0.0.1:5432: {exc.orig}")
    name = f"meshrt_walk_{secrets.token_hex(4)}"
    yield name
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_postgresql_page_as_written(tmp_path, doc_database):
    page = (ROOT / "docs" / "postgresql.md").read_text()
    blocks = code_blocks(page)
    assert [language for language, _ in blocks].count("python") == 1
    port, sim_port = str(free_port()), str(free_port())
    substitutions = {
        "127.0.0.1:5432/meshrt": f"127.0.0.1:5432/{doc_database}",
        "-U postgres meshrt": f"-U postgres {doc_database}",
        "8080": port,
        "8765": sim_port,
    }
    output = walk(tmp_path, page, blocks, substitutions, MESHRT_PORT=port)
    assert f"schema created (6 tables) at postgresql://postgres@127.0.0.1:5432/{doc_database}" in output
    assert "usage: " in output and "total_tokens=" in output, output[-3000:]  # first_session.py's answer
    account = re.search(r"^account (acct_\w+), key rsk_\w+$", output, re.M)
    assert account, output[-3000:]
    assert re.search(r"^sess_\w+\tgpt-realtime\t.*\tclient_closed$", output, re.M), output[-3000:]  # meshrt usage
    assert f'"id":"{account.group(1)}"' in output  # /v1/account, through the key from step 5
