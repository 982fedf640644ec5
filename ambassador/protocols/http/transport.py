"""Writing without a reactor round trip when the socket can take the bytes now.

Twisted's ``FileDescriptor.write`` always buffers: it registers the socket for
writability (``epoll_ctl``), waits for the next reactor iteration, sends, and
unregisters (``epoll_ctl`` again).  On the proxy's hot path that is two extra
system calls and one extra loop iteration per message each way (TWISTED-NOTES:
"two epoll_ctl per sendto").  When nothing is queued on a plain TCP or UNIX
transport, :func:`writeNow` sends at once and hands only what the kernel did not
take to ``transport.write``, so ordering, back-pressure and error handling stay
Twisted's.  Anything else (TLS, a test's ``StringTransport``) uses ``write``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.tcp import Connection


def canWriteNow(transport: Any) -> bool:
    """Is ``transport`` one whose socket :func:`writeNow` may use directly?"""
    return isinstance(transport, Connection) and hasattr(transport, "socket")


def writeNow(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sending directly when nothing is queued before it."""
    if (
        not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport._writeDisconnected
        and not getattr(transport, "_aborting", False)
    ):
        try:
            sent = transport.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = 0  # let Twisted's own write path meet (and report) the error
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def writerFor(transport: Any) -> Any:
    """The fastest correct ``write(data)`` callable for ``transport``."""
    if canWriteNow(transport):
        return lambda data: writeNow(transport, data)
    return transport.write
