"""Docs that state facts the code owns must agree with it."""

import importlib
import importlib.util
import re
import subprocess
import tomllib
from pathlib import Path

from meshrt.shared.errors import ERRORS
from meshrt.shared.settings import _ENV

ROOT = Path(__file__).resolve().parent.parent


def test_error_page_lists_every_code_with_its_close_code():
    page = (ROOT / "docs" / "errors.md").read_text()
    for code, spec in ERRORS.items():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{code}` |")), None)
        assert row is not None, code
        assert f"| {spec.type} | {spec.close_code} |" in row, code


def test_operations_page_documents_every_setting():
    page = (ROOT / "docs" / "operations.md").read_text()
    for variable in _ENV:
        assert f"`{variable}`" in page, variable


# --- citations stay inside the repository ---------------------------------------------------


def tracked_files(*suffixes: str) -> list[Path]:
    """The repository's tracked files with these suffixes (every such file when git is absent)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        paths = [ROOT / name for name in listed.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in ROOT.rglob("*") if not {".git", ".venv"} & set(p.relative_to(ROOT).parts)]
    return sorted(p for p in paths if p.suffix in suffixes and p.is_file())


SPEC_CITATION = re.compile(r"\bSPEC\s*§")  # the starting contract lives outside the repository


def test_no_file_cites_the_starting_spec():
    """Facts the code relies on are stated in docs/; a citation of ../shared/SPEC.md points out
    of the repository, at a page a reader of it may not have."""
    citing = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in tracked_files(".py", ".md")
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if SPEC_CITATION.search(line)
    ]
    assert not citing, "cite the docs/ page instead:\n" + "\n".join(citing)


POINTER = re.compile(r"docs/(?P<page>\w+)\.md, \"?(?P<rest>[^\n]{1,80})")


def headings(page: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in page.read_text().splitlines() if line.startswith("#")]


def test_section_pointers_name_sections_that_exist():
    """A pointer written `docs/<page>.md, <Section>` (quoted or not) names a heading of that page."""
    for path in tracked_files(".py", ".md"):
        text = " ".join(path.read_text(errors="replace").split())  # a pointer may wrap across lines
        text = re.sub(r"\s*#\s*", " ", text) if path.suffix == ".py" else text  # and across comment lines
        for match in POINTER.finditer(text):
            page = ROOT / "docs" / f"{match['page']}.md"
            assert page.exists(), f"{path.relative_to(ROOT)}: no page docs/{match['page']}.md"
            if match["rest"][:1].islower() or match["rest"].startswith("`"):
                continue  # a list of pages, not a section
            assert any(match["rest"].startswith(title) for title in headings(page)), (
                f"{path.relative_to(ROOT)}: docs/{match['page']}.md has no section {match['rest']!r}"
            )


# --- ARCHITECTURE.md's "The life of a session" names functions that exist ------------------

PACKAGES = {
    name.removeprefix("meshrt.")
    for name in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
}
DOTTED = re.compile(r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)`")


def life_of_a_session() -> str:
    text = (ROOT / "ARCHITECTURE.md").read_text()
    assert "\n## The life of a session\n" in text, "ARCHITECTURE.md has no section 'The life of a session'"
    return text.split("\n## The life of a session\n", 1)[1].split("\n## ", 1)[0]


def is_code(name: str) -> bool:
    """A meshrt name, or one of an importable module (`os._exit`, uvicorn's); not an event name
    such as `response.done`."""
    first = name.split(".")[0]
    return first in PACKAGES or importlib.util.find_spec(first) is not None


def resolve(name: str):
    """`frontdoor.handoff.HandoffProtocol._upgrade` -> that attribute of meshrt.frontdoor.handoff;
    a name outside meshrt is resolved from its own top-level module."""
    parts = name.split(".")
    if parts[0] in PACKAGES:
        parts = ["meshrt", *parts]
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(name)


def test_life_of_a_session_names_only_functions_that_exist():
    section = life_of_a_session()
    names = [name for name in DOTTED.findall(section) if is_code(name)]
    assert len(names) >= 60, f"only {len(names)} names found: is the section still written as `module.function`?"
    missing = []
    for name in dict.fromkeys(names):
        try:
            resolve(name)
        except (ImportError, AttributeError) as error:
            missing.append(f"{name}: {error}")
    assert not missing, "ARCHITECTURE.md, The life of a session, names what the code no longer has:\n" + "\n".join(
        missing
    )


def test_every_step_of_the_life_of_a_session_names_its_function():
    steps = re.split(r"\n(?=\d+\. \*\*)", life_of_a_session())[1:]
    assert len(steps) >= 14, "the steps are numbered `N. **Title.**`"
    for step in steps:
        assert any(name.split(".")[0] in PACKAGES for name in DOTTED.findall(step)), step.splitlines()[0]
