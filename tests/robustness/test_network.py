"""Network faults through the raft proxies: pauses, partitions, one-way and partial
connectivity, slow and lossy links, flapping (the etcd robustness / Jepsen checklist)."""

from __future__ import annotations

import pytest
import trio

from tests.robustness.cluster import Cluster
from tests.robustness.proxy import Rule
from tests.robustness.scenario import run
from tests.robustness.workload import Workload

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.robustness]


async def test_a_paused_leader_serves_no_stale_read(cluster: Cluster) -> None:
    """SIGSTOP the leader until the others elect a new one and take writes; SIGCONT it:
    its pinned client's reads (linearizable) must not return what it held."""

    async def fault(c: Cluster, wl: Workload, r: int) -> None:
        leader = await c.wait_leader()
        c.pause(leader)
        rest = [i for i in c.ids() if i != leader]
        await c.wait_leader(rest, timeout=15)
        await trio.sleep(1.0)
        c.resume(leader)
        await wl.healed_now()

    await run(cluster, fault)


async def test_a_leader_in_a_minority_partition(cluster: Cluster) -> None:
    async def fault(c: Cluster, wl: Workload, r: int) -> None:
        leader = await c.wait_leader()
        rest = [i for i in c.ids() if i != leader]
        c.net.partition([leader], rest)
        c.note(f"partition {[leader]} | {rest}")
        new = await c.wait_leader(rest, timeout=15)
        c.note(f"new leader {new}")
        await trio.sleep(1.5)
        c.net.heal()
        await wl.healed_now()

    await run(cluster, fault)


@pytest.mark.cluster_options(heartbeat_ms=300)
async def test_a_follower_partition_does_not_disrupt_the_leader(cluster: Cluster) -> None:
    """A follower cut off for many election timeouts, then back: the leader and the
    term stay as they were (pre-vote: the isolated node's elections fail quietly)."""

    async def fault(c: Cluster, wl: Workload, r: int) -> None:
        leader = await c.wait_leader()
        before = await c.status(leader)
        assert before is not None
        follower = max(i for i in c.ids() if i != leader)
        c.net.partition([follower], [i for i in c.ids() if i != follower])
        c.note(f"partition follower {follower}")
        await trio.sleep(8 * c.election_timeout)
        mid = await c.status(follower)
        c.net.heal()
        await wl.healed_now()
        await trio.sleep(4 * c.election_timeout)
        after = await c.statuses()
        terms = {i: st["current_term"] if st else None for i, st in after.items()}
        c.note(f"terms before {before['current_term']}, isolated {mid and mid['current_term']}, after {terms}")
        assert mid is not None and mid["current_term"] == before["current_term"], (before, mid)
        assert await c.leader() == leader, f"the leadership moved from {leader}: {terms}"
        assert set(terms.values()) == {before["current_term"]}, f"a term moved: {before['current_term']} -> {terms}"

    await run(cluster, fault)


async def test_one_way_isolation_of_the_leader(cluster: Cluster) -> None:
    """The leader's frames to the others are lost, theirs to it arrive."""

    async def fault(c: Cluster, wl: Workload, r: int) -> None:
        leader = await c.wait_leader()
        rest = [i for i in c.ids() if i != leader]
        c.net.isolate_one_way(leader, rest)
        c.note(f"one way: {leader} -/-> {rest}")
        await c.wait_leader(rest, timeout=15)
        await trio.sleep(1.5)
        c.net.heal()
        await wl.healed_now()

    await run(cluster, fault)


async def test_partial_connectivity(cluster: Cluster) -> None:
    """A and C cannot talk, both reach B: first with the leader as A, then the
    leader as B; the cluster must keep (or regain) a leader and serve."""

    async def fault(c: Cluster, wl: Workload, r: int) -> None:
        leader = await c.wait_leader()
        a = leader
        b, cc = [i for i in c.ids() if i != leader]
        c.net.cut_pair(a, cc)
        c.note(f"partial: {a} x {cc}, both reach {b}")
        await trio.sleep(3.0)
        await c.wait_leader(timeout=15)
        c.net.heal()
        leader = await c.wait_leader()
        b = leader
        a, cc = [i for i in c.ids() if i != leader]
        c.net.cut_pair(a, cc)
        c.note(f"partial: {a} x {cc}, both reach the leader {b}")
        await trio.sleep(3.0)
        c.net.heal()
        await wl.healed_now()

    await run(cluster, fault)


async def test_slow_and_lossy_links(cluster: Cluster) -> None:
    async def fault(c: Cluster, wl: Workload, r: int) -> None:
        c.net.degrade(c.ids(), delay=0.03, jitter=0.04)
        c.note("every link delayed 30-70 ms")
        await trio.sleep(2.5)
        c.net.degrade(c.ids(), drop=0.2)
        c.note("every link drops 20% of frames")
        await trio.sleep(2.5)
        c.net.degrade(c.ids(), drop=0.1, delay=0.02, jitter=0.03)
        c.note("every link drops 10% and is delayed 20-50 ms")
        await trio.sleep(2.0)
        before = c.net.totals()
        c.net.heal()
        c.note(f"proxy totals {before}")
        await wl.healed_now()
        assert before["dropped"] > 0

    await run(cluster, fault)


async def test_flapping_partitions(cluster: Cluster) -> None:
    """A different node isolated every ~0.4-1 s, sometimes with its connections cut."""

    async def fault(c: Cluster, wl: Workload, r: int) -> None:
        rng = c.net.rng
        for step in range(10):
            victim = rng.choice(c.ids())
            c.net.heal()
            c.net.partition([victim], [i for i in c.ids() if i != victim])
            if rng.random() < 0.5:
                c.net.cut(victim)
            c.note(f"flap {step}: isolate {victim}")
            await trio.sleep(rng.uniform(0.4, 1.0))
        c.net.heal()
        await wl.healed_now()

    await run(cluster, fault)


__all__ = ["Rule"]
