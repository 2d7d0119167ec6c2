"""Loopback ports for local multi-process tests and benchmarks."""

from __future__ import annotations

import random
import socket


def free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (the ring backend listens on one port per
    rank), for `mlx.launch --starting-port p` in local tests and benchmarks."""
    for _ in range(50):
        p = random.randint(20000, 60000)
        try:
            for q in (p, p + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
