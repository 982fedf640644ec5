"""Endpoint-string parsers shipped with ambassador, registered as Twisted plugins.

``mtls:`` server endpoints (SPEC §5) for any Twisted program with the package
installed.  Kept tiny: the parser module imports pyOpenSSL only when a string is
parsed, and nothing here imports the global reactor (TWISTED-NOTES).
"""

from ambassador.mtls import mtlsServerParser

__all__ = ["mtlsServerParser"]
