"""Benchmark of the durable store: prints numbers, asserts nothing.

    python benchmarks/storage_bench.py [--dir DIR] [--seconds S] [--entries N]

1. `RaftStorage.append` throughput with a real fdatasync per call, for batches of
   1, 10 and 100 entries of 100 bytes (each call also carries a hard state, as a
   `Ready` usually does): calls/s and entries/s, median of 3 runs.
2. Open + `load()` of a log of N (100,000) entries of 100 bytes, written in batches
   of 1, 10 and 100 (batches of 1 = the most records to replay): median of 3.

DIR defaults to a fresh temporary directory: put it on the disk you care about
(a tmpfs makes fsync free).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from metanode.raft.types import Entry, EntryKind, HardState
from metanode.storage import RaftStorage

RUNS = 3
PAYLOAD = bytes(range(100))


def append_rate(root: Path, batch: int, seconds: float) -> tuple[float, float]:
    """(calls/s, fsyncs per call) of appending `batch`-entry calls for `seconds`."""
    shutil.rmtree(root, ignore_errors=True)
    with RaftStorage.open(root) as store:
        index = 1
        calls = 0
        start = time.perf_counter()
        while True:
            entries = [Entry(3, index + i, EntryKind.NORMAL, PAYLOAD) for i in range(batch)]
            store.append(entries=entries, hard_state=HardState(3, 1, index - 1))
            index += batch
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and calls >= 20:
                break
        fsyncs = store.stats.wal_fsyncs
    return calls / elapsed, fsyncs / calls


def build_log(root: Path, n: int, batch: int) -> int:
    """A dir holding `n` entries in `batch`-entry records (fdatasync per call too:
    the format is the same, only slower to build). Returns the WAL size."""
    shutil.rmtree(root, ignore_errors=True)
    with RaftStorage.open(root) as store:
        for first in range(1, n + 1, batch):
            last = min(n, first + batch - 1)
            entries = [Entry(3, i, EntryKind.NORMAL, PAYLOAD) for i in range(first, last + 1)]
            store.append(entries=entries, hard_state=HardState(3, 1, first - 1))
        return store.stats.wal_bytes


def load_time(root: Path) -> float:
    start = time.perf_counter()
    with RaftStorage.open(root) as store:
        state = store.load()
    elapsed = time.perf_counter() - start
    assert state.entries, "nothing loaded"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temp dir)"
    )
    parser.add_argument("--seconds", type=float, default=1.0, help="duration of each append run")
    parser.add_argument("--entries", type=int, default=100_000, help="log size for the load test")
    args = parser.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="storage_bench."))
    base.mkdir(parents=True, exist_ok=True)
    try:
        print(f"storage benchmark in {base} (median of {RUNS} runs)")
        print("append with fdatasync, 100-byte entries:")
        for batch in (1, 10, 100):
            runs = [append_rate(base / "append", batch, args.seconds) for _ in range(RUNS)]
            rate = statistics.median(r[0] for r in runs)
            print(
                f"  batch {batch:>3}: {rate:8.0f} appends/s  {rate * batch:9.0f} entries/s"
                f"  ({runs[0][1]:.2f} WAL fsyncs per append)"
            )
        print(f"open + load of {args.entries:,} entries of 100 bytes:")
        for batch in (1, 10, 100):
            root = base / f"load{batch}"
            size = build_log(root, args.entries, batch)
            times = [load_time(root) for _ in range(RUNS)]
            print(
                f"  written in batches of {batch:>3} ({size / 1e6:.1f} MB WAL):"
                f" {statistics.median(times) * 1000:7.0f} ms"
            )
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
