"""Malformed, oversized and forged input on every port of every node (raft, client,
admin) while the workload runs: nothing it sends stops a node, moves a term or the
leader, or grows a node's memory without bound; and the client API's documented limits
(`too_large` up to twice `grpc_api_max_message_size`, close 1009 beyond)."""

from __future__ import annotations

import os
import struct

import msgpack
import pytest
import trio
from trio_websocket import ConnectionClosed, wrap_client_stream

from metanode.transport.frames import Hello, frame_bytes
from metanode.wire.codec import PROTOCOL_VERSION
from tests.integration.test_safety import FORGED_ID, forged_frames
from tests.robustness.cluster import ROUNDS, Cluster
from tests.robustness.proxy import connect_tcp
from tests.robustness.workload import Workload

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.robustness]

LIMIT = 1 << 20  # grpc_api_max_message_size in this test
RSS_GROWTH_KIB = 96 * 1024


async def send_raw(host: str, port: int, data: bytes, *, read: bool = True, linger: float = 0.5) -> bytes:
    """One connection: send `data`, read what comes back for a moment, close."""
    got = b""
    try:
        stream = await connect_tcp(host, port)
    except OSError:
        return got
    try:
        with trio.move_on_after(linger + 1):
            await stream.send_all(data)
            if read:
                with trio.move_on_after(linger):
                    while len(got) < 1 << 16:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            break
                        got += chunk
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)
    return got


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


async def abuse_raft_port(c: Cluster, node_id: int, cluster_id: str) -> None:
    spec = c.specs[node_id]
    host, port = spec.host, spec.raft_port  # the node's own port, not its proxy
    hello = frame_bytes(Hello(PROTOCOL_VERSION, cluster_id, "metanode", FORGED_ID))
    member_hello = frame_bytes(Hello(PROTOCOL_VERSION, cluster_id, "metanode", next(i for i in c.ids() if i != node_id)))
    payloads = [
        os.urandom(1024),  # garbage
        struct.pack(">I", 0xFFFFFFFF),  # a 4 GiB frame announced
        struct.pack(">I", 64 << 20) + os.urandom(1 << 20),  # 64 MiB announced, 1 MiB sent
        struct.pack(">I", 0),  # a zero-length frame
        _frame(b"\xc1\xc1\xc1"),  # not msgpack
        _frame(msgpack.packb([1, 2, 3])),  # not a map
        _frame(msgpack.packb({"t": "nonsense"})),
        hello + _frame(os.urandom(64)),
        hello + _frame(msgpack.packb({"t": "call", "id": 1, "method": "no-such", "payload": b""})),
        hello + _frame(msgpack.packb({"t": "call", "id": 2, "method": "join", "payload": os.urandom(200)})),
        hello + _frame(msgpack.packb({"t": "vote", "term": 10**12, "src": FORGED_ID, "dst": node_id})),
        hello + b"".join(frame_bytes(f) for f in forged_frames(10**9, node_id)),
        member_hello + _frame(msgpack.packb({"t": "hb_resp", "term": 10**12, "src": 1, "dst": node_id})),
        _frame(msgpack.packb({"t": "hello", "v": PROTOCOL_VERSION, "cluster_id": "x" * 100_000,
                              "cluster_name": "metanode", "from": 5})),
    ]
    for data in payloads:
        await send_raw(host, port, data)


async def hold_idle_connections(c: Cluster, node_id: int, n: int, seconds: float) -> None:
    """Connections that never say hello (slowloris)."""
    spec = c.specs[node_id]
    streams = []
    try:
        for _ in range(n):
            try:
                streams.append(await connect_tcp(spec.host, spec.raft_port))
            except OSError:
                break
        await trio.sleep(seconds)
    finally:
        for s in streams:
            await trio.aclose_forcefully(s)


async def abuse_admin_port(c: Cluster, node_id: int) -> None:
    spec = c.specs[node_id]
    host, port = spec.host, spec.admin_port
    for data in (
        os.urandom(2048),
        b"GET /v1/cluster/status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n",
        b"POST /v1/ctrl/trigger_snapshot HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n" + b"x" * 100_000,
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\r\n" * 10_000,
    ):
        await send_raw(host, port, data)
    for path in ("/v1/nope", "/v1/ctrl/trigger_transfer_leader?to=abc", "/v1/dashboard/stats?since=-5", "/%ff%fe"):
        await c.get(node_id, path)


