"""`metanode.client` against real nodes in-process (open_node on loopback) and against
small scripted WebSocket servers for the failures a real node cannot stage on cue
(a socket dropped with a write in flight, a redirect, a handshake refusal).

Real sockets, so the real clock; every test is bounded by `trio.fail_after`.
"""

from __future__ import annotations

import threading
from builtins import list as builtins_list
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

import metanode.errors
from metanode.client import (
    BadRequest,
    Change,
    MetaClient,
    MetaError,
    NotLeader,
    SeqV,
    SyncMetaClient,
    Timeout,
    TooLarge,
    TxnReply,
    Unauthenticated,
    Unavailable,
)
from metanode.client.client import encode_match_seq, split_address
from metanode.client.errors import error_from_wire
from metanode.config import load_config
from metanode.node.node import Node
from metanode.server import open_server
from tests.net import free_port, until

pytestmark = pytest.mark.runtime


# ---------------------------------------------------------------------- pure parts
def test_seqv_change_and_txn_reply_decode_the_wire_shapes() -> None:
    assert SeqV.from_wire(None) is None
    assert SeqV.from_wire({"seq": 3, "data": b"v", "meta": None}) == SeqV(3, b"v", None)
    assert SeqV.from_wire({"seq": 4, "data": b"", "meta": {"expire_at_ms": 99}}) == SeqV(4, b"", 99)
    for bad in ({"seq": 1}, {"seq": "1", "data": b"", "meta": None}, {"seq": 1, "data": "s", "meta": None}, [1]):
        with pytest.raises(MetaError, match="malformed SeqV"):
            SeqV.from_wire(bad)
    c = Change.from_wire({"prev": None, "result": {"seq": 1, "data": b"a", "meta": None}})
    assert c == Change(None, SeqV(1, b"a")) and c.changed
    same = {"seq": 1, "data": b"a", "meta": None}
    assert not Change.from_wire({"prev": same, "result": same}).changed
    with pytest.raises(MetaError, match="malformed change"):
        Change.from_wire({"prev": None})
    v = {"seq": 2, "data": b"x", "meta": None}
    wire = {
        "success": False,
        "responses": [
            {"get": {"key": "k", "value": v}},
            {"put": {"key": "k", "prev": None, "result": v}},
            {"delete": {"key": "k", "prev": v, "result": None}},
            {"delete_by_prefix": {"prefix": "p/", "count": 3}},
            {"future": {"value": 1}},
        ],
    }
    assert TxnReply.from_wire(wire) == TxnReply(
        False,
        [
            {"get": {"key": "k", "value": SeqV(2, b"x")}},
            {"put": {"key": "k", "prev": None, "result": SeqV(2, b"x")}},
            {"delete": {"key": "k", "prev": SeqV(2, b"x"), "result": None}},
            {"delete_by_prefix": {"prefix": "p/", "count": 3}},
            {"future": {"value": 1}},
        ],
    )
    with pytest.raises(MetaError, match="malformed txn"):
        TxnReply.from_wire({"responses": []})
    with pytest.raises(attrs_frozen_error()):
        SeqV(1, b"").seq = 2  # type: ignore[misc]


def attrs_frozen_error() -> type[Exception]:
    import attrs.exceptions

    return attrs.exceptions.FrozenInstanceError


def test_match_seq_encoding() -> None:
    assert encode_match_seq(None) is None
    assert encode_match_seq(0) == {"exact": 0}
    assert encode_match_seq(7) == {"exact": 7}
    assert encode_match_seq({"exact": 2}) == {"exact": 2}
    assert encode_match_seq({"ge": 1}) == {"ge": 1}
    for bad in ({"gt": 1}, {"exact": "1"}, {"ge": True}, {"exact": -1}, -1):
        with pytest.raises(ValueError):
            encode_match_seq(bad)
    for bad in (True, "1", 1.0, {"exact": 1, "ge": 1}):
        with pytest.raises(TypeError):
            encode_match_seq(bad)


