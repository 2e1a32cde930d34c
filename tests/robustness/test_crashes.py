"""Process faults: SIGKILL of one node, a minority, all of them; a rolling restart under
traffic; watches across failovers; ambiguous writes retried."""

from __future__ import annotations

import pytest
import trio

from metanode.client import MetaClient, MetaError
from tests.robustness.cluster import ROUNDS, Cluster
from tests.robustness.scenario import restart, run
from tests.robustness.workload import OP_TIMEOUT, Workload

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.robustness]


async def test_sigkill_of_the_leader(cluster: Cluster) -> None:
    """Writes resume within 5 election timeouts of the kill, and again once it is back."""

    async def fault(c: Cluster, wl: Workload, r: int) -> None:
        leader = await c.wait_leader()
        wl.expected_exits.add(leader)
        c.kill(leader)
        await wl.healed_now([i for i in c.ids() if i != leader])
        await trio.sleep(1.0)
        await restart(c, wl, leader)
        await wl.healed_now()

    await run(cluster, fault)


async def test_sigkill_of_a_minority_of_five(cluster: Cluster) -> None:
    """The leader and one follower of five, at once."""

    async def fault(c: Cluster, wl: Workload, r: int) -> None:
        leader = await c.wait_leader()
        victims = [leader, next(i for i in c.ids() if i != leader)]
        wl.expected_exits.update(victims)
        c.kill(*victims)
        await wl.healed_now([i for i in c.ids() if i not in victims])
        await trio.sleep(1.0)
        await restart(c, wl, *victims)
        await wl.healed_now()

    await run(cluster, fault, nodes=5, clients=3)


async def test_sigkill_of_every_node(cluster: Cluster) -> None:
    """Power loss: every node at once, then all back."""

    async def fault(c: Cluster, wl: Workload, r: int) -> None:
        ids = c.ids()
        wl.expected_exits.update(ids)
        c.kill(*ids)
        await trio.sleep(0.5)
        await restart(c, wl, *ids)
        await wl.healed_now()

    await run(cluster, fault)


async def test_rolling_restart_under_traffic(cluster: Cluster) -> None:
    """Each node in turn: SIGTERM (graceful), start again, healthy, the next."""

    async def fault(c: Cluster, wl: Workload, r: int) -> None:
        leader = await c.wait_leader()
        order = [i for i in c.ids() if i != leader] + [leader]  # the leader last, as operators do
        for i in order:
            wl.expected_exits.add(i)
            rc = await c.terminate(i)
            assert rc == 0, f"node {i} exited {rc} on SIGTERM:\n{c.output(i)[-2000:]}"
            await restart(c, wl, i)
            await c.wait_healthy(i)
            await wl.healed_now()

    await run(cluster, fault)


async def test_watch_under_failover(cluster: Cluster) -> None:
    """Besides the raw watchers on every node: a `MetaClient.watch` across every address
    whose node is SIGKILLed under it, twice: it resumes elsewhere and yields every
    revision once, in order (the raw watchers check the wire itself)."""
    got: list[int] = []
    moved: list[str] = []

    async def follower_watch(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with MetaClient.connect(cluster.client_addresses(), timeout=10) as cl:
            async with cl.watch("", "\x7f") as w:
                task_status.started()
                async for ev in w:
                    got.append(ev.seq)
                    if w.address and (not moved or moved[-1] != w.address):
                        moved.append(w.address)

    async def fault(c: Cluster, wl: Workload, r: int) -> None:
        for _ in range(2):
            on = moved[-1] if moved else None
            victim = next((i for i in c.ids() if c.specs[i].client_address == on), None)
            if victim is None:
                victim = await c.wait_leader()
            wl.expected_exits.add(victim)
            c.kill(victim)
            await wl.healed_now([i for i in c.ids() if i != victim])
            await trio.sleep(1.5)
            await restart(c, wl, victim)
            await wl.healed_now()
            await trio.sleep(1.0)

    await cluster.start_cluster(3)
    async with trio.open_nursery() as nursery:
        await nursery.start(follower_watch)
        await run(cluster, fault, started=True)
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    cluster.note(f"client watch: {len(got)} events, on {moved}")
    assert got, "the client watch saw nothing"
    dups = [b for a, b in zip(got, got[1:]) if b <= a]
    gaps = [(a, b) for a, b in zip(got, got[1:]) if b > a + 1]
    assert not dups, f"the client watch yielded revisions out of order or twice: {dups[:5]}"
    assert not gaps, f"the client watch skipped revisions: {gaps[:5]}"
    assert len(moved) >= 2, f"the client watch never moved to another node: {moved}"


async def test_ambiguous_cas_retried(cluster: Cluster) -> None:
    """Writes whose outcome is unknown (the leader partitioned away or paused under
    them) retried by their clients: a CAS retried with the same expected seq and value
    must either find its own value (the first try applied) or apply once."""
    outcomes: dict[str, int] = {}

    async def retrier(cid: int, stop: trio.Event) -> None:
        rng = cluster.net.rng
        n = 0
        key = f"r{cid}"
        async with MetaClient.connect(cluster.client_addresses(), timeout=1.0) as cl:
            seq = 0
            while not stop.is_set():
                n += 1
                value = f"r{cid}-{n}".encode()
                tries = 0
                while tries < 20:
                    tries += 1
                    call = wl.now()
                    try:
                        ch = await cl.upsert(key, value, match_seq=seq)
                    except MetaError:
                        wl.history.append(wl.op_cas(cid, key, value, seq, call))
                        outcomes["unknown"] = outcomes.get("unknown", 0) + 1
                        await trio.sleep(0.05)
                        continue
                    wl.history.append(wl.op_cas(cid, key, value, seq, call, wl.now(), ch))
                    if ch.result is not None and ch.result.data == value:
                        # applied: by this try, or by an earlier one (then prev == result)
                        outcomes["applied" if ch.changed else "found applied"] = outcomes.get(
                            "applied" if ch.changed else "found applied", 0) + 1
                        seq = ch.result.seq
                        break
                    assert False, f"{key}: CAS expecting {seq} found {ch.prev} (nobody else writes it)"
                await trio.sleep(rng.uniform(0, 0.02))

    async def fault(c: Cluster, wl_: Workload, r: int) -> None:
        for step in range(3):
            leader = await c.wait_leader()
            if step % 2 == 0:
                c.net.partition([leader], [i for i in c.ids() if i != leader])
                c.note(f"partition the leader {leader}")
            else:
                c.pause(leader)
            await trio.sleep(2.0)
            c.net.heal()
            if leader in c.paused:
                c.resume(leader)
            await wl_.healed_now()
            await trio.sleep(1.0)

    await cluster.start_cluster(3)
    wl = Workload(cluster)
    stop = trio.Event()
    async with wl.running():
        async with trio.open_nursery() as nursery:
            for cid in range(3):
                nursery.start_soon(retrier, 200 + cid, stop)
            await trio.sleep(1.0)
            for r in range(ROUNDS):
                await fault(cluster, wl, r)
            stop.set()
            with trio.move_on_after(OP_TIMEOUT + 25):
                while len(nursery.child_tasks):
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
        cluster.note(f"retried CAS outcomes: {outcomes}")
        await wl.finish()
    assert outcomes.get("unknown"), f"no CAS outcome was ever unknown: the fault did not bite ({outcomes})"
