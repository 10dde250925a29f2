"""The core modules are sans-I/O: they import no I/O, threading or clock module (SPEC §3, STYLE §1).

One exception, and only one: ``stages.py`` drives TLS with ``ssl.SSLObject`` over
``ssl.MemoryBIO`` (which do no I/O of their own), so it imports :mod:`ssl`, and
importing :mod:`ssl` loads :mod:`socket` (and with it ``select`` and ``selectors``)
whatever we use of it.  ``serving.py`` names ``ssl.SSLContext`` in an annotation
and imports ``stages``.  Those two may import ``ssl``; a module that imports
``stages`` (``_lifecycle``, ``protocol``, ``serving``) may load exactly what ``import ssl`` loads
in a bare interpreter, nothing more; every other core module nothing at all.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from .helpers import unit

SRC = Path(__file__).resolve().parent.parent / "src" / "msgsock"

CORE = [
    "exceptions",
    "extensions",
    "framing",
    "_lifecycle",
    "protocol",
    "stages",
    "serving",
    "archive",
    "proxy",
    "auth",
]
"""Core module names; those not written yet are skipped."""

FORBIDDEN = {"socket", "selectors", "asyncio", "threading", "time", "ssl", "select"}

SSL_IMPORTERS = {"stages", "serving"}
"""Core modules whose source may import ssl: stages for SSLObject/MemoryBIO, serving for a type annotation."""

THROUGH_STAGES = {"stages", "_lifecycle", "protocol", "serving"}
"""Core modules that load stages when imported (and so ssl): ``_lifecycle`` (protocol's base) runs its connections' Stages."""

SSL_NAMES = {"SSLContext", "SSLObject", "MemoryBIO", "SSLError", "SSLWantReadError", "SSLZeroReturnError"}
"""What the core may use of ssl: memory-BIO TLS and its errors (no ssl socket)."""

PRESENT = [name for name in CORE if (SRC / f"{name}.py").exists()]

_PROBE = """
import json, sys
before = set(sys.modules)
for name in {modules!r}:
    __import__("msgsock." + name)
print(json.dumps({{"added": sorted(set(sys.modules) - before), "after": sorted(sys.modules)}}))
"""

_PROBE_ONE = """
import importlib, json, sys, types
# The module alone, without the package's __init__ (which imports every public module).
package = types.ModuleType("msgsock")
package.__path__ = [{src!r}]
sys.modules["msgsock"] = package
before = set(sys.modules)
importlib.import_module("msgsock." + {name!r})
print(json.dumps(sorted(set(sys.modules) - before)))
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


@cache
def _bare() -> frozenset[str]:
    """What a bare interpreter already holds at startup (``time`` may be there): not the core's doing."""
    return frozenset(json.loads(_run("import json, sys; print(json.dumps(sorted(sys.modules)))")))


@cache
def _ssl_loads() -> frozenset[str]:
    """The forbidden modules that ``import ssl`` itself loads in a bare interpreter (ssl, socket, select...)."""
    code = (
        "import json, sys; b = set(sys.modules); import ssl; print(json.dumps(sorted(set(sys.modules) - b)))"
    )
    return frozenset(json.loads(_run(code))) & FORBIDDEN


def test_core_modules_present() -> None:
    """The core modules exist (the list of checked modules is not empty)."""
    assert {"exceptions", "framing", "protocol", "stages", "serving"} <= set(PRESENT)


def test_ssl_is_the_only_allowance() -> None:
    """What ssl is allowed to bring is ssl itself and the socket modules it loads: never asyncio, threads or time."""
    loads = _ssl_loads() - _bare()
    assert "ssl" in loads
    assert not (loads & {"asyncio", "threading", "time"})


def test_importing_the_core_adds_no_io_module() -> None:
    """In a fresh interpreter, importing the whole core adds no I/O, thread or clock module beyond what ssl loads."""
    report = json.loads(_run(_PROBE.format(modules=PRESENT)))
    added = set(report["added"])
    assert {f"msgsock.{name}" for name in PRESENT} <= added
    extra = (added & FORBIDDEN) - _ssl_loads()
    assert not extra, f"core imported {sorted(extra)}"
    # And whatever is loaded afterwards was already there in a bare interpreter (or is ssl's).
    assert set(report["after"]) & FORBIDDEN <= _bare() | _ssl_loads()


@pytest.mark.parametrize("name", PRESENT)
def test_each_core_module_alone_adds_no_io_module(name: str) -> None:
    """Each core module imported alone adds no forbidden module; only those that load stages may add ssl's own."""
    added = set(json.loads(_run(_PROBE_ONE.format(src=str(SRC), name=name))))
    assert f"msgsock.{name}" in added
    assert ("msgsock.stages" in added) == (name in THROUGH_STAGES), (
        "a core module began or stopped loading stages"
    )
    allowed = _ssl_loads() if name in THROUGH_STAGES else frozenset()
    extra = (added & FORBIDDEN) - allowed
    assert not extra, f"{name} imported {sorted(extra)}"


def _imports(name: str) -> set[str]:
    tree = ast.parse((SRC / f"{name}.py").read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    return imported


@pytest.mark.parametrize("name", PRESENT)
def test_core_source_imports_no_io_module(name: str) -> None:
    """The core's source has no import of an I/O, threading or clock module, even one already loaded (ssl: stages, serving)."""
    allowed = {"ssl"} if name in SSL_IMPORTERS else set()
    bad = (_imports(name) & FORBIDDEN) - allowed
    assert not bad, f"{name}.py imports {sorted(bad)}"


@pytest.mark.parametrize("name", sorted(SSL_IMPORTERS & set(PRESENT)))
def test_ssl_is_used_through_memory_bios_only(name: str) -> None:
    """Where the core imports ssl it uses SSLContext/SSLObject/MemoryBIO and their errors only: no ssl socket."""
    tree = ast.parse((SRC / f"{name}.py").read_text(encoding="utf-8"))
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id in {"ssl", "_ssl"}:
                used.add(node.attr)
            assert node.attr not in {"wrap_socket", "start_tls", "create_connection", "SSLSocket"}, (
                f"{name}.py uses {node.attr}"
            )
        elif isinstance(node, ast.ImportFrom):
            assert node.module != "ssl", f"{name}.py imports names from ssl"
    assert used <= SSL_NAMES, f"{name}.py uses ssl.{sorted(used - SSL_NAMES)}"


@pytest.mark.parametrize("name", PRESENT)
def test_core_imports_only_stdlib_and_core(name: str) -> None:
    """The core depends on the standard library and other core modules only (SPEC §3)."""
    tree = ast.parse((SRC / f"{name}.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            # ``from .x import y`` names module x; ``from . import x`` names x itself.
            for module in [node.module] if node.module else [a.name for a in node.names]:
                assert module in CORE, f"{name}.py imports non-core .{module}"
        elif isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for mod in mods:
                top = mod.split(".")[0]
                assert top in sys.stdlib_module_names, f"{name}.py imports non-stdlib {mod}"
