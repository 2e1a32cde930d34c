"""metanode/wsfast.py leans on trio-websocket's private attributes: they must be there
(an upgrade that changes them fails here, not as a slow or broken send)."""

from __future__ import annotations

import inspect
import os

import pytest
import trio_websocket
from trio_websocket import WebSocketConnection
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection
from wsproto.utilities import LocalProtocolError

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


class _WS:
    """A wsproto WSConnection past its handshake."""

    def __init__(self, kind: ConnectionType) -> None:
        self.connection = Connection(kind)

    def send(self, event: object) -> bytes:
        return self.connection.send(event)  # type: ignore[arg-type]


class _Conn:
    """What `binary_frame` reads of a WebSocketConnection: its wsproto WSConnection."""

    def __init__(self, kind: ConnectionType) -> None:
        self._wsproto = _WS(kind)


SIZES = [0, 1, 4, 5, 125, 126, 127, 1000, 2048, 2049, 65535, 65536, 70001]


@pytest.mark.parametrize("kind", [ConnectionType.SERVER, ConnectionType.CLIENT])
@pytest.mark.parametrize("size", SIZES)
def test_binary_frame_is_wsprotos_frame(kind: ConnectionType, size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Byte for byte what wsproto makes (the same masking key drawn), from a server
    (unmasked) and from a client (masked), at every length encoding."""
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    keys = iter([b"\x9a\x01\xff\x42", b"\x9a\x01\xff\x42"])
    monkeypatch.setattr(os, "urandom", lambda n: next(keys))
    ours = wsfast.binary_frame(_Conn(kind), data)  # type: ignore[arg-type]
    theirs = Connection(kind).send(BytesMessage(data=data))
    assert ours == theirs


@pytest.mark.parametrize("size", SIZES)
def test_a_clients_frame_reads_back_on_a_server(size: int) -> None:
    data = os.urandom(size)
    server = Connection(ConnectionType.SERVER)
    server.receive_data(wsfast.binary_frame(_Conn(ConnectionType.CLIENT), data))  # type: ignore[arg-type]
    got = b"".join(bytes(e.data) for e in server.events() if isinstance(e, BytesMessage))
    assert got == data


def test_binary_frame_leaves_anything_unusual_to_wsproto() -> None:
    conn = _Conn(ConnectionType.SERVER)
    conn._wsproto.connection.send(BytesMessage(data=b"part", message_finished=False))  # a fragmented message begun
    assert wsfast.binary_frame(conn, b"rest") == b"\x80\x04rest"  # type: ignore[arg-type]  # its final continuation
    closed = _Conn(ConnectionType.SERVER)
    closed._wsproto.connection.send(CloseConnection(code=1000))
    with pytest.raises(LocalProtocolError):
        wsfast.binary_frame(closed, b"x")  # type: ignore[arg-type]  # as wsproto: not in this state


def test_wsproto_still_has_what_binary_frame_reads() -> None:
    import wsproto

    proto = Connection(ConnectionType.CLIENT)._proto
    assert proto.extensions == [] and proto._outbound_opcode is None and proto.client is True
    assert wsproto.WSConnection(ConnectionType.SERVER).connection is None  # until the handshake
    assert "self.connection.send(event)" in inspect.getsource(wsproto.WSConnection.send)
