"""msgsock's applications: the ``msgsock`` command and what only it uses (SPEC §3, §6).

Not part of the library: ``serve`` with its engines and supervisor (:mod:`.server`),
the scripted client (:mod:`.client`), the load generator (:mod:`.stress`), the
interactive client (:mod:`.tui`) and the command line (:mod:`.cli`).  They import the
library; no library module imports them.  Their third-party packages come with the
``cli`` and ``plot`` extras and are imported only where used.
"""
