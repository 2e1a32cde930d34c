"""Replay one simulator seed: `python -m tests.sim.replay SEED [--transcript FILE]`.

Runs the same deterministic simulation as `test_random.py`, prints the outcome and
statistics, and writes the message-level transcript (every delivered message, fault
and leader change, stamped with simulated milliseconds) when asked.
"""

from __future__ import annotations

import argparse
import sys
import time

from tests.sim.workload import Run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim.replay", description=__doc__)
    parser.add_argument("seed", type=int)
    parser.add_argument("--transcript", metavar="FILE", help="write the transcript here")
    parser.add_argument("--duration-ms", type=int, default=60_000)
    args = parser.parse_args(argv)
    run = Run(args.seed, args.duration_ms, trace=bool(args.transcript))
    started = time.perf_counter()
    failure = None
    try:
        run.run()
    except AssertionError as e:
        failure = e
    wall = time.perf_counter() - started
    if args.transcript:
        with open(args.transcript, "w") as f:
            f.write("\n".join(run.cluster.transcript) + "\n")
    print(run.stats)
    print(f"{run.cluster.now / 1000:.1f} simulated s in {wall:.2f} wall s")
    for node in run.cluster.nodes.values():
        print(f"  node {node.id}: up={node.up} retired={node.retired} {node.core.status().role.value}"
              f" term={node.core.term} {node.core.log} membership={node.core.membership}")
    if failure is not None:
        print(f"FAILED: {failure}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
