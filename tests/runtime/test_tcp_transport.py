"""The raft port over real TCP sockets on 127.0.0.1 (contract §3, §7): `serve_raft`,
`PeerLink` and `call`, with hello checks and hostile input.

Every test is bounded by `trio.fail_after` and synchronizes on events and channels,
never on sleeps.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import attrs
import pytest
import trio
import trio.testing

from metanode.errors import ClientError, NotLeader, Timeout, TransportError, Unauthenticated
from metanode.raft.messages import AppendRequest, Heartbeat, TimeoutNow, VoteRequest
from metanode.raft.types import Entry, EntryKind, LogId
from metanode.transport import (
    Call,
    CallResult,
    ErrorFrame,
    Hello,
    Identity,
    PeerLink,
    call,
    decode_frame,
    frame_bytes,
    serve_raft,
)
from metanode.transport.frames import ErrorInfo
from metanode.wire import PROTOCOL_VERSION, FrameDecoder, encode_frame, pack
from tests.net import free_port

pytestmark = pytest.mark.runtime

LIMIT = 5.0
CLUSTER = "test-cluster"
SERVER_ID = 1
PEER_ID = 2


def ident(node_id: int = PEER_ID, cluster_id: str | None = "c1", name: str = CLUSTER) -> Identity:
    return Identity(node_id=node_id, cluster_name=name, cluster_id=cluster_id)


def hb(i: int, src: int = PEER_ID, dst: int = SERVER_ID) -> Heartbeat:
    return Heartbeat(term=3, src=src, dst=dst, commit=i)


def hello(cluster_id: str | None = "c1", *, v: int = PROTOCOL_VERSION, name: str = CLUSTER,
          from_id: int = PEER_ID) -> Hello:
    return Hello(v, cluster_id, name, from_id)


async def echo_call(method: str, payload: bytes, hello: Hello) -> bytes:
    return method.encode() + b":" + payload


@attrs.define
class Server:
    """A running `serve_raft` recording what reached the node."""

    port: int
    address: str
    messages: trio.MemoryReceiveChannel[object]
    cluster_ids: list[str]
    scope: trio.CancelScope
    state: dict[str, Identity]


@asynccontextmanager
async def running_server(
    *,
    identity: Identity | None = None,
    on_call: Callable[[str, bytes, Hello], Awaitable[bytes]] = echo_call,
    port: int = 0,
    **kwargs: object,
) -> AsyncIterator[Server]:
    state = {"identity": identity or ident(SERVER_ID)}
    send, receive = trio.open_memory_channel[object](10_000)
    cluster_ids: list[str] = []

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            partial(
                serve_raft,
                "127.0.0.1",
                port,
                identity=lambda: state["identity"],
                on_message=send.send_nowait,
                on_call=on_call,
                **kwargs,
            )
        )
        yield Server(bound, f"127.0.0.1:{bound}", receive, cluster_ids, nursery.cancel_scope, state)
        nursery.cancel_scope.cancel()


class RawClient:
    """A hand-driven dialer: write any bytes, read frames back."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()

    async def send(self, *frames: object) -> None:
        await self.stream.send_all(b"".join(frame_bytes(f) for f in frames))

    async def receive_frame(self) -> object | None:
        """The next frame, or None once the server closed the connection."""
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            bodies = self.decoder.feed(data)
            if bodies:
                assert len(bodies) == 1
                return decode_frame(bodies[0])

    async def receive_until_closed(self) -> list[object]:
        frames = []
        while (frame := await self.receive_frame()) is not None:
            frames.append(frame)
        return frames


@asynccontextmanager
async def raw_client(server: Server) -> AsyncIterator[RawClient]:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        yield RawClient(stream)


def assert_no_message(server: Server) -> None:
    with pytest.raises(trio.WouldBlock):
        server.messages.receive_nowait()


async def assert_server_works(server: Server) -> None:
    assert await call(server.address, ident(0, None), "ping", b"x", timeout=LIMIT) == b"ping:x"


# ------------------------------------------------------------------ raft messages


