"""The documentation: its examples run, and the site builds with warnings as errors.

Examples are the fenced code blocks of README.md and docs/**/*.md (and
``code-block`` directives of docs/**/*.rst).  The info string marks them:

- ``python runnable`` (or ``sh runnable``): a complete program.  The blocks of one
  page run in document order, each in its own subprocess, all in one temporary
  working directory (so a block may use the files an earlier block of the page
  wrote, as a reader following the page would).  Servers in them bind loopback with
  ``port=0``.
- ``python fragment``: a piece of a program (names it uses are not defined); it is
  compiled, not run.

Every ``python`` block must say which it is, so no example goes untested by
accident.  ``runnable`` and ``fragment`` do not show in the rendered page: MyST and
GitHub take the first word of the info string as the language and ignore the rest.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import unit

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

PYTHON_LANGS = {"python", "py", "python3"}
SHELL_LANGS = {"sh", "bash", "shell"}
MARKS = {"runnable", "fragment"}

# Programs a runnable shell block may need besides Python and msgsock; a page whose
# blocks use one that is missing is skipped, naming it.
EXTERNAL_TOOLS = ("openssl",)

# The modules of the API reference (docs/reference/): every name of their __all__
# must have an entry in the built site's inventory.
REFERENCE_MODULES = (
    "msgsock",
    "msgsock.exceptions",
    "msgsock.framing",
    "msgsock.protocol",
    "msgsock.stages",
    "msgsock.serving",
    "msgsock.archive",
    "msgsock.proxy",
    "msgsock.auth",
    "msgsock.tls",
    "msgsock.sync",
    "msgsock.aio",
    "msgsock.callback",
    "msgsock.udp",
    "msgsock.extensions",
    "msgsock.native",
)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a documentation file."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    marks: frozenset[str]
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_RST_CODE = re.compile(r"^(?P<indent>[ \t]*)\.\. (?:code-block|code|sourcecode)::[ \t]*(?P<lang>\S*)")


def markdown_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, indentation of the fence removed."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"].strip()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            line = lines[i]
            stripped = line.strip()
            if stripped.startswith(fence[0] * len(fence)) and set(stripped) == {fence[0]}:
                break
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1
        words = info.split()
        lang = words[0].lower() if words else ""
        blocks.append(Block(path, start + 1, lang, frozenset(words[1:]), "\n".join(body) + "\n"))
    return blocks


def rst_blocks(path: Path) -> list[Block]:
    """The ``code-block`` directives of a reStructuredText file; ``:class: runnable`` marks them."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = _RST_CODE.match(lines[i])
        if match is None:
            i += 1
            continue
        start, base = i, len(match["indent"])
        marks: set[str] = set()
        i += 1
        while i < len(lines) and lines[i].strip().startswith(":"):
            option = lines[i].strip()
            if option.startswith(":class:"):
                marks.update(option[len(":class:") :].split())
            i += 1
        body: list[str] = []
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > base):
            body.append(lines[i])
            i += 1
        text = "\n".join(body).strip("\n")
        width = min((len(x) - len(x.lstrip()) for x in text.splitlines() if x.strip()), default=0)
        code = "\n".join(x[width:] for x in text.splitlines()) + "\n"
        blocks.append(Block(path, start + 1, match["lang"].lower(), frozenset(marks), code))
    return blocks


def doc_files() -> list[Path]:
    """README.md and every page of the docs (not the build output)."""
    files = [ROOT / "README.md"]
    for suffix in ("*.md", "*.rst"):
        files += sorted(p for p in DOCS.rglob(suffix) if "_build" not in p.relative_to(DOCS).parts)
    return files


def blocks_of(path: Path) -> list[Block]:
    return rst_blocks(path) if path.suffix == ".rst" else markdown_blocks(path)


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


FILES = doc_files()
RUNNABLE_FILES = [p for p in FILES if any("runnable" in b.marks for b in blocks_of(p))]


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    # The examples call `python` and `msgsock`: the ones of this environment.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONSTARTUP", None)
    return env


@pytest.mark.parametrize("path", FILES, ids=_id)
def test_python_blocks_are_marked(path: Path) -> None:
    """Every python block says whether it is a runnable program or a fragment, and fragments compile."""
    unmarked = []
    for block in blocks_of(path):
        if block.lang not in PYTHON_LANGS:
            continue
        if not block.marks & MARKS:
            unmarked.append(block.where)
            continue
        if "fragment" in block.marks:
            compile(block.code, block.where, "exec")
    assert not unmarked, (
        "python blocks without a mark (write 'python runnable' for a complete program, "
        f"'python fragment' for a piece of one): {', '.join(unmarked)}"
    )


