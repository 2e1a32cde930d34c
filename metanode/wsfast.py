"""Sending a WebSocket message without a task switch before the write, or without
awaiting at all.

`trio_websocket.WebSocketConnection.send_message` frames the message, then takes the
connection's stream lock with ``async with``, which is a checkpoint: the task yields a
pass of the event loop before its bytes reach the socket, even when nothing else is
being sent. At one request in flight that pass is paid twice per request (the client's
send, the server's reply). `send_message` here takes the lock without a checkpoint when
it is free and writes at once (trio's ``send_all`` writes, then checkpoints); when the
lock is held (a pong, a close, another message being written) it is
``ws.send_message`` itself. Either way the frames leave whole and in the order they
were framed, under the same lock.

`send_now` sends from code that cannot await (a write's reply, from the task that
applied the write: docs/architecture/node.md). It needs the connection `adopt`ed
first: its stream lock becomes a `HandOffLock`, which trio-websocket takes with
``async with`` as before, but which has no owner. `send_now` takes it, writes the frame
to the socket's file descriptor (non-blocking), and releases it when the socket took
the frame whole; otherwise a task of the adopted nursery writes the rest and releases
the lock then, so no other frame (a reply, a pong, a close) can start in between.
Plain TCP only: over TLS the bytes go through the SSL object, and `send_now` declines.
An adopted connection's reader task also reads with `trio_util.receive_some`, which
waits for the socket before its one read. Both send paths frame a message with
`binary_frame` (wsproto's bytes, built in a few C calls).

`deliver_to` hands a connection's messages to a function, awaited by its reader
task, instead of queueing them for `get_message` (another task's wake-up per
message). trio-websocket's reader task builds its table of event handlers when it
starts, from the class, so the one handler involved (`_handle_message_event`) is
replaced on the class; it behaves as before on connections without a sink.

It reads private attributes of trio-websocket (0.12): ``_close_reason``,
``_stream_lock``, ``_wsproto``, ``_stream`` and ``_abort_web_socket``, the same
steps as its own ``_send``, and of wsproto's connection (``_proto.extensions``,
``_proto._outbound_opcode``, ``_proto.client``). tests/unit/test_wsfast.py checks
that they are there, so an upgrade that changes them fails loudly rather than slowly.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Awaitable, Callable

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState
from wsproto.frame_protocol import XorMaskerSimple
from wsproto.events import BytesMessage, TextMessage

from metanode import trio_util

_write_fd = os.write  # send_now's direct write (tests replace it)


class HandOffLock:
    """A lock with no owner (a semaphore of one, FIFO), with the interface of the
    trio lock it replaces: ``async with``, `acquire_nowait`, `release`, `locked`."""

    __slots__ = ("_sem",)

    def __init__(self) -> None:
        self._sem = trio.Semaphore(1, max_value=1)  # a second release raises

    def locked(self) -> bool:
        return self._sem.value == 0

    def acquire_nowait(self) -> None:
        self._sem.acquire_nowait()

    async def acquire(self) -> None:
        await self._sem.acquire()

    def release(self) -> None:
        self._sem.release()

    async def __aenter__(self) -> None:
        await self._sem.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._sem.release()


def adopt(ws: WebSocketConnection, nursery: trio.Nursery) -> bool:
    """Let `send_now` write on `ws` (plain TCP only), finishing partial writes in
    tasks of `nursery`, which must outlive every `send_now` on `ws`. False (nothing
    changed) when `ws` is not plain TCP or a frame is being written right now."""
    if not isinstance(ws._stream, trio.SocketStream) or ws._stream_lock.locked():
        return False
    ws._stream_lock = HandOffLock()
    ws._metanode_nursery = nursery  # type: ignore[attr-defined]
    # trio-websocket's reader task reads with `receive_some`: the leaner read
    # (trio_util.receive_some). trio's SocketStream cannot be subclassed.
    ws._stream.receive_some = functools.partial(trio_util.receive_some, ws._stream)  # type: ignore[method-assign]
    return True


_HEAD_16 = struct.Struct("!BBH")
_HEAD_64 = struct.Struct("!BBQ")
_INT_MASK_MAX = 2048  # (payload bytes: masked as one int XOR up to this, else by wsproto's masker)


def binary_frame(ws: WebSocketConnection, data: bytes) -> bytes:
    """The frame of one binary message `data`: what ``ws._wsproto.send(BytesMessage(data))``
    returns (RFC 6455 §5.2: FIN, opcode 2, the length, and from a client a fresh
    random masking key and the masked payload), built here in a few C calls where
    wsproto spends ~32k instructions a frame from a server and ~57k from a client
    (counted under cachegrind, 200 bytes). wsproto's own when the connection is not
    open, negotiated an extension, or is in the middle of a fragmented message (none
    of which metanode does)."""
    wsconn = ws._wsproto  # a wsproto WSConnection: its `connection` once the handshake is done
    conn = wsconn.connection
    proto = conn._proto if conn is not None and conn.state is ConnectionState.OPEN else None
    if proto is None or proto.extensions or proto._outbound_opcode is not None:
        return wsconn.send(BytesMessage(data=data))  # type: ignore[no-any-return]
    n = len(data)
    mask_bit = 0x80 if proto.client else 0
    if n <= 125:
        head = bytes((0x82, n | mask_bit))
    elif n <= 0xFFFF:
        head = _HEAD_16.pack(0x82, 126 | mask_bit, n)
    else:
        head = _HEAD_64.pack(0x82, 127 | mask_bit, n)
    if not mask_bit:
        return head + data
    key = os.urandom(4)  # (as wsproto: a fresh key from the OS's entropy, §5.3)
    if n > _INT_MASK_MAX:  # wsproto's byte-table masking is faster on long payloads
        return head + key + XorMaskerSimple(key).process(bytearray(data))
    repeated = int.from_bytes((key * (n // 4 + 1))[:n], "little")
    return head + key + (int.from_bytes(data, "little") ^ repeated).to_bytes(n, "little")


def send_now(ws: WebSocketConnection, data: bytes) -> bool:
    """Send `data` as one binary message without awaiting: True when its frame is
    written, or begun and left to a task that writes the rest under the lock. False,
    having done nothing, when it cannot start now: `ws` not adopted, closing, or
    another frame being written, or a broken socket (nothing written); then send it
    as usual (`send_message`). A socket that breaks during the rest is found by that
    task (as `send_message` would: the connection aborts)."""
    lock = ws._stream_lock
    if not isinstance(lock, HandOffLock) or lock.locked() or ws._close_reason is not None:
        return False
    frame = binary_frame(ws, data)
    lock.acquire_nowait()
    try:
        n = _write_fd(ws._stream.socket.fileno(), frame)
    except BlockingIOError:  # full: the task writes it all
        n = 0
    except OSError:  # broken, nothing written: the usual path finds out (and aborts)
        lock.release()
        return False
    except BaseException:
        lock.release()
        raise
    if n == len(frame):
        lock.release()
        return True
    try:
        ws._metanode_nursery.start_soon(_finish, ws, lock, memoryview(frame)[n:])  # type: ignore[attr-defined]
    except RuntimeError:  # the nursery is closed: the connection is ending; end it here
        _cut(ws)
        lock.release()
    return True


async def _finish(ws: WebSocketConnection, lock: HandOffLock, rest: memoryview) -> None:
    try:
        await ws._stream.send_all(rest)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await ws._abort_web_socket()
    except BaseException:  # cancelled with the frame half written
        _cut(ws)
        raise
    finally:
        lock.release()


def _cut(ws: WebSocketConnection) -> None:
    """A frame is half written: nothing may follow it on this stream. Close the
    socket (the reader task then ends the connection)."""
    ws._stream.socket.close()


async def send_message(ws: WebSocketConnection, data: bytes) -> None:
    """``ws.send_message(data)`` (bytes), without yielding before the write when
    nothing else is being sent on `ws`. Raises ConnectionClosed as it does."""
    lock = ws._stream_lock
    if ws._close_reason is not None or lock.locked():
        await ws.send_message(data)
        return
    frame = binary_frame(ws, data)
    lock.acquire_nowait()  # free (checked above, no checkpoint since): ours at once
    try:
        await ws._stream.send_all(frame)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await ws._abort_web_socket()
        assert ws._close_reason is not None
        raise ConnectionClosed(ws._close_reason) from None
    finally:
        lock.release()


_queue_message = WebSocketConnection._handle_message_event


def deliver_to(ws: WebSocketConnection, sink: Callable[[bytes | str], Awaitable[None]]) -> list[bytes | str]:
    """From now on, `await sink(message)` in `ws`'s reader task for each message
    received whole (the size limit as before: over it, the connection closes with
    1009); `get_message` then only raises ConnectionClosed once the connection ends.
    Returns the messages queued before, oldest first, for the caller to handle before
    it awaits anything (they precede every message the sink gets). `sink` must not
    raise: the reader task would end with it."""
    ws._metanode_sink = sink  # type: ignore[attr-defined]
    queued: list[bytes | str] = []
    while True:
        try:
            queued.append(ws._recv_channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return queued


async def _handle_message_event(self: WebSocketConnection, event: BytesMessage | TextMessage) -> None:
    sink = getattr(self, "_metanode_sink", None)
    if sink is None or not event.message_finished or self._message_size + len(event.data) > self._max_message_size:
        await _queue_message(self, event)  # no sink; a part; or too large (closes 1009)
        return
    message: bytes | str
    if self._message_parts:
        parts = [*self._message_parts, event.data]
        message = b"".join(parts) if isinstance(event, BytesMessage) else "".join(parts)
        self._message_parts = []
        self._message_size = 0
    else:
        message = bytes(event.data) if isinstance(event, BytesMessage) else event.data
    await sink(message)


WebSocketConnection._handle_message_event = _handle_message_event  # type: ignore[method-assign]

__all__ = ["HandOffLock", "adopt", "deliver_to", "send_message", "send_now"]
