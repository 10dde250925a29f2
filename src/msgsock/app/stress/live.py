"""The live view: interval lines (iperf3-like) and a progress bar while the run goes on."""

from __future__ import annotations

import os
from typing import Any, TextIO

from .config import StressConfig


class _Live:
    """Interval lines (iperf3-like) and a progress bar: rich on a terminal, plain lines otherwise."""

    def __init__(self, cfg: StressConfig, stream: TextIO, enabled: bool) -> None:
        self.cfg = cfg
        self.stream = stream
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None
        self._console: Any = None
        if enabled and stream.isatty():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

                self._console = Console(file=stream, highlight=False)
                total = cfg.messages if cfg.messages is not None else (cfg.duration or 0) + cfg.warmup
                label = "messages" if cfg.messages is not None else "seconds"
                self._progress = Progress(
                    TextColumn("[bold]stress"),
                    BarColumn(),
                    TaskProgressColumn(),
                    TextColumn("{task.completed:,.0f}/{task.total:,.0f} " + label),
                    console=self._console,
                    auto_refresh=False,  # refreshed on each interval: no thread competing with the loop
                    transient=True,
                )
                self._task = self._progress.add_task("stress", total=total)
                self._progress.start()
            except ImportError:  # pragma: no cover - rich is a dependency
                self._console = None

    @property
    def has_bar(self) -> bool:
        """True when a rich progress bar is shown."""
        return self._progress is not None

    def line(self, text: str) -> None:
        """Show one line (above the bar on a terminal); stop quietly when the reader is gone."""
        if not self.enabled:
            return
        try:
            if self._progress is not None:
                self._progress.console.print(text, markup=False)
                self._progress.refresh()
            else:
                print(text, file=self.stream, flush=True)
        except BrokenPipeError:  # the reader went away (| head): stop live output, keep running
            self.enabled = False
            _silence(self.stream)

    def progress(self, value: float) -> None:
        """Move the bar to ``value`` (messages or seconds done)."""
        if self._progress is not None:
            self._progress.update(self._task, completed=value)
            self._progress.refresh()

    def stop(self) -> None:
        """Remove the bar (the lines stay)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _silence(stream: TextIO) -> None:
    """Point a stream whose reader went away at /dev/null, so exit does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
