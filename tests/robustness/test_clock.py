"""TTL under skewed clocks: node 2's clock runs SKEW ms ahead, node 3's SKEW ms behind
(the test-only METANODE_TEST_CLOCK_OFFSET_MS, read in metanode/server.py), and the
leadership moves 1 -> 2 -> 3 -> 1 while keys with a TTL are written and read.

TTL is decided by log time (the leader's clock stamps each entry; the state machine's
time is the largest stamp so far), so with every clock within SKEW of real time:
- a write's `expire_at_ms - ttl_ms` lies within SKEW of real time between its call and
  its acknowledgement;
- a key is visible to a linearizable read that returned before `call + ttl - 2*SKEW`;
- it is gone everywhere (local reads on every node) `ack + ttl + 2*SKEW + slack` after;
- once a read saw it gone, no read that started later sees it (no resurrection);
and every replica expires the same keys at the same log position (the digests).
"""

from __future__ import annotations

import random
import time

import attrs
import pytest
import trio

from metanode.client import MetaClient, MetaError
from tests.robustness.cluster import ROUNDS, Cluster
from tests.robustness.workload import Workload

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.robustness]

SKEW_MS = 1000
SLACK_MS = 2500  # the expiry tick (one a heartbeat), its commit, a read's own time


@attrs.define
class TtlKey:
    key: str
    ttl: int
    call: float  # wall clock, seconds
    ack: float | None = None
    expire_at: int | None = None
    reads: list[tuple[float, float, bool]] = attrs.Factory(list)  # (call, ret, present) wall clock


async def test_ttl_with_skewed_clocks(cluster: Cluster) -> None:
    c = cluster
    await c.add_node(1)
    await c.add_node(2, env={"METANODE_TEST_CLOCK_OFFSET_MS": str(SKEW_MS)})
    await c.add_node(3, env={"METANODE_TEST_CLOCK_OFFSET_MS": str(-SKEW_MS)})
    await c.start_cluster(3)
    keys: list[TtlKey] = []
    failures: list[str] = []
    stop_writes = trio.Event()
    stop_reads = trio.Event()
    rng = random.Random()

    async def writer() -> None:
        async with MetaClient.connect(c.client_addresses(), timeout=3) as cl:
            n = 0
            while not stop_writes.is_set():
                n += 1
                k = TtlKey(f"t/{n:05d}", rng.randint(3000, 4000), time.time())
                try:
                    ch = await cl.upsert(k.key, b"ttl", ttl_ms=k.ttl)
                    k.ack = time.time()
                    assert ch.result is not None
                    k.expire_at = ch.result.expire_at_ms
                    keys.append(k)
                except MetaError:
                    pass  # unknown: not checked
                await trio.sleep(0.05)

    async def reader() -> None:
        async with MetaClient.connect(c.client_addresses(), timeout=3) as cl:
            while not stop_reads.is_set():
                live = [k for k in keys if k.ack is not None]
                for k in rng.sample(live, min(8, len(live))):
                    call = time.time()
                    try:
                        v = await cl.get(k.key)
                    except MetaError:
                        continue
                    k.reads.append((call, time.time(), v is not None))
                await trio.sleep(0.02)

    async def moves(wl: Workload) -> None:
        for to in (2, 3, 1) * ROUNDS:
            await trio.sleep(3.0)
            for _ in range(20):
                if await c.transfer_leader(to) and await c.leader() == to:
                    break
                await trio.sleep(0.3)
            assert await c.wait_leader() == to, f"the leadership did not move to {to}"
            await wl.healed_now()

    wl = Workload(c, clients=3)
    async with wl.running():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            nursery.start_soon(reader)
            await moves(wl)
            await trio.sleep(1.0)
            stop_writes.set()
            last = max(k.ack for k in keys if k.ack is not None)
            longest = max(k.ttl for k in keys)
            await trio.sleep(max(0.0, last + (longest + 2 * SKEW_MS + SLACK_MS) / 1000 - time.time()))
            stop_reads.set()
        # Every key is gone on every node, by its own state.
        for i in c.ids():
            async with MetaClient.connect([c.specs[i].client_address], timeout=10) as cl:
                left = await cl.list("t/", consistency="local")
            if left:
                failures.append(f"node {i} still holds {len(left)} expired keys, e.g. {left[0]}")
        await wl.finish()

    for k in keys:
        assert k.ack is not None and k.expire_at is not None
        stamp_ms = k.expire_at - k.ttl
        if not (k.call * 1000 - SKEW_MS - 50 <= stamp_ms <= k.ack * 1000 + SKEW_MS + 50):
            failures.append(f"{k.key}: expire_at {k.expire_at} - ttl {k.ttl} is {stamp_ms}, outside"
                            f" [{k.call * 1000 - SKEW_MS:.0f}, {k.ack * 1000 + SKEW_MS:.0f}]")
        gone_at: float | None = None
        for call, ret, present in sorted(k.reads):
            if present and call * 1000 > k.ack * 1000 + k.ttl + 2 * SKEW_MS + SLACK_MS:
                failures.append(f"{k.key}: still visible {call - k.ack:.1f} s after its write (ttl {k.ttl} ms)")
            if not present and ret * 1000 < k.call * 1000 + k.ttl - 2 * SKEW_MS:
                failures.append(f"{k.key}: gone {ret - k.call:.1f} s after its write (ttl {k.ttl} ms)")
            if present and gone_at is not None and call > gone_at:
                failures.append(f"{k.key}: visible again at {call:.3f} after a read saw it gone at {gone_at:.3f}")
            if not present and (gone_at is None or ret < gone_at):
                gone_at = ret
    ahead = [k for k in keys if k.expire_at - k.ttl - k.ack * 1000 > SKEW_MS / 2]  # type: ignore[operator]
    assert ahead, "no write was stamped by the clock running ahead: the skew hook did nothing"
    reads = sum(len(k.reads) for k in keys)
    c.note(f"{len(keys)} TTL keys, {reads} reads, {len(failures)} failures")
    assert len(keys) > 50 and reads > 200, (len(keys), reads)
    assert not failures, "\n".join(failures[:20])
