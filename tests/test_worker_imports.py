"""A worker imports nothing after its fork: every module that the session path's code imports
inside a function is already imported by the zygote (worker.zygote._preimport). An import after
the fork costs each worker its own import, or its own compile when a worker under a uid of its
own cannot read the interpreter's cache (~10 ms of CPU per session for worker/preauth.py alone),
and may fail outright once the worker is sandboxed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).resolve().parent.parent / "worker"

SCRIPT = r"""
import ast, importlib.util, json, sys
from pathlib import Path
from meshrt.worker import zygote
zygote._preimport()
found = []
for path in sorted(Path(sys.argv[1]).glob("*.py")):
    tree = ast.parse(path.read_text())
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom):
                name = ("." * node.level) + (node.module or "")
                mods = [importlib.util.resolve_name(name, "meshrt.worker") if node.level else node.module]
            elif isinstance(node, ast.Import):
                mods = [alias.name for alias in node.names]
            else:
                continue
            found += [[path.name, fn.name, mod, mod in sys.modules] for mod in mods]
print(json.dumps(found))
"""


def test_every_import_inside_the_workers_functions_is_done_by_the_zygote_before_any_fork():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(WORKER)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    found = json.loads(out)
    assert ["session.py", "run", "meshrt.worker.preauth", True] in found  # the one a worker used to import itself
    missing = [row for row in found if not row[3]]
    assert missing == []
