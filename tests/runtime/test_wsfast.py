"""wsfast.send_now on real sockets (loopback): a frame written whole or finished by a
task under the lock, never interleaved with another; declined when it cannot start."""

from __future__ import annotations

import os
import socket
from functools import partial
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url, serve_websocket
from wsproto.events import BytesMessage

from metanode import wsfast

END = b"-- end --"
UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def _pair(nursery: trio.Nursery, body: Any) -> list[bytes]:
    """Run `body(server_ws, nursery)` on the server side of a fresh connection; return
    the messages the client received before the server's END."""
    got: list[bytes] = []

    async def handler(request: Any) -> None:
        ws = await request.accept()
        async with trio.open_nursery() as inner:
            await body(ws, inner)
        await ws.send_message(END)
        with trio.move_on_after(5):
            await ws.get_message()  # until the client closes

    server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
    async with open_websocket_url(f"ws://127.0.0.1:{server.port}/") as client:
        while (message := await client.get_message()) != END:
            got.append(message)
    return got


async def _bare_client(port: int, done: Any, limit: float = 3.0) -> None:
    """A bare client: the upgrade request, then nothing until `done()` (trio-websocket's
    own client leaks its socket when the server drops it); its socket closed after."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(UPGRADE)
        with trio.move_on_after(limit):
            while not done():
                await trio.sleep(0.01)
    finally:
        await stream.aclose()


async def _serve_one(handler: Any, done: Any) -> None:
    """Serve `handler` for one bare client, which waits until `done()`."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
            await _bare_client(server.port, done)
            nursery.cancel_scope.cancel()


async def test_send_now_writes_at_once_without_a_checkpoint() -> None:
    async def body(ws: WebSocketConnection, nursery: trio.Nursery) -> None:
        assert not wsfast.send_now(ws, b"not adopted")  # declined: nothing sent
        assert wsfast.adopt(ws, nursery)
        assert isinstance(ws._stream_lock, wsfast.HandOffLock)
        assert wsfast.send_now(ws, b"one")
        assert not ws._stream_lock.locked()
        await wsfast.send_message(ws, b"two")  # the usual paths still work with the new lock
        await ws.send_message(b"three")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            assert await _pair(nursery, body) == [b"one", b"two", b"three"]
            nursery.cancel_scope.cancel()


