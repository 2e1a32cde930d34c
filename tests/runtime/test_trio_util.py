"""`metanode.trio_util`: `receive_some`, the read of the peer links and of adopted
WebSockets (the results and errors of `trio.SocketStream.receive_some`, on socket
pairs), and `waiting_receivers`, the raft loop's idle check (what
`statistics().tasks_waiting_receive` counts)."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing

from metanode.trio_util import receive_some, waiting_receivers

pytestmark = pytest.mark.runtime


def _pair() -> tuple[trio.SocketStream, socket.socket]:
    a, b = socket.socketpair()
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), b


async def test_it_waits_for_data_and_reads_it_once() -> None:
    stream, peer = _pair()
    got: list[bytes] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _read_into(stream, got))
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # waiting, not spinning
            peer.send(b"hello")
    assert got == [b"hello"]
    peer.sendall(b"abcdef")
    with trio.fail_after(5):
        assert await receive_some(stream, 4) == b"abcd"  # at most max_bytes
        assert await receive_some(stream, None) == b"ef"  # None: trio's default size
    await stream.aclose()
    peer.close()


async def _read_into(stream: trio.SocketStream, got: list[bytes]) -> None:
    got.append(await receive_some(stream, 100))


async def test_end_of_stream_is_empty_bytes() -> None:
    stream, peer = _pair()
    peer.close()
    with trio.fail_after(5):
        assert await receive_some(stream, 100) == b""
    await stream.aclose()


async def test_a_reset_connection_is_a_broken_resource() -> None:
    a = socket.socket()  # TCP, for a reset
    listener = socket.create_server(("127.0.0.1", 0))
    a.connect(listener.getsockname())
    b, _ = listener.accept()
    listener.close()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    b.close()  # RST
    tcp = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
        await receive_some(tcp, 100)
    await tcp.aclose()


async def test_a_closed_stream_is_a_closed_resource_before_and_during_the_wait() -> None:
    stream, peer = _pair()
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await receive_some(stream, 100)
    stream, peer2 = _pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await receive_some(stream, 100)

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            await stream.aclose()
    peer.close()
    peer2.close()


async def test_other_streams_read_their_own_way() -> None:
    send, recv = trio.testing.memory_stream_pair()
    await send.send_all(b"xyz")
    with trio.fail_after(5):
        assert await receive_some(recv, 100) == b"xyz"
    await send.aclose()
    await recv.aclose()


async def test_waiting_receivers_is_who_statistics_counts_as_waiting() -> None:
    send, recv = trio.open_memory_channel[int](4)
    waiting = waiting_receivers(recv)

    def check(n: int) -> None:
        assert len(waiting) == recv.statistics().tasks_waiting_receive == n

    check(0)
    got: list[int] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _receive_into(recv, got))
            await trio.testing.wait_all_tasks_blocked()
            check(1)
            send.send_nowait(7)  # handed over: no longer waiting, before it runs
            check(0)
        assert got == [7]
        send.send_nowait(8)  # buffered: nobody waits
        check(0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _receive_into(recv, got))
            await trio.testing.wait_all_tasks_blocked()
            check(0)  # it took the buffered one without waiting
        assert got == [7, 8]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _receive_into(recv, got))
            await trio.testing.wait_all_tasks_blocked()
            check(1)
            nursery.cancel_scope.cancel()
        check(0)
    assert waiting_receivers(recv) is waiting  # the same object for the channel's life
    await send.aclose()
    await recv.aclose()


async def _receive_into(recv: trio.MemoryReceiveChannel[int], got: list[int]) -> None:
    got.append(await recv.receive())


async def test_a_close_landing_after_the_wakeup_never_reads_a_reused_descriptor() -> None:
    """The socket is closed, and its descriptor number taken by a new socket, after
    the reader was woken but before it ran (three tasks woken in one pass, in any
    order): the read is of this socket or fails closed, never the new one's bytes."""
    seen: set[str] = set()
    for _ in range(60):
        seen.add(await _close_race_trial())
    assert seen <= {"ClosedResourceError", "mine"}, seen


async def _close_race_trial() -> str:
    x, x_peer = socket.socketpair()
    y, y_peer = socket.socketpair()
    a, peer = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    fd = a.fileno()
    out: dict[str, object] = {}
    keep: list[socket.socket] = []

    async def reader() -> None:
        try:
            out["read"] = (await receive_some(stream, 100)).decode()
        except trio.ClosedResourceError:
            out["read"] = "ClosedResourceError"

    async def closer() -> None:
        await trio.lowlevel.wait_readable(x)
        await trio.aclose_forcefully(stream)

    async def opener() -> None:
        await trio.lowlevel.wait_readable(y)
        n1, n2 = socket.socketpair()  # one of them may get the closed socket's number
        keep.extend((n1, n2))
        (n2 if n1.fileno() == fd else n1).send(b"OTHER")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for task in (reader, closer, opener):
                nursery.start_soon(task)
            await trio.testing.wait_all_tasks_blocked()
            x_peer.send(b"x")
            y_peer.send(b"y")
            peer.send(b"mine")
    for s in (*keep, peer, x, x_peer, y, y_peer):
        s.close()
    return str(out["read"])
