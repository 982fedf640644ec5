"""The smallest end-to-end check: bytes through a tcp route of the real twistd."""

import socket
import threading

from harness import Ambassador, freePort


def test_tcp_echo_through_route_with_a_dead_first_member(tmp_path):
    listen, dead, live = freePort(), freePort(), freePort()
    server = socket.create_server(("127.0.0.1", live))
    received = []

    def echoOnce():
        conn, _ = server.accept()
        with conn:
            data = conn.recv(100)
            received.append(data)
            conn.sendall(data.upper())

    thread = threading.Thread(target=echoOnce, daemon=True)
    thread.start()
    spec = f"tcp tcp:{listen} tcp:127.0.0.1:{dead} tcp:127.0.0.1:{live}"
    with Ambassador(tmp_path, routes=[spec]) as amb:
        with socket.create_connection(("127.0.0.1", listen), timeout=5) as c:
            c.sendall(b"hello")
            assert c.recv(100) == b"HELLO"
        thread.join(5)
        assert received == [b"hello"]
        line = amb.waitForLog(r"access#info\] tcp-1 ")[0]
        assert line is not None
    server.close()
