"""Port helpers the benchmark scripts share (each runs as ``python bench/NAME.py``, so
this folder is on ``sys.path``)."""

from __future__ import annotations

import socket
import subprocess
import time


def freePort() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def waitForPort(port: int, timeout: float = 15.0, process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts on 127.0.0.1:``port``; give up after ``timeout``
    seconds, or at once if ``process`` (the one meant to listen) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
