"""Sandboxing: what each meshrt process does to itself so that a compromised one reaches little.

Layers (docs/security.md says what each one stops and how to check it on a running node):

- `nondumpable` (every process): prctl(PR_SET_DUMPABLE, 0). No process of the same uid can read
  this one's memory (/proc/<pid>/mem, process_vm_readv), environment (/proc/<pid>/environ) or
  fds, nor ptrace it; its /proc/<pid> files belong to root. Root still can.
- `secrets` (supervisor, front door): the secret variables are wiped from the environment block
  the process was started with (what /proc/<pid>/environ shows, even to root) and removed from
  `os.environ` once the settings are read.
- `own_uid` (workers, when the node runs as root): each worker runs under a uid and gid of its
  own from MESHRT_WORKER_UIDS, with no other group: it cannot signal, trace or read another
  process, nor open the node's files (the state dir is 0700: the database, the spools).
- `no_new_privs` (workers): prctl(PR_SET_NO_NEW_PRIVS, 1): no execve can gain privileges.
- `rlimits` (workers): no core files, CPU time capped, file size capped, hard limits equal to
  soft ones (a non-root worker cannot raise them; seccomp forbids setrlimit for all).
- `seccomp` (workers, once the upstream is connected): a syscall allow-list (libseccomp via
  pyseccomp). Whatever is not listed fails with EPERM (open, socket(AF_INET), kill of another
  process, setrlimit, ...); execve, fork, ptrace and process_vm_* kill the worker (SIGSYS).

MESHRT_SANDBOX chooses: `off` (none), `on` (each layer that can be installed; one that cannot is
logged), `require` (the node refuses to start, and a worker its session, if a layer cannot be
installed).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import resource
import signal
import socket
import stat

log = logging.getLogger("meshrt.sandbox")

MODES = ("off", "on", "require")
PROCESS_LAYERS = ("nondumpable", "secrets")
WORKER_LAYERS = ("nondumpable", "no_new_privs", "rlimits", "seccomp")

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39

WORKER_MAX_FILE_BYTES = 1 << 30  # the spool is the only file a worker writes: far below this
CPU_MARGIN_S = 60  # beyond the session's longest life: a worker cannot use more CPU than that

VIOLATION_SIGNAL = signal.SIGSYS  # how a worker killed by its seccomp filter dies


class SandboxError(OSError):
    """A layer could not be installed (MESHRT_SANDBOX=require makes this fatal)."""


_libc = None


def _prctl(option: int, arg: int = 0) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(_libc, "prctl"):  # not Linux: no layer but `secrets` can be installed
        raise SandboxError(errno.ENOSYS, "prctl: not available on this system")
    result = _libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if result < 0:
        err = ctypes.get_errno()
        raise SandboxError(err, f"prctl({option}): {os.strerror(err)}")
    return result


def set_nondumpable() -> None:
    _prctl(PR_SET_DUMPABLE, 0)


def is_dumpable() -> bool:
    return bool(_prctl(PR_GET_DUMPABLE))


def set_no_new_privs() -> None:
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def forget_secrets(names) -> list[str]:
    """Wipe `names` from this process's environment: their values are overwritten in place in
    the C environment (the block /proc/<pid>/environ shows, even to root), then unset. Returns
    the names that were present."""
    forgotten = []
    libc = ctypes.CDLL(None)
    environ = ctypes.POINTER(ctypes.c_void_p).in_dll(libc, "environ")
    prefixes = {name: (name + "=").encode() for name in names}
    i = 0
    while environ[i]:
        address = environ[i]
        entry = ctypes.string_at(address)
        for name, prefix in prefixes.items():
            if entry.startswith(prefix):
                ctypes.memset(address + len(prefix), 0, len(entry) - len(prefix))
                forgotten.append(name)
        i += 1
    for name in names:
        if os.environ.pop(name, None) is not None and name not in forgotten:
            forgotten.append(name)
    return forgotten


def harden_process(mode: str, secret_names=()) -> list[str]:
    """For the supervisor, the front door and the zygote: non-dumpable, secrets forgotten.
    Returns the layers installed; raises SandboxError under `require` if one fails."""
    if mode == "off":
        return []
    layers = []
    try:
        set_nondumpable()
        layers.append("nondumpable")
    except OSError as exc:
        _failed(mode, "nondumpable", exc)
    if secret_names:
        forget_secrets(secret_names)
        layers.append("secrets")
    return layers


def _failed(mode: str, layer: str, exc: BaseException) -> None:
    if mode == "require":
        raise SandboxError(errno.EPERM, f"sandbox layer {layer} cannot be installed: {exc}") from exc
    log.warning("sandbox layer not installed", extra={"fields": {"layer": layer, "error": str(exc)}})


# --- workers -----------------------------------------------------------------------------------


def limit_worker(mode: str, max_session_s: float) -> list[str]:
    """Right after the fork, before the session's bytes are read: non-dumpable (inherited from
    the zygote too), no_new_privs, rlimits. Returns the layers installed."""
    if mode == "off":
        return []
    layers = []
    for layer, install in (
        ("nondumpable", set_nondumpable),
        ("no_new_privs", set_no_new_privs),
        ("rlimits", lambda: _worker_rlimits(max_session_s)),
    ):
        try:
            install()
            layers.append(layer)
        except (OSError, ValueError) as exc:
            _failed(mode, layer, exc)
    return layers


def become_worker_user(uid: int) -> None:
    """In a new worker, before any session byte: drop root for a uid and gid of its own, with no
    other group. No other process runs under that uid, so the worker cannot signal, trace or read
    any of them, nor open the node's files (the state dir is 0700): it re-attaches through an
    abstract socket (supervisor.supervisor.reattach_address)."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid):  # pragma: no cover - the kernel said yes and did not
        raise SandboxError(errno.EPERM, f"still uid {os.getresuid()} after setresuid({uid})")


