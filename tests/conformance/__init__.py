"""One conformance suite for every msgsock server and client (SPEC §5.0, §9; the model: trio's ``_check_streams``).

Each behaviour is written once, in a ``test_*.py`` module, against the small
interfaces of :mod:`tests.conformance.adapters`; the fixtures of ``conftest.py`` run
it against every implementation: the servers ``aio`` (per-message handler),
``aio-conn`` (``connection_handler``), ``threads`` (:class:`msgsock.sync.ThreadedServer`),
``processes`` (``msgsock serve --engine processes`` in a subprocess) and ``callback``
(:class:`msgsock.callback.MessageServer`), and the clients ``sync``, ``aio``,
``callback`` (a :class:`msgsock.callback.MessageSocket` behind a blocking wrapper) and
the ``msgsock stress`` command.  Every implementation must show the same end kinds,
the same log reasons and the same summary counts.
"""
