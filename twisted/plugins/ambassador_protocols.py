"""Route protocols shipped with ambassador, registered as Twisted plugins.

Third-party packages add protocols the same way: a module under their own
``twisted/plugins/`` that instantiates an ``IRouteProtocol`` provider.
"""

from ambassador.protocols.tcp import tcpProtocol
from ambassador.protocols.http import httpProtocol  # noqa: F401

__all__ = ["tcpProtocol"]