def test_error_codes_map_to_the_metanode_error_classes() -> None:
    for code, cls in [
        ("not_leader", NotLeader),
        ("unavailable", Unavailable),
        ("too_large", TooLarge),
        ("unauthenticated", Unauthenticated),
        ("bad_request", BadRequest),
        ("timeout", Timeout),
    ]:
        e = error_from_wire({"code": code, "message": "the server says so", "leader": None}, "h:1")
        assert type(e) is cls and isinstance(e, MetaError) and e.code == code
        assert "the server says so" in str(e) and "h:1" in str(e)
    assert MetaError is metanode.errors.ClientError
    nl = error_from_wire({"code": "not_leader", "message": "m", "leader": "10.0.0.1:9191"})
    assert isinstance(nl, NotLeader) and nl.leader == "10.0.0.1:9191"
    for code in ("internal", "what_is_this"):
        e = error_from_wire({"code": code, "message": "boom", "leader": None})
        assert type(e) is MetaError and e.code == code and "boom" in str(e)
    assert type(error_from_wire("garbage")) is MetaError


def test_addresses() -> None:
    assert split_address("127.0.0.1:9191") == ("127.0.0.1", 9191)
    assert split_address("[::1]:80") == ("::1", 80)
    for bad in ("nohost", ":1", "h:", "h:x"):
        with pytest.raises(ValueError):
            split_address(bad)


async def test_arguments_are_checked_before_anything_is_sent() -> None:
    with pytest.raises(ValueError, match="at least one address"):
        async with MetaClient.connect([]):
            pass
    with pytest.raises(ValueError, match="host:port"):
        async with MetaClient.connect(["localhost"]):
            pass
    with pytest.raises(TypeError, match="list"):
        async with MetaClient.connect("127.0.0.1:9191"):
            pass


