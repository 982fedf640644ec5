"""TLS towards members: certificate files, client options, and verified connects.

Verification is never off (SPEC §2/§5): every member connection made through
:class:`VerifiedTLSEndpoint` counts as connected only once the TLS handshake has
completed *and* the peer's chain and name were verified.  A handshake that fails
is a failed attempt with reason ``tls-error`` that wrote nothing (so any request may
be retried on another member, and the breaker counts it), logged once with the
peer certificate's subject and the reason OpenSSL (or service_identity) gave.

Twisted's own ``connect()`` of a TLS endpoint fires when the *TCP* connection is
made, before the handshake; a route that trusted that would count a member with a
bad certificate as connected.  Hence the gate below, shared by every protocol.

Heavy imports (pyOpenSSL) happen inside functions: this module is imported by the
config checks, which must stay cheap.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ambassador.resilience.reasons import TLS_ERROR, AttemptFailed

log = Logger(namespace="ambassador")

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


class TLSFileError(ValueError):
    """A certificate, key or CA file that cannot be used; the text says why."""


# --- files ----------------------------------------------------------------------------


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSFileError(f"{what} {path!r}: cannot read: {e.strerror or e}") from None


def certificateFiles(path: str) -> list[str]:
    """The files a ``trust_roots``/``caCerts`` path stands for: itself, or every
    regular file of the directory (sorted, so that errors are reproducible)."""
    if os.path.isdir(path):
        return [
            os.path.join(path, name)
            for name in sorted(os.listdir(path))
            if os.path.isfile(os.path.join(path, name))
        ]
    return [path]


def loadCertificates(path: str, what: str = "CA certificates") -> list[Any]:
    """Every PEM certificate in a file, or in the files of a directory.

    @raise TLSFileError: unreadable, or not one certificate in it.
    """
    from twisted.internet.ssl import Certificate

    if not os.path.exists(path):
        raise TLSFileError(f"{what} {path!r}: no such file or directory")
    certificates = []
    for name in certificateFiles(path):
        for block in _PEM_CERTIFICATE.findall(_read(name, what)):
            try:
                certificates.append(Certificate.loadPEM(block))
            except Exception as e:
                raise TLSFileError(f"{what} {name!r}: not a valid PEM certificate: {_first(e)}") from None
    if not certificates:
        raise TLSFileError(f"{what} {path!r}: holds no PEM certificate")
    return certificates


def loadPrivateCertificate(certificate: str, privateKey: str | None) -> Any:
    """A certificate and its private key (``privateKey`` None: both in one file).

    @raise TLSFileError: unreadable, unparsable, or a key that does not match the
        certificate.
    """
    from OpenSSL import crypto
    from twisted.internet.ssl import Certificate, KeyPair, PrivateCertificate

    certificatePEM = _read(certificate, "certificate")
    keyPEM = _read(privateKey, "private key") if privateKey is not None else certificatePEM
    keyPath = privateKey if privateKey is not None else certificate
    blocks = _PEM_CERTIFICATE.findall(certificatePEM)
    if not blocks:
        raise TLSFileError(f"certificate {certificate!r}: holds no PEM certificate")
    try:
        leaf = Certificate.loadPEM(blocks[0])
    except Exception as e:
        raise TLSFileError(f"certificate {certificate!r}: not a valid PEM certificate: {_first(e)}") from None
    try:
        key = KeyPair.load(keyPEM, crypto.FILETYPE_PEM)
    except Exception as e:
        raise TLSFileError(f"private key {keyPath!r}: not a valid PEM private key: {_first(e)}") from None
    if not key.keyHash() == leaf.getPublicKey().keyHash():
        raise TLSFileError(
            f"private key {keyPath!r} does not match the certificate {certificate!r}"
        )
    return PrivateCertificate.fromCertificateAndKeyPair(leaf, key)


def extraChain(certificate: str) -> list[Any]:
    """The intermediate certificates that follow the leaf in a certificate file."""
    from twisted.internet.ssl import Certificate

    blocks = _PEM_CERTIFICATE.findall(_read(certificate, "certificate"))
    return [Certificate.loadPEM(block).original for block in blocks[1:]]


def clientOptions(
    serverName: str, trustRoots: str | None = None,
    certificate: str | None = None, privateKey: str | None = None,
) -> Any:
    """Client TLS options that verify the chain (``trustRoots``, else the platform's
    store) and ``serverName`` (also sent as SNI), with an optional client certificate.

    @raise TLSFileError: a file that cannot be used.
    """
    from twisted.internet.ssl import (
        optionsForClientTLS,
        platformTrust,
        trustRootFromCertificates,
    )

    trustRoot: Any = platformTrust()
    if trustRoots is not None:
        trustRoot = trustRootFromCertificates(loadCertificates(trustRoots, "trust_roots"))
    clientCertificate = None
    if certificate is not None:
        clientCertificate = loadPrivateCertificate(certificate, privateKey)
    extra: dict[str, Any] | None = None
    if certificate is not None:
        chain = extraChain(certificate)
        if chain:
            extra = {"extraCertChain": chain}
    return optionsForClientTLS(
        serverName, trustRoot=trustRoot, clientCertificate=clientCertificate,
        extraCertificateOptions=extra,
    )


# --- the handshake gate ---------------------------------------------------------------


def describeHandshakeFailure(reason: Failure, handle: Any) -> tuple[str, str]:
    """(peer certificate subject, why) for a failed handshake, for the log.

    ``handle`` is the pyOpenSSL connection (``ITLSTransport.getHandle()``), or None.
    """
    subject = "none presented"
    if handle is not None:
        try:
            peer = handle.get_peer_certificate()
            if peer is None:
                # OpenSSL keeps the chain it was sent even when verifying it failed
                chain = handle.get_peer_cert_chain()
                peer = chain[0] if chain else None
            if peer is not None:
                subject = peer.to_cryptography().subject.rfc4514_string() or "(empty subject)"
        except Exception:  # pragma: no cover - diagnostics must never raise
            pass
    value = reason.value
    why = _first(value) if str(value) else type(value).__name__
    try:
        from OpenSSL.SSL import Error as SSLError

        if isinstance(value, SSLError):
            parts = [entry[2] for entry in value.args[0] if isinstance(entry, tuple) and len(entry) == 3]
            why = "; ".join(p for p in parts if p) or why
            detail = _verifyResult(handle)
            if detail and "verify" in why:
                why = f"{why}: {detail}"
    except Exception:  # pragma: no cover
        pass
    try:
        from service_identity import VerificationError

        if isinstance(value, VerificationError):
            why = "certificate does not match the name: " + "; ".join(
                _mismatch(e) for e in value.errors
            )
    except Exception:  # pragma: no cover
        pass
    return subject, why


def _mismatch(error: Any) -> str:
    identity = getattr(error, "mismatched_id", None)
    name = getattr(identity, "hostname", None) or getattr(identity, "ip", None) or identity
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return f"{type(error).__name__} {name}"


def _verifyResult(handle: Any) -> str | None:
    """OpenSSL's verify result text (e.g. "certificate has expired"), if any.

    pyOpenSSL has no public accessor for it; its cffi bindings do.
    """
    if handle is None:
        return None
    try:
        from OpenSSL._util import ffi, lib

        code = lib.SSL_get_verify_result(handle._ssl)
        if code == 0:
            return None
        return ffi.string(lib.X509_verify_cert_error_string(code)).decode()
    except Exception:
        return None


def isTLSFailure(value: BaseException) -> bool:
    """Is this how a TLS handshake (chain, name, protocol) fails?"""
    try:
        from OpenSSL.SSL import Error as SSLError
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover - dependencies
        return False
    return isinstance(value, (SSLError, VerificationError))


@implementer(IHandshakeListener)
class _HandshakeGate(Protocol):
    """Sits under the TLS layer until the handshake is done, then steps aside.

    The application's protocol is connected only after a verified handshake, so it
    never sees a connection to an unverified peer; from then on the TLS layer
    delivers straight to it (the gate costs nothing per byte).
    """

    def __init__(self, connecting: _Connecting) -> None:
        self.connecting = connecting

    def connectionMade(self) -> None:
        pass

    def handshakeCompleted(self) -> None:
        tls: Any = self.transport
        # A name mismatch aborts the connection from inside do_handshake, which then
        # still reports success: trust the abort, and wait for connectionLost.
        if getattr(tls, "disconnecting", False):
            return
        self.connecting.verified(tls)

    def dataReceived(self, data: bytes) -> None:  # pragma: no cover
        pass  # TLS delivers no application data before the handshake completes

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.connecting.lost(reason if reason is not None else Failure(ConnectionDone()), self.transport)


class _GateFactory(Factory):
    noisy = False

    def __init__(self, connecting: _Connecting) -> None:
        self.connecting = connecting

    def buildProtocol(self, addr: Any) -> _HandshakeGate:
        self.connecting.address = addr
        return _HandshakeGate(self.connecting)


def _memberTransportClass() -> type:
    """The TLS layer for member connections: Twisted's, made safe for a relay.

    Built lazily (it subclasses a pyOpenSSL-backed class) and once.
    """
    global _MemberTLSTransport
    if _MemberTLSTransport is not None:
        return _MemberTLSTransport
    from twisted.protocols.tls import BufferingTLSTransport

    class MemberTLSTransport(BufferingTLSTransport):  # type: ignore[misc]
        """Twisted's TLS layer with two fixes a relay needs.

        - ``loseWriteConnection`` is a TLS half-close: send close_notify, then keep
          reading until the member closes.  Twisted's layer has none of its own, so
          the call fell through to the TCP socket under it (a FIN without
          close_notify, which the member reads as a truncation attack and which made
          the layer lose the connection in the middle of its own read loop).
        - ``abortConnection`` after the connection is gone does nothing, as it does
          for a plain TCP transport (Twisted's TLS layer raises AttributeError).
        """

        def loseWriteConnection(self) -> None:
            if self._tlsConnection is None or self.disconnecting:
                return
            # No more bytes will come from the app: its transport need not be paused
            # by this one any more, and TLS shuts down only once it is unregistered.
            self.unregisterProducer()
            self.loseConnection()

        def abortConnection(self) -> None:
            if self._tlsConnection is None:
                return
            super().abortConnection()

    _MemberTLSTransport = MemberTLSTransport
    return MemberTLSTransport


_MemberTLSTransport: type | None = None


class _Connecting:
    """One connect() through the gate: from TCP connect to a verified handshake."""

    def __init__(self, endpoint: VerifiedTLSEndpoint, factory: Any) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.address: Any = None
        self.application: Any = None
        self.tls: Any = None
        self.done = False
        self.result: Deferred[Any] = Deferred(self._cancel)
        self.tcp: Deferred[Any] | None = None

    def start(self) -> Deferred[Any]:
        wrapped = self.endpoint.wrapped
        gateFactory = _GateFactory(self)
        inner = getattr(wrapped, "_wrappedEndpoint", None)
        makeTLSFactory = getattr(wrapped, "_wrapperFactory", None)
        if inner is not None and makeTLSFactory is not None:
            # Twisted's wrapClientTLS endpoint (what [route.tls] and tls: strings build):
            # connect its inner endpoint with its TLS factory, whose TLS layer is ours.
            tlsFactory = makeTLSFactory(gateFactory)
            tlsFactory.protocol = _memberTransportClass()
            tcp = inner.connect(tlsFactory)
        else:  # pragma: no cover - another TLS endpoint: its own TLS layer, our gate
            tcp = wrapped.connect(gateFactory)
        self.tcp = tcp
        tcp.addCallbacks(self._tcpConnected, self._tcpFailed)
        return self.result

    def _tcpConnected(self, protocol: Any) -> None:
        self.tcp = None
        if self.done:
            return
        # The TLS layer, whichever way it was reached.
        self.tls = protocol.transport if isinstance(protocol, _HandshakeGate) else protocol

    def _tcpFailed(self, failure: Failure) -> None:
        self.tcp = None
        if not self.done:
            self.done = True
            if isTLSFailure(failure.value):
                failure = Failure(AttemptFailed(TLS_ERROR, written=False))
            self.result.errback(failure)

    def verified(self, tls: Any) -> None:
        if self.done:
            return
        self.done = True
        try:
            application = self.factory.buildProtocol(self.address)
            if application is None:
                raise ValueError(f"{self.factory!r} built no protocol")
            tls.wrappedProtocol = application
            application.makeConnection(tls)
            if IHandshakeListener.providedBy(application):
                application.handshakeCompleted()
        except Exception:
            # Not the member's fault, and not the TLS layer's to report: the attempt
            # fails with it (the core logs it as unexpected) and the connection closes.
            failure = Failure()
            tls.abortConnection()
            self.result.errback(failure)
            return
        self.application = application
        self.result.callback(application)

    def lost(self, reason: Failure, tls: Any) -> None:
        if self.done:
            return
        self.done = True
        handle = None
        try:
            handle = tls.getHandle() if tls is not None else None
        except Exception:  # pragma: no cover
            handle = None
        if isTLSFailure(reason.value):
            subject, why = describeHandshakeFailure(reason, handle)
            log.warn(
                "route {route}: TLS handshake with {upstream} failed (tls-error): {why}; "
                "peer certificate subject: {subject}",
                route=self.endpoint.route or "-", upstream=self.endpoint.upstream or "-",
                why=why, subject=subject,
            )
            self.result.errback(Failure(AttemptFailed(TLS_ERROR, written=False)))
        else:
            # The member closed or reset the connection before the handshake finished:
            # nothing was sent, so it is a connect failure.
            self.result.errback(Failure(AttemptFailed("connect-failure", written=False)))

    def _cancel(self, result: Deferred[Any]) -> None:
        if self.done:
            return
        self.done = True
        if self.tcp is not None:
            self.tcp.cancel()
        elif self.tls is not None:
            self.tls.abortConnection()


@implementer(IStreamClientEndpoint)
class VerifiedTLSEndpoint:
    """A TLS client endpoint whose connect() fires after a verified handshake.

    The protocol factory gets ``buildProtocol`` once the handshake is done, but no
    ``doStart``/``doStop`` (route protocols' member factories need none).

    @param wrapped: a client endpoint that speaks TLS as a Twisted TLS wrapper
        (``wrapClientTLS(...)``, or what a ``tls:`` endpoint string builds).
    @param route: the route name, for the log.
    @param upstream: the member's endpoint string, for the log.
    """

    def __init__(self, wrapped: Any, route: str | None = None, upstream: str | None = None) -> None:
        self.wrapped = wrapped
        self.route = route
        self.upstream = upstream

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        """Connect, handshake, verify; then build and connect ``protocolFactory``'s
        protocol.  Fails with ``AttemptFailed("tls-error", written=False)`` on a bad
        handshake; cancelling it closes whatever was opened."""
        return _Connecting(self, protocolFactory).start()


def _first(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0]


def checkTLSMemberString(description: str, args: list[str], kwargs: dict[str, str]) -> None:
    """Check the files a ``tls:`` member endpoint string names, before Twisted's own
    parser does (whose errors say "UnlistableError" or a bare errno).

    Twisted's ``trustRoots=`` is a *directory*, and it reads only the first
    certificate of each ``*.pem`` file in it.

    @raise TLSFileError: with the option, the path and what is wrong with it.
    """
    if len(args) < 3 and not ("host" in kwargs and "port" in kwargs):
        raise TLSFileError(f"{description!r}: a tls: member needs a host and a port (tls:HOST:PORT)")
    trustRoots = kwargs.get("trustRoots")
    if trustRoots is not None:
        if not os.path.isdir(trustRoots):
            what = "no such directory" if not os.path.exists(trustRoots) else "not a directory"
            raise TLSFileError(
                f"trustRoots={trustRoots!r}: {what} (tls: wants a directory of *.pem CA certificates)"
            )
        pems = [n for n in certificateFiles(trustRoots) if n.lower().endswith(".pem")]
        found = False
        for name in pems:
            if _PEM_CERTIFICATE.search(_read(name, "trustRoots file")):
                found = True
        if not found:
            raise TLSFileError(f"trustRoots={trustRoots!r}: no *.pem file with a CA certificate in it")
    certificate = kwargs.get("certificate")
    privateKey = kwargs.get("privateKey")
    if privateKey is not None and certificate is None:
        raise TLSFileError(f"privateKey={privateKey!r} needs certificate= (the client certificate)")
    if certificate is not None:
        try:
            loadPrivateCertificate(certificate, privateKey)
        except TLSFileError as e:
            raise TLSFileError(f"client certificate: {e}") from None
