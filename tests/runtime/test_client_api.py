"""The client API server at the protocol level (docs/reference/client-protocol.md):
raw WebSocket + msgpack against real nodes in-process on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from metanode.config import load_config
from metanode.node.node import Node
from metanode.server import open_server
from tests.net import free_port, until

pytestmark = pytest.mark.runtime
LIMIT = 20


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.raft: dict[int, int] = {}
        self.grpc: dict[int, int] = {}

    def port(self, i: int) -> int:
        self.raft.setdefault(i, free_port())
        return self.grpc.setdefault(i, free_port())

    @asynccontextmanager
    async def node(self, i: int, *extra: str, max_message: int | None = None) -> AsyncIterator[Node]:
        self.port(i)
        args = [
            "--id", str(i), "--raft-dir", str(self.tmp / f"d{i}"), "--log-dir", str(self.tmp / "logs"),
            "--raft-api-port", str(self.raft[i]), "--raft-advertise-host", "127.0.0.1",
            "--grpc-api-address", f"127.0.0.1:{self.grpc[i]}", "--heartbeat-interval", "50",
            "--wait-leader-timeout", "5000", *extra,
        ]
        if max_message is not None:
            args += ["--grpc-api-max-message-size", str(max_message)]
        async with open_server(load_config(args, {}), admin=False) as n:
            yield n

    @asynccontextmanager
    async def socket(self, i: int) -> AsyncIterator[WebSocketConnection]:
        async with open_websocket_url(
            f"ws://127.0.0.1:{self.grpc[i]}/v1", max_message_size=64 << 20, receive_buffer_size=None
        ) as ws:
            yield ws
        await ws._stream.aclose()  # docs/architecture/stack.md: the client leaks its socket otherwise


async def ask(ws: WebSocketConnection, **req: Any) -> dict:
    await ws.send_message(msgpack.packb(req, use_bin_type=True))
    return msgpack.unpackb(await ws.get_message(), raw=False)


async def test_every_op_on_a_single_node(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    async with c.node(1, "--single") as n1, c.socket(1) as ws:
        await until(lambda: n1.core.is_leader)
        assert (await ask(ws, id=1, op="handshake"))["ok"]["server"] == "metanode"
        r = await ask(ws, id=2, op="upsert", key="a", value=b"1")
        assert r == {"id": 2, "ok": {"prev": None, "result": {"seq": 1, "data": b"1", "meta": None}}}
        # seq mismatch: nothing changes and prev == result
        r = await ask(ws, id=3, op="upsert", key="a", value=b"x", match_seq={"exact": 5})
        assert r["ok"]["prev"] == r["ok"]["result"] == {"seq": 1, "data": b"1", "meta": None}
        r = await ask(ws, id=4, op="upsert", key="a/b", value=b"2", match_seq={"exact": 0}, ttl_ms=60_000)
        assert r["ok"]["result"]["seq"] == 2 and r["ok"]["result"]["meta"]["expire_at_ms"] > 0
        assert (await ask(ws, id=5, op="get", key="a"))["ok"]["data"] == b"1"
        assert (await ask(ws, id=6, op="get", key="zz"))["ok"] is None
        assert [v and v["seq"] for v in (await ask(ws, id=7, op="mget", keys=["a", "zz", "a/b"]))["ok"]] == [1, None, 2]
        assert [k for k, _ in (await ask(ws, id=8, op="list", prefix="a/"))["ok"]] == ["a/b"]
        assert len((await ask(ws, id=9, op="list", prefix="", limit=1))["ok"]) == 1
        r = await ask(ws, id=10, op="upsert", key="a", value=None)
        assert r["ok"]["result"] is None and r["ok"]["prev"]["seq"] == 1
        assert (await ask(ws, id=11, op="get", key="a", consistency="local"))["ok"] is None
        assert (await ask(ws, id=12, op="member_list"))["ok"] == []
        assert (await ask(ws, id=13, op="cluster_status"))["ok"]["is_leader"] is True


@pytest.mark.parametrize(
    "req, message",
    [
        ({"op": "get", "key": "a"}, "non-negative integer 'id'"),
        ({"id": 1, "op": "nope"}, "unknown op"),
        ({"id": 1, "op": "get"}, "missing argument 'key'"),
        ({"id": 1, "op": "get", "key": 3}, "wrong type"),
        ({"id": 1, "op": "upsert", "key": "k", "value": "text"}, "wrong type"),
        ({"id": 1, "op": "upsert", "key": "k", "value": b"", "match_seq": {"gt": 1}}, "match_seq"),
        ({"id": 1, "op": "upsert", "key": "k", "value": b"", "ttl_ms": True}, "wrong type"),
        ({"id": 1, "op": "upsert", "key": "k", "value": b"", "ttl_ms": -1}, "ttl_ms"),
        ({"id": 1, "op": "mget", "keys": "a"}, "list of strings"),
        ({"id": 1, "op": "list", "prefix": "", "limit": -1}, "limit"),
        ({"id": 1, "op": "get", "key": "a", "consistency": "eventual"}, "consistency"),
    ],
)
async def test_bad_requests_get_bad_request_and_harm_nobody(tmp_path: Path, req: dict, message: str) -> None:
    c = Cluster(tmp_path)
    async with c.node(1, "--single") as n1, c.socket(1) as ws:
        await until(lambda: n1.core.is_leader)
        r = await ask(ws, **req)
        assert r["error"]["code"] == "bad_request" and message in r["error"]["message"]
        assert (await ask(ws, id=99, op="handshake"))["ok"]  # the socket still works


async def test_garbage_text_and_oversized_messages(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    async with c.node(1, "--single", max_message=1000) as n1, c.socket(1) as ws:
        await until(lambda: n1.core.is_leader)
        await ws.send_message(b"\xc1\x00")
        assert msgpack.unpackb(await ws.get_message())["error"]["code"] == "bad_request"
        await ws.send_message("text")
        assert msgpack.unpackb(await ws.get_message())["error"]["code"] == "bad_request"
        r = await ask(ws, id=5, op="upsert", key="k", value=b"x" * 1500)
        assert r["id"] == 5 and r["error"]["code"] == "too_large"
        assert (await ask(ws, id=6, op="get", key="k"))["ok"] is None


async def test_many_requests_in_flight_on_one_socket(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    async with c.node(1, "--single") as n1, c.socket(1) as ws:
        await until(lambda: n1.core.is_leader)
        for i in range(200):
            await ws.send_message(msgpack.packb({"id": i, "op": "upsert", "key": f"k{i % 7}", "value": b"v"}))
        replies = [msgpack.unpackb(await ws.get_message()) for _ in range(200)]
        assert sorted(r["id"] for r in replies) == list(range(200))
        assert sorted(r["ok"]["result"]["seq"] for r in replies) == list(range(1, 201))


@pytest.mark.parametrize("direct", [True, False])
async def test_a_leaders_write_replies_once_from_the_applying_task_or_else_from_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """The replies of a leader's writes leave from the task that applied them
    (wsfast.send_now); when that declines (another frame being written) the serving
    task sends them. Either way each request gets exactly one reply."""
    from metanode import wsfast

    calls: list[bool] = []
    real = wsfast.send_now

    def spy(ws: Any, data: bytes) -> bool:
        sent = real(ws, data) if direct else False
        calls.append(sent)
        return sent

    monkeypatch.setattr(wsfast, "send_now", spy)
    c = Cluster(tmp_path)
    async with c.node(1, "--single") as n1, c.socket(1) as ws:
        await until(lambda: n1.core.is_leader)
        r = await ask(ws, id=1, op="upsert", key="a", value=b"1")
        assert r["id"] == 1 and r["ok"]["result"]["seq"] == 1
        batch = [{"id": i, "op": "upsert", "key": f"b{i}", "value": b"v"} for i in (2, 3, 4)]
        await ws.send_message(msgpack.packb(batch))
        replies = msgpack.unpackb(await ws.get_message())  # one message
        assert sorted(r["id"] for r in replies) == [2, 3, 4] and all("ok" in r for r in replies)
        r = await ask(ws, id=6, op="get", key="a")  # the next message is its reply: no duplicates
        assert r["id"] == 6 and r["ok"]["data"] == b"1"
        with trio.move_on_after(0.2):
            extra = await ws.get_message()
            raise AssertionError(f"a reply too many: {msgpack.unpackb(extra)}")
    assert calls == [direct, direct]


async def test_a_message_of_writes_is_proposed_by_the_reader_task_on_the_leader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On the leader a message of writes only is proposed in the connection's reader
    task (its serving task then waits); a message with anything else, or a proposal
    there that fails, is served by its serving task as before."""
    c = Cluster(tmp_path)
    async with c.node(1, "--single") as n1, c.socket(1) as ws:
        await until(lambda: n1.core.is_leader)
        proposers: list[str] = []
        submit = n1.submit_proposals

        async def recording(cmds: Any, on_done: Any = None) -> Any:
            # Who proposes (submits the Propose): the core itself may then be stepped by
            # that task or, when the raft loop is busy at that moment, by the raft loop.
            name = trio.lowlevel.current_task().name
            if "reader_task" in name or "client_api" in name:
                proposers.append(name)  # (not the node's own, e.g. publishing its record)
            return await submit(cmds, on_done)

        monkeypatch.setattr(n1, "submit_proposals", recording)
        assert "ok" in await ask(ws, id=1, op="upsert", key="a", value=b"1")
        await ws.send_message(msgpack.packb([
            {"id": 2, "op": "upsert", "key": "b", "value": b"2"}, {"id": 3, "op": "get", "key": "a"},
        ]))
        replies = {r["id"]: r for r in [msgpack.unpackb(await ws.get_message()) for _ in range(2)]}
        assert "ok" in replies[2] and replies[3]["ok"]["data"] == b"1"
        assert len(proposers) == 2
        assert "reader_task" in proposers[0] and "serve" in proposers[1], proposers

        async def failing(*args: Any) -> Any:
            raise RuntimeError("injected")

        monkeypatch.setattr(n1, "begin_client_writes", failing)
        assert "ok" in await ask(ws, id=4, op="upsert", key="c", value=b"3")
        assert "serve" in proposers[2] and "proposing them from the reader task failed" in caplog.text


