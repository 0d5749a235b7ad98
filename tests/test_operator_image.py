"""deploy/Dockerfile, read as text (building it needs a container engine and a registry, which a
test run has not): every installed package is copied in, the final stage runs `meshrt serve` as
an unprivileged user under an init, with a health check and no build tools, and agrees with
deploy/kubernetes.yaml."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "python3-dev", "libpq-dev", "pip install")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for instruction in instructions():
        if instruction[0] == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


def test_every_installed_package_is_copied_into_the_build():
    build = stages()[0]
    copied = {shlex.split(args)[0].rstrip("/") for name, args in build if name == "COPY" and "--from" not in args}
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dirs = set(setuptools["package-dir"].values())
    assert package_dirs <= copied, f"not copied into the image: {sorted(package_dirs - copied)}"
    assert {"pyproject.toml", "README.md"} <= {part for _, args in build for part in shlex.split(args)}


def test_final_stage_is_unprivileged_supervised_and_has_no_build_tools():
    build, final = stages()[0], stages()[-1]
    assert len(stages()) == 2
    assert build[0][1].split()[0] == final[0][1].split()[0] == "${BASE}"  # one interpreter for the venv
    body = " ".join(args for _, args in final)
    for tool in BUILD_TOOLS:
        assert tool not in body, tool
    user = [args for name, args in final if name == "USER"]
    assert user and user[-1].split(":")[0].isdigit() and int(user[-1].split(":")[0]) >= 1000
    entrypoint = [args for name, args in final if name == "ENTRYPOINT"][-1]
    assert yaml.safe_load(entrypoint) == ["tini", "--", "meshrt"]
    assert yaml.safe_load([args for name, args in final if name == "CMD"][-1]) == ["serve", "--keep"]
    health = [args for name, args in final if name == "HEALTHCHECK"]
    assert health and "/healthz" in health[-1] and "MESHRT_PORT" in health[-1]
    env = " ".join(args for name, args in final if name == "ENV")
    assert "MESHRT_STATE_DIR=/var/lib/meshrt/state" in env and "MESHRT_HOST=0.0.0.0" in env


def test_image_and_kubernetes_agree():
    final = stages()[-1]
    user = int([args for name, args in final if name == "USER"][-1].split(":")[0])
    port = int([args for name, args in final if name == "EXPOSE"][-1].split("/")[0])
    deployment = next(
        d for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()) if d["kind"] == "Deployment"
    )
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == user
    assert pod["containers"][0]["ports"][0]["containerPort"] == port