# ---------------------------------------------------------------------- helpers
class Cluster:
    """Nodes in-process, each in its own task so any one can be stopped."""

    def __init__(self, tmp: Path, nursery: trio.Nursery) -> None:
        self.tmp = tmp
        self.nursery = nursery
        self.raft: dict[int, int] = {}
        self.grpc: dict[int, int] = {}
        self.nodes: dict[int, Node] = {}
        self.stops: dict[int, trio.Event] = {}
        self.stopped: dict[int, trio.Event] = {}

    def raft_address(self, i: int) -> str:
        return f"127.0.0.1:{self.raft.setdefault(i, free_port())}"

    def address(self, i: int) -> str:
        return f"127.0.0.1:{self.grpc.setdefault(i, free_port())}"

    async def start(self, i: int, *extra: str) -> Node:
        config = load_config(
            [
                "--id", str(i), "--raft-dir", str(self.tmp / f"d{i}"), "--log-dir", str(self.tmp / "logs"),
                "--raft-api-port", self.raft_address(i).split(":")[1], "--raft-advertise-host", "127.0.0.1",
                "--grpc-api-address", self.address(i), "--grpc-api-advertise-host", "127.0.0.1",
                "--heartbeat-interval", "50", "--wait-leader-timeout", "5000", *extra,
            ],
            {},
        )  # fmt: skip
        self.stops[i] = trio.Event()
        self.stopped[i] = trio.Event()
        node: Node = await self.nursery.start(self._run, i, config)
        self.nodes[i] = node
        return node

    async def _run(self, i: int, config: Any, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with open_server(config, admin=False) as node:
                task_status.started(node)
                await self.stops[i].wait()
        finally:
            self.stopped[i].set()

    async def stop(self, i: int) -> None:
        self.stops[i].set()
        await self.stopped[i].wait()
        del self.nodes[i]

    def leader(self) -> int | None:
        return next((i for i, n in self.nodes.items() if n.core.is_leader), None)


@asynccontextmanager
async def cluster(tmp: Path) -> AsyncIterator[Cluster]:
    async with trio.open_nursery() as nursery:
        c = Cluster(tmp, nursery)
        try:
            yield c
        finally:
            for i in list(c.nodes):
                await c.stop(i)


async def three_nodes(c: Cluster) -> None:
    await c.start(1, "--single")
    await c.start(2, "--join", c.raft_address(1))
    await c.start(3, "--join", c.raft_address(1))
    await until(lambda: all(len(n.cluster_nodes()) == 3 for n in c.nodes.values()))
    await until(lambda: all(n.core.leader is not None for n in c.nodes.values()))


Handler = Callable[[WebSocketConnection, dict], Awaitable[None]]


class Fake:
    """A scripted client-API server: `handler(ws, request)` for every request."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[dict] = []
        self.connections = 0
        self.closed = 0
        self.address = ""

    async def serve(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        self.connections += 1
        try:
            while True:
                try:
                    raw = await ws.get_message()
                except ConnectionClosed:
                    break
                req = msgpack.unpackb(raw, raw=False)
                self.requests.append(req)
                await self.handler(ws, req)
        finally:
            self.closed += 1

    def ops(self) -> list[str]:
        return [r["op"] for r in self.requests]


@asynccontextmanager
async def fakes(*handlers: Handler) -> AsyncIterator[list[Fake]]:
    async with trio.open_nursery() as nursery:
        servers = [Fake(h) for h in handlers]
        for f in servers:
            server = await nursery.start(partial(serve_websocket, f.serve, "127.0.0.1", 0, None))
            f.address = f"127.0.0.1:{server.port}"
        yield servers
        nursery.cancel_scope.cancel()


async def reply(ws: WebSocketConnection, req: dict, **body: Any) -> None:
    await ws.send_message(msgpack.packb({"id": req["id"], **body}, use_bin_type=True))


async def drop(ws: WebSocketConnection, req: dict) -> None:
    """The node dies with the request in hand."""
    await ws.aclose(1011, "crashed")


async def silent(ws: WebSocketConnection, req: dict) -> None:
    pass


def redirect_to(leader: Callable[[], str]) -> Handler:
    async def handler(ws: WebSocketConnection, req: dict) -> None:
        await reply(ws, req, error={"code": "not_leader", "message": "ask the leader", "leader": leader()})

    return handler


# ---------------------------------------------------------------------- one node
async def test_every_method_against_one_node(tmp_path: Path) -> None:
    with trio.fail_after(15):
        async with cluster(tmp_path) as c:
            await c.start(1, "--single")
            async with MetaClient.connect([c.address(1)]) as cl:
                assert cl.address == c.address(1)
                ch = await cl.upsert("app/a", b"1")
                assert ch.prev is None and ch.result is not None and ch.result.data == b"1"
                seq = ch.result.seq
                # match_seq: a mismatch changes nothing and says so with prev == result.
                miss = await cl.upsert("app/a", b"2", match_seq=seq + 1)
                assert miss.prev == miss.result == ch.result and not miss.changed
                hit = await cl.upsert("app/a", b"2", match_seq={"exact": seq})
                assert hit.prev == ch.result and hit.result is not None and hit.result.data == b"2"
                assert (await cl.upsert("app/a", b"3", match_seq={"ge": 1})).result.data == b"3"  # type: ignore[union-attr]
                assert (await cl.upsert("app/b", b"new", match_seq=0)).prev is None  # only if absent
                assert not (await cl.upsert("app/b", b"again", match_seq=0)).changed
                ttl = await cl.upsert("tmp/x", b"t", ttl_ms=60_000)
                assert ttl.result is not None and ttl.result.expire_at_ms is not None

                got = await cl.get("app/a")
                assert got is not None and got.data == b"3" and got.seq > seq
                assert await cl.get("nope") is None
                assert await cl.get("app/a", consistency="local") == got
                assert [v and v.data for v in await cl.mget(["app/b", "nope", "app/a"])] == [b"new", None, b"3"]
                assert [k for k, _ in await cl.list("app/")] == ["app/a", "app/b"]
                assert [k for k, _ in await cl.list("app/", limit=1, consistency="local")] == ["app/a"]
                assert (await cl.list(""))[-1][0] == "tmp/x"

                gone = await cl.delete("app/b", match_seq=999)
                assert not gone.changed
                gone = await cl.delete("app/b")
                assert gone.prev is not None and gone.result is None
                assert await cl.get("app/b") is None
                assert await cl.member_list() == [c.address(1)]
                status = await cl.cluster_status()
                assert status["is_leader"] and [v["name"] for v in status["voters"]] == ["1"]

                a = await cl.get("app/a")
                assert a is not None
                r = await cl.txn(
                    conditions=[{"key": "app/a", "target": "value", "op": "==", "operand": b"3"}],
                    if_then=[{"put": {"key": "app/c", "value": b"c"}}, {"get": {"key": "app/a"}}],
                    else_then=[{"get": {"key": "app/a"}}],
                )
                assert r.success and len(r.responses) == 2
                put = r.responses[0]["put"]
                assert put["key"] == "app/c" and put["prev"] is None and put["result"] == await cl.get("app/c")
                assert r.responses[1] == {"get": {"key": "app/a", "value": a}}
                r = await cl.txn(
                    conditions=[{"key": "app/a", "target": "seq", "op": ">", "operand": a.seq}],
                    if_then=[{"delete": {"key": "app/a"}}],
                    else_then=[{"delete_by_prefix": {"prefix": "app/c"}}],
                )
                assert not r.success and r.responses == [{"delete_by_prefix": {"prefix": "app/c", "count": 1}}]
                assert await cl.get("app/a") == a and await cl.get("app/c") is None
                with pytest.raises(BadRequest, match="txn"):
                    await cl.txn(if_then=[{"nope": {}}])

                with pytest.raises(BadRequest, match="ttl_ms"):
                    await cl.upsert("k", b"v", ttl_ms=1, expire_at_ms=1)
                with pytest.raises(ValueError, match="consistency"):
                    await cl.get("k", consistency="eventual")
                with pytest.raises(TypeError, match="bytes"):
                    await cl.upsert("k", "text")  # type: ignore[arg-type]


async def test_many_concurrent_requests_share_one_socket(tmp_path: Path) -> None:
    with trio.fail_after(15):
        async with cluster(tmp_path) as c:
            await c.start(1, "--single")
            async with MetaClient.connect([c.address(1)]) as cl:
                results: dict[int, SeqV | None] = {}

                async def one(i: int) -> None:
                    await cl.upsert(f"k/{i:04}", str(i).encode())
                    results[i] = await cl.get(f"k/{i:04}")

                async with trio.open_nursery() as nursery:
                    for i in range(300):
                        nursery.start_soon(one, i)
                assert len(cl._conns) == 1  # one socket carried them all
                assert all(v is not None and v.data == str(i).encode() for i, v in results.items())
                items = await cl.list("k/")
                assert len(items) == 300 and len({v.seq for _, v in items}) == 300


async def test_a_request_alone_in_flight_is_written_by_its_caller_and_concurrent_ones_batched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alone in flight, a request leaves from the calling task (wsfast.send_now);
    concurrent ones are queued for the sender task and go out as one message."""
    from metanode import wsfast

    direct: list[bytes] = []
    batched: list[bytes] = []
    real_now, real_send = wsfast.send_now, wsfast.send_message

    def spy_now(ws: Any, data: bytes) -> bool:
        sent = real_now(ws, data)
        if sent and ws.is_client:  # (the server in this process sends its replies so too)
            direct.append(data)
        return sent

    async def spy_send(ws: Any, data: bytes) -> None:
        if ws.is_client:
            batched.append(data)
        await real_send(ws, data)

    with trio.fail_after(15):
        async with cluster(tmp_path) as c:
            await c.start(1, "--single")
            async with MetaClient.connect([c.address(1)]) as cl:
                monkeypatch.setattr(wsfast, "send_now", spy_now)
                monkeypatch.setattr(wsfast, "send_message", spy_send)
                for i in range(3):
                    await cl.upsert(f"alone/{i}", b"v")
                assert len(direct) == 3 and not batched
                direct.clear()
                async with trio.open_nursery() as nursery:
                    for i in range(20):
                        nursery.start_soon(cl.upsert, f"together/{i}", b"v")
                # The first may go alone (nothing else was waiting yet); the rest wait
                # for the sender task, which sends them together.
                assert len(direct) <= 1 and len(batched) == 1
                assert len(msgpack.unpackb(batched[0])) == 20 - len(direct)
                assert len(await cl.list("together/")) == 20


async def test_too_large_leaves_the_socket_usable(tmp_path: Path) -> None:
    with trio.fail_after(15):
        async with cluster(tmp_path) as c:
            await c.start(1, "--single", "--grpc-api-max-message-size", "4096")
            async with MetaClient.connect([c.address(1)]) as cl:
                conn = cl._conn
                with pytest.raises(TooLarge, match="4096"):
                    await cl.upsert("big", b"x" * 10_000)
                assert await cl.get("big") is None
                assert cl._conn is conn


async def test_a_batch_over_the_servers_limit_is_sent_again_request_by_request(tmp_path: Path) -> None:
    """Concurrent calls are batched into one message; a server whose limit the batch
    exceeds answers every request of it too_large (nothing done), and the client sends
    each again alone: requests that fit succeed, the one that does not fails alone."""
    with trio.fail_after(15):
        async with cluster(tmp_path) as c:
            await c.start(1, "--single", "--grpc-api-max-message-size", "4096")
            async with MetaClient.connect([c.address(1)]) as cl:
                results: dict[int, object] = {}

                async def one(i: int) -> None:
                    try:
                        results[i] = await cl.upsert(f"k{i}", b"v" * (10_000 if i == 0 else 200))
                    except TooLarge as e:
                        results[i] = e

                async with trio.open_nursery() as nursery:
                    for i in range(40):  # 40 x ~230 B: well over 4096 together
                        nursery.start_soon(one, i)
                assert isinstance(results[0], TooLarge)
                assert all(not isinstance(results[i], Exception) for i in range(1, 40))
                assert len(await cl.list("k")) == 39


# ---------------------------------------------------------------------- a cluster
async def test_through_a_follower_and_failover_when_its_node_stops(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with cluster(tmp_path) as c:
            await three_nodes(c)
            leader = c.leader()
            follower, other = [i for i in (1, 2, 3) if i != leader]
            addresses = [c.address(follower), c.address(other), c.address(leader)]  # type: ignore[arg-type]
            async with MetaClient.connect(addresses, timeout=5) as cl:
                assert cl.address == c.address(follower)
                # The follower forwards writes and linearizable reads to the leader.
                ch = await cl.upsert("f", b"1")
                assert ch.result is not None
                assert (await cl.get("f")) == ch.result
                assert sorted(await cl.member_list()) == sorted(c.address(i) for i in (1, 2, 3))
                st = await cl.cluster_status()
                assert st["id"] == follower and not st["is_leader"]
                # "local" reads this replica: it catches up on its own.
                with trio.fail_after(5):
                    while await cl.get("f", consistency="local") != ch.result:
                        await trio.sleep(0.02)

                # Reads in flight while the node we talk to stops: none fails.
                failures: list[BaseException] = []
                reads = 0
                done = trio.Event()

                async def reader() -> None:
                    nonlocal reads
                    while not done.is_set():
                        try:
                            assert (await cl.get("f")) == ch.result
                            reads += 1
                        except MetaError as e:
                            failures.append(e)

                async with trio.open_nursery() as nursery:
                    for _ in range(4):
                        nursery.start_soon(reader)
                    await until(lambda: reads > 10)
                    before = reads
                    await c.stop(follower)
                    after = reads
                    await until(lambda: reads > after + 20)
                    done.set()
                assert not failures and before > 0
                assert cl.address == c.address(other)
                assert (await cl.upsert("f", b"2")).result.data == b"2"  # type: ignore[union-attr]


async def test_unavailable_names_every_address_tried() -> None:
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    with trio.fail_after(5):
        with pytest.raises(Unavailable) as info:
            async with MetaClient.connect(dead, timeout=0.5):
                pass
    for a in dead:
        assert a in str(info.value)
    assert "refused" in str(info.value).lower()


# ---------------------------------------------------------------------- scripted failures
async def test_a_socket_dropped_in_the_handshake_or_rejected_fails_fast() -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.aclose()

    async def reject(request: WebSocketRequest) -> None:
        await request.reject(404)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            (listener,) = await nursery.start(partial(trio.serve_tcp, hang_up, 0, host="127.0.0.1"))
            dropper = f"127.0.0.1:{listener.socket.getsockname()[1]}"
            server = await nursery.start(partial(serve_websocket, reject, "127.0.0.1", 0, None))
            rejecter = f"127.0.0.1:{server.port}"
            start = trio.current_time()
            with pytest.raises(Unavailable) as info:
                async with MetaClient.connect([dropper, rejecter], timeout=0.5):
                    pass
            message = str(info.value)
            assert "closed during the WebSocket handshake" in message and "HTTP 404" in message
            # Each address was tried many times within the timeout, not once each.
            assert trio.current_time() - start < 1
            nursery.cancel_scope.cancel()


async def test_a_write_in_flight_when_the_socket_drops_has_an_unknown_outcome(tmp_path: Path) -> None:
    with trio.fail_after(15):
        async with cluster(tmp_path) as c, fakes(drop) as (fake,):
            await c.start(1, "--single")
            async with MetaClient.connect([fake.address, c.address(1)], timeout=5) as cl:
                with pytest.raises(Timeout, match="outcome is unknown") as info:
                    await cl.upsert("w", b"1")
                assert "1011" in str(info.value) and fake.address in str(info.value)
                assert fake.ops() == ["upsert"]  # sent once, never again
                # Nothing went to the real node either; the next request goes there.
                assert await cl.get("w") is None
                assert cl.address == c.address(1)
                with pytest.raises(Timeout, match="unknown"):
                    async with MetaClient.connect([fake.address], timeout=2) as again:
                        await again.delete("w")
            # A read is sent again on the next address.
            async with MetaClient.connect([fake.address, c.address(1)], timeout=5) as cl:
                assert await cl.get("w") is None
                assert fake.ops() == ["upsert", "upsert", "get"]


async def test_no_reply_by_the_deadline_is_a_timeout() -> None:
    with trio.fail_after(10):
        async with fakes(silent) as (fake,):
            async with MetaClient.connect([fake.address], timeout=0.3) as cl:
                with pytest.raises(Timeout, match="no reply") as info:
                    await cl.get("k")
                assert "unknown" not in str(info.value)
                with pytest.raises(Timeout, match="outcome is unknown"):
                    await cl.upsert("k", b"v")
                with pytest.raises(Timeout, match="outcome is unknown"):
                    await cl.txn(if_then=[{"put": {"key": "k", "value": b"v"}}])
            assert fake.ops() == ["get", "upsert", "txn"]


async def test_each_request_times_out_at_its_own_deadline() -> None:
    # One task ends the waits of all requests (MetaClient._expire_calls): each at its
    # own deadline, however they overlap, and none before it.
    with trio.fail_after(10):
        async with fakes(silent) as (fake,):
            async with MetaClient.connect([fake.address], timeout=0.6) as cl:
                start = trio.current_time()
                ended: dict[str, float] = {}

                async def get(key: str, after: float) -> None:
                    await trio.sleep(after)
                    with pytest.raises(Timeout, match="no reply"):
                        await cl.get(key)
                    ended[key] = trio.current_time() - start

                async with trio.open_nursery() as nursery:
                    for key, after in (("a", 0.0), ("b", 0.3), ("c", 0.35)):
                        nursery.start_soon(get, key, after)
                assert ended["a"] >= 0.6 and ended["b"] >= 0.9 and ended["c"] >= 0.95
                assert ended["a"] < ended["b"] < ended["c"]
                # After it all, a request still gets its full time.
                t = trio.current_time()
                with pytest.raises(Timeout, match="no reply"):
                    await cl.get("d")
                assert trio.current_time() - t >= 0.6


async def test_not_leader_with_an_address_is_followed(tmp_path: Path) -> None:
    with trio.fail_after(15):
        async with cluster(tmp_path) as c:
            await c.start(1, "--single")
            async with fakes(redirect_to(lambda: c.address(1))) as (fake,):
                async with MetaClient.connect([fake.address], timeout=5) as cl:
                    assert cl.address == fake.address
                    ch = await cl.upsert("r", b"1")
                    assert ch.result is not None and ch.result.data == b"1"
                    assert cl.address == c.address(1) and c.address(1) in cl.addresses
                    await until(lambda: fake.closed == 1)  # the old socket closed once idle
                    assert fake.ops() == ["upsert"]


async def test_redirects_are_bounded() -> None:
    with trio.fail_after(10):
        addresses: list[str] = []
        async with fakes(redirect_to(lambda: addresses[1]), redirect_to(lambda: addresses[0])) as (a, b):
            addresses += [a.address, b.address]
            async with MetaClient.connect([a.address], timeout=5) as cl:
                with pytest.raises(NotLeader, match="ask the leader") as info:
                    await cl.get("k")
                assert info.value.leader in addresses
            assert len(a.requests) + len(b.requests) == 6  # the first try and 5 redirects


async def test_the_token_goes_first_in_a_handshake() -> None:
    async def guard(ws: WebSocketConnection, req: dict) -> None:
        if req["op"] == "handshake":
            if req.get("token") != "s3cret":
                await reply(ws, req, error={"code": "unauthenticated", "message": "bad token", "leader": None})
                await ws.aclose(1008)
                return
            await reply(ws, req, ok={"server": "metanode", "version": "0"})
        else:
            await reply(ws, req, ok=None)

    with trio.fail_after(10):
        async with fakes(guard) as (fake,):
            with pytest.raises(Unauthenticated, match="bad token"):
                async with MetaClient.connect([fake.address], token="wrong", timeout=2):
                    pass
            async with MetaClient.connect([fake.address], token="s3cret", timeout=2) as cl:
                assert await cl.get("k") is None
            assert fake.ops() == ["handshake", "handshake", "get"]


# ---------------------------------------------------------------------- the sync client
async def test_the_sync_client_blocks_in_its_own_thread(tmp_path: Path) -> None:
    with trio.fail_after(15):
        async with cluster(tmp_path) as c:
            await c.start(1, "--single")

            def work() -> list[Any]:
                with SyncMetaClient([c.address(1)], timeout=5) as sc:
                    assert [t for t in threading.enumerate() if t.name == "metanode-client"]
                    ch = sc.upsert("s/a", b"1")
                    out = [
                        ch,
                        sc.upsert("s/a", b"2", match_seq=ch.result.seq),  # type: ignore[union-attr]
                        sc.get("s/a"),
                        sc.mget(["s/a", "s/b"]),
                        [k for k, _ in sc.list("s/")],
                        sc.delete("s/a"),
                        sc.member_list(),
                        sc.cluster_status()["is_leader"],
                    ]
                    try:
                        sc.upsert("s/x", b"", ttl_ms=1, expire_at_ms=1)
                    except BadRequest as e:
                        out.append(e)
                    # Threads share the one socket.
                    with ThreadPoolExecutor(4) as pool:
                        builtins_list(pool.map(lambda i: sc.upsert(f"s/t/{i}", b"t"), range(40)))
                    out.append(len(sc.list("s/t/")))
                sc.close()  # again: nothing happens
                try:
                    sc.get("s/a")
                except MetaError as e:
                    out.append(e)
                return out

            ch, ch2, got, many, keys, gone, members, leads, err, n, closed = await trio.to_thread.run_sync(work)
            assert ch.prev is None and ch2.result.data == b"2" and got == ch2.result
            assert many == [got, None] and keys == ["s/a"] and gone.result is None
            assert members == [c.address(1)] and leads and isinstance(err, BadRequest)
            assert n == 40 and "closed" in str(closed)

            def unreachable() -> None:
                SyncMetaClient([f"127.0.0.1:{free_port()}"], timeout=0.3)

            with pytest.raises(Unavailable):
                await trio.to_thread.run_sync(unreachable)
    assert not [t for t in threading.enumerate() if t.name == "metanode-client"]


async def test_a_message_sent_while_another_is_written_waits_its_turn() -> None:
    """wsfast.send_message with the stream lock free writes at once; with it held it
    waits (trio-websocket's own path): the server receives both messages whole, in
    order."""
    from trio_websocket import open_websocket_url, serve_websocket

    from metanode import wsfast

    got: list[bytes] = []
    done = trio.Event()

    async def handler(request: Any) -> None:
        ws = await request.accept()
        for _ in range(3):
            got.append(await ws.get_message())
        done.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
            async with open_websocket_url(f"ws://127.0.0.1:{server.port}/") as ws:
                # With the lock free, the bytes are written before any other task runs
                # (trio-websocket's own send_message yields first).
                stream_send = ws._stream.send_all
                others_ran: list[bool] = []
                ran: list[int] = []

                async def spy(data: Any) -> None:
                    others_ran.append(bool(ran))
                    await stream_send(data)

                async def other() -> None:
                    ran.append(1)

                ws._stream.send_all = spy  # type: ignore[method-assign]
                nursery.start_soon(other)
                await wsfast.send_message(ws, b"first")
                assert others_ran == [False]
                ws._stream.send_all = stream_send  # type: ignore[method-assign]
                await ws._stream_lock.acquire()  # someone else is writing
                nursery.start_soon(wsfast.send_message, ws, b"second")
                await trio.sleep(0.05)
                assert got == [b"first"]
                ws._stream_lock.release()
                await trio.sleep(0.05)
                await wsfast.send_message(ws, b"third" * 10_000)
                await done.wait()
            assert got == [b"first", b"second", b"third" * 10_000]
            nursery.cancel_scope.cancel()
