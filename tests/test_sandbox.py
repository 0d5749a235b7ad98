"""The sandbox (shared/sandbox.py, docs/security.md): the escape suite and the live checks.

The escape suite forks a process that applies the worker's own sandbox functions, in the order
a worker does (`limit_worker` after the fork, `confine_worker` once the upstream is connected),
and tries each escape there. The tests run as root here; where root would bypass a layer (the
non-dumpable flag, rlimits), the attempt is made under uid `nobody` in a child of its own.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import socket
import time

import pytest
from conftest import OPERATOR_KEY
from conftest import ended_record
from conftest import wait_for
from realtime_client import connect_ws
from realtime_client import recv_json
from realtime_client import run
from sqlmodel import Session
from sqlmodel import select

from meshrt.shared import sandbox
from meshrt.shared.settings import SECRET_VARIABLES
from meshrt.storage.db import SessionRecord

NOBODY = 65534

pytestmark = pytest.mark.skipif(sandbox.seccomp_available() is not None, reason="no seccomp here")


def _in_child(attempt, *, sandboxed: bool = True, uid: int | None = None) -> tuple[str, int | None]:
    """Run `attempt()` in a forked child (as the worker is sandboxed, if `sandboxed`); return what
    it said (`ok: ...` or `OSError errno`) and the signal that killed it, if one did."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_end)
        code = 0
        try:
            if uid is not None:
                os.setgid(uid)
                os.setuid(uid)
            if sandboxed:
                sandbox.limit_worker("require", 60)
                sandbox.confine_worker("require")
            try:
                said = f"ok: {attempt()!r}"
            except OSError as exc:
                said = f"OSError {exc.errno}"
            except ValueError as exc:  # resource.setrlimit's EPERM
                said = f"ValueError {exc}"
            os.write(write_end, said.encode())
        except BaseException as exc:  # noqa: BLE001
            os.write(write_end, f"failed: {exc!r}".encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    said = b""
    while chunk := os.read(read_end, 4096):
        said += chunk
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    killed = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    return said.decode(), killed


EPERM = f"OSError {errno.EPERM}"


def _open(path) -> int:
    fd = os.open(str(path), os.O_RDONLY)
    os.close(fd)
    return fd


# --- the escape suite: each attempt fails as the filter says ------------------------------------


def test_a_sandboxed_worker_opens_no_file(tmp_path):
    database = tmp_path / "meshrt.db"
    database.write_bytes(b"SQLite format 3\x00")
    spool = tmp_path / "spool-other.jsonl"
    spool.write_text("{}\n")
    parent = os.getpid()
    for path in (database, spool, "/etc/passwd", f"/proc/{parent}/environ", f"/proc/{parent}/mem", "/proc/self/mem"):
        assert _in_child(lambda p=path: _open(p)) == (EPERM, None), path
    # creating one is refused too, and so is a lookup by path
    assert _in_child(lambda: os.open(str(tmp_path / "new"), os.O_CREAT | os.O_WRONLY)) == (EPERM, None)
    assert _in_child(lambda: os.stat("/etc/passwd")) == (EPERM, None)
    assert not (tmp_path / "new").exists()


def test_a_sandboxed_worker_reaches_no_network_and_no_stream_socket(tmp_path):
    assert _in_child(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)) == (EPERM, None)
    assert _in_child(lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM)) == (EPERM, None)
    assert _in_child(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) == (EPERM, None)

    def postgres():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.connect(("127.0.0.1", 5432))

    assert _in_child(postgres) == (EPERM, None)
    # a unix stream listener (PostgreSQL's own socket is one): no stream socket can be made, and
    # the one kind allowed (SOCK_SEQPACKET, to re-attach) cannot connect to it
    path = str(tmp_path / "stream.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    try:
        assert _in_child(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) == (EPERM, None)
        assert _in_child(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)) == (EPERM, None)
        assert _in_child(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET).connect(path)) == (
            f"OSError {errno.EPROTOTYPE}",
            None,
        )
    finally:
        listener.close()