@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", RUNNABLE_FILES, ids=_id)
def test_runnable_examples(path: Path, tmp_path: Path) -> None:
    """Each runnable block of a page exits 0, run in order in one working directory."""
    env = _environment()
    shell = "\n".join(b.code for b in blocks_of(path) if "runnable" in b.marks and b.lang in SHELL_LANGS)
    missing = [tool for tool in EXTERNAL_TOOLS if re.search(rf"\b{tool}\b", shell) and not shutil.which(tool)]
    if missing:
        pytest.skip(f"{path.relative_to(ROOT)} needs {', '.join(missing)}, which is not installed")
    for block in blocks_of(path):
        if "runnable" not in block.marks:
            continue
        if block.lang in PYTHON_LANGS:
            script = tmp_path / f"block_{block.line}.py"
            command = [sys.executable, str(script)]
        elif block.lang in SHELL_LANGS:
            script = tmp_path / f"block_{block.line}.sh"
            command = ["bash", "-euo", "pipefail", str(script)]
        else:
            pytest.fail(f"{block.where}: a runnable block must be python or sh, not {block.lang!r}")
        script.write_text(block.code, encoding="utf-8")
        try:
            result = subprocess.run(
                command,
                cwd=tmp_path,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=unit(60),
            )
        except subprocess.TimeoutExpired as exc:
            output = [
                o.decode(errors="replace") if isinstance(o, bytes) else o or ""
                for o in (exc.stdout, exc.stderr)
            ]
            pytest.fail(f"{block.where}: still running after {exc.timeout:.0f} s\n{output[0]}\n{output[1]}")
        assert result.returncode == 0, (
            f"{block.where} exited {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        )


def _inventory_names(path: Path) -> set[str]:
    """The Python-domain names of a Sphinx objects.inv (format version 2)."""
    data = path.read_bytes()
    header_end = 0
    for _ in range(4):  # four header lines, then zlib-compressed entries
        header_end = data.index(b"\n", header_end) + 1
    names = set()
    for line in zlib.decompress(data[header_end:]).decode("utf-8").splitlines():
        match = re.match(r"(?x)(.+?)\s+(\S+):(\S+)\s+(-?\d+)\s+(\S*)\s+(.*)", line)
        if match and match[2] == "py":
            names.add(match[1])
    return names


@pytest.mark.timeout(900)
def test_sphinx_build(tmp_path: Path) -> None:
    """The site builds with warnings as errors, and every public name has a reference entry."""
    missing_tools = [name for name in ("sphinx", "myst_parser") if importlib.util.find_spec(name) is None]
    if missing_tools:
        pytest.skip(f"{', '.join(missing_tools)} not installed: pip install -e '.[docs]'")
    out = tmp_path / "html"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(DOCS),
            str(out),
        ],
        cwd=ROOT,
        env=_environment(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=unit(600),
    )
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stderr}\n{result.stdout}"
    documented = _inventory_names(out / "objects.inv")
    missing = []
    for module_name in REFERENCE_MODULES:
        module = importlib.import_module(module_name)
        if module_name not in documented:
            missing.append(module_name)
        missing += [
            f"{module_name}.{name}" for name in module.__all__ if f"{module_name}.{name}" not in documented
        ]
        # The top-level page lists re-exports; their members are documented at home.
        if module_name != "msgsock":
            missing += [
                f"{module_name}.{name}.{member}"
                for name in module.__all__
                for member in _public_members(getattr(module, name))
                if f"{module_name}.{name}.{member}" not in documented
            ]
    assert not missing, f"public names without a reference entry (no docstring?): {', '.join(missing)}"


def _public_members(cls: object) -> list[str]:
    """The public methods and properties of a msgsock class that its own entry must list.

    A member defined on the class, or on a private base of msgsock (a class no
    ``__all__`` names: one part of a large class split over modules), belongs to the
    class's entry; one from a public base is documented there.
    """
    if not inspect.isclass(cls) or not cls.__module__.startswith("msgsock"):
        return []
    names = []
    for member in dir(cls):
        if member.startswith("_"):
            continue
        owner = next(base for base in cls.__mro__ if member in vars(base))
        private_base = owner.__module__.startswith("msgsock.") and not _exported(owner)
        if owner is not cls and not private_base:
            continue
        value = vars(owner)[member]
        if isinstance(value, staticmethod | classmethod):
            value = value.__func__
        if (inspect.isfunction(value) or isinstance(value, property)) and inspect.getdoc(value):
            names.append(member)
    return names


def _exported(cls: type) -> bool:
    """Whether the ``__all__`` of a public msgsock module (no ``_`` in its path) names ``cls``."""
    for name, module in list(sys.modules.items()):
        parts = name.split(".")
        if parts[0] != "msgsock" or any(part.startswith("_") for part in parts):
            continue
        if cls.__name__ in getattr(module, "__all__", ()) and getattr(module, cls.__name__, None) is cls:
            return True
    return False
