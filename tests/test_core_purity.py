"""The core modules are sans-I/O: they import no I/O, threading or clock module (SPEC §3, STYLE §1)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import unit

SRC = Path(__file__).resolve().parent.parent / "src" / "msgsock"

CORE = ["exceptions", "framing", "protocol", "archive", "proxy", "auth"]
"""Core module names; those not written yet are skipped."""

FORBIDDEN = {"socket", "selectors", "asyncio", "threading", "time", "ssl", "select"}

PRESENT = [name for name in CORE if (SRC / f"{name}.py").exists()]

_PROBE = """
import json, sys
before = set(sys.modules)
for name in {modules!r}:
    __import__("msgsock." + name)
print(json.dumps({{"added": sorted(set(sys.modules) - before), "after": sorted(sys.modules)}}))
"""


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=unit(30),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_core_modules_present() -> None:
    """The three original core modules exist (the list of checked modules is not empty)."""
    assert {"exceptions", "framing", "protocol"} <= set(PRESENT)


def test_importing_the_core_adds_no_io_module() -> None:
    """In a fresh interpreter, importing the core adds none of socket/selectors/asyncio/threading/time/ssl/select."""
    # What a bare interpreter already holds at startup (``time`` may be there) is not the
    # core's doing; compare against it rather than against an absolute list.
    bare = set(json.loads(_run("import json, sys; print(json.dumps(sorted(sys.modules)))")))
    report = json.loads(_run(_PROBE.format(modules=PRESENT)))
    added = set(report["added"])
    assert {f"msgsock.{name}" for name in PRESENT} <= added
    assert not (added & FORBIDDEN), f"core imported {sorted(added & FORBIDDEN)}"
    # And whatever is loaded afterwards was already there in a bare interpreter.
    assert set(report["after"]) & FORBIDDEN <= bare


@pytest.mark.parametrize("name", PRESENT)
def test_core_source_imports_no_io_module(name: str) -> None:
    """The core's source has no import of an I/O, threading or clock module, even one already loaded."""
    tree = ast.parse((SRC / f"{name}.py").read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    assert not (imported & FORBIDDEN), f"{name}.py imports {sorted(imported & FORBIDDEN)}"


@pytest.mark.parametrize("name", PRESENT)
def test_core_imports_only_stdlib_and_core(name: str) -> None:
    """The core depends on the standard library and other core modules only (SPEC §3)."""
    tree = ast.parse((SRC / f"{name}.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            assert node.module in CORE, f"{name}.py imports non-core .{node.module}"
        elif isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for mod in mods:
                top = mod.split(".")[0]
                assert top in sys.stdlib_module_names, f"{name}.py imports non-stdlib {mod}"