async def test_peer_link_delivers_raft_messages() -> None:
    with trio.fail_after(LIMIT):
        async with running_server() as server, trio.open_nursery() as nursery:
            link = PeerLink(SERVER_ID, lambda: server.address, lambda: ident(), rng=random.Random(1))
            nursery.start_soon(link.run)
            await link.wait_connected()
            msgs = [
                VoteRequest(4, PEER_ID, SERVER_ID, LogId(3, 9), pre_vote=True),
                AppendRequest(
                    4, PEER_ID, SERVER_ID, LogId(3, 9),
                    (Entry(4, 10, EntryKind.NORMAL, b"\x00cmd\xff"),), commit=9,
                ),
                TimeoutNow(4, PEER_ID, SERVER_ID),
            ]
            for msg in msgs:
                assert link.send_nowait(msg)
            assert [await server.messages.receive() for _ in msgs] == msgs
            assert link.stats.sent == 3 and link.stats.dropped == 0
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("when", ["connecting", "connected"])
async def test_many_queued_messages_are_batched_in_few_writes(when: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Queued while the link connects, or while connected with a socket that takes no
    direct write (full): the writer sends them in a write or two."""
    from metanode.transport import tcp

    def full(fd: int, data: bytes) -> int:
        raise BlockingIOError

    monkeypatch.setattr(tcp, "_write_fd", full)
    with trio.fail_after(LIMIT):
        async with running_server() as server, trio.open_nursery() as nursery:
            link = PeerLink(SERVER_ID, lambda: server.address, lambda: ident(), queue_size=2000)
            nursery.start_soon(link.run)
            if when == "connected":
                await link.wait_connected()
                await trio.testing.wait_all_tasks_blocked()  # the writer waits: direct writes tried
            n = 1000
            for i in range(n):  # no checkpoint: all queued before the writer runs
                assert link.send_nowait(hb(i)) and not link.flushed
            got = [await server.messages.receive() for _ in range(n)]
            assert got == [hb(i) for i in range(n)]
            assert link.stats.sent == n
            assert link.stats.batches <= 2
            nursery.cancel_scope.cancel()


async def idle_link(server: Server, nursery: trio.Nursery) -> PeerLink:
    """A link to `server`, connected, its writer waiting for messages."""
    link = PeerLink(SERVER_ID, lambda: server.address, lambda: ident())
    nursery.start_soon(link.run)
    await link.wait_connected()
    await trio.testing.wait_all_tasks_blocked()
    return link


async def test_a_link_waiting_for_messages_writes_the_next_one_itself() -> None:
    """While the writer waits with nothing queued, each message goes out from
    `send_nowait` itself (one write, no task switch), and the next one too."""
    with trio.fail_after(LIMIT):
        async with running_server() as server, trio.open_nursery() as nursery:
            link = await idle_link(server, nursery)
            for i in range(1, 6):
                assert link.send_nowait(hb(i)) and link.flushed
                assert link.stats.sent == i  # written already, before any checkpoint
            assert [await server.messages.receive() for _ in range(5)] == [hb(i) for i in range(1, 6)]
            assert link.stats.sent == 5 and link.stats.batches == 5
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("failure", ["partial", "full", "broken"])
async def test_a_direct_write_the_socket_does_not_take_goes_through_the_writer(
    failure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frame written in part (the socket buffer full), not at all, or refused is
    finished by the writer task, and what follows comes after it: every message
    arrives whole and in order."""
    import os

    from metanode.transport import tcp

    calls: list[int] = []

    def flaky(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            if failure == "partial":
                return os.write(fd, data[:3])
            raise BlockingIOError if failure == "full" else BrokenPipeError
        return os.write(fd, data)

    monkeypatch.setattr(tcp, "_write_fd", flaky)
    with trio.fail_after(LIMIT):
        async with running_server() as server, trio.open_nursery() as nursery:
            link = await idle_link(server, nursery)
            big = AppendRequest(4, PEER_ID, SERVER_ID, LogId(3, 9), (Entry(4, 10, EntryKind.NORMAL, b"x" * 5000),), 9)
            msgs = [big, hb(1), hb(2)]
            for msg in msgs:
                assert link.send_nowait(msg)
            assert [await server.messages.receive() for _ in msgs] == msgs
            await trio.testing.wait_all_tasks_blocked()
            assert link.send_nowait(hb(3))  # the writer waits again: direct once more
            assert await server.messages.receive() == hb(3)
            assert len(calls) == 2 and link.stats.dropped == 0
            nursery.cancel_scope.cancel()


async def test_peer_link_drops_when_its_queue_is_full() -> None:
    link = PeerLink(SERVER_ID, lambda: None, lambda: ident(), queue_size=2)
    assert link.send_nowait(hb(1))
    assert link.send_nowait(hb(2))
    assert not link.send_nowait(hb(3))
    assert link.stats.dropped == 1


async def test_peer_link_reconnects_after_the_server_restarts() -> None:
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            await _restart_scenario(nursery)
            nursery.cancel_scope.cancel()


async def _restart_scenario(nursery: trio.Nursery) -> None:
    async with running_server() as server:
        port = server.port
        link = PeerLink(
            SERVER_ID, lambda: f"127.0.0.1:{port}", lambda: ident(),
            rng=random.Random(7), backoff_min=0.2, backoff_max=0.4,
        )
        nursery.start_soon(link.run)
        await link.wait_connected()
        assert link.send_nowait(hb(1))
        assert await server.messages.receive() == hb(1)
    # The server is gone: the link notices (the server closed the connection), and
    # drops what is sent while it waits to reconnect.
    await link.wait_disconnected()
    dropped = link.stats.dropped
    assert not link.send_nowait(hb(2))
    assert link.stats.dropped == dropped + 1
    async with running_server(port=port) as server:
        await link.wait_connected()
        assert link.stats.reconnects == 1
        assert link.send_nowait(hb(3))
        assert await server.messages.receive() == hb(3)
        assert_no_message(server)


async def test_peer_link_follows_a_new_address() -> None:
    with trio.fail_after(LIMIT):
        async with running_server() as old, running_server() as new:
            address = {"peer": old.address}
            async with trio.open_nursery() as nursery:
                link = PeerLink(SERVER_ID, lambda: address["peer"], lambda: ident())
                nursery.start_soon(link.run)
                await link.wait_connected()
                address["peer"] = new.address
                link.reconnect_nowait()
                await link.wait_disconnected()
                await link.wait_connected()
                assert link.send_nowait(hb(1))
                assert await new.messages.receive() == hb(1)
                assert_no_message(old)
                nursery.cancel_scope.cancel()


async def test_peer_link_reports_a_refusal_and_retries(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(LIMIT):
        async with running_server() as server, trio.open_nursery() as nursery:
            link = PeerLink(
                SERVER_ID, lambda: server.address, lambda: ident(cluster_id="other"),
                backoff_min=0.01, backoff_max=0.02,
            )
            nursery.start_soon(link.run)
            await link.wait_connected()
            link.send_nowait(hb(1))
            await link.wait_disconnected()
            await link.wait_connected()  # it retries
            nursery.cancel_scope.cancel()
            assert_no_message(server)
    assert any("refused us: unauthenticated" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- calls


async def test_call_returns_the_payload() -> None:
    with trio.fail_after(LIMIT):
        async with running_server() as server:
            assert await call(server.address, ident(), "join", b"\x01\x02", timeout=LIMIT) == b"join:\x01\x02"


async def test_call_raises_not_leader_with_the_leader_address() -> None:
    async def on_call(method: str, payload: bytes, hello: Hello) -> bytes:
        if method == "by_id":
            raise NotLeader("node 1 is not the leader", leader=3)
        raise NotLeader("node 1 is not the leader", leader="127.0.0.1:4003")  # type: ignore[arg-type]

    with trio.fail_after(LIMIT):
        async with running_server(
            on_call=on_call, leader_address={3: "10.0.0.3:29103"}.get
        ) as server:
            with pytest.raises(NotLeader) as info:
                await call(server.address, ident(), "write", b"", timeout=LIMIT)
            assert info.value.leader == "127.0.0.1:4003"
            assert "not the leader" in str(info.value)
            with pytest.raises(NotLeader) as info:
                await call(server.address, ident(), "by_id", b"", timeout=LIMIT)
            assert info.value.leader == "10.0.0.3:29103"


async def test_call_errors_keep_their_code(caplog: pytest.LogCaptureFixture) -> None:
    class Odd(ClientError):
        code = "odd_code"

    async def on_call(method: str, payload: bytes, hello: Hello) -> bytes:
        if method == "odd":
            raise Odd("strange")
        if method == "crash":
            raise RuntimeError("boom")
        return await echo_call(method, payload, hello)

    with trio.fail_after(LIMIT):
        async with running_server(on_call=on_call) as server:
            with pytest.raises(ClientError) as info:
                await call(server.address, ident(), "odd", b"", timeout=LIMIT)
            assert info.value.code == "odd_code" and str(info.value) == "strange"
            with pytest.raises(ClientError) as info:
                await call(server.address, ident(), "crash", b"", timeout=LIMIT)
            assert info.value.code == "internal"
            await assert_server_works(server)
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)


async def test_calls_on_one_connection_run_concurrently() -> None:
    fast_done = trio.Event()

    async def on_call(method: str, payload: bytes, hello: Hello) -> bytes:
        if method == "slow":
            await fast_done.wait()  # only finishes if "fast" ran meanwhile
        else:
            fast_done.set()
        return method.encode()

    with trio.fail_after(LIMIT):
        async with running_server(on_call=on_call) as server, raw_client(server) as client:
            await client.send(hello(), Call(1, "slow", b""), Call(2, "fast", b""))
            assert await client.receive_frame() == CallResult(2, payload=b"fast")
            assert await client.receive_frame() == CallResult(1, payload=b"slow")


async def test_call_timeout_raises_timeout() -> None:
    async def on_call(method: str, payload: bytes, hello: Hello) -> bytes:
        await trio.sleep_forever()
        raise AssertionError

    with trio.fail_after(LIMIT):
        async with running_server(on_call=on_call) as server:
            with pytest.raises(Timeout):
                await call(server.address, ident(), "stuck", b"", timeout=0.1)


async def test_call_to_a_closed_port_raises_transport_error() -> None:
    address = f"127.0.0.1:{free_port()}"
    with trio.fail_after(LIMIT), pytest.raises(TransportError) as info:
        await call(address, ident(), "join", b"", timeout=LIMIT)
    assert address in str(info.value)
    assert "refused" in str(info.value).lower()


async def test_a_server_closing_before_the_answer_is_a_transport_error() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(100)
        await stream.aclose()

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            with pytest.raises(TransportError, match=f"127.0.0.1:{port}"):
                await call(f"127.0.0.1:{port}", ident(), "join", b"", timeout=LIMIT)
            nursery.cancel_scope.cancel()


# -------------------------------------------------------------------------- hello


@pytest.mark.parametrize(
    ("bad_hello", "code", "words"),
    [
        (hello(v=PROTOCOL_VERSION + 1), "bad_request", "protocol version"),
        (hello(name="other-cluster"), "unauthenticated", "cluster_name"),
        (hello(cluster_id="c2"), "unauthenticated", "cluster_id"),
    ],
    ids=["version", "cluster_name", "cluster_id"],
)
async def test_hello_mismatch_gets_an_error_frame(bad_hello: Hello, code: str, words: str) -> None:
    with trio.fail_after(LIMIT):
        async with running_server() as server:
            async with raw_client(server) as client:
                await client.send(bad_hello, hb(1), Call(1, "join", b""))
                frames = await client.receive_until_closed()
            assert len(frames) == 1 and isinstance(frames[0], ErrorFrame)
            assert frames[0].code == code and words in frames[0].message
            assert_no_message(server)
            await assert_server_works(server)


async def test_call_with_a_refused_hello_raises_the_error() -> None:
    with trio.fail_after(LIMIT):
        async with running_server() as server:
            with pytest.raises(Unauthenticated, match="cluster_name"):
                await call(server.address, ident(name="nope"), "join", b"", timeout=LIMIT)


async def test_the_first_frame_must_be_a_hello() -> None:
    with trio.fail_after(LIMIT):
        async with running_server() as server:
            async with raw_client(server) as client:
                await client.send(hb(1))
                frames = await client.receive_until_closed()
            assert [type(f) for f in frames] == [ErrorFrame]
            assert_no_message(server)


async def test_a_dialer_without_cluster_id_may_call_but_not_send_raft() -> None:
    with trio.fail_after(LIMIT):
        async with running_server() as server:
            assert await call(server.address, ident(0, None), "leave", b"2", timeout=LIMIT) == b"leave:2"
            async with raw_client(server) as client:
                await client.send(hello(cluster_id=None), Call(7, "join", b""))
                assert await client.receive_frame() == CallResult(7, payload=b"join:")
                await client.send(hb(1))
                frame = await client.receive_frame()
                assert isinstance(frame, ErrorFrame) and frame.code == "unauthenticated"
                assert await client.receive_frame() is None
            assert_no_message(server)
            assert server.cluster_ids == []


async def test_a_server_without_cluster_id_refuses_raft_messages_and_adopts_nothing() -> None:
    """A node adopts a cluster id only from its join reply: a dialer claiming any
    cluster id (a forger who read it off the status route, or a vote request reaching
    a wiped node) gets no raft message through and changes nothing."""
    with trio.fail_after(LIMIT):
        async with running_server(identity=ident(SERVER_ID, cluster_id=None)) as server:
            async with raw_client(server) as client:
                await client.send(hello(cluster_id="c9"), hb(1))
                frames = await client.receive_until_closed()
            assert [type(f) for f in frames] == [ErrorFrame]
            assert "not joined a cluster yet" in frames[0].message
            assert_no_message(server)
            assert server.state["identity"].cluster_id is None
            # Calls still work: that is how the node joins.
            async with raw_client(server) as client:
                await client.send(hello(cluster_id=None), Call(1, "join", b"x"))
                frame = await client.receive_frame()
            assert isinstance(frame, CallResult) and frame.payload == b"join:x"


async def test_messages_not_from_the_hello_node_or_not_for_us_are_refused() -> None:
    with trio.fail_after(LIMIT):
        async with running_server() as server:
            for msg in (hb(1, src=3), hb(1, dst=4)):
                async with raw_client(server) as client:
                    await client.send(hello(), msg)
                    frames = await client.receive_until_closed()
                assert [type(f) for f in frames] == [ErrorFrame]
            assert_no_message(server)


# ------------------------------------------------------------------ hostile bytes


async def test_an_oversized_frame_closes_only_its_connection(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(LIMIT):
        async with running_server(max_frame_size=1024) as server:
            async with raw_client(server) as client:
                await client.send(hello())
                # Announce 1 GiB and send only a few bytes of it: the server must close
                # at once instead of waiting for (or allocating) the body.
                await client.stream.send_all((1 << 30).to_bytes(4, "big") + b"abc")
                frames = await client.receive_until_closed()
            assert len(frames) == 1 and isinstance(frames[0], ErrorFrame)
            assert frames[0].code == "too_large"
            # Just over the limit is refused too; at the limit works.
            async with raw_client(server) as client:
                await client.send(hello())
                await client.stream.send_all(encode_frame(b"\x00" * 1025))
                assert [type(f) for f in await client.receive_until_closed()] == [ErrorFrame]
            await assert_server_works(server)
            assert_no_message(server)
    assert any("127.0.0.1:" in r.getMessage() and "exceeds" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize(
    "garbage",
    [
        encode_frame(b"\xc1"),  # never-used msgpack byte
        encode_frame(b"\x93\x01\x02"),  # truncated msgpack array
        encode_frame(pack({"t": "nope"})),  # unknown tag
        encode_frame(pack({"t": "hb", "term": "3", "src": 2, "dst": 1, "commit": 0})),
        encode_frame(frame_bytes(CallResult(1, error=ErrorInfo("x", "y")))[4:]),  # wrong way
        b"\x00\x00\x00\x00",  # zero-length frame
    ],
    ids=["bad-byte", "short-msgpack", "unknown-tag", "bad-field", "result-to-server", "empty"],
)
async def test_garbage_closes_only_its_connection(
    garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(LIMIT):
        async with running_server() as server:
            async with raw_client(server) as client:
                await client.send(hello())
                await client.stream.send_all(garbage)
                frames = await client.receive_until_closed()
            assert [type(f) for f in frames] == [ErrorFrame]
            assert frames[0].code == "bad_request"  # type: ignore[attr-defined]
            await assert_server_works(server)
            assert_no_message(server)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("127.0.0.1:" in w for w in warnings)


async def test_garbage_instead_of_a_hello_is_refused() -> None:
    with trio.fail_after(LIMIT):
        async with running_server() as server:
            async with raw_client(server) as client:
                await client.stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                frames = await client.receive_until_closed()
            assert [type(f) for f in frames] == [ErrorFrame]
            await assert_server_works(server)


async def test_a_truncated_frame_closes_only_its_connection(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(LIMIT):
        async with running_server() as server:
            async with raw_client(server) as client:
                data = frame_bytes(hb(1))
                await client.send(hello())
                await client.stream.send_all(data[: len(data) // 2])
                await client.stream.send_eof()
                await client.receive_until_closed()
            await assert_server_works(server)
            assert_no_message(server)
    assert any("middle of a frame" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)


async def test_a_connection_without_hello_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("metanode.transport.tcp.HELLO_TIMEOUT", 0.05)
    with trio.fail_after(LIMIT):
        async with running_server() as server, raw_client(server) as client:
            frames = await client.receive_until_closed()
            assert len(frames) == 1 and isinstance(frames[0], ErrorFrame)
            assert "no hello" in frames[0].message


async def test_a_port_in_use_raises_eaddrinuse() -> None:
    import errno

    with trio.fail_after(LIMIT):
        async with running_server() as server:
            with pytest.raises(OSError) as info:
                await serve_raft(
                    "127.0.0.1", server.port, identity=lambda: ident(SERVER_ID),
                    on_message=lambda m: None, on_call=echo_call,
                )
            assert info.value.errno == errno.EADDRINUSE