async def test_a_follower_forwards_writes_and_serves_linearizable_reads(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    async with c.node(1, "--single") as n1:
        await until(lambda: n1.core.is_leader)
        async with c.node(2, "--join", f"127.0.0.1:{c.raft[1]}") as n2, c.socket(2) as ws:
            assert not n2.core.is_leader
            r = await ask(ws, id=1, op="upsert", key="k", value=b"v")
            assert r["ok"]["result"]["seq"] == 1
            # Linearizable: the follower reads after the leader's read index.
            assert (await ask(ws, id=2, op="get", key="k"))["ok"]["data"] == b"v"
            r = await ask(ws, id=3, op="upsert", key="k", value=b"w")
            assert (await ask(ws, id=4, op="get", key="k"))["ok"]["data"] == b"w"
            assert n1.sm.get("k").data == b"w"  # type: ignore[union-attr]


async def test_shutdown_closes_client_sockets_with_1001(tmp_path: Path) -> None:
    from trio_websocket import ConnectionClosed

    c = Cluster(tmp_path)
    async with c.node(1, "--single") as n1:
        await until(lambda: n1.core.is_leader)
        ws_cm = c.socket(1)
        ws = await ws_cm.__aenter__()
        n1.stopping.set()
        with trio.fail_after(5), pytest.raises(ConnectionClosed) as info:
            await ws.get_message()
        assert info.value.reason.code == 1001
        await ws_cm.__aexit__(None, None, None)


async def test_txn_runs_one_branch_atomically(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    async with c.node(1, "--single") as n1, c.socket(1) as ws:
        await until(lambda: n1.core.is_leader)
        await ask(ws, id=1, op="upsert", key="k", value=b"old")
        await ask(ws, id=2, op="upsert", key="p/1", value=b"")
        r = await ask(
            ws, id=3, op="txn",
            conditions=[{"key": "k", "target": "value", "op": "==", "operand": b"old"},
                        {"key": "k", "target": "seq", "op": ">=", "operand": 1}],
            if_then=[{"put": {"key": "k", "value": b"new"}}, {"get": {"key": "k"}},
                     {"delete_by_prefix": {"prefix": "p/"}}, {"delete": {"key": "k", "match_seq": {"exact": 99}}}],
            else_then=[{"put": {"key": "k", "value": b"other"}}],
        )
        ok = r["ok"]
        assert ok["success"] is True
        assert ok["responses"][0]["put"]["result"]["data"] == b"new"
        assert ok["responses"][1] == {"get": {"key": "k", "value": ok["responses"][0]["put"]["result"]}}
        assert ok["responses"][2] == {"delete_by_prefix": {"prefix": "p/", "count": 1}}
        assert ok["responses"][3]["delete"]["result"] == ok["responses"][3]["delete"]["prev"]  # mismatch
        r = await ask(ws, id=4, op="txn", conditions=[{"key": "k", "target": "value", "op": "==", "operand": b"old"}],
                      if_then=[{"put": {"key": "k", "value": b"x"}}], else_then=[{"get": {"key": "k"}}])
        assert r["ok"]["success"] is False and r["ok"]["responses"][0]["get"]["value"]["data"] == b"new"
        # A bad op anywhere: bad_request, nothing applied.
        for bad in ([{"put": {"key": "k"}}], [{"frob": {}}], [{"put": {"key": "k", "value": b"", "ttl_ms": 1, "expire_at_ms": 2}}]):
            r = await ask(ws, id=5, op="txn", if_then=[{"put": {"key": "z", "value": b""}}, *bad])
            assert r["error"]["code"] == "bad_request", r
        r = await ask(ws, id=6, op="txn", conditions=[{"key": "k", "target": "size", "op": "==", "operand": 1}])
        assert r["error"]["code"] == "bad_request" and "target" in r["error"]["message"]
        assert (await ask(ws, id=7, op="get", key="z"))["ok"] is None


async def test_ttl_follows_the_leaders_clock_on_every_replica(tmp_path: Path) -> None:
    """contract §5: the leader stamps entries with its clock and expiry happens at log
    positions: a follower whose clock is an hour ahead still sees the key until the
    leader's clock says it expired, and then no replica returns it."""
    c = Cluster(tmp_path)
    async with c.node(1, "--single") as n1:
        await until(lambda: n1.core.is_leader)
        async with c.node(2, "--join", f"127.0.0.1:{c.raft[1]}") as n2, c.socket(2) as ws:
            n2.clock_ms = lambda: int(trio.current_time() * 1000) + 3_600_000  # skewed, unused for TTL
            r = await ask(ws, id=1, op="upsert", key="t", value=b"v", ttl_ms=800)
            expire_at = r["ok"]["result"]["meta"]["expire_at_ms"]
            assert abs(expire_at - n1.clock_ms() - 800) < 5_000  # the leader's clock, not the follower's
            assert (await ask(ws, id=2, op="get", key="t"))["ok"] is not None
            await trio.sleep(1.0)
            assert (await ask(ws, id=3, op="get", key="t"))["ok"] is None  # linearizable read: expired
            await until(lambda: n1.sm.get("t") is None and n2.sm.get("t") is None)
            assert n1.sm.log_time_ms == n2.sm.log_time_ms


async def test_keys_expire_without_any_client_traffic(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    async with c.node(1, "--single") as n1, c.socket(1) as ws:
        await until(lambda: n1.core.is_leader)
        await ask(ws, id=1, op="upsert", key="t", value=b"v", ttl_ms=200)
        index = n1.applied.index
        await until(lambda: n1.sm.get("t") is None, timeout=5)  # the leader logged a Tick
        assert n1.applied.index > index


async def test_odd_requests_are_bad_requests_not_internal_errors(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    async with c.node(1, "--single") as n1, c.socket(1) as ws:
        await until(lambda: n1.core.is_leader)
        for req in ({"id": 1, "op": ["get"]}, {"id": 2, "op": {"a": 1}},
                    {"id": 3, "op": "upsert", "key": "k", "value": b"", "ttl_ms": 2**63 - 1}):
            r = await ask(ws, **req)
            assert r["error"]["code"] == "bad_request", r
        await ws.send_message(msgpack.packb({(1, 2): 3}))  # a map with an array key
        assert msgpack.unpackb(await ws.get_message(), strict_map_key=False)["error"]["code"] == "bad_request"
        assert (await ask(ws, id=4, op="get", key="k"))["ok"] is None


async def test_a_write_in_flight_at_shutdown_gets_its_reply_before_1001(tmp_path: Path) -> None:
    from trio_websocket import ConnectionClosed

    c = Cluster(tmp_path)
    async with c.node(1, "--single") as n1:
        await until(lambda: n1.core.is_leader)
        async with c.socket(1) as ws:
            await ws.send_message(msgpack.packb({"id": 1, "op": "upsert", "key": "k", "value": b"v"}))
            await until(lambda: n1.calls.count > 0 or n1.sm.get("k") is not None)  # the server has it
            n1.stopping.set()
            reply = msgpack.unpackb(await ws.get_message())
            assert reply["id"] == 1 and "ok" in reply
            with trio.fail_after(5), pytest.raises(ConnectionClosed):
                await ws.get_message()


async def test_missing_tls_files_and_oversized_limits_are_config_errors(tmp_path: Path) -> None:
    from metanode.errors import ConfigError

    c = Cluster(tmp_path)
    with pytest.raises(ConfigError, match="grpc_tls_server_cert: '/x.crt' does not exist"):
        async with c.node(1, "--single", "--grpc-tls-server-cert", "/x.crt", "--grpc-tls-server-key", "/x.key"):
            pass
    with pytest.raises(ConfigError, match="grpc_api_max_message_size"):
        async with c.node(2, "--single", max_message=100 << 20):
            pass


async def next_msg(ws: WebSocketConnection) -> dict:
    with trio.fail_after(5):
        return msgpack.unpackb(await ws.get_message(), raw=False)


async def test_watch_a_key_and_a_range_with_flush_filters_and_cancel(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    async with c.node(1, "--single") as n1, c.socket(1) as ws, c.socket(1) as writer:
        await until(lambda: n1.core.is_leader)
        await ask(writer, id=1, op="upsert", key="r/a", value=b"0")
        await ws.send_message(msgpack.packb({"id": 7, "op": "watch", "key": "r/", "key_end": "r0", "initial_flush": True}))
        flush = await next_msg(ws)
        assert flush["init"] and flush["event"]["key"] == "r/a" and flush["event"]["current"]["data"] == b"0"
        marker = await next_msg(ws)
        assert marker == {"id": 7, "event": None, "init": True, "seq": 1}
        await ws.send_message(msgpack.packb({"id": 8, "op": "watch", "key": "r/b", "filter": "delete"}))
        await ask(writer, id=2, op="upsert", key="r/b", value=b"1")
        await ask(writer, id=3, op="upsert", key="other", value=b"x")  # outside the range
        await ask(writer, id=4, op="upsert", key="r/b", value=None)
        events = [await next_msg(ws) for _ in range(3)]
        by_watch: dict[int, list] = {}
        for e in events:
            by_watch.setdefault(e["id"], []).append(e["event"])
        assert [(e["key"], e["current"] and e["current"]["data"], e["seq"]) for e in by_watch[7]] == [
            ("r/b", b"1", 2), ("r/b", None, 4)]
        assert [(e["key"], e["current"], e["seq"]) for e in by_watch[8]] == [("r/b", None, 4)]  # deletes only
        await ws.send_message(msgpack.packb({"id": 7, "op": "cancel"}))
        assert await next_msg(ws) == {"id": 7, "ok": None}
        r = await ask(ws, id=9, op="cancel")
        assert r["error"]["code"] == "bad_request"
        await ws.send_message(msgpack.packb({"id": 8, "op": "cancel"}))
        assert await next_msg(ws) == {"id": 8, "ok": None}


async def test_watch_resumes_from_seq_on_another_node_without_gaps(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    async with c.node(1, "--single") as n1:
        await until(lambda: n1.core.is_leader)
        async with c.node(2, "--join", f"127.0.0.1:{c.raft[1]}"), c.socket(1) as w1, c.socket(2) as w2:
            await w1.send_message(msgpack.packb({"id": 1, "op": "watch", "key": "k"}))
            await ask(w2, id=10, op="upsert", key="k", value=b"1")
            first = await next_msg(w1)
            assert first["event"]["current"]["data"] == b"1"
            seen = first["event"]["seq"]
            # Two more writes happen while the watcher is "disconnected".
            await ask(w2, id=11, op="upsert", key="k", value=b"2")
            await ask(w2, id=12, op="upsert", key="k", value=b"3")
            await w2.send_message(msgpack.packb({"id": 2, "op": "watch", "key": "k", "from_seq": seen}))
            resumed = [await next_msg(w2) for _ in range(2)]
            assert [e["event"]["current"]["data"] for e in resumed] == [b"2", b"3"]
            assert [e["event"]["seq"] for e in resumed] == [seen + 1, seen + 2]
            r = await ask(w2, id=3, op="watch", key="k", from_seq=1, initial_flush=True)
            assert r["error"]["code"] == "bad_request"


async def test_watch_from_a_compacted_revision_is_refused(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    async with c.node(1, "--single") as n1, c.socket(1) as ws:
        await until(lambda: n1.core.is_leader)
        await ask(ws, id=1, op="upsert", key="k", value=b"1")
        n1.watch_hub.reset(n1.sm.rev)  # as after a snapshot from the leader
        r = await ask(ws, id=2, op="watch", key="k", from_seq=0)
        assert r["error"]["code"] == "bad_request" and "compacted" in r["error"]["message"]


async def test_a_follower_reuses_its_connection_to_the_leader(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    async with c.node(1, "--single") as n1:
        await until(lambda: n1.core.is_leader)
        async with c.node(2, "--join", f"127.0.0.1:{c.raft[1]}") as n2, c.socket(2) as ws:
            before = n2.calls_to_leader.connects
            for i in range(50):
                assert "ok" in await ask(ws, id=i, op="upsert", key=f"k{i}", value=b"v")
                assert "ok" in await ask(ws, id=100 + i, op="get", key=f"k{i}")
            assert n2.calls_to_leader.connects - before <= 1


async def test_with_a_token_the_first_request_must_be_a_valid_handshake(tmp_path: Path) -> None:
    from trio_websocket import ConnectionClosed
    from wsproto.events import BytesMessage

    c = Cluster(tmp_path)
    async with c.node(1, "--single", "--grpc-api-token", "s3cret") as n1:
        await until(lambda: n1.core.is_leader)
        async with c.socket(1) as ws:
            r = await ask(ws, id=1, op="get", key="k")
            assert r["error"]["code"] == "unauthenticated"
            with trio.fail_after(5), pytest.raises(ConnectionClosed):
                await ws.get_message()
        async with c.socket(1) as ws:
            r = await ask(ws, id=1, op="handshake", token="wrong")
            assert r["error"]["code"] == "unauthenticated"
        async with c.socket(1) as ws:
            assert (await ask(ws, id=1, op="handshake", token="s3cret"))["ok"]["server"] == "metanode"
            assert "ok" in await ask(ws, id=2, op="upsert", key="k", value=b"v")
        # Messages pipelined in one TCP write are decided in the order they came (the
        # reader task hands them over together; their serving tasks run in any order).
        for _ in range(5):
            async with c.socket(1) as ws:
                frames = [ws._wsproto.send(BytesMessage(data=msgpack.packb(req))) for req in (
                    {"id": 1, "op": "handshake", "token": "s3cret"}, {"id": 2, "op": "get", "key": "k"},
                )]
                await ws._stream.send_all(b"".join(frames))
                replies = {r["id"]: r for r in [msgpack.unpackb(await ws.get_message()) for _ in range(2)]}
                assert "ok" in replies[1] and replies[2]["ok"]["data"] == b"v", replies
            async with c.socket(1) as ws:
                frames = [ws._wsproto.send(BytesMessage(data=msgpack.packb(req))) for req in (
                    {"id": 1, "op": "get", "key": "k"}, {"id": 2, "op": "handshake", "token": "s3cret"},
                )]
                await ws._stream.send_all(b"".join(frames))
                r = msgpack.unpackb(await ws.get_message())
                assert r["id"] == 1 and r["error"]["code"] == "unauthenticated"
                with trio.fail_after(5), pytest.raises(ConnectionClosed):
                    await ws.get_message()  # the handshake after it was not served
    assert n1.config.redacted()["grpc_api_token"] == "***"


async def test_the_python_client_sends_its_token(tmp_path: Path) -> None:
    from metanode.client import MetaClient, Unauthenticated

    c = Cluster(tmp_path)
    async with c.node(1, "--single", "--grpc-api-token", "s3cret") as n1:
        await until(lambda: n1.core.is_leader)
        async with MetaClient.connect([f"127.0.0.1:{c.grpc[1]}"], token="s3cret", timeout=5) as client:
            assert (await client.upsert("k", b"v")).result is not None
        with pytest.raises(Unauthenticated):
            async with MetaClient.connect([f"127.0.0.1:{c.grpc[1]}"], token="nope", timeout=5) as client:
                await client.get("k")


async def _raw_socket(port: int) -> tuple[trio.SocketStream, Any]:
    """A bare WebSocket client (wsproto over a TCP stream the test closes itself)."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="127.0.0.1", target="/v1")))
    while True:
        ws.receive_data(await stream.receive_some())
        if any(isinstance(e, AcceptConnection) for e in ws.events()):
            return stream, ws


@asynccontextmanager
async def _one_node_bare_socket(tmp_path: Path) -> AsyncIterator[tuple[trio.SocketStream, Any]]:
    """A single-node cluster and a bare WebSocket client to it (closed after)."""
    c = Cluster(tmp_path)
    with trio.fail_after(LIMIT):
        async with c.node(1, "--single") as n1:
            await until(lambda: n1.core.is_leader)
            stream, ws = await _raw_socket(c.grpc[1])
            try:
                yield stream, ws
            finally:
                await stream.aclose()


@pytest.mark.parametrize("req", [
    {"id": 1, "op": "get", "key": "a", "consistency": "local"},
    {"id": 1, "op": "upsert", "key": "a", "value": b"1"},
])
async def test_a_message_that_arrives_after_the_session_ended_is_dropped(
    tmp_path: Path, req: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """Shutdown closes the socket (1001); a message the client sent before it saw the
    close still reaches the reader task, after the session's tasks are gone: it is
    dropped, and the node stops cleanly (it crashed the client API)."""
    from wsproto.events import CloseConnection
    from wsproto.frame_protocol import FrameProtocol, Opcode

    c = Cluster(tmp_path)
    got_close = trio.Event()

    async def client(port: int) -> None:
        stream, ws = await _raw_socket(port)
        try:
            while not got_close.is_set():
                data = await stream.receive_some()
                if not data:
                    return
                ws.receive_data(data)
                if any(isinstance(e, CloseConnection) for e in ws.events()):
                    got_close.set()
            # wsproto sends nothing after a close: the frame is built by hand.
            await stream.send_all(FrameProtocol(client=True, extensions=[])._serialize_frame(
                Opcode.BINARY, msgpack.packb(req)))
            await trio.sleep(0.5)
        finally:
            await stream.aclose()

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            async with c.node(1, "--single") as n1:
                await until(lambda: n1.core.is_leader)
                nursery.start_soon(client, c.grpc[1])
                await trio.sleep(0.2)
            # open_server returned without an error: the late message harmed nothing
    assert got_close.is_set()
    assert n1.sm.get("a") is None  # dropped before anything was done with it
    assert not [r for r in caplog.records if r.levelname == "ERROR" and r.name.startswith("metanode.api")]


async def test_backpressure_holds_for_a_burst_read_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small messages in one TCP read are handed over without a checkpoint
    between them: the in-flight count is taken as each is handed over, so no more
    than MAX_IN_FLIGHT requests are in flight on the socket."""
    from wsproto.events import BytesMessage

    from metanode.api import client_api

    peak = [0]
    serve_batch = client_api.ClientSession._serve_batch

    async def slow(self: Any, reqs: list[Any]) -> None:
        peak[0] = max(peak[0], self.in_flight)
        await trio.sleep(0.3)  # a request that takes a while
        await serve_batch(self, reqs)

    monkeypatch.setattr(client_api.ClientSession, "_serve_batch", slow)
    async with _one_node_bare_socket(tmp_path) as (stream, ws):
        n = client_api.MAX_IN_FLIGHT * 3
        await stream.send_all(b"".join(
            ws.send(BytesMessage(data=msgpack.packb({"id": i, "op": "member_list"}))) for i in range(n)
        ))
        await until(lambda: peak[0] >= client_api.MAX_IN_FLIGHT, "a full socket")
        await trio.sleep(0.5)
    assert peak[0] == client_api.MAX_IN_FLIGHT


async def _replies(stream: trio.SocketStream, ws: Any, want: Any, limit: float = 5.0) -> list[dict]:
    """Replies read off a bare socket (whole messages, arrays flattened) until
    `want(replies)` or `limit` seconds."""
    from wsproto.events import BytesMessage

    out: list[dict] = []
    parts: list[bytes] = []
    with trio.move_on_after(limit):
        while not want(out):
            data = await stream.receive_some()
            if not data:
                break
            ws.receive_data(data)
            for e in ws.events():
                if isinstance(e, BytesMessage):
                    parts.append(e.data)
                    if e.message_finished:
                        m = msgpack.unpackb(b"".join(parts))
                        parts.clear()
                        out.extend(m if isinstance(m, list) else [m])
    return out


async def test_messages_queued_before_the_session_runs_are_all_answered_under_backpressure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages that came before the session took over (its own task handles those)
    and after it (the reader task) wait for room one at a time, in order: each is
    answered, and the session ends when the client leaves."""
    from wsproto.events import BytesMessage

    from metanode.api import client_api

    run, serve_batch = client_api.ClientSession.run, client_api.ClientSession._serve_batch
    sessions: list[Any] = []

    async def late_run(self: Any) -> None:  # the handler reaches `run` a little late
        sessions.append(self)
        await trio.sleep(0.3)
        await run(self)

    async def slow(self: Any, reqs: list[Any]) -> None:
        if len(reqs) > 1:
            await trio.sleep(0.5)  # the big batch holds the socket's room for a while
        await serve_batch(self, reqs)

    monkeypatch.setattr(client_api.ClientSession, "run", late_run)
    monkeypatch.setattr(client_api.ClientSession, "_serve_batch", slow)
    async with _one_node_bare_socket(tmp_path) as (stream, ws):

        def msg(m: Any) -> bytes:
            return ws.send(BytesMessage(data=msgpack.packb(m)))

        big = [{"id": 1000 + i, "op": "member_list"} for i in range(client_api.MAX_IN_FLIGHT + 44)]
        await stream.send_all(msg(big) + msg({"id": 1, "op": "member_list"}))  # before `run`
        await trio.sleep(0.5)
        await stream.send_all(msg({"id": 2, "op": "member_list"}))  # through the reader task
        got = await _replies(stream, ws, lambda r: {1, 2} <= {x["id"] for x in r})
        assert {1, 2} <= {r["id"] for r in got} and len(got) == len(big) + 2
        await stream.aclose()
        await until(lambda: sessions[0]._closed, "the session's end")
        assert sessions[0].in_flight == 0 and sessions[0].counter.count == 0


async def test_cancelling_a_watch_whose_send_waits_for_a_slow_reader_cuts_no_frame(tmp_path: Path) -> None:
    """A watch's `cancel` while its event is half written (the client does not read)
    takes effect after that frame: everything the client then reads is whole, ending
    with the watch's last reply."""
    from wsproto.events import BytesMessage

    c = Cluster(tmp_path)
    with trio.fail_after(LIMIT * 2):
        async with c.node(1, "--single", max_message=8 << 20) as n1:
            await until(lambda: n1.core.is_leader)
            async with c.socket(1) as w:
                for i in range(24):
                    assert "ok" in await ask(w, id=i, op="upsert", key=f"k{i:02}", value=bytes(1 << 20))
            stream, ws = await _raw_socket(c.grpc[1])
            try:
                await stream.send_all(ws.send(BytesMessage(data=msgpack.packb(
                    {"id": 7, "op": "watch", "key": "k", "key_end": "l", "initial_flush": True}))))
                await trio.sleep(1.0)  # the watch's sends block: nothing is read
                await stream.send_all(ws.send(BytesMessage(data=msgpack.packb({"id": 7, "op": "cancel"}))))
                got = await _replies(stream, ws, lambda r: any("ok" in x for x in r), limit=10)
            finally:
                await stream.aclose()
    assert got and got[-1] == {"id": 7, "ok": None}, got[-1:]
    assert all(r["id"] == 7 for r in got)