def test_a_sandboxed_worker_can_still_reach_a_seqpacket_control_socket(tmp_path):
    """What re-attaching to a restarted supervisor needs (docs/security.md states the choice)."""
    path = str(tmp_path / "control.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)
    try:

        def reattach():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(path)
            return s.send(b"reattach")

        assert _in_child(reattach) == ("ok: 8", None)
        conn, _ = listener.accept()
        assert conn.recv(100) == b"reattach"
        conn.close()
    finally:
        listener.close()


def test_a_sandboxed_worker_cannot_exec_fork_or_trace():
    assert _in_child(lambda: os.execv("/bin/sh", ["sh", "-c", "true"])) == ("", signal.SIGSYS)
    assert _in_child(os.fork) == ("", signal.SIGSYS)
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()
    PTRACE_ATTACH = 16
    assert _in_child(lambda: libc.ptrace(PTRACE_ATTACH, parent, 0, 0)) == ("", signal.SIGSYS)

    def read_parent_memory():
        class IoVec(ctypes.Structure):
            _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

        buf = ctypes.create_string_buffer(64)
        local = IoVec(ctypes.addressof(buf), 64)
        remote = IoVec(id(object()), 64)
        return libc.process_vm_readv(parent, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)

    assert _in_child(read_parent_memory) == ("", signal.SIGSYS)


def test_a_sandboxed_worker_signals_no_one_but_itself():
    parent = os.getpid()
    assert _in_child(lambda: os.kill(parent, 0)) == (EPERM, None)
    assert _in_child(lambda: os.kill(parent, signal.SIGTERM)) == (EPERM, None)
    assert _in_child(lambda: os.kill(0, signal.SIGTERM)) == (EPERM, None)  # its process group
    assert _in_child(lambda: os.kill(-1, signal.SIGTERM)) == (EPERM, None)  # everyone
    assert _in_child(lambda: os.kill(os.getpid(), 0)) == ("ok: None", None)


def test_a_sandboxed_worker_cannot_raise_its_limits():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def raise_nofile():
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft + 1, hard + 1))

    refused = "ValueError not allowed to raise maximum limit"  # setrlimit's EPERM, as Python words it
    assert _in_child(raise_nofile) == (refused, None)
    assert _in_child(lambda: resource.setrlimit(resource.RLIMIT_CPU, (1, 1))) == (refused, None)  # even lowering

    # what `limit_worker` set, before the filter: hard limits equal soft ones, no core, CPU capped
    def limits():
        sandbox.limit_worker("require", 60)
        return [resource.getrlimit(r) for r in (resource.RLIMIT_CORE, resource.RLIMIT_CPU, resource.RLIMIT_NOFILE)]

    said, _ = _in_child(limits, sandboxed=False)
    core, cpu, nofile = eval(said.removeprefix("ok: "))  # noqa: S307 - our own child's repr of tuples
    assert core == (0, 0) and cpu == (60 + sandbox.CPU_MARGIN_S,) * 2 and nofile[0] == nofile[1]

    # without the filter, only root could raise a hard limit back: as nobody, the rlimits alone
    # already refuse it (as root, the filter is what refuses it: above)
    def as_nobody_raise():
        sandbox.limit_worker("require", 60)
        resource.setrlimit(resource.RLIMIT_CPU, (10**6, 10**6))

    assert _in_child(lambda: resource.getrlimit(resource.RLIMIT_NOFILE))[0] == f"ok: {(soft, hard)!r}"
    if os.getuid() == 0:
        assert _in_child(as_nobody_raise, sandboxed=False, uid=NOBODY) == (refused, None)


def test_a_sandboxed_worker_still_relays_and_runs_threads():
    """What the relay needs keeps working: its fds, epoll, time, threads (not processes)."""

    def relay():
        import selectors
        import threading

        a, b = socket.socketpair()
        a.setblocking(False)
        sel = selectors.EpollSelector()
        sel.register(b, selectors.EVENT_READ)
        a.send(b"frame")
        assert sel.select(1)
        data = b.recv(10)
        seen = []
        t = threading.Thread(target=lambda: seen.append(time.monotonic()))
        t.start()
        t.join()
        os.fstat(a.fileno())
        return data, len(seen)

    assert _in_child(relay) == ("ok: (b'frame', 1)", None)


