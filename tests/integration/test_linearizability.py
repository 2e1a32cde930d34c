"""Real processes, real clients: the history must be linearizable across a leader crash.

Four `MetaClient`s run puts, conditional puts, deletes and linearizable reads on a few
keys of a 3-node cluster for over 20 s; in the middle the leader is killed with SIGKILL
and restarted. The recorded history is checked with the simulator's checker
(tests/sim/linearizability.py). Any failed write counts as an unknown outcome (it may
have been applied); a failed read is dropped (it had no effect).
"""

from __future__ import annotations

import random
import time

import pytest
import trio

from metanode.client import MetaClient, MetaError
from tests.integration.harness import LocalCluster, wait_until
from tests.sim.linearizability import Op, check

pytestmark = pytest.mark.integration

KEYS = ("a", "b", "c")
DURATION_S = 22.0
CLIENTS = 4


def sv(v: object) -> tuple[int, bytes] | None:
    return None if v is None else (v.seq, v.data)  # type: ignore[attr-defined]


async def run_client(cid: int, addresses: list[str], history: list[Op], stop_at: float, seen: dict) -> None:
    rng = random.Random(cid)
    n = 0
    async with MetaClient.connect(addresses, timeout=5) as c:
        while time.monotonic() < stop_at:
            key = rng.choice(KEYS)
            kind = rng.choices(("get", "put", "cas", "delete"), (4, 3, 2, 1))[0]
            value = f"c{cid}-{n}".encode()
            n += 1
            call = time.monotonic()
            try:
                if kind == "get":
                    out = sv(await c.get(key))
                    history.append(Op.get(cid, key, call, time.monotonic(), out))
                elif kind == "put":
                    ch = await c.upsert(key, value)
                    history.append(Op.put(cid, key, value, call, time.monotonic(), (sv(ch.prev), sv(ch.result))))
                elif kind == "cas":
                    expect = rng.choice(sorted(seen.get(key, {0})))
                    ch = await c.upsert(key, value, match_seq=expect)
                    history.append(
                        Op.cas(cid, key, value, expect, call, time.monotonic(), (sv(ch.prev), sv(ch.result)))
                    )
                else:
                    ch = await c.delete(key)
                    history.append(Op.delete(cid, key, call, time.monotonic(), (sv(ch.prev), None)))
                if kind != "get" and ch.result is not None:
                    seen.setdefault(key, {0}).add(ch.result.seq)
            except MetaError:
                if kind == "put":
                    history.append(Op.put(cid, key, value, call))
                elif kind == "cas":
                    history.append(Op.cas(cid, key, value, expect, call))
                elif kind == "delete":
                    history.append(Op.delete(cid, key, call))
                await trio.sleep(0.05)


def test_a_history_across_a_leader_crash_is_linearizable(cluster: LocalCluster) -> None:
    cluster.start(3)
    addresses = cluster.client_addresses()
    history: list[Op] = []
    seen: dict = {}

    async def main() -> None:
        stop_at = time.monotonic() + DURATION_S
        async with trio.open_nursery() as nursery:
            for cid in range(CLIENTS):
                nursery.start_soon(run_client, cid, addresses, history, stop_at, seen)
            await trio.sleep(DURATION_S / 3)
            leader = await trio.to_thread.run_sync(cluster.leader)
            assert leader is not None
            cluster.procs[leader].kill()
            await trio.sleep(2)
            cluster.restart(leader)

    trio.run(main)
    done = [op for op in history if op.ret is not None]
    print(f"{len(history)} operations ({len(history) - len(done)} with unknown outcome) in {DURATION_S:.0f} s")
    assert len(history) >= 2000
    result = check(history)
    assert result.ok, result.explanation


def test_every_acknowledged_write_survives_power_loss_of_the_whole_cluster(cluster: LocalCluster) -> None:
    """contract §8: appends are fsynced before they are acknowledged; SIGKILL of every node
    in the middle of a stream of writes loses none that a client saw acknowledged."""
    cluster.start(3)
    addresses = cluster.client_addresses()
    acked: dict[str, int] = {}

    async def writer(wid: int, stop: trio.Event) -> None:
        async with MetaClient.connect(addresses, timeout=2) as c:
            n = 0
            while not stop.is_set():
                key = f"w{wid}-{n}"
                n += 1
                try:
                    ch = await c.upsert(key, key.encode())
                except MetaError:
                    return  # the cluster is gone: this write's outcome is unknown
                acked[key] = ch.result.seq  # type: ignore[union-attr]

    async def main() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for wid in range(4):
                nursery.start_soon(writer, wid, stop)
            await trio.sleep(3)
            for i in (1, 2, 3):
                cluster.procs[i].kill()  # power loss, all at once
            stop.set()

    trio.run(main)
    assert len(acked) > 100
    for i in (1, 2, 3):
        cluster.restart(i)
    for i in (1, 2, 3):
        cluster.wait_healthy(i)
    wait_until(cluster.leader, 30, "a leader after the restart")

    async def read_back() -> dict:
        async with MetaClient.connect(addresses, timeout=10) as c:
            keys = sorted(acked)
            values = await c.mget(keys)
            return dict(zip(keys, values))

    found = trio.run(read_back)
    lost = [k for k, v in found.items() if v is None or v.seq != acked[k] or v.data != k.encode()]
    print(f"{len(acked)} acknowledged writes, {len(lost)} lost")
    assert not lost, lost[:10]
