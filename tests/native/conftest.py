"""Fixtures of the native engine's tests: a server on a thread per backend, skipped without the extension."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from msgsock import native
from msgsock.framing import DEFAULT_FORMAT, FrameFormat
from msgsock.protocol import DEFAULT_LIMITS, Limits
from tests.conformance.adapters import LogCapture, captured_logger
from tests.helpers import unit

REASON = native.unavailable_reason()
requires_native = pytest.mark.skipif(REASON is not None, reason=f"native engine: {REASON}")


def uring_available() -> bool:
    """True when a server asked for io_uring gets it (the kernel allows it)."""
    if REASON is not None:
        return False
    with native.serve(None, "127.0.0.1", 0, backend="io_uring") as server:
        return server.backend == "io_uring"


class Running:
    """One NativeServer serving on a thread, with its captured log."""

    def __init__(self, server: native.NativeServer, log: LogCapture) -> None:
        self.server = server
        self.log = log
        self.port = server.port
        self.result: Any = None
        self.thread = threading.Thread(target=self._run, name="native-test-server", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.result = self.server.serve_forever()

    def stop(self) -> Any:
        """Stop gracefully; return the final statistics."""
        self.server.close()
        self.thread.join(unit(20))
        assert not self.thread.is_alive(), f"the native server did not stop; it logged:\n{self.log.dump()}"
        return self.result


StartServer = Callable[..., Running]


@pytest.fixture(params=["epoll", "io_uring"])
def backend(request: pytest.FixtureRequest) -> str:
    """The loop backend under test (io_uring skips where the kernel refuses it)."""
    if REASON is not None:
        pytest.skip(f"native engine: {REASON}")
    name = str(request.param)
    if name == "io_uring" and not uring_available():
        pytest.skip("io_uring is not available here (the engine falls back to epoll)")
    return name


@pytest.fixture
def start_server(backend: str) -> Iterator[StartServer]:
    """Start a NativeServer of ``backend`` on a thread; stopped at teardown."""
    running: list[Running] = []

    def start(
        handler: Any = None, *, frame: FrameFormat = DEFAULT_FORMAT, limits: Limits = DEFAULT_LIMITS
    ) -> Running:
        log = LogCapture()
        logger: logging.Logger = captured_logger(log)
        server = native.serve(
            handler, "127.0.0.1", 0, frame=frame, limits=limits, logger=logger, backend=backend
        )
        run = Running(server, log)
        running.append(run)
        assert server.backend == backend
        return run

    try:
        yield start
    finally:
        for run in running:
            with contextlib.suppress(BaseException):
                run.stop()
