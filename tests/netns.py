"""Run a Python scenario inside a network namespace of its own, for every test that sets up a
WebRTC peer connection.

WebRTC gathers ICE candidates on every interface and aiortc offers no loopback candidates, so a
peer connection on the host would send packets out of real interfaces. Here a scenario runs under
``unshare --net`` (root) in a fresh namespace holding only ``lo`` (up) and a veth pair,
``veth-a`` 10.201.0.1/24 <-> ``veth-b`` 10.201.0.2/24: servers bind 127.0.0.1 for HTTP and
WebSockets, and the peers' ICE candidates are the veth addresses. Nothing can leave it.

A scenario is a Python file run as ``python FILE ARGS...`` (its directory, e.g. tests/, is then
on ``sys.path``), or a module name run as ``python -m MODULE ARGS...``; the last line it prints
on stdout is its result, as JSON::

    result = run_in_netns(Path(__file__).parent / "calls_scenario.py", "hangup_ends_the_call", timeout=60)

``netns_command(argv)`` wraps any command the same way (for a process the test manages itself).
The namespace shares the filesystem (files, Unix sockets, SQLite) but has no route to anything
on the host's network: a TCP service on the host (PostgreSQL, say) is out of reach from inside.

No skipping: a missing ``unshare`` or ``ip`` (util-linux / iproute2, in Debian's base) or a
namespace that cannot be made fails with a message saying so.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

VETH_A = "10.201.0.1"
VETH_B = "10.201.0.2"
SETUP = (
    "ip link set lo up"
    " && ip link add veth-a type veth peer name veth-b"
    f" && ip addr add {VETH_A}/24 dev veth-a"
    f" && ip addr add {VETH_B}/24 dev veth-b"
    " && ip link set veth-a up"
    " && ip link set veth-b up"
)


class NetnsError(AssertionError):
    """The namespace could not be made, or the scenario failed (the message has its output)."""


def netns_command(argv: list[str]) -> list[str]:
    """``argv`` wrapped to run in a fresh network namespace with lo and the veth pair set up."""
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            raise NetnsError(
                f"`{tool}` is not installed: WebRTC tests run in a network namespace of their own "
                "(apt-get install util-linux iproute2)"
            )
    script = f'{SETUP} || {{ echo "netns setup failed" >&2; exit 97; }}; exec "$@"'
    return ["unshare", "--net", "--", "sh", "-c", script, "netns", *argv]


def run_in_netns(
    scenario: str | Path, *args: str, timeout: float = 120, env: dict | None = None, cwd: str | Path | None = None
) -> Any:
    """Run ``python scenario args...`` (a file) or ``python -m scenario args...`` (a module name) in
    a fresh network namespace; its last stdout line, as JSON."""
    is_file = isinstance(scenario, Path) or str(scenario).endswith(".py") or os.path.sep in str(scenario)
    argv = [sys.executable, str(scenario), *args] if is_file else [sys.executable, "-m", str(scenario), *args]
    full_env = {**os.environ, **(env or {})}
    try:
        proc = subprocess.run(
            netns_command(argv), capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(
            f"scenario {Path(scenario).name} {' '.join(args)} took over {timeout} s:\n{exc.stderr}"
        ) from None
    if proc.returncode == 97 or "unshare:" in proc.stderr and proc.returncode != 0:
        raise NetnsError(f"cannot make a network namespace (needs root / CAP_SYS_ADMIN):\n{proc.stderr}")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise NetnsError(
            f"scenario {Path(scenario).name} {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return json.loads(lines[-1])


def probe() -> dict:
    """What a process inside sees: its interfaces and IPv4 addresses, and whether the outside world
    is routable (``python tests/netns.py`` prints it; tests/test_simulator_calls.py checks it)."""
    listed = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True).stdout)
    addresses = {item["ifname"]: [a["local"] for a in item.get("addr_info", [])] for item in listed}
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: routable only with a default route
        outside = "routable"
    except OSError as exc:
        outside = errno.errorcode.get(exc.errno or 0, str(exc))
    return {"interfaces": sorted(name for _, name in socket.if_nameindex()), "ipv4": addresses, "outside": outside}


if __name__ == "__main__":
    print(json.dumps(probe()))
