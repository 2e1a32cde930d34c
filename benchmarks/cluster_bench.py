"""Operational timings of real `metanode` processes on 127.0.0.1 (heartbeat 500 ms).

Prints the median of several runs of:
- join: from starting a new node to it being a voter (a 3-node cluster, the 4th joins);
- failover: from SIGKILL of the leader to a new leader elected by the survivors;
- startup: from starting a node whose log holds 100,000 entries to its admin API
  answering and its state machine caught up.

Usage: python benchmarks/cluster_bench.py [--runs 3] [--entries 100000]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The nodes run as `python -m metanode` in temp dirs: let them import this checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from metanode.raft import Entry, EntryKind, HardState  # noqa: E402
from metanode.sm import Upsert  # noqa: E402
from metanode.sm.codec import encode_command  # noqa: E402
from metanode.storage import RaftStorage  # noqa: E402
from tests.integration.harness import LocalCluster, voter_ids, wait_until  # noqa: E402


def bench_join_and_failover(root: pathlib.Path) -> tuple[float, float]:
    c = LocalCluster(root, heartbeat_ms=500)
    try:
        c.start(3)
        started = time.monotonic()
        c.add(4, join=[1])
        wait_until(lambda: 4 in voter_ids(c.admin(1).status()), 60, "node 4 voter", interval=0.01)
        join_s = time.monotonic() - started
        leader = wait_until(c.leader, 30, "leader")
        survivors = [i for i in (1, 2, 3, 4) if i != leader]
        killed = time.monotonic()
        c.procs[leader].kill()
        wait_until(lambda: c.leader(survivors), 60, "new leader", interval=0.01)
        return join_s, time.monotonic() - killed
    finally:
        c.stop_all()


def bench_startup(root: pathlib.Path, entries: int) -> float:
    c = LocalCluster(root, heartbeat_ms=500)
    c.add(1, single=True)  # allocates ports and writes the config; stop it at once
    c.wait_healthy(1)
    wait_until(lambda: c.admin(1).node_names() == ["1"], 30, "node 1")
    c.procs[1].stop()
    store = RaftStorage.open(root / "data1")
    state = store.load()
    last = state.entries[-1]
    term = store.hard_state.term
    batch = []
    for i in range(last.index + 1, last.index + 1 + entries):
        data = encode_command(Upsert(f"key-{i % 5000:05}", b"v" * 100), 1_000)
        batch.append(Entry(term, i, EntryKind.NORMAL, data))
        if len(batch) == 1000:
            store.append(entries=batch)
            batch = []
    if batch:
        store.append(entries=batch)
    store.append(hard_state=HardState(term, 1, last.index + entries))
    store.close()
    started = time.monotonic()
    c.restart(1)
    target = last.index + entries
    wait_until(
        lambda: c.admin(1).status()["last_applied"]["index"] >= target, 300, "replay", interval=0.02
    )
    elapsed = time.monotonic() - started
    c.stop_all()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--entries", type=int, default=100_000)
    args = parser.parse_args()
    joins, failovers, startups = [], [], []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as d:
            j, f = bench_join_and_failover(pathlib.Path(d))
            joins.append(j)
            failovers.append(f)
        with tempfile.TemporaryDirectory() as d:
            startups.append(bench_startup(pathlib.Path(d), args.entries))
        print(f"run {run + 1}: join->voter {joins[-1]:.2f} s, SIGKILL->new leader {failovers[-1]:.2f} s,"
              f" startup with {args.entries} entries {startups[-1]:.2f} s")
    print(f"median of {args.runs}: join->voter {statistics.median(joins):.2f} s,"
          f" SIGKILL->new leader {statistics.median(failovers):.2f} s,"
          f" startup {statistics.median(startups):.2f} s")


if __name__ == "__main__":
    main()
