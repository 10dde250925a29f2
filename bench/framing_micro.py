"""In-process micro-benchmark of the frame codec: pure Python against ``msgsock._speedups``.

Each case runs in child processes, some with ``MSGSOCK_NO_EXTENSIONS=1`` (pure Python)
and some without (native), so both measure the very methods the pumps call.  The two
kinds of child alternate, ROUNDS of each (the machine's noise then hits both alike); a
child times every case 5 times (each a loop of at least ~0.05 s).  The table shows the
median over all of them of the time per message, and the ratio pure / native (above 1:
the native codec is faster).

Usage::

    .venv/bin/python bench/framing_micro.py            # the table
    .venv/bin/python bench/framing_micro.py --json     # the medians as JSON

Not a test: nothing here asserts a speed (SPEC §8).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

REPEATS = 5
ROUNDS = 3
MIN_TIME = 0.2


def _cases() -> dict[str, tuple[int, Callable[[], object]]]:
    """Each case: (messages per call, the call)."""
    from msgsock.framing import FrameFormat

    plain = FrameFormat()
    fields = FrameFormat.parse("u32be+kind:B+flags:H")
    cases: dict[str, tuple[int, Callable[[], object]]] = {}

    def feed_case(fmt: FrameFormat, size: int, count: int, read: int | None, span: bool) -> None:
        header = {"kind": 3, "flags": 7} if fmt.field_names else None
        stream = b"".join(fmt.encode(b"x" * size, header) for _ in range(count))
        dec = fmt.decoder()
        call = dec.feed_span if span else dec.feed
        if read is None:
            view = memoryview(stream)
            cases[f"{'feed_span' if span else 'feed'} {fmt} {size} B x{count}"] = (count, lambda: call(view))
        else:
            chunks = [memoryview(stream)[i : i + read] for i in range(0, len(stream), read)]

            def run() -> None:
                for chunk in chunks:
                    call(chunk)

            cases[f"{'feed_span' if span else 'feed'} {fmt} {size} B x{count}, {read} B reads"] = (count, run)

    feed_case(plain, 64, 64, None, False)
    feed_case(plain, 64, 1, None, False)
    feed_case(plain, 1024, 16, None, False)
    feed_case(plain, 64, 256, 1000, False)
    feed_case(fields, 64, 64, None, False)
    feed_case(plain, 64, 64, None, True)
    feed_case(fields, 64, 64, None, True)
    feed_case(plain, 64, 256, 1000, True)

    body = b"y" * 64
    cases[f"encode_parts {plain} 64 B"] = (1, lambda: plain.encode_parts(body))
    cases[f"encode_header {plain}"] = (1, lambda: plain.encode_header(64))
    header = {"kind": 3, "flags": 7}
    cases[f"encode_parts {fields} 64 B"] = (1, lambda: fields.encode_parts(body, header))
    cases[f"encode {plain} 64 B"] = (1, lambda: plain.encode(body))
    return cases


def _child() -> None:
    from msgsock import extensions

    results: dict[str, object] = {"codec": extensions.describe()}
    for name, (per_call, call) in _cases().items():
        loops = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(loops):
                call()
            if time.perf_counter() - t0 >= MIN_TIME / 4:
                break
            loops *= 2
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            for _ in range(loops):
                call()
            times.append((time.perf_counter() - t0) / (loops * per_call) * 1e9)  # ns per message
        results[name] = times
    print(json.dumps(results))


def _measure(pure: bool) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "MSGSOCK_NO_EXTENSIONS"}
    if pure:
        env["MSGSOCK_NO_EXTENSIONS"] = "1"
    done = subprocess.run(
        [sys.executable, __file__, "--child"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the medians as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child()
        return 0
    pure: dict[str, object] = {}
    native: dict[str, object] = {}
    for _ in range(ROUNDS):
        for into, is_pure in ((pure, True), (native, False)):
            for name, value in _measure(pure=is_pure).items():
                if isinstance(value, list):
                    previous = into.setdefault(name, [])
                    assert isinstance(previous, list)
                    previous.extend(value)
                else:
                    into[name] = value
    for into in (pure, native):
        for name, value in into.items():
            if isinstance(value, list):
                into[name] = statistics.median(value)
    if args.json:
        print(json.dumps({"pure": pure, "native": native}, indent=2))
        return 0
    print(f"pure: {pure.pop('codec')}; native: {native.pop('codec')}")
    print(f"median of {ROUNDS} x {REPEATS} timings, ns per message")
    width = max(len(name) for name in pure)
    print(f"{'case':<{width}}  {'pure':>9}  {'native':>9}  {'ratio':>6}")
    for name, p in pure.items():
        n = native[name]
        assert isinstance(p, float) and isinstance(n, float)
        print(f"{name:<{width}}  {p:9.1f}  {n:9.1f}  {p / n:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
