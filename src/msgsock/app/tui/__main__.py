"""Run the interactive client with the default settings: ``python -m msgsock.app.tui``."""

from __future__ import annotations

import sys

from ..client import ClientConfig
from .app import run_tui

if __name__ == "__main__":  # pragma: no cover - manual run
    sys.exit(run_tui(ClientConfig()))
