"""Active health checks of a tcp route from outside (SPEC §2 [route.health], §3).

For tcp routes the check is a connection (``path``/``expect_status`` are http only;
the http check is shown in test_dns_e2e with a member whose /health answers 500).
"""

from __future__ import annotations

import json
import socket
import urllib.request

from harness import Ambassador, freePort
from peers import echoServer, refusingAddress


def test_tcp_member_refusing_connections_is_left_out_before_any_app_connection(tmp_path):
    listen, admin = freePort(), freePort()
    dead = refusingAddress()
    with echoServer() as live:
        text = f"""
[[route]]
name = "db"
protocol = "tcp"
listen = "tcp:{listen}"
upstreams = ["{dead}", "tcp:127.0.0.1:{live.port}"]

[route.health]
interval = "200ms"
timeout = "500ms"
unhealthy_threshold = 2
healthy_threshold = 2
"""
        with Ambassador(tmp_path, config=text,
                        args=["--admin", f"tcp:{admin}:interface=127.0.0.1"]) as amb:
            amb.waitForLog(rf"{dead} is unhealthy after 2 failed checks")
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=5) as r:
                members = {m["upstream"]: m for m in json.loads(r.read())["routes"][0]["members"]}
            assert members[dead]["healthy"] is False
            assert members[dead]["breaker"] == "closed"  # no user attempt went there
            for i in range(6):
                with socket.create_connection(("127.0.0.1", listen), timeout=5) as c:
                    c.sendall(b"ping %d" % i)
                    assert c.recv(100) == b"ping %d" % i
            amb.waitForLog(r"access#info\] db ", count=6)
            lines = amb.accessLines()
            assert [line["attempts"] for line in lines] == ["1"] * 6
            assert {line["upstream"] for line in lines} == {f"tcp:127.0.0.1:{live.port}"}
