"""Run the real ``msgsock`` command line in subprocesses, and always clean up."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from tests.helpers import unit

MSGSOCK = [sys.executable, "-m", "msgsock"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run_cli(
    *args: str, input: str | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``msgsock ARGS`` to completion and return what it printed."""
    return subprocess.run(
        [*MSGSOCK, *args],
        input=input,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout or unit(30),
        stdin=None if input is not None else subprocess.DEVNULL,
    )


@dataclass
class ServerProcess:
    """A running ``msgsock serve`` and what it has printed so far."""

    proc: subprocess.Popen[str]
    ready: str
    port: int
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    _readers: list[threading.Thread] = field(default_factory=list)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the server and wait for it to exit; return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=unit(20))
        finally:
            for reader in self._readers:
                reader.join(timeout=unit(5))
        return code

    @property
    def log(self) -> str:
        """Everything the server wrote to stderr so far."""
        return "".join(self.stderr)

    @property
    def output(self) -> str:
        """Everything the server wrote to stdout so far (after the ready line)."""
        return "".join(self.stdout)


def _pump(stream: object, sink: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        sink.append(line)


@contextlib.contextmanager
def serve(*args: str, program: Sequence[str] = MSGSOCK) -> Iterator[ServerProcess]:
    """Start ``msgsock serve --port 0 ARGS``, wait for its ready line, yield it, always stop it.

    The server runs in a session of its own, so on failure the whole process group
    (the workers of ``--engine processes`` too) is killed.  ``program`` replaces the
    ``python -m msgsock`` prefix (e.g. a ``python -c`` that patches something first).
    """
    proc = subprocess.Popen(
        [*program, "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        ready = proc.stdout.readline()
        if not ready.startswith("listening on "):
            _kill_session(proc)
            _, err = proc.communicate(timeout=unit(10))
            raise AssertionError(f"server did not start: {ready!r} {err}")
        port = int(ready.split()[2].rsplit(":", 1)[1])
        server = ServerProcess(proc, ready.strip(), port)
        for stream, sink in ((proc.stdout, server.stdout), (proc.stderr, server.stderr)):
            t = threading.Thread(target=_pump, args=(stream, sink), daemon=True)
            t.start()
            server._readers.append(t)
        yield server
    finally:
        if proc.poll() is None:
            _kill_session(proc)
            proc.wait(timeout=unit(10))


def _kill_session(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a still running server and every process of its session (its workers)."""
    if proc.poll() is not None:
        return  # its process group id may no longer be ours to signal
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