class WorkerUids:
    """The zygote's book of workers' uids (MESHRT_WORKER_UIDS, FIRST..LAST): each held by one
    live worker at a time, freed when the worker is reaped."""

    def __init__(self, first: int, last: int):
        self.first, self.last = first, last
        self.next = first
        self.held: dict[int, int] = {}  # pid -> uid

    def take(self) -> int:
        in_use = set(self.held.values())
        for _ in range(self.last - self.first + 1):
            uid, self.next = self.next, self.first if self.next >= self.last else self.next + 1
            if uid not in in_use:
                return uid
        raise SandboxError(errno.EAGAIN, "every worker uid of MESHRT_WORKER_UIDS is in use")

    def hold(self, pid: int, uid: int) -> None:
        self.held[pid] = uid

    def free(self, pid: int) -> None:
        self.held.pop(pid, None)


def _worker_rlimits(max_session_s: float) -> None:
    cpu = int(max_session_s) + CPU_MARGIN_S
    limits = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, cpu)]  # CPU soft: SIGXCPU; hard = soft
    if not _stderr_is_a_file():
        # the spool is the only file a worker writes. Not when stderr is a file (`2>>log`): a
        # log past the cap would kill every worker (SIGXFSZ) at its next log line
        limits.append((resource.RLIMIT_FSIZE, WORKER_MAX_FILE_BYTES))
    for limit, value in limits:
        soft, hard = resource.getrlimit(limit)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(limit, (value, value))
    # the rest: whatever hard limits the zygote had become the soft ones (none can be raised)
    for limit in (resource.RLIMIT_NOFILE, resource.RLIMIT_AS):
        soft, _hard = resource.getrlimit(limit)
        resource.setrlimit(limit, (soft, soft))


def _stderr_is_a_file() -> bool:
    try:
        return stat.S_ISREG(os.fstat(2).st_mode)
    except OSError:
        return False


def seccomp_available() -> str | None:
    """None if a seccomp filter can be built here, else why not."""
    try:
        import pyseccomp  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - missing binding or libseccomp
        return f"pyseccomp unavailable: {exc}"
    try:
        with open("/proc/self/status") as status:
            if "Seccomp:" not in status.read():
                return "the kernel has no seccomp"
    except OSError as exc:
        return f"cannot read /proc/self/status: {exc}"
    return None


