"""ARCHITECTURE.md's Layout lists every module of every package, and nothing that is gone.

The packages are pyproject.toml's `package-dir` mapping (`meshrt.<name>` -> a top-level
directory), so a package added there is checked here too. A Layout line reads

    worker/      → meshrt.worker       zygote, warmup, session, ...

an entry with a `/` in it is a data file or directory the package ships, checked to exist.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^\s+(?P<dir>[\w.-]+)/\s+→\s+(?P<package>meshrt\.[\w.]+)\s+(?P<entries>\S.*)$")


def setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def package_dirs() -> dict[str, str]:
    """`meshrt.<name>` -> its directory, as installed."""
    return dict(setuptools_config()["package-dir"])


def layout() -> dict[str, tuple[str, list[str]]]:
    """`meshrt.<name>` -> (directory, entries) from ARCHITECTURE.md's Layout section."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    assert "\n## Layout\n" in text, "ARCHITECTURE.md has no Layout section"
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    listed: dict[str, tuple[str, list[str]]] = {}
    for line in section.splitlines():
        match = LINE.match(line)
        if match:
            assert match["package"] not in listed, f"{match['package']} has two Layout lines"
            entries = [entry.strip() for entry in match["entries"].split(",")]
            assert len(entries) == len(set(entries)), f"{match['package']}: an entry listed twice: {entries}"
            listed[match["package"]] = (match["dir"], entries)
    return listed


def modules(directory: Path) -> set[str]:
    """Every module in a package directory (`__init__` aside), dotted below it."""
    return {
        ".".join(path.relative_to(directory).with_suffix("").parts)
        for path in directory.rglob("*.py")
        if path.name != "__init__.py"
    }


def test_every_package_has_one_layout_line_naming_its_directory():
    listed, installed = layout(), package_dirs()
    assert sorted(listed) == sorted(installed), "ARCHITECTURE.md's Layout vs pyproject.toml's package-dir"
    for package, (directory, _) in listed.items():
        assert directory == installed[package], f"{package} is installed from {installed[package]}/"


def test_every_top_level_package_is_installed():
    """A package directory outside package-dir would install nothing and escape the listing."""
    installed = set(package_dirs().values())
    for init in sorted(ROOT.glob("*/__init__.py")):
        assert init.parent.name in installed, f"{init.parent.name}/ is not in pyproject.toml's package-dir"
    assert set(setuptools_config()["packages"]) >= set(package_dirs()), "package-dir vs packages"


@pytest.mark.parametrize("package", sorted(package_dirs()))
def test_layout_line_lists_exactly_the_modules(package):
    directory = ROOT / package_dirs()[package]
    _, entries = layout().get(package, ("", []))
    listed = {entry for entry in entries if "/" not in entry}
    present = modules(directory)
    assert not present - listed, f"{package}: modules missing from ARCHITECTURE.md's Layout: {sorted(present - listed)}"
    assert not listed - present, f"{package}: listed in ARCHITECTURE.md's Layout but gone: {sorted(listed - present)}"
    for data in (entry for entry in entries if "/" in entry):
        assert (directory / data).exists(), f"{package}: listed data {data} is not in {directory.name}/"
