"""The command-line runners of ``msgsock serve --udp`` and ``msgsock client --udp`` (SPEC §6.1, §6.2).

The datagram endpoints themselves are the library's :mod:`msgsock.udp`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TextIO

from ..protocol import format_address
from ..serving import ServerStatistics
from ..udp import UdpClient, UdpServer
from ._signals import run_until_stopped
from ._text import escape_text

__all__ = ["run_udp_client", "run_udp_server"]


def run_udp_server(
    host: str,
    port: int,
    handler: Callable[[bytes], bytes | None],
    *,
    max_size: int,
    out: TextIO,
) -> ServerStatistics:
    """Serve datagrams until SIGINT or SIGTERM; what ``msgsock serve --udp`` runs (SPEC §6.1).

    Prints one line to ``out`` when ready -- ``listening on HOST:PORT (udp, datagram)``
    with the real port when 0 was asked -- and nothing else (the caller prints the
    summary).  Must be called from the main thread (it installs signal handlers,
    and restores the previous ones on return).

    Returns:
        The server's statistics.

    Raises:
        ValueError: ``max_size`` outside 0-65535.
        OSError: the address cannot be resolved or bound (before the ready line).
    """
    server = UdpServer(handler, host, port, max_size=max_size)

    def start() -> None:
        server.start()
        print(f"listening on {format_address(server.address)} (udp, datagram)", file=out, flush=True)

    run_until_stopped(start, server.shutdown)
    return server.statistics()


def run_udp_client(
    host: str,
    port: int,
    messages: Iterable[bytes],
    *,
    timeout: float,
    retries: int,
    max_size: int,
    out: TextIO,
) -> int:
    """Send each message with :meth:`UdpClient.request` and print each reply as text (SPEC §6.2).

    Returns:
        The number of messages answered.

    Raises:
        Timeout: a message got no reply after every try (the message says which
            address, how many tries, and whether the port was unreachable).
        OversizeMessage: a message is above ``max_size`` (nothing sent).
        MessageTooLarge: a reply is above ``max_size``.
        ValueError: bad ``timeout``, ``retries`` or ``max_size``.
        OSError: the host does not resolve (``socket.gaierror``) or cannot be used.
    """
    count = 0
    with UdpClient(host, port, timeout=timeout, retries=retries, max_size=max_size) as client:
        for message in messages:
            reply = client.request(message)
            print(escape_text(reply), file=out, flush=True)
            count += 1
    return count
