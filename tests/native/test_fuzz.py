"""A bounded run of the native receive path's fuzz harness under AddressSanitizer (fuzz/native/engine_fuzz.c)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import unit

REPO = Path(__file__).resolve().parents[2]
NATIVE = REPO / "src" / "msgsock" / "_native"


@pytest.mark.timeout(unit(180))
def test_receive_path_survives_the_fuzzer(tmp_path: Path) -> None:
    """50,000 generated inputs (formats, splits, frames cut and mutated, garbage): no ASan/UBSan report, every check holds."""
    if shutil.which("gcc") is None:
        pytest.skip("no gcc: the harness cannot be built")
    if not (NATIVE / "frame.h").exists():
        pytest.skip("src/msgsock/_native/frame.h is not there")
    if shutil.which("make") is None:
        pytest.skip("no make: fuzz/native/Makefile cannot run")
    # fuzz/native/Makefile's run-engine target: gcc -fsanitize=address,undefined, then the runs.
    run = subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(REPO / "fuzz" / "native"),
            "run-engine",
            f"OUT={tmp_path}",
            "ENGINE_RUNS=50000",
        ],
        capture_output=True,
        text=True,
        timeout=unit(170),
    )
    if run.returncode != 0 and "cannot find" in run.stderr and "asan" in run.stderr:
        pytest.skip(f"this gcc has no sanitizer runtime: {run.stderr.strip()[:200]}")
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "engine_fuzz: 50000 inputs, no failure" in run.stdout, run.stdout
