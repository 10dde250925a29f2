"""The commands' one way to stop on SIGINT/SIGTERM (msgsock.app._signals)."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import pytest

from msgsock.app._signals import STOP_SIGNALS, run_until_stopped, stop_signals


@pytest.mark.timeout(10)
@pytest.mark.parametrize("signum", STOP_SIGNALS)
def test_a_signal_inside_the_block_calls_on_stop_and_the_old_handler_comes_back(signum: int) -> None:
    seen: list[int] = []

    def mine(s: int, frame: Any) -> None:
        seen.append(-s)

    before = signal.signal(signum, mine)
    try:
        with stop_signals(lambda: seen.append(signum)):
            os.kill(os.getpid(), signum)  # delivered to the main thread before kill returns
        assert seen == [signum]
        assert signal.getsignal(signum) is mine
        os.kill(os.getpid(), signum)
        assert seen == [signum, -signum]
    finally:
        signal.signal(signum, before)


@pytest.mark.timeout(10)
def test_outside_the_main_thread_nothing_is_installed() -> None:
    handlers: list[object] = []

    def body() -> None:
        with stop_signals(lambda: None):
            handlers.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=body)
    thread.start()
    thread.join(5)
    assert handlers == [before]


@pytest.mark.timeout(10)
def test_run_until_stopped_shuts_down_once_after_the_signal() -> None:
    calls: list[str] = []

    def start() -> None:
        calls.append("start")
        os.kill(os.getpid(), signal.SIGTERM)

    run_until_stopped(start, lambda: calls.append("shutdown"))
    assert calls == ["start", "shutdown"]


@pytest.mark.timeout(10)
def test_run_until_stopped_shuts_down_when_start_fails() -> None:
    calls: list[str] = []

    def start() -> None:
        raise OSError("address in use")

    with pytest.raises(OSError, match="address in use"):
        run_until_stopped(start, lambda: calls.append("shutdown"))
    assert calls == ["shutdown"]
