"""Fixtures of the conformance suite: every behaviour runs against every server and client.

- ``server_factory(handler=None, *, frame, limits, tls, auth_key, proxy_protocol, needs)``
  starts one server of the kind under test (parameter ``server_kind``) and stops it at
  teardown, whatever happened; an adapter that cannot express the options skips.
- ``shared_server(*, frame, tls, auth_key)``: an echo server of that kind shared by
  the tests that only check what comes back (no log or counter assertions), so a
  slow-starting server (the processes engine) starts once per configuration.
- ``client_factory(port, *, frame, tls, auth_key)``: one client of the kind under test
  (parameter ``client_kind``), aborted at teardown if still open.
- ``peer_factory(port, frame=..., rcvbuf=None)``: a :class:`RawPeer`.

Teardown runs clients and peers before the server they talk to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from msgsock.framing import DEFAULT_FORMAT, FrameFormat
from msgsock.protocol import DEFAULT_LIMITS, Limits
from tests.conformance.adapters import (
    CLIENTS,
    SERVERS,
    Cleanup,
    ClientAdapter,
    ClientOptions,
    Handler,
    RawPeer,
    ServerAdapter,
    ServerOptions,
)

SERVER_KINDS = tuple(SERVERS)
CLIENT_KINDS = tuple(CLIENTS)

ServerFactory = Callable[..., ServerAdapter]
ClientFactory = Callable[..., ClientAdapter]
PeerFactory = Callable[..., RawPeer]


@pytest.fixture
def cleanup() -> Iterator[Cleanup]:
    """Teardown steps, run last-in first-out."""
    steps = Cleanup()
    try:
        yield steps
    finally:
        steps.run()


@pytest.fixture(params=SERVER_KINDS)
def server_kind(request: pytest.FixtureRequest) -> str:
    """The server implementation under test."""
    return str(request.param)


@pytest.fixture(params=CLIENT_KINDS)
def client_kind(request: pytest.FixtureRequest) -> str:
    """The client implementation under test."""
    return str(request.param)


def _start(kind: str, options: ServerOptions) -> ServerAdapter:
    cls = SERVERS[kind]
    cls.check(options)
    adapter = cls(options)
    try:
        adapter.start()
    except BaseException:
        adapter.close()
        raise
    return adapter


@pytest.fixture
def server_factory(
    server_kind: str, cleanup: Cleanup, request: pytest.FixtureRequest, tmp_path: Any
) -> ServerFactory:
    """Start a server of the kind under test; it is stopped at teardown."""

    def make(
        handler: Handler | None = None,
        *,
        frame: FrameFormat = DEFAULT_FORMAT,
        limits: Limits = DEFAULT_LIMITS,
        tls: bool = False,
        auth_key: bytes | None = None,
        proxy_protocol: bool = False,
        needs: tuple[str, ...] = (),
    ) -> ServerAdapter:
        options = ServerOptions(
            handler=handler,
            frame=frame,
            limits=limits,
            tls=tls,
            auth_key=auth_key,
            proxy_protocol=proxy_protocol,
            needs=frozenset(needs),
            pki=request.getfixturevalue("pki") if tls else None,
            tmp_path=tmp_path,
        )
        adapter = _start(server_kind, options)
        cleanup.add(adapter.close)
        return adapter

    return make


class _Pool:
    """Echo servers shared across tests, one per (kind, configuration); stopped at the session's end."""

    def __init__(self, tmp_path: Any) -> None:
        self.tmp_path = tmp_path
        self.servers: dict[tuple[Any, ...], ServerAdapter] = {}

    def get(
        self, kind: str, frame: FrameFormat, tls: bool, auth_key: bytes | None, pki: Any
    ) -> ServerAdapter:
        key = (kind, str(frame), frame.max_size, tls, auth_key)
        server = self.servers.get(key)
        if server is None:
            options = ServerOptions(frame=frame, tls=tls, auth_key=auth_key, pki=pki, tmp_path=self.tmp_path)
            server = self.servers[key] = _start(kind, options)
        return server

    def close(self) -> None:
        steps = Cleanup([s.close for s in self.servers.values()])
        self.servers.clear()
        steps.run()


@pytest.fixture(scope="session")
def server_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Pool]:
    """The shared echo servers."""
    pool = _Pool(tmp_path_factory.mktemp("conformance-keys"))
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def shared_server(server_kind: str, server_pool: _Pool, request: pytest.FixtureRequest) -> ServerFactory:
    """An echo server of the kind under test, shared with the other tests that only check replies."""

    def get(
        *, frame: FrameFormat = DEFAULT_FORMAT, tls: bool = False, auth_key: bytes | None = None
    ) -> ServerAdapter:
        pki = request.getfixturevalue("pki") if tls else None
        return server_pool.get(server_kind, frame, tls, auth_key, pki)

    return get


@pytest.fixture
def client_factory(client_kind: str, cleanup: Cleanup, request: pytest.FixtureRequest) -> ClientFactory:
    """Connect a client of the kind under test; aborted at teardown unless the test closed it."""

    def make(
        port: int, *, frame: FrameFormat = DEFAULT_FORMAT, tls: bool = False, auth_key: bytes | None = None
    ) -> ClientAdapter:
        options = ClientOptions(
            frame=frame, tls=tls, auth_key=auth_key, pki=request.getfixturevalue("pki") if tls else None
        )
        client = CLIENTS[client_kind](port, options)
        cleanup.add(client.abort)
        return client

    return make


@pytest.fixture
def peer_factory(cleanup: Cleanup) -> PeerFactory:
    """Open a :class:`RawPeer`; closed at teardown."""

    def make(port: int, frame: FrameFormat = DEFAULT_FORMAT, *, rcvbuf: int | None = None) -> RawPeer:
        peer = RawPeer(port, frame, rcvbuf=rcvbuf)
        cleanup.add(peer.close)
        return peer

    return make
