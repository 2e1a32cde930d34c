"""A count of requests being served, so a graceful shutdown can let them answer."""

from __future__ import annotations

import trio


class InFlight:
    """`with counter:` around serving one request; `await counter.wait_idle()`."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = trio.Event()
        self._idle.set()

    def __enter__(self) -> None:
        self.count += 1
        if self.count == 1:
            self._idle = trio.Event()

    def __exit__(self, *exc: object) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()
