"""Small Trio helpers shared by the node and the client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


@asynccontextmanager
async def single_errors() -> AsyncIterator[None]:
    """Let one error out of a nursery as itself, not as a one-member group (strict
    exception groups), so callers can catch ConfigError, JoinFailed, MetaError...;
    several errors stay a group. The error keeps its traceback and context."""
    try:
        yield
    except BaseExceptionGroup as group:
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if exc is group:
            raise
        context = exc.__context__
        try:
            raise exc
        finally:
            exc.__context__ = context
            del exc, context


class InFlight:
    """A count of requests being served, so a graceful shutdown can let them answer:
    `with counter:` around serving one request (or `add()`, then `done()` from the
    task that finishes it); `await counter.wait_idle()`."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = trio.Event()
        self._idle.set()

    def add(self) -> None:
        self.count += 1
        if self.count == 1:
            self._idle = trio.Event()

    def done(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    def __enter__(self) -> None:
        self.add()

    def __exit__(self, *exc: object) -> None:
        self.done()

    async def wait_idle(self) -> None:
        await self._idle.wait()