# Syscalls a relaying worker makes once its upstream is connected (CPython, uvloop/asyncio,
# trio, OpenSSL), found by running the session tests under SCMP_ACT_LOG. Not listed: EPERM.
ALLOWED = (
    # bytes on fds it holds
    "read", "readv", "pread64", "write", "writev", "pwrite64",
    "recvfrom", "recvmsg", "recvmmsg", "sendto", "sendmsg", "sendmmsg", "shutdown",
    "close", "dup", "dup2", "dup3", "fcntl", "lseek", "fstat", "fsync", "fdatasync",
    "getsockopt", "setsockopt", "getsockname", "getpeername", "pipe2", "eventfd2",
    # waiting
    "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2",
    "poll", "ppoll", "select", "pselect6",
    "futex", "set_robust_list", "get_robust_list", "rseq", "sched_yield", "restart_syscall",
    "nanosleep", "clock_nanosleep",
    # memory
    "mmap", "munmap", "mprotect", "mremap", "brk", "madvise",
    # time, identity, randomness
    "clock_gettime", "clock_getres", "gettimeofday", "time", "getrandom", "getrusage", "times",
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getcwd",
    "sched_getaffinity", "sysinfo", "uname",
    # signals (its own), the end
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "rt_sigpending",
    "exit", "exit_group",
)  # fmt: skip
KILLED = ("execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev")

CLONE_THREAD = 0x00010000
SOCK_TYPE_MASK = 0xF
AT_EMPTY_PATH = 0x1000
FIONBIO, FIOCLEX, FIONCLEX, FIONREAD, TCGETS = 0x5421, 0x5451, 0x5450, 0x541B, 0x5401


def build_filter():
    """The worker's seccomp filter (not loaded). In a child of the process that ran
    `build_base_filter` (a worker of the zygote), the first call takes its copy of that base and
    adds the rules that name its own pid (~0.15 ms instead of ~1.7 ms of ctypes calls)."""
    global _base
    if _base is not None and _base[0] != os.getpid():
        f, _base = _base[1], None  # a copy takes its pid's rules once: a second call builds afresh
    else:
        f = _common_filter()
    _own_pid_rules(f, os.getpid())
    return f


def build_base_filter() -> None:
    """In the zygote, before any fork: every rule of the workers' filter but the two that name
    a worker's pid, built once; each worker inherits a copy of it (`build_filter`)."""
    global _base
    _base = (os.getpid(), _common_filter())


def _own_pid_rules(f, pid: int) -> None:
    import pyseccomp as sc

    # signals to itself only (kill(0) would reach its whole process group)
    f.add_rule(sc.ALLOW, "kill", sc.Arg(0, sc.EQ, pid))
    f.add_rule(sc.ALLOW, "tgkill", sc.Arg(0, sc.EQ, pid))


def _common_filter():
    """The worker's filter without the rules that name its pid."""
    import pyseccomp as sc

    f = sc.SyscallFilter(sc.ERRNO(errno.EPERM))
    f.set_attr(sc.Attr.CTL_TSYNC, 1)  # every thread (an executor's, from the connect) gets it
    f.set_attr(sc.Attr.CTL_NNP, 1)
    for name in ALLOWED:
        try:
            f.add_rule(sc.ALLOW, name)
        except (OSError, ValueError):
            pass  # not a syscall on this architecture
    for name in KILLED:
        try:
            f.add_rule(sc.KILL_PROCESS, name)
        except (OSError, ValueError):
            pass
    # threads only: clone without CLONE_THREAD would be a fork; clone3 hides its flags, so
    # glibc is told it does not exist and falls back to clone
    f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
    f.add_rule(sc.KILL_PROCESS, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    # fstat is newfstatat(fd, "", AT_EMPTY_PATH) in recent glibc: no path lookups
    f.add_rule(sc.ALLOW, "newfstatat", sc.Arg(3, sc.MASKED_EQ, AT_EMPTY_PATH, AT_EMPTY_PATH))
    f.add_rule(sc.ALLOW, "statx", sc.Arg(2, sc.MASKED_EQ, AT_EMPTY_PATH, AT_EMPTY_PATH))
    # its limits may be read (prlimit64 with no new limit), never set
    f.add_rule(sc.ALLOW, "prlimit64", sc.Arg(0, sc.EQ, 0), sc.Arg(2, sc.EQ, 0))
    f.add_rule(sc.ALLOW, "getrlimit")
    # re-attaching to a restarted supervisor: a unix SOCK_SEQPACKET socket only (connect cannot
    # be filtered by path; a seqpacket socket reaches no stream listener such as PostgreSQL's)
    f.add_rule(
        sc.ALLOW,
        "socket",
        sc.Arg(0, sc.EQ, socket.AF_UNIX),
        sc.Arg(1, sc.MASKED_EQ, SOCK_TYPE_MASK, socket.SOCK_SEQPACKET),
    )
    f.add_rule(sc.ALLOW, "connect")
    f.add_rule(sc.ALLOW, "socketpair", sc.Arg(0, sc.EQ, socket.AF_UNIX))  # reaches nothing outside
    # ioctl: non-blocking and close-on-exec flags, bytes pending, isatty; never TIOCSTI & co.
    for request in (FIONBIO, FIOCLEX, FIONCLEX, FIONREAD, TCGETS):
        f.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.EQ, request))
    return f


