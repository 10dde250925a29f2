"""``python -m msgsock.app.stress``: the stress command on its own."""

from __future__ import annotations

import sys

# Imported by the package name, so worker processes (spawned) find every function as
# msgsock.app.stress.*, never as __main__.*.
from msgsock.app.stress.cli import _main

if __name__ == "__main__":
    sys.exit(_main())
