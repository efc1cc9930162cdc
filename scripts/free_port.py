"""Print a free TCP port on 127.0.0.1 for `ray start` to listen on, below the kernel's ephemeral range.

A port taken from bind(("127.0.0.1", 0)) and released is in the ephemeral range, where the kernel may hand it again
to one of Ray's own processes binding port 0 before the process it was meant for binds it (seen in CI: the
dashboard agent's "address already in use" on such a port, and `ray job submit` timing out waiting for the job
agent). Ports between Ray's worker range (10002-19999) and the ephemeral range are never handed out that way.
"""

from __future__ import annotations

import random
import socket


def free_port() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: the kernel's choice, as before
        ephemeral = 0
    for _ in range(200 if ephemeral > 20001 else 0):
        port = random.randrange(20000, ephemeral)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    print(free_port())
