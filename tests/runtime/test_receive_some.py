"""`trio_util.receive_some`, the read of the peer links and of adopted WebSockets:
the results and errors of `trio.SocketStream.receive_some`, on socket pairs."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing

from metanode.trio_util import receive_some

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