def test_a_filter_built_ahead_confines_as_one_built_at_once(tmp_path):
    """An idle pool worker builds its filter ahead (`prepare_worker`); its session then only
    loads it: the same escapes fail."""
    (tmp_path / "db").write_text("secret")

    def prepared_then(attempt):
        def run_it():
            sandbox.limit_worker("require", 60)
            sandbox.prepare_worker()
            began = time.perf_counter()
            assert sandbox.confine_worker("require") == ["seccomp"]
            return attempt(), time.perf_counter() - began

        return run_it

    said, _ = _in_child(prepared_then(lambda: _open(tmp_path / "db")), sandboxed=False)
    assert said == EPERM, said
    said, killed = _in_child(prepared_then(lambda: os.fork()), sandboxed=False)
    assert killed == signal.SIGSYS, (said, killed)
    said, _ = _in_child(prepared_then(lambda: os.getpid()), sandboxed=False)  # an allowed call: it runs on
    assert said.startswith("ok: ("), said
    print(f"a prepared filter loaded in {float(said.rsplit(', ', 1)[1].rstrip(')')) * 1e6:.0f} µs")


def test_a_worker_given_the_zygotes_base_filter_is_confined_as_by_one_built_at_once(tmp_path, monkeypatch):
    """The zygote builds the filter's common rules once (`build_base_filter`); a worker adds the
    rules that name its pid to its copy: the same escapes fail, and its own signals still work."""
    (tmp_path / "db").write_text("secret")
    monkeypatch.setattr(sandbox, "_base", None)
    sandbox.build_base_filter()  # as the zygote does, before any fork
    base = sandbox._base
    parent = os.getpid()
    assert _in_child(lambda: _open(tmp_path / "db")) == (EPERM, None)
    assert _in_child(lambda: os.kill(parent, 0)) == (EPERM, None)
    assert _in_child(lambda: os.kill(0, signal.SIGTERM)) == (EPERM, None)
    assert _in_child(lambda: os.kill(os.getpid(), 0)) == ("ok: None", None)
    said, killed = _in_child(lambda: os.fork())
    assert killed == signal.SIGSYS, (said, killed)
    assert _in_child(lambda: sandbox._base is None) == ("ok: True", None)  # the child's copy was taken
    assert sandbox._base is base  # the zygote's own base is never taken
    assert sandbox.build_filter() is not base[1]
    assert sandbox._base is base


def test_the_filter_is_what_the_status_shows():
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        sandbox.limit_worker("require", 60)
        sandbox.confine_worker("require")
        os.read(read_end, 1)
        os._exit(0)
    try:
        wait_for(lambda: sandbox.status(pid).get("Seccomp") == "2", 5, 0.01, "the filter")
        assert sandbox.status(pid) == {"NoNewPrivs": "1", "Seccomp": "2"}
    finally:
        os.write(write_end, b"x")
        os.waitpid(pid, 0)


def test_off_installs_nothing():
    assert _in_child(lambda: (sandbox.limit_worker("off", 60), sandbox.confine_worker("off")), sandboxed=False) == (
        "ok: ([], [])",
        None,
    )


# --- non-dumpable: same-uid processes cannot read memory or environ -----------------------------


def _victim(dumpable: bool) -> tuple[int, int]:
    """A child running as nobody, dumpable or not, that waits; returns (pid, its wake-up fd)."""
    read_end, write_end = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        if dumpable:  # a change of uid made it non-dumpable already (fs.suid_dumpable)
            sandbox._prctl(sandbox.PR_SET_DUMPABLE, 1)
        else:
            sandbox.harden_process("require")
        os.write(ready_w, b"r")
        os.read(read_end, 1)
        os._exit(0)
    os.read(ready_r, 1)
    os.close(ready_r)
    os.close(ready_w)
    return pid, write_end


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make two processes of another uid")
def test_a_nondumpable_process_is_unreadable_to_its_own_uid():
    """As nobody, one process reads another nobody process's environ and mem only while that one
    is dumpable. (Root still can: CAP_SYS_PTRACE. These tests run as root, hence the uid.)"""
    for dumpable, expected in ((True, ("ok",)), (False, (f"OSError {errno.EACCES}", EPERM))):
        pid, wake = _victim(dumpable)
        try:
            for name in ("environ", "mem"):
                said, killed = _in_child(lambda n=name, p=pid: _open(f"/proc/{p}/{n}"), sandboxed=False, uid=NOBODY)
                assert said.startswith(expected) and killed is None, (dumpable, name, said)
        finally:
            os.write(wake, b"x")
            os.waitpid(pid, 0)


