"""The heart of ``msgsock stress`` is pure: payloads, ledger, stream windows and kinds do no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import msgsock.app.stress

PACKAGE = Path(msgsock.app.stress.__file__).parent
PURE = ["kinds.py", "payload.py", "ledger.py", "stream.py"]
IO_MODULES = {"socket", "select", "selectors", "ssl", "time", "os", "threading", "asyncio", "signal"}


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_import_no_io_and_read_no_clock(name: str) -> None:
    """A pure module imports no I/O or clock module, and never names a clock function."""
    tree = ast.parse((PACKAGE / name).read_text())
    wrong = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            wrong += [a.name for a in node.names if a.name.split(".")[0] in IO_MODULES]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module.split(".")[0] in IO_MODULES:
                wrong.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level and node.module:
            # Within the package, a pure module reaches only pure modules (and config's types).
            top = node.module.split(".")[0]
            if node.level == 1 and f"{top}.py" not in PURE and top != "config":
                wrong.append(f".{node.module}")
        elif isinstance(node, ast.Attribute) and node.attr in (
            "monotonic",
            "monotonic_ns",
            "time",
            "perf_counter",
        ):
            wrong.append(node.attr)
    assert not wrong, f"{name}: {wrong}"
