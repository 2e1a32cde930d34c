"""Sending a WebSocket message without a task switch before the write.

`trio_websocket.WebSocketConnection.send_message` frames the message, then takes the
connection's stream lock with ``async with``, which is a checkpoint: the task yields a
pass of the event loop before its bytes reach the socket, even when nothing else is
being sent. At one request in flight that pass is paid twice per request (the client's
send, the server's reply). `send_message` here takes the lock without a checkpoint when
it is free and writes at once (trio's ``send_all`` writes, then checkpoints); when the
lock is held (a pong, a close, another message being written) it is
``ws.send_message`` itself. Either way the frames leave whole and in the order they
were framed, under the same lock.

It reads private attributes of trio-websocket (0.12): ``_close_reason``,
``_stream_lock``, ``_wsproto``, ``_stream`` and ``_abort_web_socket``, the same
steps as its own ``_send``. tests/unit/test_wsfast.py checks that they are there, so
an upgrade that changes them fails loudly rather than slowly.
"""

from __future__ import annotations

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.events import BytesMessage


async def send_message(ws: WebSocketConnection, data: bytes) -> None:
    """``ws.send_message(data)`` (bytes), without yielding before the write when
    nothing else is being sent on `ws`. Raises ConnectionClosed as it does."""
    lock = ws._stream_lock
    if ws._close_reason is not None or lock.locked():
        await ws.send_message(data)
        return
    frame = ws._wsproto.send(BytesMessage(data=data))
    lock.acquire_nowait()  # free (checked above, no checkpoint since): ours at once
    try:
        await ws._stream.send_all(frame)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await ws._abort_web_socket()
        assert ws._close_reason is not None
        raise ConnectionClosed(ws._close_reason) from None
    finally:
        lock.release()


__all__ = ["send_message"]
