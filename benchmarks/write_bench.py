"""Write and read throughput of a local 3-node cluster through `MetaClient`.

Starts the cluster itself (real processes on 127.0.0.1, heartbeat 500 ms), then for
concurrency 1, 16 and 64 (tasks sharing one client, pipelined on its socket) drives
upserts of 16-byte keys and 100-byte values, then linearizable reads, for a fixed
time each; prints ops/s and p50/p99 latency, the median of `--runs` runs.

Usage: python benchmarks/write_bench.py [--seconds 5] [--runs 3] [--via leader|follower]
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
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

import trio  # noqa: E402

from metanode.client import MetaClient  # noqa: E402
from tests.integration.harness import LocalCluster, wait_until  # noqa: E402

VALUE = b"v" * 100


async def drive(address: str, kind: str, concurrency: int, seconds: float) -> tuple[float, float, float]:
    latencies: list[float] = []
    async with MetaClient.connect([address], timeout=30) as c:
        for i in range(64):  # keys to read exist
            await c.upsert(f"key-{i:012d}", VALUE)
        deadline = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            n = 0
            while time.perf_counter() < deadline:
                key = f"key-{(w * 7919 + n) % 100_000:012d}"  # 16 bytes
                n += 1
                t = time.perf_counter()
                if kind == "write":
                    await c.upsert(key, VALUE)
                else:
                    await c.get(f"key-{n % 64:012d}")
                latencies.append(time.perf_counter() - t)

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for w in range(concurrency):
                nursery.start_soon(worker, w)
        elapsed = time.perf_counter() - started
    latencies.sort()
    return (
        len(latencies) / elapsed,
        latencies[len(latencies) // 2] * 1000,
        latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--via", choices=("leader", "follower"), default="leader")
    args = parser.parse_args()
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as d:
            c = LocalCluster(pathlib.Path(d), heartbeat_ms=500)
            try:
                c.start(3)
                leader = wait_until(c.leader, 30, "leader")
                target = leader if args.via == "leader" else next(i for i in (1, 2, 3) if i != leader)
                address = f"127.0.0.1:{c.ports[target][2]}"
                for kind in ("write", "read"):
                    for conc in (1, 16, 64):
                        r = trio.run(drive, address, kind, conc, args.seconds)
                        results.setdefault((kind, conc), []).append(r)
                        print(f"run {run + 1} {kind:5} x{conc:<3} {r[0]:8.0f} ops/s  p50 {r[1]:6.2f} ms  p99 {r[2]:6.2f} ms",
                              flush=True)
            finally:
                c.stop_all()
    print(f"\nmedian of {args.runs} runs (3 nodes on one 2-core machine, via the {args.via}):")
    print("| op | concurrency | ops/s | p50 ms | p99 ms |\n|---|---|---|---|---|")
    for (kind, conc), rs in results.items():
        ops = statistics.median(r[0] for r in rs)
        p50 = statistics.median(r[1] for r in rs)
        p99 = statistics.median(r[2] for r in rs)
        print(f"| {'upsert' if kind == 'write' else 'linearizable get'} | {conc} | {ops:.0f} | {p50:.2f} | {p99:.2f} |")


if __name__ == "__main__":
    main()