def test_forgetting_a_secret_wipes_the_environment_block(tmp_path):
    """What /proc/<pid>/environ shows (the block the process started with) loses the value too,
    so even root reading it finds nothing; os.environ loses the name."""
    import subprocess
    import sys

    code = (
        "import os, sys; from meshrt.shared import sandbox; "
        "sandbox.harden_process('require', ('OPENAI_API_KEY', 'MESHRT_ADMIN_TOKEN')); "
        "print('OPENAI_API_KEY' in os.environ, 'MESHRT_ADMIN_TOKEN' in os.environ, flush=True); sys.stdin.read()"
    )
    env = dict(os.environ, OPENAI_API_KEY="sk-wipe-me-123", MESHRT_ADMIN_TOKEN="admin-wipe-me")
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().split() == ["False", "False"]
        block = open(f"/proc/{proc.pid}/environ", "rb").read()
        assert b"sk-wipe-me-123" not in block and b"admin-wipe-me" not in block
        assert b"PATH=" in block  # the rest is left alone
    finally:
        proc.communicate("")


# --- live: a gateway's processes --------------------------------------------------------------


def _live_worker_pid(engine, request_id: str) -> int | None:
    with Session(engine) as db:
        row = db.exec(select(SessionRecord).where(SessionRecord.request_id == request_id)).first()
        return row.pid if row is not None and row.state == "live" else None


@pytest.mark.parametrize("backend", ["uvloop", "asyncio", "trio"])
def test_a_live_worker_is_confined(gateway_factory, backend, tenant, engine):
    """On each backend: the session's worker runs with NoNewPrivs 1 and Seccomp 2 (filter),
    relays a response under it, and the node's start-up line names the layers."""
    gateway = gateway_factory(MESHRT_WORKER_BACKEND=backend)

    async def go():
        async with connect_ws(gateway.ws_url, key=tenant.key) as ws:
            await recv_json(ws)
            request_id = ws.response.headers["x-request-id"]
            pid = wait_for(lambda: _live_worker_pid(engine, request_id), 10, 0.05, "the worker")
            wait_for(lambda: sandbox.status(pid).get("Seccomp") == "2", 5, 0.02, "the worker's filter")
            await ws.send('{"type": "response.create"}')
            while (await recv_json(ws))["type"] != "response.done":
                pass
            return sandbox.status(pid), request_id

    status, request_id = run(go())
    assert status == {"NoNewPrivs": "1", "Seccomp": "2"}
    zygote = next(c for c in gateway.children() if "meshrt.worker.zygote" in " ".join(c.cmdline()))
    assert sandbox.status(zygote.pid) == {"NoNewPrivs": "1", "Seccomp": "2"}  # its io_uring filter
    assert ended_record(engine, request_id).end_reason == "client_closed"
    assert ended_record(engine, request_id).cost_pico > 0
    log = gateway.log_text()
    layers = "workers: own_uid, nondumpable, no_new_privs, rlimits, seccomp"  # the suite runs as root
    assert f"sandbox: on; processes: nondumpable, secrets; {layers}" in log
    assert "NOT active" not in log


def test_the_front_door_and_the_supervisor_hold_no_secret_in_their_environment(gateway_factory):
    gw = gateway_factory(MESHRT_ADMIN_TOKEN="admin-secret-token")
    for pid in (gw.proc.pid, gw.frontdoor_pid()):
        block = open(f"/proc/{pid}/environ", "rb").read()
        assert OPERATOR_KEY.encode() not in block and b"admin-secret-token" not in block, pid
        assert str(gw.env["MESHRT_DATABASE_URL"]).encode() not in block, pid


def test_sandbox_off_is_said_and_installs_nothing(gateway_factory, tenant, engine):
    gw = gateway_factory(MESHRT_SANDBOX="off")

    async def go():
        async with connect_ws(gw.ws_url, key=tenant.key) as ws:
            await recv_json(ws)
            request_id = ws.response.headers["x-request-id"]
            pid = wait_for(lambda: _live_worker_pid(engine, request_id), 10, 0.05, "the worker")
            return sandbox.status(pid)

    assert run(go()) == {"NoNewPrivs": "0", "Seccomp": "0"}
    assert "sandbox: off" in gw.log_text()


def test_a_worker_killed_by_its_filter_ends_its_session_billed_and_counted(gateway, tenant, engine):
    """A violation (SIGSYS from the filter; sent here by hand, as the kernel would) kills only
    that worker: its session ends internal_error from its spool, and the node logs it."""

    async def go():
        async with connect_ws(gateway.ws_url, key=tenant.key) as ws:
            await recv_json(ws)
            request_id = ws.response.headers["x-request-id"]
            pid = wait_for(lambda: _live_worker_pid(engine, request_id), 10, 0.05, "the worker")
            os.kill(pid, signal.SIGSYS)
            try:
                while True:
                    await ws.recv()
            except Exception:  # noqa: BLE001 - the connection ends with the worker
                pass
            return request_id

    request_id = run(go())
    assert ended_record(engine, request_id).end_reason == "internal_error"
    wait_for(lambda: "worker killed by its sandbox" in gateway.log_text(), 10, 0.05, "the violation's log line")


