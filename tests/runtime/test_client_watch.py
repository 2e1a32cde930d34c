"""`MetaClient.watch` (docs/guide/client.md, "Watch"): against real nodes in-process, and
against scripted servers for the resume rules a real node cannot stage on cue.

Real sockets, so the real clock; every test is bounded by `trio.fail_after`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from trio_websocket import WebSocketConnection

import metanode.client.client as client_mod
from metanode.client import (
    BadRequest,
    HistoryCompacted,
    MetaClient,
    MetaError,
    SeqV,
    SyncMetaClient,
    WatchEvent,
)
from metanode.client.client import _Stream
from tests.net import until
from tests.runtime.test_client import cluster, fakes, reply, three_nodes

pytestmark = pytest.mark.runtime


# ---------------------------------------------------------------------- pure parts
def test_watch_event_is_frozen_and_the_stream_buffer_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import attrs.exceptions

    ev = WatchEvent("k", None, SeqV(1, b"v"), 3)
    assert not ev.init
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        ev.seq = 4  # type: ignore[misc]
    monkeypatch.setattr(client_mod, "WATCH_BUFFER", 2)
    s = _Stream()
    live = {"id": 1, "event": {"key": "k", "prev": None, "current": None, "seq": 1}, "init": False}
    init = dict(live, init=True)
    assert s.push(init) and s.push(init) and s.push(init)  # the flush is not bounded
    assert s.push({"id": 1, "event": None, "init": True, "seq": 9}) and s.marker.is_set()
    s.items.clear()
    assert s.push(live) and s.push(live)
    assert not s.push(live) and s.end == ("overflow", None) and len(s.items) == 2
    s = _Stream()
    assert not s.push({"id": 1, "error": {"code": "unavailable"}}) and s.end is not None and s.end[0] == "error"


async def test_watch_arguments_are_checked() -> None:
    async def never(ws: WebSocketConnection, req: dict) -> None:
        pass

    async with fakes(never) as (f,):
        async with MetaClient.connect([f.address], timeout=2) as cl:
            with pytest.raises(ValueError, match="filter"):
                async with cl.watch("k", filter="puts"):
                    pass
            with pytest.raises(ValueError, match="exclude"):
                async with cl.watch("k", initial_flush=True, from_seq=3):
                    pass
            with pytest.raises(ValueError, match="from_seq"):
                async with cl.watch("k", from_seq=-1):
                    pass
            with pytest.raises(TypeError, match="key_end"):
                async with cl.watch("k", key_end=b"z"):  # type: ignore[arg-type]
                    pass
            assert f.requests == []


# ---------------------------------------------------------------------- scripted resume
def _ev(req: dict, key: str, seq: int, data: bytes | None) -> dict:
    current = None if data is None else {"seq": seq, "data": data, "meta": None}
    return {"id": req["id"], "event": {"key": key, "prev": None, "current": current, "seq": seq}, "init": False}


async def _send(ws: WebSocketConnection, msg: dict) -> None:
    await ws.send_message(msgpack.packb(msg, use_bin_type=True))


async def test_resume_after_a_lost_socket_and_unavailable_sends_from_seq() -> None:
    """The marker's revision, then the last event's, is where each resume starts; a
    duplicate the server would send again is not yielded."""
    watches: list[dict] = []

    async def server(ws: WebSocketConnection, req: dict) -> None:
        if req["op"] == "cancel":
            await reply(ws, req, ok=None)
            return
        watches.append(req)
        n = len(watches)
        if n == 1:  # the start: a flush (asked by the client), its marker, two events, a crash
            await _send(ws, {"id": req["id"], "event": {"key": "k", "prev": None, "current": {"seq": 2, "data": b"old", "meta": None}, "seq": 2}, "init": True})
            await _send(ws, {"id": req["id"], "event": None, "init": True, "seq": 5})
            await _send(ws, _ev(req, "k", 6, b"a"))
            await _send(ws, _ev(req, "k", 7, b"b"))
            await trio.sleep(0.2)
            await ws.aclose(1011, "crashed")
        elif n == 2:  # resumed: one event (and a stale duplicate), then "too slow"
            await _send(ws, _ev(req, "k", 7, b"b"))
            await _send(ws, _ev(req, "k", 9, None))
            await reply(ws, req, error={"code": "unavailable", "message": "too slow", "leader": None})
        else:
            await _send(ws, _ev(req, "k", 12, b"c"))

    with trio.fail_after(10):
        async with fakes(server) as (f,):
            async with MetaClient.connect([f.address], timeout=3) as cl:
                async with cl.watch("k") as events:
                    assert events.flushed.is_set() and events.last_seq == 5
                    got = []
                    async for ev in events:
                        got.append((ev.seq, ev.current and ev.current.data))
                        if len(got) == 4:
                            break
                assert got == [(6, b"a"), (7, b"b"), (9, None), (12, b"c")]
                await until(lambda: f.ops()[-1] == "cancel")
    assert watches[0]["initial_flush"] is True and "from_seq" not in watches[0]
    assert [(w["initial_flush"], w["from_seq"]) for w in watches[1:]] == [(False, 7), (False, 9)]
    assert f.requests[-1] == {"id": watches[2]["id"], "op": "cancel"}
    assert all(w["key"] == "k" and w["filter"] == "all" and w["consistency"] == "linearizable" for w in watches)


async def test_history_compacted_is_raised_with_advice() -> None:
    async def server(ws: WebSocketConnection, req: dict) -> None:
        await reply(ws, req, error={"code": "bad_request", "message": "history compacted", "leader": None})

    with trio.fail_after(10):
        async with fakes(server) as (f,):
            async with MetaClient.connect([f.address], timeout=3) as cl:
                async with cl.watch("k", from_seq=1) as events:
                    with pytest.raises(HistoryCompacted, match="initial_flush=True") as e:
                        await events.__anext__()
                    assert isinstance(e.value, BadRequest)
                    with pytest.raises(HistoryCompacted):  # it stays failed
                        await events.__anext__()


async def test_a_caller_that_does_not_read_gets_a_resume_not_a_stalled_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client_mod, "WATCH_BUFFER", 3)
    watches: list[dict] = []

    async def server(ws: WebSocketConnection, req: dict) -> None:
        if req["op"] != "watch":
            await reply(ws, req, ok=None)
            return
        watches.append(req)
        start = req.get("from_seq") or 10
        if req["initial_flush"]:
            await _send(ws, {"id": req["id"], "event": None, "init": True, "seq": start})
        for seq in range(start + 1, 31):
            await _send(ws, _ev(req, "k", seq, b"v"))

    with trio.fail_after(10):
        async with fakes(server) as (f,):
            async with MetaClient.connect([f.address], timeout=3) as cl:
                async with cl.watch("k") as events:
                    await until(lambda: cl._conn is not None and not cl._conn.streams)  # overflowed
                    assert await cl.get("k") is None  # the socket still answers requests
                    got = [e.seq for e in await _collect(events, 20)]
                assert got == list(range(11, 31))
    # 3 buffered events (11..13) were yielded, then a resume after 13 (and so on).
    assert watches[1]["from_seq"] == 13 and not watches[1]["initial_flush"]
    assert {"id": watches[0]["id"], "op": "cancel"} in f.requests

# ---------------------------------------------------------------------- real nodes
async def _collect(events: Any, n: int) -> list[WatchEvent]:
    out = []
    async for ev in events:
        out.append(ev)
        if len(out) == n:
            break
    return out


async def test_a_key_and_a_range_see_every_change_in_order(tmp_path: Path) -> None:
    with trio.fail_after(15):
        async with cluster(tmp_path) as c:
            await c.start(1, "--single")
            async with MetaClient.connect([c.address(1)]) as cl:
                async with cl.watch("a/1") as one, cl.watch("a/", key_end="a0") as rng:
                    await cl.upsert("a/1", b"x")
                    await cl.upsert("b", b"outside")
                    await cl.upsert("a/2", b"y")
                    await cl.upsert("a/1", b"x2")
                    await cl.delete("a/1")
                    await cl.upsert("a/3", b"short", ttl_ms=200)
                    # Requests share the socket with the two watches.
                    assert await cl.get("a/2") is not None and len(cl._conns) == 1
                    got = await _collect(rng, 6)
                    assert [(e.key, e.current and e.current.data) for e in got] == [
                        ("a/1", b"x"), ("a/2", b"y"), ("a/1", b"x2"), ("a/1", None), ("a/3", b"short"), ("a/3", None),
                    ]  # fmt: skip  (the last: a/3's expiry)
                    assert got[2].prev == got[0].current and got[3].prev == got[2].current
                    seqs = [e.seq for e in got]
                    assert seqs == sorted(seqs) and len(set(seqs)) == 6 and not any(e.init for e in got)
                    mine = await _collect(one, 3)
                    assert [e.seq for e in mine] == [got[0].seq, got[2].seq, got[3].seq]


async def test_filters_initial_flush_and_cancel(tmp_path: Path) -> None:
    with trio.fail_after(15):
        async with cluster(tmp_path) as c:
            await c.start(1, "--single")
            async with MetaClient.connect([c.address(1)]) as cl:
                await cl.upsert("p/a", b"1")
                await cl.upsert("p/b", b"2")
                async with cl.watch("p/", key_end="p0", initial_flush=True) as flush, cl.watch(
                    "p/", key_end="p0", filter="update"
                ) as upd, cl.watch("p/", key_end="p0", filter="delete") as dels:
                    assert not flush.flushed.is_set()
                    init = await _collect(flush, 2)
                    assert [(e.key, e.current and e.current.data, e.init, e.prev) for e in init] == [
                        ("p/a", b"1", True, None), ("p/b", b"2", True, None),
                    ]  # fmt: skip
                    await cl.delete("p/a")
                    await cl.upsert("p/c", b"3")
                    live = await _collect(flush, 2)
                    assert flush.flushed.is_set() and flush.flush_seq is not None
                    assert all(not e.init and e.seq > flush.flush_seq for e in live)
                    assert [(e.key, e.current) for e in await _collect(dels, 1)] == [("p/a", None)]
                    assert [e.key for e in await _collect(upd, 1)] == ["p/c"]
                    watch_ids = set(cl._conn.streams)  # type: ignore[union-attr]
                    assert len(watch_ids) == 3
                # Leaving cancelled all three on the server; the socket carries on.
                assert cl._conn is not None and not cl._conn.streams
                assert (await cl.upsert("p/d", b"4")).result is not None
                await trio.sleep(0.1)
                assert not cl._conn.streams


async def test_a_watch_resumes_on_another_node_without_gap_or_duplicate(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with cluster(tmp_path) as c:
            await three_nodes(c)
            leader = c.leader()
            follower, other = [i for i in (1, 2, 3) if i != leader]
            async with MetaClient.connect([c.address(follower), c.address(other)], timeout=5) as watcher, \
                    MetaClient.connect([c.address(leader)], timeout=5) as writer:  # fmt: skip
                written: list[bytes] = []
                async with watcher.watch("r/", key_end="r0") as events:
                    assert events.address == c.address(follower)

                    follower_gone = trio.Event()

                    async def write() -> None:
                        for i in range(60):
                            if i == 30:  # half before the node stops, half after
                                await follower_gone.wait()
                            await writer.upsert(f"r/{i % 7}", str(i).encode())
                            written.append(str(i).encode())
                            await trio.sleep(0.005)

                    got: list[WatchEvent] = []
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(write)
                        async for ev in events:
                            got.append(ev)
                            if len(got) == 15:
                                await c.stop(follower)  # the writer keeps writing meanwhile
                                follower_gone.set()
                            if len(got) == 60:
                                break
                    assert events.address == c.address(other)
                assert [e.current and e.current.data for e in got] == written
                seqs = [e.seq for e in got]
                assert seqs == list(range(seqs[0], seqs[0] + 60))  # no other key changed


async def test_from_seq_older_than_the_history_is_history_compacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import metanode.node.watch

    monkeypatch.setattr(metanode.node.watch, "HISTORY", 3)  # a node keeps the last 3 changes
    with trio.fail_after(15):
        async with cluster(tmp_path) as c:
            await c.start(1, "--single")
            async with MetaClient.connect([c.address(1)]) as cl:
                for i in range(8):
                    await cl.upsert("x", str(i).encode())
                async with cl.watch("x", from_seq=1) as events:
                    with pytest.raises(HistoryCompacted, match="initial_flush=True"):
                        await events.__anext__()
                # A recent revision still resumes.
                last = (await cl.get("x")).seq  # type: ignore[union-attr]
                async with cl.watch("x", initial_flush=True) as events:
                    first = await events.__anext__()
                    assert first.init and first.current is not None and first.current.seq == last
                assert await cl.get("x") is not None


def test_the_sync_watch_blocks_for_each_event(tmp_path: Path) -> None:
    async def main() -> None:
        async with cluster(tmp_path) as c:
            await c.start(1, "--single")
            with trio.fail_after(15):
                await trio.to_thread.run_sync(in_thread, c.address(1))

    def in_thread(address: str) -> None:
        with SyncMetaClient([address]) as cl:
            cl.upsert("s", b"0")
            with cl.watch("s", initial_flush=True) as events:
                first = next(events)
                assert first.init and first.current is not None and first.current.data == b"0"
                cl.upsert("s", b"1")
                ev = next(events)
                assert events.flushed and not ev.init and ev.current is not None and ev.current.data == b"1"
                assert events.last_seq == ev.seq

    trio.run(main)


async def test_a_watch_on_the_leader_resumes_across_a_leader_change(tmp_path: Path) -> None:
    """contract §5: a watch survives losing the leader it was on: the client resumes on
    another node with from_seq and sees every write exactly once, in order."""
    with trio.fail_after(30):
        async with cluster(tmp_path) as c:
            await three_nodes(c)
            leader = c.leader()
            others = [i for i in (1, 2, 3) if i != leader]
            async with MetaClient.connect([c.address(leader), *map(c.address, others)], timeout=10) as watcher, \
                    MetaClient.connect([c.address(i) for i in others], timeout=10) as writer:  # fmt: skip
                written: list[bytes] = []
                async with watcher.watch("w/", key_end="w0") as events:
                    assert events.address == c.address(leader)
                    leader_gone = trio.Event()

                    async def write() -> None:
                        i = 0
                        while len(written) < 40:
                            if len(written) == 20:
                                await leader_gone.wait()
                            value = str(i).encode()
                            i += 1
                            try:
                                await writer.upsert(f"w/{i % 5}", value)
                            except MetaError:
                                continue  # the election: this write may or may not exist
                            written.append(value)

                    got: list[bytes] = []

                    async def read() -> None:
                        async for ev in events:
                            assert ev.current is not None
                            got.append(ev.current.data)
                            if len(got) == 10:
                                await c.stop(leader)
                                leader_gone.set()

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(read)
                        await write()
                        # An event can arrive before its write's reply: wait for all.
                        await until(lambda: set(written) <= set(got), "every write watched")
                        nursery.cancel_scope.cancel()
                    assert events.address != c.address(leader)
                # Every acknowledged write arrives once, in order; an unknown-outcome
                # write may appear too (it was applied), but nothing twice.
                assert len(got) == len(set(got))
                assert [v for v in got if v in set(written)] == written
