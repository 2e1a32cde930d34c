"""Helpers shared by the runtime and integration tests: free loopback ports and a
bounded wait on state that cannot be awaited directly."""

from __future__ import annotations

import random
import socket
from collections.abc import Callable

import trio


_GIVEN: set[int] = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port nobody listens on (bound, then closed), below the kernel's
    ephemeral range: a port the kernel hands out to outgoing connections could be taken
    by one (another test's client) between this call and the node binding it. Never the
    same port twice in one test process."""
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10_000, max(low, 10_001))
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(pred: Callable[[], object], what: str = "", timeout: float = 10) -> None:
    """Wait until `pred()` holds, polling every 10 ms: the state of in-process nodes
    (several at once) offers no single event to wait on. Bounded by `timeout`."""
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.01)
