"""Benchmark server: a user-supplied handler through msgsock's public asyncio API.

This is the ``msgsock_handler`` row of ``bench/run.py`` (SPEC §8: "a user-supplied
Python handler (the general per-message path)").  Where ``msgsock serve`` uses its
built-in echo, this server goes through exactly what an application writes::

    server = await msgsock.aio.serve(lambda message: message, "127.0.0.1", port)

run by :func:`msgsock.aio.run` (uvloop when installed, stock asyncio otherwise).  With
``--engine native`` the same handler runs on the native engine's public API (the
``msgsock_native_handler`` rows)::

    server = msgsock.native.serve(lambda message: message, "127.0.0.1", port)
    server.serve_forever()

It prints ``listening on HOST:PORT (handler, LOOP)`` when ready (LOOP: ``uvloop``,
``asyncio``, ``native epoll`` or ``native io_uring``) and shuts down gracefully on
SIGTERM or SIGINT (exit 0), like ``msgsock serve``.

Usage::

    .venv/bin/python bench/servers/msgsock_handler.py --port 9898 [--no-uvloop]
    .venv/bin/python bench/servers/msgsock_handler.py --port 9898 --engine native [--backend epoll]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import msgsock.aio


async def _serve(host: str, port: int) -> int:
    # The handler is a plain lambda on purpose: the general per-message path, not the
    # built-in echo that the server module may special-case (SPEC §8).
    server = await msgsock.aio.serve(lambda message: message, host, port)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.close)
    name = type(loop).__module__.split(".")[0]
    print(f"listening on {host}:{server.port} (handler, {name})", flush=True)
    async with server:
        await server.serve_forever()
    summary = server.statistics().summary()
    print(f"summary: {summary}", flush=True)
    return 0


def _serve_native(host: str, port: int, backend: str | None) -> int:
    import msgsock.native

    # The same plain lambda: the native engine calls it once per message.
    server = msgsock.native.serve(lambda message: message, host, port, backend=backend)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signo, frame: server.close())
    print(f"listening on {host}:{server.port} (handler, native {server.backend})", flush=True)
    stats = server.serve_forever()
    print(f"summary: {stats.summary()}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the handler server until SIGTERM/SIGINT.

    Args:
        argv: command line arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 after a clean shutdown, 1 when the port cannot be bound.
    """
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=9898, help="port (default 9898; 0 = any)")
    ap.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio event loop")
    ap.add_argument(
        "--engine", default="asyncio", choices=("asyncio", "native"), help="the engine (default asyncio)"
    )
    ap.add_argument(
        "--backend",
        default=None,
        choices=("epoll", "io_uring"),
        help="the native engine's backend (default: MSGSOCK_NATIVE_BACKEND, else io_uring where allowed)",
    )
    ap.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(message)s")
    try:
        if args.engine == "native":
            return _serve_native(args.host, args.port, args.backend)
        if args.no_uvloop:
            return asyncio.run(_serve(args.host, args.port))
        return msgsock.aio.run(_serve(args.host, args.port))
    except OSError as exc:
        print(f"msgsock_handler: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