async def test_send_now_declines_while_another_frame_is_written() -> None:
    async def body(ws: WebSocketConnection, nursery: trio.Nursery) -> None:
        assert wsfast.adopt(ws, nursery)
        ws._stream_lock.acquire_nowait()  # someone else is writing
        assert not wsfast.send_now(ws, b"declined")
        ws._stream_lock.release()
        assert wsfast.send_now(ws, b"after")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            assert await _pair(nursery, body) == [b"after"]
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("taken", [0, 1, 7, 100])
async def test_a_partial_write_is_finished_by_a_task_before_any_other_frame(
    taken: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket takes `taken` bytes of the frame (0: EAGAIN): a task writes the rest
    holding the lock, so a message sent meanwhile (both paths) comes after it, whole."""
    big = bytes(range(256)) * 400

    def partial(fd: int, frame: bytes) -> int:
        monkeypatch.setattr(wsfast, "_write_fd", os.write)  # only the first write is cut
        if taken == 0:
            raise BlockingIOError
        return os.write(fd, frame[:taken])

    async def body(ws: WebSocketConnection, nursery: trio.Nursery) -> None:
        assert wsfast.adopt(ws, nursery)
        monkeypatch.setattr(wsfast, "_write_fd", partial)
        assert wsfast.send_now(ws, big)
        assert ws._stream_lock.locked()  # held for the task finishing the frame
        assert not wsfast.send_now(ws, b"declined meanwhile")
        nursery.start_soon(ws.send_message, b"queued behind it")
        await wsfast.send_message(ws, b"sent behind it")
        await trio.sleep(0.05)
        assert not ws._stream_lock.locked()
        assert wsfast.send_now(ws, b"last")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            got = await _pair(nursery, body)
            nursery.cancel_scope.cancel()
    assert got[0] == big and got[-1] == b"last"
    assert sorted(got[1:3]) == [b"queued behind it", b"sent behind it"]
    assert len(got) == 4


@pytest.mark.parametrize("first_write", ["broken", "partial"])
async def test_a_broken_socket_aborts_the_connection_as_send_message_would(
    monkeypatch: pytest.MonkeyPatch, first_write: str
) -> None:
    """The socket is broken for writing: a direct write that fails declines (nothing
    written, the lock free: the usual path finds out and aborts); one that took part
    of the frame leaves the rest to the task, whose send_all finds the broken stream
    and aborts the WebSocket. Either way no exception leaks from send_now and later
    sends see the connection closed."""
    closed: list[Any] = []

    def write(fd: int, frame: bytes) -> int:
        if first_write == "broken":
            raise BrokenPipeError
        return 3

    async def handler(request: Any) -> None:
        ws = await request.accept()
        async with trio.open_nursery() as inner:
            assert wsfast.adopt(ws, inner)
            monkeypatch.setattr(wsfast, "_write_fd", write)
            ws._stream.socket.shutdown(socket.SHUT_WR)  # broken for writing (EPIPE), no checkpoint
            if first_write == "broken":
                assert not wsfast.send_now(ws, b"declined")
                assert not ws._stream_lock.locked()
                with pytest.raises(ConnectionClosed):
                    await wsfast.send_message(ws, b"the usual path")
            else:
                assert wsfast.send_now(ws, b"begun")
        assert not ws._stream_lock.locked()
        closed.append(ws.closed)
        assert not wsfast.send_now(ws, b"after")  # closed: declined

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
            await _bare_client(server.port, lambda: bool(closed))
            nursery.cancel_scope.cancel()
    assert closed and closed[0] is not None


async def test_deliver_to_hands_messages_to_the_sink_in_order_whole_and_in_the_reader_task() -> None:
    """Fragmented and text messages arrive whole, in order, from the reader task;
    messages queued before `deliver_to` come back from it; `get_message` then only
    reports the end."""
    got: list[Any] = []
    tasks: set[str] = set()
    ended: list[bool] = []

    async def sink(message: bytes | str) -> None:
        got.append(message)
        tasks.add(trio.lowlevel.current_task().name)

    async def handler(request: Any) -> None:
        ws = await request.accept()
        await trio.sleep(0.1)  # the client's first message is queued by then
        got.extend(wsfast.deliver_to(ws, sink))
        try:
            await ws.get_message()
        except ConnectionClosed:
            ended.append(True)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
            async with open_websocket_url(f"ws://127.0.0.1:{server.port}/") as client:
                await client.send_message(b"queued")
                await trio.sleep(0.2)
                await client._send(BytesMessage(data=b"frag", message_finished=False))
                await client._send(BytesMessage(data=b"mented", message_finished=True))
                await client.send_message("text")
                await client.send_message(b"last")
                with trio.move_on_after(2):
                    while len(got) < 4:
                        await trio.sleep(0.01)
            with trio.move_on_after(2):
                while not ended:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert got == [b"queued", b"fragmented", "text", b"last"]
    assert all("reader_task" in name for name in tasks), tasks
    assert ended == [True]


async def test_deliver_to_keeps_the_size_limit() -> None:
    """A message over the connection's limit closes it with 1009, as without a sink;
    the sink never sees it."""
    got: list[Any] = []
    reasons: list[Any] = []

    async def sink(message: bytes | str) -> None:
        got.append(message)

    async def handler(request: Any) -> None:
        ws = await request.accept()
        wsfast.deliver_to(ws, sink)
        try:
            await ws.get_message()
        except ConnectionClosed as e:
            reasons.append(e.reason.code)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(serve_websocket, handler, "127.0.0.1", 0, None, max_message_size=1000)
            )
            async with open_websocket_url(f"ws://127.0.0.1:{server.port}/") as client:
                await client.send_message(b"small")
                await client._send(BytesMessage(data=b"x" * 600, message_finished=False))
                await client._send(BytesMessage(data=b"y" * 600, message_finished=True))
                with trio.move_on_after(2):
                    while not reasons:
                        await trio.sleep(0.01)
            await client._stream.aclose()  # docs/architecture/stack.md: the client leaks it otherwise
            nursery.cancel_scope.cancel()
    assert got == [b"small"] and reasons == [1009]


async def test_a_frame_cut_short_by_a_cancel_closes_the_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """The task finishing a frame is cancelled with the frame half written: nothing
    may follow it on the stream, so the socket is closed (and the lock released)."""
    state: dict[str, Any] = {}

    async def handler(request: Any) -> None:
        ws = await request.accept()
        with trio.move_on_after(0.3):
            async with trio.open_nursery() as inner:
                assert wsfast.adopt(ws, inner)
                monkeypatch.setattr(wsfast, "_write_fd", lambda fd, frame: os.write(fd, frame[:10]))
                assert wsfast.send_now(ws, bytes(32 << 20))  # the peer does not read: the rest blocks
                await trio.sleep_forever()
        state["fd"] = ws._stream.socket.fileno()
        state["locked"] = ws._stream_lock.locked()

    await _serve_one(handler, lambda: "fd" in state)
    assert state == {"fd": -1, "locked": False}


async def test_a_partial_write_after_the_adopting_nursery_closed_ends_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No task can finish the frame (the nursery `adopt` was given is gone): the
    socket is closed at once, nothing raised, the lock free."""
    state: dict[str, Any] = {}

    async def handler(request: Any) -> None:
        ws = await request.accept()
        async with trio.open_nursery() as gone:
            assert wsfast.adopt(ws, gone)
        monkeypatch.setattr(wsfast, "_write_fd", lambda fd, frame: os.write(fd, frame[:5]))
        state["sent"] = wsfast.send_now(ws, b"x" * 100)
        state["fd"] = ws._stream.socket.fileno()
        state["locked"] = ws._stream_lock.locked()

    await _serve_one(handler, lambda: "fd" in state)
    assert state == {"sent": True, "fd": -1, "locked": False}
