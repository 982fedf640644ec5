"""Certificates (made by trustme) and TLS peers for the TLS and mutual-TLS tests.

The peers are plain Python ``ssl`` servers in threads, so the ambassador is tested
against a TLS stack other than its own.  Everything binds 127.0.0.1 and every
socket operation has a timeout.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from pathlib import Path

import trustme
from harness import freePort


class Certs:
    """Every certificate file the tests need, written under ``directory``.

    - ``ca.pem`` (and ``ca/ca.pem``, a directory for ``trustRoots=``): the trusted CA
    - ``server.pem``/``server.key``: localhost and 127.0.0.1, signed by the CA
    - ``wrongname.pem``/``.key``: only ``other.example``
    - ``expired.pem``/``.key``: localhost, expired yesterday
    - ``untrusted.pem``/``.key``: localhost, signed by another CA
    - ``client.pem``/``client.key``: a client certificate signed by the CA
    - ``rogue-client.pem``/``.key``: a client certificate signed by the other CA
    """

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.otherCA = trustme.CA()
        (self.dir / "ca").mkdir(exist_ok=True)
        self.ca.cert_pem.write_to_path(str(self.dir / "ca.pem"))
        self.ca.cert_pem.write_to_path(str(self.dir / "ca" / "ca.pem"))
        self.otherCA.cert_pem.write_to_path(str(self.dir / "other-ca.pem"))
        now = datetime.datetime.now(datetime.UTC)
        self.leaves = {
            "server": self.ca.issue_cert("localhost", "127.0.0.1", common_name="member.test"),
            "wrongname": self.ca.issue_cert("other.example", common_name="other.example"),
            "expired": self.ca.issue_cert(
                "localhost", "127.0.0.1", common_name="expired.test",
                not_before=now - datetime.timedelta(days=10),
                not_after=now - datetime.timedelta(days=1),
            ),
            "untrusted": self.otherCA.issue_cert("localhost", "127.0.0.1", common_name="untrusted.test"),
            "client": self.ca.issue_cert("client.test", common_name="client.test"),
            "rogue-client": self.otherCA.issue_cert("rogue.test", common_name="rogue.test"),
        }
        for name, leaf in self.leaves.items():
            # the leaf first, then any intermediates: one file, as servers expect
            with open(self.dir / f"{name}.pem", "wb") as f:
                f.writelines(pem.bytes() for pem in leaf.cert_chain_pems)
            leaf.private_key_pem.write_to_path(str(self.dir / f"{name}.key"))

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def serverContext(self, leaf: str = "server", requireClient: bool = False) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.leaves[leaf].configure_cert(context)
        if requireClient:
            context.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(context)
        return context

    def clientContext(self, clientLeaf: str | None = None) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(context)
        if clientLeaf is not None:
            context.load_cert_chain(self.path(f"{clientLeaf}.pem"), self.path(f"{clientLeaf}.key"))
        return context


class TLSEchoMember:
    """A TLS member that answers every read with the bytes upper-cased.

    @ivar serverNames: the SNI names clients sent.
    @ivar clientSubjects: the commonName of each verified client certificate (None:
        the client sent none).
    @ivar handshakeErrors: why handshakes failed, as text.
    """

    def __init__(
        self, context: ssl.SSLContext | None, port: int | None = None, atEnd: bool = False,
    ) -> None:
        """@param atEnd: read until the client finishes sending (a TLS close_notify or
        EOF), then answer everything upper-cased and close cleanly (close_notify)."""
        self.context = context
        self.atEnd = atEnd
        self.port = port or freePort()
        self.serverNames: list[str | None] = []
        self.clientSubjects: list[str | None] = []
        self.handshakeErrors: list[str] = []
        self.accepted = 0
        if context is not None:
            context.sni_callback = self._sni
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.listener.settimeout(0.2)
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _sni(self, sslSocket: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        self.serverNames.append(name)

    def _serve(self) -> None:
        while self.running:
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            if self.context is not None:
                try:
                    conn = self.context.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    self.handshakeErrors.append(str(e))
                    return
                peer = conn.getpeercert() if isinstance(conn, ssl.SSLSocket) else None
                subject = None
                if peer:
                    subject = dict(x[0] for x in peer["subject"]).get("commonName")
                self.clientSubjects.append(subject)
            received = b""
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                if self.atEnd:
                    received += data
                else:
                    conn.sendall(data.upper())
            if self.atEnd:
                conn.sendall(received.upper())
                if isinstance(conn, ssl.SSLSocket):
                    conn = conn.unwrap()
        except (ssl.SSLError, OSError) as e:
            self.handshakeErrors.append(str(e))
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def stop(self) -> None:
        self.running = False
        self.listener.close()
        self.thread.join(2)


def exchange(port: int, data: bytes = b"hello", context: ssl.SSLContext | None = None,
             serverName: str = "localhost", timeout: float = 10.0) -> bytes:
    """Connect to the route (optionally with TLS), send ``data``, return what came
    back before the connection closed or ``len(data)`` bytes arrived; b"" when the
    connection was refused, reset or closed before answering."""
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError:
        return b""
    sock: socket.socket = raw
    try:
        if context is not None:
            sock = context.wrap_socket(raw, server_hostname=serverName)
        sock.sendall(data)
        received = b""
        while len(received) < len(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received
    except (TimeoutError, ssl.SSLError, ConnectionError, OSError):
        return b""
    finally:
        sock.close()


class HTTPSMember:
    """An HTTP/1.1 keep-alive member over TLS; ``GET /any`` answers JSON with the path
    and Host header.

    @ivar handshakes: TLS handshakes that succeeded (one per TCP connection).
    @ivar handshakeErrors: why the others failed.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.port = freePort()
        self.handshakes = 0
        self.handshakeErrors: list[str] = []
        self.requests = 0
        member = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                member.requests += 1
                body = json.dumps({"path": self.path, "host": self.headers.get("Host")}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):  # type: ignore[no-untyped-def]
                conn, address = self.socket.accept()
                conn.settimeout(10)
                try:
                    tlsConn = context.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    member.handshakeErrors.append(str(e))
                    conn.close()
                    raise
                member.handshakes += 1
                return tlsConn, address

            def handle_error(self, request, client_address):  # type: ignore[no-untyped-def]
                pass

        self.server = Server(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(2)
