"""The library apart from its applications (SPEC §3, issue 11).

The library -- the core, ``sync``, ``aio``, ``callback``, ``udp`` -- imports only the
standard library and itself; the applications in :mod:`msgsock.app` import the
library, never the other way round.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import msgsock
from tests.helpers import unit

PACKAGE = Path(msgsock.__file__).parent
# ``__main__`` is the command's entry point (``python -m msgsock``): the one way in to the applications.
LIBRARY_FILES = sorted(
    p for p in PACKAGE.rglob("*.py") if "app" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py"
)
APP_FILES = sorted((PACKAGE / "app").rglob("*.py"))  # the stress package's modules too
STDLIB = sys.stdlib_module_names


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, resolved to an absolute name (relative ones included)."""
    package = ".".join(("msgsock", *path.relative_to(PACKAGE).parent.parts))
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [f"{module}.{alias.name}" for alias in node.names] if not node.module else [module]
            found += [(node.lineno, name) for name in names]
    return found


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_imports_only_the_standard_library_and_itself(path: Path) -> None:
    """No library module imports an application module or a third-party package."""
    wrong = []
    for line, name in _imports(path):
        top = name.split(".")[0]
        if name == "msgsock.app" or name.startswith("msgsock.app."):
            wrong.append(f"line {line}: {name} (an application module)")
        elif top not in ("msgsock", "uvloop", "_typeshed") and top not in STDLIB:
            # uvloop: imported only where present (msgsock.aio); _typeshed: for type checkers only
            wrong.append(f"line {line}: {name} (not the standard library)")
    assert not wrong, f"{path.name} imports " + "; ".join(wrong)


def test_importing_the_library_loads_no_application_module() -> None:
    """``import msgsock`` and every layer load nothing of msgsock.app nor a third-party package."""
    code = (
        "import sys, msgsock, msgsock.sync, msgsock.aio, msgsock.callback, msgsock.udp\n"
        "app = sorted(m for m in sys.modules if m.startswith('msgsock.app'))\n"
        "third = sorted(m for m in ('rich', 'textual', 'uvloop', 'matplotlib') if m in sys.modules)\n"
        "print(app, third)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=unit(60)
    )
    assert out.stdout.strip() == "[] []"


def _is_module(name: str) -> bool:
    """True when ``name`` (``msgsock.a.b``) is a module file or a package of ours."""
    path = PACKAGE.joinpath(*name.split(".")[1:])
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


@pytest.mark.parametrize("path", APP_FILES, ids=lambda p: str(p.relative_to(PACKAGE / "app")))
def test_applications_import_the_library_by_its_package(path: Path) -> None:
    """An application module reaches the library as ``..module`` (never a copy of it under app/)."""
    for _, name in _imports(path):
        if name.startswith("msgsock.app."):
            assert _is_module(name), name
