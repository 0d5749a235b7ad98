"""Docs that state facts the code owns must agree with it."""

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
