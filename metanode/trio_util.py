"""Small Trio helpers shared by the node and the client."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Sized
from contextlib import asynccontextmanager
from typing import Any

import trio

_RECEIVE_SIZE = 65536  # trio's own default for `receive_some(None)`


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


async def receive_some(stream: trio.abc.ReceiveStream, max_bytes: int | None = None) -> bytes:
    """`stream.receive_some(max_bytes)`, for a plain `trio.SocketStream` without its
    first attempt: that one tries the read before waiting, and between messages it
    nearly always fails (EAGAIN), at a syscall and a raised and caught
    BlockingIOError; this waits for the socket first and reads once (~32k
    instructions less per read, counted under cachegrind: about a third of a read's).
    Same results and errors: the bytes (b"" at the end of the stream),
    `trio.BrokenResourceError` for a failed read, `trio.ClosedResourceError` for a
    closed socket. Other streams (TLS) take their own path."""
    if type(stream) is not trio.SocketStream:
        return await stream.receive_some(max_bytes)
    if max_bytes is None:
        max_bytes = _RECEIVE_SIZE
    if max_bytes < 1:
        raise ValueError("max_bytes must be >= 1")
    sock = stream.socket
    if sock.fileno() < 0:
        raise trio.ClosedResourceError("this socket was already closed")
    await trio.lowlevel.wait_readable(sock)  # ClosedResourceError if closed meanwhile
    # The descriptor again, after the wait: a close whose notice came too late for the
    # wait (it was woken already) leaves -1 here, while its old number may already be
    # another socket's or file's.
    fd = sock.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("this socket was already closed")
    try:
        return os.read(fd, max_bytes)
    except BlockingIOError:  # (woken without data after all): trio's own read
        return await trio.SocketStream.receive_some(stream, max_bytes)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise trio.ClosedResourceError("this socket was already closed") from None
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


def waiting_receivers(channel: trio.MemoryReceiveChannel[Any]) -> Sized:
    """The live collection of the tasks waiting in `channel.receive()`: its length is
    ``channel.statistics().tasks_waiting_receive``, which makes an attrs object each
    call (~13k instructions, against ~0.7k for this; the raft loop's idle check runs
    a few times a write). It is trio's ``_state.receive_tasks``, the same object for
    the channel's life (tests/runtime/test_trio_util.py checks both)."""
    tasks = channel._state.receive_tasks
    assert len(tasks) == channel.statistics().tasks_waiting_receive
    return tasks
