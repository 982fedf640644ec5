"""The ``http`` route: an HTTP/1.1 reverse proxy on the shared resilience core.

``server`` serves app connections, ``client`` keeps pooled member connections,
``headers`` holds the header rules; ``plugin`` is what ``twisted/plugins`` registers.
"""

from ambassador.protocols.http.plugin import HTTPRouteProtocol, httpProtocol

__all__ = ["HTTPRouteProtocol", "httpProtocol"]
