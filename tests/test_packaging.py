"""Release packaging: the sdist and the wheel build, and the wheel works in a clean venv.

One module-scoped fixture does the slow part once: it copies the project's files into
a temporary directory (so the build writes nothing into the work tree), creates a
build environment with the build backend that ``pyproject.toml`` asks for, builds the
sdist there with the PEP 517 hook, builds the wheel *from the sdist* with
``pip wheel --no-deps`` (so the sdist is known to hold everything the wheel needs),
and installs the wheel with ``--no-deps`` into a fresh ``python -m venv``.  Installing
without dependencies is deliberate: the library layers must import with the standard
library alone (SPEC §3).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

import pytest

from tests.helpers import unit

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(900)

# What the sdist is built from: the files `git ls-files` would list, less the caches.
SOURCE_ITEMS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "CHANGELOG.md", "src")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.so")

LIBRARY_MODULES = ("msgsock", "msgsock.sync", "msgsock.aio", "msgsock.callback", "msgsock.udp")

# The optional extensions are built where a compiler is (setup.py), unless switched off.
COMPILER = shutil.which("gcc") is not None or shutil.which("cc") is not None
EXTENSIONS_OFF = os.environ.get("MSGSOCK_NO_EXTENSIONS") == "1"


@dataclass(frozen=True)
class Built:
    """Paths of what the fixture built."""

    sdist: Path
    wheel: Path
    venv_python: Path


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(command: list[str], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV", "PYTHONHOME"):
        env.pop(name, None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    result = subprocess.run(
        command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{' '.join(command)} exited {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Build the sdist, then the wheel from it, then install the wheel into a clean venv."""
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    source.mkdir()
    for item in SOURCE_ITEMS:
        path = ROOT / item
        if path.is_dir():
            shutil.copytree(path, source / item, ignore=IGNORED)
        else:
            shutil.copy2(path, source / item)

    # A build environment with the backend pyproject.toml names (one download, or pip's cache).
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    build_env = base / "build-env"
    _run([sys.executable, "-m", "venv", str(build_env)], cwd=base, timeout=unit(120))
    build_python = _venv_python(build_env)
    try:
        _run([str(build_python), "-m", "pip", "install", "-q", *requires], cwd=base, timeout=unit(300))
    except AssertionError as exc:
        pytest.skip(f"cannot install the build backend {requires} (no package index?): {exc}")

    dist = base / "dist"
    dist.mkdir()
    hook = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    name = _run([str(build_python), "-c", hook, str(dist)], cwd=source, timeout=unit(300)).stdout.split()[-1]
    sdist = dist / name

    wheels = base / "wheels"
    _run(
        [
            str(build_python),
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(sdist),
        ],
        cwd=base,
        timeout=unit(300),
    )
    (wheel,) = wheels.glob("msgsock-*.whl")

    venv = base / "clean-venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=base, timeout=unit(120))
    venv_python = _venv_python(venv)
    _run(
        [str(venv_python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        cwd=base,
        timeout=unit(300),
    )
    return Built(sdist, wheel, venv_python)


def _metadata(wheel: Path) -> dict[str, list[str]]:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        message = Parser().parsestr(archive.read(name).decode("utf-8"))
    fields: dict[str, list[str]] = {}
    for key, value in message.items():
        fields.setdefault(key, []).append(value)
    return fields


def test_wheel_contents(built: Built) -> None:
    """The wheel carries the package, py.typed and the license, and no tests."""
    with zipfile.ZipFile(built.wheel) as archive:
        names = archive.namelist()
    assert "msgsock/py.typed" in names
    assert "msgsock/__init__.py" in names
    for package in ("msgsock/sync/__init__.py", "msgsock/aio/__init__.py", "msgsock/callback/__init__.py"):
        assert package in names
    tops = {name.split("/")[0] for name in names}
    assert not {
        top for top in tops if top.startswith("tests") or top in ("examples", "bench", "docs", "fuzz")
    }, f"the wheel holds more than the package: {sorted(tops)}"
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), "no LICENSE in the wheel"
    assert not [n for n in names if n.endswith((".c", ".h"))], "the wheel holds C sources"


def test_wheel_holds_the_compiled_extension(built: Built) -> None:
    """With a C compiler at build time, the wheel carries msgsock._speedups compiled (SPEC §3)."""
    if not COMPILER:
        pytest.skip("no C compiler: the wheel is pure Python")
    with zipfile.ZipFile(built.wheel) as archive:
        names = archive.namelist()
    speedups = [n for n in names if n.startswith("msgsock/_speedups.") and n.endswith((".so", ".pyd"))]
    if EXTENSIONS_OFF:
        assert not speedups, "MSGSOCK_NO_EXTENSIONS=1 at build time still built the extension"
    else:
        assert speedups, f"no compiled msgsock._speedups in {built.wheel.name}"
        assert not built.wheel.name.endswith("-none-any.whl"), (
            "a wheel with an extension is platform-specific"
        )


def test_wheel_metadata(built: Built) -> None:
    """The metadata has the version of msgsock.__version__, the license and classifiers."""
    fields = _metadata(built.wheel)
    init = (ROOT / "src/msgsock/__init__.py").read_text()
    assert f'__version__ = "{fields["Version"][0]}"' in init
    assert fields["License-Expression"] == ["MIT"]
    assert fields["License-File"] == ["LICENSE"]
    assert "Typing :: Typed" in fields["Classifier"]
    assert fields["Requires-Python"] == [">=3.11"]
    # The library needs no third-party package; every requirement belongs to an extra.
    requires = fields.get("Requires-Dist", [])
    assert requires and all("extra ==" in r for r in requires), requires
    assert {"cli", "plot", "test", "docs"} <= set(fields["Provides-Extra"])


def test_sdist_contents(built: Built) -> None:
    """The sdist carries what a build needs: the sources, py.typed, the readme and the license."""
    with tarfile.open(built.sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for needed in (
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "src/msgsock/__init__.py",
        "src/msgsock/py.typed",
        "setup.py",
        "src/msgsock/_native/frame.h",
        "src/msgsock/_native/speedups.c",
    ):
        assert needed in names, f"{needed} is not in {built.sdist.name}"


SMOKE = """
import importlib, importlib.metadata, json, sys
modules = {name: importlib.import_module(name) for name in sys.argv[1:]}
import msgsock
import msgsock.extensions
from msgsock import sync
server = sync.ThreadedServer(lambda message: message[::-1], "127.0.0.1", 0)
server.start()
with sync.connect("127.0.0.1", server.port, connect_timeout=10) as conn:
    conn.send(b"smoke")
    reply = conn.receive(timeout=10)
server.shutdown()
third_party = sorted(
    name for name in ("rich", "textual", "uvloop", "matplotlib") if name in sys.modules
)
print(json.dumps({
    "version": msgsock.__version__,
    "metadata": importlib.metadata.version("msgsock"),
    "file": msgsock.__file__,
    "reply": reply.decode(),
    "third_party": third_party,
    "extensions": msgsock.extensions.describe(),
}))
"""


def test_installed_wheel_works(built: Built, tmp_path: Path) -> None:
    """In a clean venv, without dependencies: every layer imports, versions agree, an echo round-trips."""
    result = _run(
        [str(built.venv_python), "-I", "-c", SMOKE, *LIBRARY_MODULES], cwd=tmp_path, timeout=unit(120)
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["version"] == report["metadata"]
    assert "site-packages" in report["file"], f"imported from {report['file']}, not the installed wheel"
    assert report["reply"] == "ekoms"
    assert report["third_party"] == [], f"the library imported {report['third_party']}"
    if COMPILER and not EXTENSIONS_OFF:
        assert report["extensions"].startswith("native: speedups"), report["extensions"]


def test_commands_without_extras(built: Built, tmp_path: Path) -> None:
    """Without the cli extra the command runs, and says which extra a missing part needs."""
    script = built.venv_python.parent / "msgsock"
    result = subprocess.run(
        [str(script), "client", "--tui"],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=unit(60),
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "msgsock client: error: --tui needs textual and rich: pip install 'msgsock[cli]'"
    ]
