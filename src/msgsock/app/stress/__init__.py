"""``msgsock stress``: the verifying load generator, successor of iocpclient (SPEC §6.3).

Theory of operation
-------------------
One process runs **one event loop** over many non-blocking connections; ``--workers N``
runs N such processes over disjoint sets of connections and merges their results
(counters add up, latency histograms merge bucket by bucket).  Every message carries
its identity, so each reply is checked **byte for byte**; every kind of error is
counted separately, and any of them makes the exit status 1.

The package, one job per module, from the pure heart outwards:

=================  ==================================================================
``kinds``          the kinds of error, and how each connection end counts
``config``         :class:`StressConfig`, and its division among workers
``payload``        message identity: building bodies, matching replies (pure)
``ledger``         the verification ledger: pending, settle, classify, lost (sans-I/O)
``stream``         stream mode's windows: checking replies without parsing (pure)
``poller``         ``epoll``, or the ``selectors`` fallback
``conn``           one worker's connections, and how a connection ends
``send``           building and writing messages; closed and open loop
``receive``        reading and checking replies in the general mode
``connect``        the TCP connect and the client side of the core's stages
``hotloop``        stream mode's read-compare-write round (the benchmark's hot loop)
``pump``           the poll loop of a worker: phases, timeouts, ticks, its result
``workers``        one worker in process, or ``--workers N`` processes
``merge``          merging histograms and interval snapshots
``live``           interval lines and the progress bar
``report``         the report: text, verdict, JSON (its schema is there)
``plot``           ``--plot`` (matplotlib, imported lazily)
``fmt``            how numbers and the run are worded
``cli``            the options, their checks, :func:`run`
=================  ==================================================================
"""

from __future__ import annotations

from .cli import _main as _main
from .cli import configure_parser, run
from .config import StressConfig
from .kinds import ERROR_KINDS
from .payload import _first_difference as _first_difference

__all__ = ["ERROR_KINDS", "StressConfig", "configure_parser", "run"]
