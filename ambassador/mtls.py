"""The ``mtls:`` server endpoint-string prefix: TLS that requires client certificates.

Twisted's ``ssl:`` server endpoint cannot require a client certificate (SPEC §5), so
this package adds, through Twisted's endpoint plugin mechanism, a prefix any Twisted
program can use once the package is installed::

    serverFromString(reactor, "mtls:8443:privateKey=key.pem:certKey=cert.pem:caCerts=ca.pem")

``mtls:PORT:privateKey=KEY.pem:certKey=CERT.pem:caCerts=CA.pem[:interface=ADDR]
[:backlog=N][:extraCertChain=CHAIN.pem]``: a client must present a certificate signed
by a CA in ``caCerts`` (a PEM file, or a directory of them) or the handshake fails.
``certKey`` defaults to ``privateKey`` (both in one file), like ``ssl:``; a
``certKey`` file may carry the intermediates after the leaf.

The instance is made in ``twisted/plugins/ambassador_endpoints.py``; this module
imports pyOpenSSL only when a string is parsed, so plugin scanning stays cheap and
never touches the global reactor.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import (
    IHandshakeListener,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.plugin import IPlugin
from zope.interface import implementer


def mtlsContextFactory(
    privateKey: str, certKey: str | None, caCerts: str, extraCertChain: str | None = None,
) -> Any:
    """Server TLS options that require and verify a client certificate.

    @raise ambassador.tls.TLSFileError: a file that cannot be used, or a key that does
        not match its certificate.
    """
    from twisted.internet.ssl import CertificateOptions

    from ambassador.tls import extraChain, loadCertificates, loadPrivateCertificate

    certificatePath = certKey if certKey is not None else privateKey
    server = loadPrivateCertificate(certificatePath, privateKey)
    chain = extraChain(certificatePath)
    if extraCertChain is not None:
        chain += [c.original for c in loadCertificates(extraCertChain, "extraCertChain")]
    authorities = [c.original for c in loadCertificates(caCerts, "caCerts")]
    return CertificateOptions(
        privateKey=server.privateKey.original,
        certificate=server.original,
        extraCertChain=chain or None,
        verify=True,
        requireCertificate=True,
        caCerts=authorities,
    )


@implementer(IPlugin, IStreamServerEndpointStringParser)
class MTLSServerParser:
    """Parses ``mtls:`` server endpoint strings into ``SSL4ServerEndpoint``s."""

    prefix = "mtls"

    def parseStreamServer(self, reactor: Any, *args: str, **kwargs: str) -> Any:
        """``mtls:PORT:privateKey=...:certKey=...:caCerts=...[:interface=...][:backlog=...]
        [:extraCertChain=...]`` -> an endpoint that requires client certificates."""
        known = {"privateKey", "certKey", "caCerts", "interface", "backlog", "extraCertChain"}
        unknown = sorted(set(kwargs) - known)
        if unknown or len(args) > 1:
            raise ValueError(
                f"mtls: unknown option(s) {', '.join(unknown) or args[1:]!r} "
                f"(known: PORT, {', '.join(sorted(known))})"
            )
        return self._parse(reactor, *args, **kwargs)

    def _parse(
        self, reactor: Any, port: str | None = None, *, privateKey: str | None = None,
        certKey: str | None = None, caCerts: str | None = None, interface: str = "",
        backlog: str = "50", extraCertChain: str | None = None,
    ) -> Any:
        from twisted.internet.endpoints import SSL4ServerEndpoint

        if port is None:
            raise ValueError("mtls: needs a port (mtls:PORT:privateKey=...:certKey=...:caCerts=...)")
        try:
            portNumber = int(port)
        except ValueError:
            raise ValueError(f"mtls: port {port!r} is not a number") from None
        if privateKey is None:
            raise ValueError("mtls: needs privateKey= (the server's PEM private key)")
        if caCerts is None:
            raise ValueError(
                "mtls: needs caCerts= (PEM CA certificates that sign the client certificates)"
            )
        options = mtlsContextFactory(privateKey, certKey, caCerts, extraCertChain)
        return VerifiedClientsServerEndpoint(
            SSL4ServerEndpoint(reactor, portNumber, options, backlog=int(backlog), interface=interface)
        )


@implementer(IStreamServerEndpoint)
class VerifiedClientsServerEndpoint:
    """A TLS server endpoint whose protocols exist only for verified clients.

    Twisted connects the application's protocol when the TCP connection is accepted,
    before the handshake; a route would then start its member connection for a
    client that is about to be refused.  Here the application's protocol is built
    and connected only once the handshake (client certificate included) succeeded.
    """

    def __init__(self, wrapped: Any) -> None:
        # Named like Twisted's wrapper endpoints, which the config's port check unwraps.
        self._wrappedEndpoint = wrapped

    def listen(self, protocolFactory: Any) -> Any:
        return self._wrappedEndpoint.listen(_ServerGateFactory(protocolFactory))


@implementer(IHandshakeListener)
class _ServerGate(Protocol):
    """Holds an accepted TLS connection until its handshake is done."""

    def __init__(self, factory: Any, address: Any) -> None:
        self.applicationFactory = factory
        self.address = address

    def connectionMade(self) -> None:
        pass

    def handshakeCompleted(self) -> None:
        tls: Any = self.transport
        if getattr(tls, "disconnecting", False):
            return
        application = self.applicationFactory.buildProtocol(self.address)
        if application is None:
            tls.abortConnection()
            return
        tls.wrappedProtocol = application
        application.makeConnection(tls)
        if IHandshakeListener.providedBy(application):
            application.handshakeCompleted()

    def dataReceived(self, data: bytes) -> None:  # pragma: no cover
        pass  # TLS delivers no application data before the handshake completes

    def connectionLost(self, reason: Any = None) -> None:
        pass  # refused or gone before the handshake: the application never knew it


class _ServerGateFactory(Factory):
    """Builds gates; starts, stops and names itself after the application's factory."""

    noisy = False

    def __init__(self, factory: Any) -> None:
        self.applicationFactory = factory

    def doStart(self) -> None:
        self.applicationFactory.doStart()

    def doStop(self) -> None:
        self.applicationFactory.doStop()

    def logPrefix(self) -> str:
        prefix = getattr(self.applicationFactory, "logPrefix", None)
        return prefix() if prefix is not None else type(self.applicationFactory).__name__

    def buildProtocol(self, addr: Any) -> _ServerGate:
        return _ServerGate(self.applicationFactory, addr)


mtlsServerParser = MTLSServerParser()
