"""metanode/wsfast.py leans on trio-websocket's private attributes: they must be there
(an upgrade that changes them fails here, not as a slow or broken send)."""

from __future__ import annotations

import inspect

import trio_websocket
from trio_websocket import WebSocketConnection

from metanode import wsfast


def test_trio_websocket_still_has_what_wsfast_reads() -> None:
    source = inspect.getsource(WebSocketConnection)
    for name in ("_close_reason", "_stream_lock", "_wsproto", "_stream"):
        assert f"self.{name} =" in source or f"self.{name}:" in source, name
    assert callable(getattr(WebSocketConnection, "_abort_web_socket", None))
    send = inspect.getsource(WebSocketConnection._send)
    # wsfast.send_message repeats these steps of `_send`: frame, lock, send_all.
    assert "self._wsproto.send(event)" in send and "async with self._stream_lock" in send
    assert "self._stream.send_all(data)" in send
    # ... and `send_message` checks nothing more before `_send` than wsfast does.
    public = inspect.getsource(WebSocketConnection.send_message)
    assert "if self._close_reason:" in public and "await self._send(event)" in public
    assert public.count("raise ") == 2  # ConnectionClosed, and ValueError for a non-str/bytes
    # wsfast.deliver_to replaces `_handle_message_event` on the class: the reader task
    # must still look it up there when it starts, and the original must still keep
    # its parts and sizes where the replacement reads them.
    reader = inspect.getsource(WebSocketConnection._reader_task)
    assert "BytesMessage: self._handle_message_event" in reader
    assert "TextMessage: self._handle_message_event" in reader
    original = inspect.getsource(wsfast._queue_message)
    for name in ("self._message_size", "self._message_parts", "self._max_message_size",
                 "self._send_channel.send(msg)", "event.message_finished"):
        assert name in original, name
    assert "self._recv_channel = " in source or "self._send_channel, self._recv_channel" in source
    assert trio_websocket.__version__.startswith("0.12"), trio_websocket.__version__
