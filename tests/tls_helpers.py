"""A TLS client over memory BIOs for tests that must control how bytes are split into writes."""

from __future__ import annotations

import socket
import ssl


class MemoryTls:
    """A blocking TLS client over memory BIOs, so a test decides which bytes go out in one write."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, host: str) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=host)

    def handshake(self, prefix: bytes = b"") -> None:
        """Run the TLS handshake; ``prefix`` goes out in the same write as the ClientHello."""
        while True:
            try:
                self.tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            out = prefix + self.outgoing.read()
            prefix = b""
            if out:
                self.sock.sendall(out)
            if done:
                return
            self._fill()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise AssertionError("the server closed during the TLS exchange")
        self.incoming.write(data)

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self.sock.sendall(self.outgoing.read())

    def recv_exactly(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            try:
                data += self.tls.read(size - len(data))
            except ssl.SSLWantReadError:
                self._fill()
        return bytes(data)
