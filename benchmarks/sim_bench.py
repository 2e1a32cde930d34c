"""Raw simulator throughput: simulated seconds per wall-clock second.

Runs a few seeds of the randomized workload several times and prints the median.
Usage: python benchmarks/sim_bench.py [--seeds 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tests.sim.workload import run_seed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)
    rates = []
    for _ in range(args.repeat):
        sim_ms = 0
        ops = 0
        started = time.perf_counter()
        for seed in range(args.seeds):
            stats = run_seed(seed)
            sim_ms += stats.sim_ms
            ops += stats.ops_ok + stats.ops_unknown
        wall = time.perf_counter() - started
        rates.append(sim_ms / 1000 / wall)
        print(f"{args.seeds} seeds: {sim_ms / 1000:.0f} simulated s, {ops} client ops in {wall:.1f} s"
              f" -> {rates[-1]:.0f} simulated s per wall s")
    print(f"median of {args.repeat}: {statistics.median(rates):.0f} simulated s per wall s (one core)")


if __name__ == "__main__":
    main()