async def abuse_client_port(c: Cluster, node_id: int, report: dict) -> None:
    spec = c.specs[node_id]
    host, port = spec.host, spec.grpc_port
    await send_raw(host, port, os.urandom(4096))
    await send_raw(host, port, b"GET /v1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
    stream = await connect_tcp(host, port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, host, "/v1", max_message_size=1 << 26)
            try:
                replies = []
                for msg in (b"\xc1", msgpack.packb([]), msgpack.packb({"op": "get"}), msgpack.packb({"id": -1}),
                            msgpack.packb({"id": 1, "op": "nope"}), b"\xdd\xff\xff\xff\xff",  # array of 2^32-1 announced
                            msgpack.packb({"id": 2, "op": "get", "key": 5}),
                            msgpack.packb({"id": 3, "op": "upsert", "key": "k", "value": "text", "match_seq": {"x": 1}})):
                    await ws.send_message(msg)
                    with trio.move_on_after(5):
                        replies.append(msgpack.unpackb(await ws.get_message(), raw=False, strict_map_key=False))
                await ws.send_message("a text message")
                with trio.move_on_after(5):
                    replies.append(msgpack.unpackb(await ws.get_message(), raw=False, strict_map_key=False))
                codes = [(r[0] if isinstance(r, list) else r).get("error", {}).get("code") for r in replies]
                report.setdefault("client port errors", []).append(codes)
                # Over the limit but within twice it: too_large, and the socket still serves.
                big = msgpack.packb({"id": 10, "op": "upsert", "key": "big", "value": os.urandom(LIMIT + 1000)})
                await ws.send_message(big)
                with trio.fail_after(10):
                    r = msgpack.unpackb(await ws.get_message(), raw=False, strict_map_key=False)
                r = r[0] if isinstance(r, list) else r
                assert r.get("id") == 10 and r["error"]["code"] == "too_large", r
                await ws.send_message(msgpack.packb({"id": 11, "op": "get", "key": "k0", "consistency": "local"}))
                with trio.fail_after(10):
                    r = msgpack.unpackb(await ws.get_message(), raw=False, strict_map_key=False)
                r = r[0] if isinstance(r, list) else r
                assert r.get("id") == 11 and "ok" in r, r
                # Beyond twice the limit (+1 MiB): the server does not read it, it closes 1009.
                huge = msgpack.packb({"id": 12, "op": "upsert", "key": "huge", "value": os.urandom(3 * LIMIT + 4096)})
                closed = None
                try:
                    await ws.send_message(huge)
                    with trio.fail_after(10):
                        await ws.get_message()
                except ConnectionClosed as e:
                    closed = e.reason.code if e.reason else None
                report.setdefault("close codes beyond twice the limit", []).append(closed)
                assert closed == 1009, f"a message beyond twice the limit: socket closed with {closed}"
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


@pytest.mark.cluster_options(top_extra={"grpc_api_max_message_size": LIMIT})
async def test_malformed_oversized_and_forged_input_on_every_port(cluster: Cluster) -> None:
    c = cluster
    await c.start_cluster(3)
    wl = Workload(c)
    report: dict = {}
    async with wl.running():
        await trio.sleep(1.5)
        leader = await c.wait_leader()
        sts = await c.statuses()
        term = {st["current_term"] for st in sts.values() if st}
        cluster_id = sts[leader]["cluster_id"]  # type: ignore[index]
        rss0 = {i: c.rss_kib(i) for i in c.ids()}
        for rnd in range(ROUNDS + 1):
            async with trio.open_nursery() as nursery:
                for i in c.ids():
                    nursery.start_soon(abuse_raft_port, c, i, cluster_id)
                    nursery.start_soon(hold_idle_connections, c, i, 150, 2.0)
                    nursery.start_soon(abuse_admin_port, c, i)
                    nursery.start_soon(abuse_client_port, c, i, report)
            c.note(f"abuse round {rnd + 1} done: {report}")
        await trio.sleep(1.0)
        rss1 = {i: c.rss_kib(i) for i in c.ids()}
        c.note(f"RSS KiB before {rss0}, after {rss1}")
        sts = await c.statuses()
        after = {i: st["current_term"] if st else None for i, st in sts.items()}
        assert all(c.running(i) for i in c.ids()), "a node died of its input"
        assert set(after.values()) == term, f"a term moved: {term} -> {after}"
        assert await c.leader() == leader, "the leadership moved"
        for i in c.ids():
            assert rss1[i] - rss0[i] < RSS_GROWTH_KIB, f"node {i}'s RSS grew from {rss0[i]} to {rss1[i]} KiB"
        await wl.healed_now()
        await wl.finish()