def test_every_secret_variable_is_forgotten_by_the_node():
    assert set(SECRET_VARIABLES) == {"OPENAI_API_KEY", "MESHRT_ADMIN_TOKEN", "MESHRT_DATABASE_URL"}


# --- MESHRT_SANDBOX: the start-up decision ------------------------------------------------------


def _start_up(mode: str, seccomp_missing: bool) -> str:
    """`sandbox_start` in a child (it hardens the process that calls it): its answer and log."""
    import io
    import logging

    from meshrt.shared.settings import Settings
    from meshrt.supervisor import supervisor

    def attempt():
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        logging.getLogger("meshrt").addHandler(handler)
        logging.getLogger("meshrt").setLevel(logging.INFO)
        if seccomp_missing:
            sandbox.seccomp_available = lambda: "pyseccomp unavailable: test"
        return supervisor.sandbox_start(Settings(sandbox=mode)), stream.getvalue()

    said, killed = _in_child(attempt, sandboxed=False)
    assert killed is None and said.startswith("ok: "), said
    return said


def test_require_refuses_to_start_when_a_layer_cannot_be_installed():
    said = _start_up("require", seccomp_missing=True)
    assert said.startswith("ok: (False,") and "seccomp NOT active: pyseccomp unavailable: test" in said
    assert "refusing to start" in said


def test_on_starts_without_a_layer_it_cannot_install_and_says_so():
    said = _start_up("on", seccomp_missing=True)
    assert said.startswith("ok: (True,") and "seccomp NOT active: pyseccomp unavailable: test" in said
    said = _start_up("require", seccomp_missing=False)
    assert said.startswith("ok: (True,") and "NOT active" not in said
    own_uid = "own_uid, " if os.geteuid() == 0 else ""  # a root node runs workers under their own uids
    assert f"workers: {own_uid}nondumpable, no_new_privs, rlimits, seccomp" in said


def test_a_worker_under_require_without_its_filter_ends_its_session():
    def attempt():
        sandbox.seccomp_available = lambda: "missing"
        sandbox.build_filter = lambda: (_ for _ in ()).throw(OSError("no libseccomp"))
        return sandbox.confine_worker("require")

    said, _ = _in_child(attempt, sandboxed=False)
    assert said == EPERM  # SandboxError (an OSError, EPERM): the session ends internal_error

    def attempt_on():
        sandbox.build_filter = lambda: (_ for _ in ()).throw(OSError("no libseccomp"))
        return sandbox.confine_worker("on")

    assert _in_child(attempt_on, sandboxed=False) == ("ok: []", None)


def test_file_size_is_capped_unless_stderr_is_a_file(tmp_path):
    """The spool is the only file a worker writes: capped at 1 GiB. Not when stderr is a regular
    file, where a log grown past the cap would kill each worker at its next log line."""

    def fsize(to_file: bool):
        def attempt():
            target = os.open(str(tmp_path / "err.log") if to_file else "/dev/null", os.O_WRONLY | os.O_CREAT)
            os.dup2(target, 2)
            sandbox.limit_worker("require", 60)
            return resource.getrlimit(resource.RLIMIT_FSIZE)[0]

        return _in_child(attempt, sandboxed=False)

    assert fsize(False) == (f"ok: {sandbox.WORKER_MAX_FILE_BYTES}", None)
    assert fsize(True) == (f"ok: {resource.getrlimit(resource.RLIMIT_FSIZE)[0]}", None)


# --- workers under uids of their own (the node runs as root: MESHRT_WORKER_UIDS) ---------------


def _ids(pid: int) -> dict[str, list[str]]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.split() for k, _, v in (line.partition(":") for line in f) if k in ("Uid", "Gid", "Groups")}