def refuse_io_uring(mode: str) -> list[str]:
    """In the zygote, before any event loop exists: io_uring_setup fails (ENOSYS), so libuv
    (uvloop) runs on epoll alone. An io_uring does its reads, opens and connects where no
    seccomp filter sees them, and libuv makes one per loop whatever UV_USE_IO_URING says; the
    workers' filter refuses io_uring_enter, so one made before it would abort the worker."""
    if mode == "off":
        return []
    try:
        import pyseccomp as sc

        set_no_new_privs()
        f = sc.SyscallFilter(sc.ALLOW)
        f.add_rule(sc.ERRNO(errno.ENOSYS), "io_uring_setup")
        f.load()
    except Exception as exc:  # noqa: BLE001
        _failed(mode, "seccomp", exc)
        return []
    return ["no_io_uring"]


_prepared: tuple[int, object] | None = None  # (pid, filter) built ahead by an idle pool worker
_base: tuple[int, object] | None = None  # (the zygote's pid, the filter's common rules): build_base_filter


def prepare_worker() -> None:
    """In an idle pool worker: build its filter now (~1.7 ms of ctypes calls), off the set-up
    path of the session it will be given. Loading it stays for `confine_worker` (~0.6 ms)."""
    global _prepared
    if seccomp_available() is None:
        _prepared = (os.getpid(), build_filter())


def confine_worker(mode: str) -> list[str]:
    """Once the upstream is connected: load the seccomp filter. Returns the layers installed;
    under `require` a failure raises SandboxError (the session ends internal_error)."""
    global _prepared
    if mode == "off":
        return []
    try:
        prepared, _prepared = _prepared, None
        f = prepared[1] if prepared is not None and prepared[0] == os.getpid() else build_filter()
        f.load()
    except Exception as exc:  # noqa: BLE001 - ImportError, OSError from libseccomp, ...
        _failed(mode, "seccomp", exc)
        return []
    return ["seccomp"]


def probe(mode: str, max_session_s: float = 60.0, uids: tuple[int, int] | None = None) -> dict[str, str | None]:
    """Which worker layers install on this host: each layer -> None (it does) or why not. Runs
    them in a forked child that exits at once, so nothing here is confined. `uids`: the range
    of MESHRT_WORKER_UIDS, whose first uid the child takes (`own_uid`)."""
    if mode == "off":
        return {}
    result: dict[str, str | None] = {}
    unavailable = seccomp_available()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_end)
        lines = []
        own_uid = [("own_uid", lambda: become_worker_user(uids[0]))] if uids else []
        for layer, install in (
            *own_uid,
            ("nondumpable", set_nondumpable),
            ("no_new_privs", set_no_new_privs),
            ("rlimits", lambda: _worker_rlimits(max_session_s)),
            ("seccomp", lambda: build_filter().load() if unavailable is None else None),
        ):
            try:
                install()
                lines.append(f"{layer}=")
            except BaseException as exc:  # noqa: BLE001
                lines.append(f"{layer}={exc}".replace("\n", " "))
        os.write(write_end, "\n".join(lines).encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    for line in b"".join(chunks).decode().splitlines():
        layer, _, error = line.partition("=")
        result[layer] = error or None
    if unavailable is not None:
        result["seccomp"] = unavailable
    for layer in (("own_uid",) if uids else ()) + WORKER_LAYERS:
        result.setdefault(layer, "probe failed")
    return result


def status(pid: int | str = "self") -> dict[str, str]:
    """NoNewPrivs and Seccomp as /proc/<pid>/status shows them (what docs/security.md checks)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("NoNewPrivs", "Seccomp"):
                out[key] = value.strip()
    return out
