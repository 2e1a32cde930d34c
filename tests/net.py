"""Helpers shared by the runtime and integration tests: free loopback ports and a
bounded wait on state that cannot be awaited directly."""

from __future__ import annotations

import socket
from collections.abc import Callable

import trio


def free_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(pred: Callable[[], object], what: str = "", timeout: float = 10) -> None:
    """Wait until `pred()` holds, polling every 10 ms: the state of in-process nodes
    (several at once) offers no single event to wait on. Bounded by `timeout`."""
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.01)
