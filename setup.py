"""Build the optional compiled extensions (the metadata is in pyproject.toml).

Every ``src/msgsock/_native/NAME.c`` is the extension ``msgsock._NAME`` (``speedups.c``:
``msgsock._speedups``, the frame codec's hot loops), except the ``engine*.c`` files,
which together are ``msgsock._engine`` (the native event loop).  The headers there
(``frame.h`` and the others) are shared.  Every extension is ``optional``: without a C
compiler or the Python headers the build only warns and msgsock installs as pure Python
(every extension has a pure-Python fallback).  Setting
``MSGSOCK_NO_EXTENSIONS=1`` in the environment of the build skips them altogether;
set at run time, it makes an installed msgsock ignore them (see ``msgsock.extensions``).
"""

from __future__ import annotations

import os
from glob import glob

from setuptools import Extension, setup

NATIVE = "src/msgsock/_native"
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]


def extensions() -> list[Extension]:
    """The extensions to build: none when ``MSGSOCK_NO_EXTENSIONS=1``."""
    if os.environ.get("MSGSOCK_NO_EXTENSIONS") == "1":
        return []
    depends = sorted(glob(f"{NATIVE}/*.h"))
    common = {"include_dirs": [NATIVE], "extra_compile_args": CFLAGS, "depends": depends, "optional": True}
    sources = sorted(glob(f"{NATIVE}/*.c"))
    engine = [path for path in sources if os.path.basename(path).startswith("engine")]
    built = [
        Extension(f"msgsock._{os.path.basename(path)[:-2]}", [path], **common)
        for path in sources
        if path not in engine
    ]
    if engine:
        built.append(Extension("msgsock._engine", engine, **common))
    # (stressloop.c -> msgsock._stressloop comes from the rule above, like any NAME.c.)
    return built


setup(ext_modules=extensions())
