"""Route protocols shipped with ambassador, registered as Twisted plugins.

Third-party packages add protocols the same way: a module under their own
``twisted/plugins/`` that instantiates an ``IRouteProtocol`` provider.
"""

from ambassador.protocols.tcp import tcpProtocol
from ambassador.protocols.http import httpProtocol  # noqa: F401
from ambassador.protocols.line.protocol import lineProtocol
from ambassador.protocols.line.plain import plainDialect
from ambassador.protocols.line.redis import redisDialect
from ambassador.protocols.line.memcached import memcachedDialect

__all__ = ["tcpProtocol", "lineProtocol", "plainDialect", "redisDialect", "memcachedDialect"]
