"""The configuration of one ``msgsock stress`` run, and its division among workers."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from ...framing import DEFAULT_FORMAT, FrameFormat

__all__ = ["StressConfig"]


@dataclass(frozen=True)
class StressConfig:
    """Everything one stress run needs (built from the command line by :func:`run`).

    Args:
        host: server host name or address.
        port: server port.
        connections: connections to open (UDP: connected sockets).
        size_min: smallest message body in bytes.
        size_max: largest message body (equal to ``size_min`` for a fixed size).
        seed: seed of the per-message random sizes.
        depth: messages in flight per connection.
        duration: seconds of measurement (None with ``messages``).
        messages: total measured messages across connections (None with ``duration``).
        warmup: seconds of traffic before the measurement starts.
        rate: open-loop messages per second overall, or None for closed loop.
        connect_rate: connections opened per second, or None for all at once.
        frame: the frame format (TCP only).
        udp: datagrams instead of a framed stream.
        workers: processes to run.
        timeout: seconds after which an unanswered message counts as lost (and a
            connection attempt as timed out).
        expect: ``"echo"`` or ``"reverse"``: what the server replies.
        interval: seconds between live interval lines.
        tls: speak TLS, verifying the server (TCP only).
        tls_ca: CA certificates (PEM file) to trust instead of the system's.
        tls_cert: a client certificate chain (PEM file), for mutual TLS.
        tls_key: its private key, when not in ``tls_cert``.
        server_hostname: the name to verify in the server's certificate (default
            ``host``).
        auth_key: the shared key of a server that requires the authentication
            handshake (SPEC §4.2), or None.

    Each worker process builds its own TLS context from the file names (an
    ``ssl.SSLContext`` cannot be sent to another process).
    """

    host: str = "127.0.0.1"
    port: int = 9898
    connections: int = 1
    size_min: int = 64
    size_max: int = 64
    seed: int = 1
    depth: int = 1
    duration: float | None = 10.0
    messages: int | None = None
    warmup: float = 0.0
    rate: float | None = None
    connect_rate: float | None = None
    frame: FrameFormat = DEFAULT_FORMAT
    udp: bool = False
    workers: int = 1
    timeout: float = 5.0
    expect: str = "echo"
    interval: float = 1.0
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    server_hostname: str | None = None
    auth_key: bytes | None = field(default=None, repr=False)

    def tls_context(self) -> ssl.SSLContext | None:
        """Return a new client TLS context for this run (None without TLS).

        Raises:
            ValueError: a certificate or key file is missing or invalid.
        """
        if not self.tls:
            return None
        from ...tls import client_context

        return client_context(self.tls_ca, self.tls_cert, self.tls_key)


@dataclass(frozen=True)
class _Share:
    """The part of a run one worker process does."""

    index: int
    first_cid: int
    connections: int
    messages: int | None
    rate: float | None
    connect_rate: float | None


def _shares(cfg: StressConfig) -> list[_Share]:
    """Divide a run among ``cfg.workers`` workers as evenly as whole numbers allow.

    Args:
        cfg: the run.

    Returns:
        One share per worker, with disjoint, consecutive connection ids.
    """
    w = cfg.workers
    shares = []
    first = 0
    for i in range(w):
        conns = cfg.connections // w + (1 if i < cfg.connections % w else 0)
        msgs = None if cfg.messages is None else cfg.messages // w + (1 if i < cfg.messages % w else 0)
        shares.append(
            _Share(
                index=i,
                first_cid=first,
                connections=conns,
                messages=msgs,
                rate=None if cfg.rate is None else cfg.rate / w,
                connect_rate=None if cfg.connect_rate is None else cfg.connect_rate / w,
            )
        )
        first += conns
    return shares