def test_each_live_worker_runs_under_a_uid_of_its_own(gateway_factory, tenant, engine):
    """Two sessions at once: two workers, two uids of the range (real, effective, saved and fs
    uid and gid alike), no supplementary group; both relay and bill; and a worker under its uid
    can neither signal the other nor open the node's state."""
    assert os.geteuid() == 0, "the suite runs as root (CI and this machine kind do)"
    gw = gateway_factory(MESHRT_WORKER_UIDS="3000000000-3000000099")

    async def go():
        async with connect_ws(gw.ws_url, key=tenant.key) as a, connect_ws(gw.ws_url, key=tenant.key) as b:
            ids = []
            for ws in (a, b):
                await recv_json(ws)
                request_id = ws.response.headers["x-request-id"]
                pid = wait_for(lambda: _live_worker_pid(engine, request_id), 10, 0.05, "the worker")  # noqa: B023
                ids.append((pid, _ids(pid), request_id))
            for ws in (a, b):
                await ws.send('{"type": "response.create"}')
                while (await recv_json(ws))["type"] != "response.done":
                    pass
            # from a process under the first worker's uid (as its worker is): the other worker,
            # the supervisor, the state dir, the database, the path of the control socket
            uid, other = int(ids[0][1]["Uid"][0]), ids[1][0]
            attempts = {
                "kill the other worker": lambda: os.kill(other, 0),
                "the supervisor's environment": lambda: _open(f"/proc/{gw.proc.pid}/environ"),
                "the state dir": lambda: os.listdir(gw.state_dir),
                "the database": lambda: _open(gw.state_dir / "meshrt.db"),
                "a spool": lambda: os.listdir(gw.state_dir / "spool"),
                "the control socket's path": lambda: _connect_seqpacket(str(gw.state_dir / "run" / "control.sock")),
            }
            refused = {what: _in_child(attempt, sandboxed=False, uid=uid)[0] for what, attempt in attempts.items()}
            return ids, refused

    ids, refused = run(go())
    uids = []
    for _pid, status, _request_id in ids:
        uid = int(status["Uid"][0])
        assert status["Uid"] == [str(uid)] * 4 and status["Gid"] == [str(uid)] * 4, status
        assert status["Groups"] == [], status
        assert 3000000000 <= uid <= 3000000099
        uids.append(uid)
    assert len(set(uids)) == 2, uids
    for what, said in refused.items():
        assert said in (EPERM, f"OSError {errno.EACCES}"), (what, said)
    for _pid, _status, request_id in ids:
        row = ended_record(engine, request_id)
        assert row.end_reason == "client_closed" and row.cost_pico > 0
    assert "workers: own_uid, nondumpable" in gw.log_text()


def _connect_seqpacket(path: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(path)
    finally:
        sock.close()


def test_workers_keep_the_nodes_uid_when_told_to(gateway_factory, tenant, engine):
    gw = gateway_factory(MESHRT_WORKER_UIDS="off")

    async def go():
        async with connect_ws(gw.ws_url, key=tenant.key) as ws:
            await recv_json(ws)
            request_id = ws.response.headers["x-request-id"]
            pid = wait_for(lambda: _live_worker_pid(engine, request_id), 10, 0.05, "the worker")
            return _ids(pid)

    assert run(go())["Uid"] == [str(os.geteuid())] * 4
    assert "workers: nondumpable, no_new_privs" in gw.log_text()


def test_worker_uids_are_handed_out_once_each_and_reused_when_freed():
    book = sandbox.WorkerUids(100, 102)
    taken = [book.take() for _ in range(3)]
    assert taken == [100, 101, 102]
    for pid, uid in zip((1, 2, 3), taken, strict=True):
        book.hold(pid, uid)
    with pytest.raises(sandbox.SandboxError):
        book.take()  # every uid held by a live worker: none is shared
    book.free(2)
    assert book.take() == 101


@pytest.mark.parametrize(
    ("raw", "says"),
    [("100", "FIRST-LAST"), ("5-3", "0 < FIRST < LAST"), ("0-10", "0 < FIRST < LAST"), ("a-b", "expected auto")],
)
def test_bad_worker_uid_ranges_are_told(raw, says):
    from meshrt.shared.settings import SettingsError
    from meshrt.shared.settings import load_settings

    with pytest.raises(SettingsError) as refused:
        load_settings({"MESHRT_WORKER_UIDS": raw})
    assert "MESHRT_WORKER_UIDS" in str(refused.value) and says in str(refused.value)
    assert load_settings({"MESHRT_WORKER_UIDS": "10-20"}).worker_uid_range == (10, 20)
    assert load_settings({"MESHRT_WORKER_UIDS": "off"}).worker_uid_range is None
