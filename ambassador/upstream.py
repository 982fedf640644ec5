"""Member endpoints: endpoint strings to client endpoints, with the route's TLS."""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint

from ambassador.endpoints import memberHost


def memberEndpoint(reactor: Any, upstream: str, tls: Any = None) -> IStreamClientEndpoint:
    """The client endpoint for a member, wrapped in TLS when the route has ``[route.tls]``.

    Verification is always on: the name checked (and sent as SNI) is ``server_name``
    or the member's host.
    """
    endpoint = clientFromString(reactor, upstream)
    if tls is None:
        return endpoint
    from twisted.internet.ssl import (
        Certificate,
        PrivateCertificate,
        optionsForClientTLS,
        platformTrust,
        trustRootFromCertificates,
    )

    serverName = tls.serverName or memberHost(upstream) or "localhost"
    trustRoot: Any = platformTrust()
    if tls.trustRoots is not None:
        trustRoot = trustRootFromCertificates(_loadCertificates(tls.trustRoots, Certificate))
    clientCertificate = None
    if tls.certificate is not None:
        with open(tls.certificate, "rb") as c, open(tls.privateKey, "rb") as k:
            clientCertificate = PrivateCertificate.loadPEM(c.read() + b"\n" + k.read())
    options = optionsForClientTLS(serverName, trustRoot=trustRoot, clientCertificate=clientCertificate)
    return wrapClientTLS(options, endpoint)


def _loadCertificates(path: str, certificateType: Any) -> list[Any]:
    """Every PEM certificate in a file, or in every file of a directory."""
    import os
    import re

    files = [path]
    if os.path.isdir(path):
        files = [os.path.join(path, name) for name in sorted(os.listdir(path))]
    certificates = []
    pattern = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
    for name in files:
        if not os.path.isfile(name):
            continue
        with open(name, "rb") as f:
            for block in pattern.findall(f.read()):
                certificates.append(certificateType.loadPEM(block))
    return certificates
