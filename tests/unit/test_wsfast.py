"""metanode/wsfast.py leans on trio-websocket's private attributes: they must be there
(an upgrade that changes them fails here, not as a slow or broken send)."""

from __future__ import annotations

import inspect

import trio_websocket
from trio_websocket import WebSocketConnection


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
    assert trio_websocket.__version__.startswith("0.12"), trio_websocket.__version__
