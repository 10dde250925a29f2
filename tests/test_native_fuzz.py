"""A bounded run of frame.h's fuzz harness under AddressSanitizer and UBSan (fuzz/native/frame_fuzz.c).

The harness checks the native scanner, header parser and encoder against a reference
written in the harness, over random formats and random, mutated and truncated streams
cut into random reads (see its opening comment).  It is built and run with the
Makefile's ``run-frame`` target, as a developer runs it, for about 15 seconds.  The
Makefile's ``run-speedups`` target then runs the CPython glue, built with the same
sanitizers, under the hypothesis tests of ``tests/test_native_framing.py``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import unit

REPO = Path(__file__).resolve().parents[1]
FUZZ = REPO / "fuzz" / "native"
SECONDS = 15


@pytest.mark.timeout(unit(240))
def test_frame_codec_survives_the_fuzzer(tmp_path: Path) -> None:
    """~15 s of generated and mutated inputs: no sanitizer report, every check against the reference holds."""
    gcc = shutil.which("gcc")
    make = shutil.which("make")
    if gcc is None or make is None:
        pytest.skip(f"the harness needs gcc and make ({'gcc' if gcc is None else 'make'} is missing)")
    build = subprocess.run(
        [make, "-s", "-C", str(FUZZ), f"OUT={tmp_path}", f"CC={gcc}", f"{tmp_path}/frame_fuzz"],
        capture_output=True,
        text=True,
        timeout=unit(120),
    )
    if build.returncode != 0 and "cannot find" in build.stderr and "asan" in build.stderr.lower():
        pytest.skip(f"this gcc has no sanitizer runtime: {build.stderr.strip()[:200]}")
    assert build.returncode == 0, build.stderr
    run = subprocess.run(
        [make, "-s", "-C", str(FUZZ), f"OUT={tmp_path}", f"SECONDS={SECONDS}", "SEED=20261202", "run-frame"],
        capture_output=True,
        text=True,
        timeout=unit(SECONDS + 90),
    )
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-4000:]
    assert "ERROR:" not in report and "runtime error" not in report, report[-4000:]
    found = re.search(r"frame_fuzz: (\d+) inputs in ([\d.]+) s, no failure", run.stdout)
    assert found, report[-2000:]
    assert int(found.group(1)) > 10_000  # it really ran


@pytest.mark.timeout(unit(300))
def test_extension_under_sanitizers(tmp_path: Path) -> None:
    """speedups.c built with ASan/UBSan passes the native-vs-pure hypothesis tests without a report."""
    gcc = shutil.which("gcc")
    make = shutil.which("make")
    if gcc is None or make is None:
        pytest.skip(f"the harness needs gcc and make ({'gcc' if gcc is None else 'make'} is missing)")
    run = subprocess.run(
        [
            make,
            "-s",
            "-C",
            str(FUZZ),
            f"OUT={tmp_path}",
            f"CC={gcc}",
            f"PYTHON={sys.executable}",
            "run-speedups",
        ],
        capture_output=True,
        text=True,
        timeout=unit(280),
    )
    report = run.stdout + run.stderr
    if run.returncode != 0 and "cannot find" in report and "asan" in report.lower():
        pytest.skip(f"this gcc has no sanitizer runtime: {report.strip()[:200]}")
    assert run.returncode == 0, report[-4000:]
    assert "ERROR:" not in report and "runtime error" not in report, report[-4000:]
    # The sanitized extension was really the one under test: nothing skipped for want of it.
    assert re.search(r"\d+ passed", run.stdout) and "skipped" not in run.stdout, report[-2000:]
