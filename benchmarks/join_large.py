"""How long a new node takes to become a voter of a 3-node cluster holding many keys.

Starts a local 3-node cluster (`metanode.bench.local_cluster`: real ``metanode``
processes on 127.0.0.1, heartbeat 500 ms), loads `--keys` keys (16-byte keys, 100-byte
values) in transactions of 500 puts, 8 in flight, through one `MetaClient`, pads the log
to at least 1,500 entries and builds a snapshot on the leader (``trigger_snapshot``),
so its log is purged past what it keeps for followers (max_applied_log_to_keep, 1000)
and a joiner must get the snapshot. Then it starts a 4th node with an empty raft_dir
and ``join = [node 1's raft address]`` and measures from the process's start to:

- banner:   the banner on the joiner's stdout (interpreter start and imports);
- learner:  node 4 among the leader's ``non_voters`` (GET /v1/cluster/status, polled);
- snapshot: ``installs snapshot`` in the joiner's log (the last chunk arrived);
- voter:    node 4 among the leader's ``voters`` (also in a joint configuration);
- running:  ``is running`` in the joiner's log (its join call returned);

and the joiner's RSS (VmRSS, and the peak VmHWM) once it runs. It also prints the
milestones of the leader's and the joiner's logs for the last run. Every figure is the
median of `--runs` runs, a new cluster each. Every process is stopped by PID on every
path (`metanode.bench.stop_pids`), Ctrl-C and SIGTERM included.

Usage: python benchmarks/join_large.py [--keys 1000000] [--runs 1] [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shutil
import signal
import statistics
import sys
import time
import urllib.request
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from metanode import bench  # noqa: E402
from metanode.bench import VALUE, BenchFailed, LocalCluster, LocalNode, _free_port, _http_json  # noqa: E402

JOINER = 4
TXN_OPS = 500  # puts per transaction while loading
IN_FLIGHT = 8  # transactions in flight
MIN_ENTRIES = 1_500  # log entries before the snapshot: it purges all but the last 1000
JOIN_TIMEOUT = 300.0  # seconds for the joiner to become a voter and run
POLL_S = 0.05
POINTS = ("banner", "learner", "snapshot", "voter", "running")
# (node, message start) of the log lines shown as milestones
MILESTONES = (
    ("leader", "handles join"), ("leader", "sends snapshot"), ("leader", "added node"), ("leader", f"link to {JOINER}"),
    ("joiner", "joined cluster"), ("joiner", "installs snapshot"), ("joiner", "joined the cluster"),
    ("joiner", "is running"), ("joiner", "join via"),
)


async def load(address: str, keys: int) -> None:
    from metanode.client import MetaClient

    async with MetaClient.connect([address], timeout=120) as client:
        starts = iter(range(0, keys, TXN_OPS))

        async def worker() -> None:
            for start in starts:
                ops = [{"put": {"key": f"key-{i:012d}", "value": VALUE}} for i in range(start, min(keys, start + TXN_OPS))]
                await client.txn(if_then=ops)

        async with trio.open_nursery() as nursery:
            for _ in range(IN_FLIGHT):
                nursery.start_soon(worker)
        filler = iter(range(max(0, MIN_ENTRIES - (keys + TXN_OPS - 1) // TXN_OPS)))

        async def pad() -> None:
            for _ in filler:
                await client.upsert("join-bench/filler", b"x")

        async with trio.open_nursery() as nursery:
            for _ in range(64):
                nursery.start_soon(pad)


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB."""
    fields = dict(line.split(":", 1) for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def log_lines(cluster: LocalCluster, node_id: int) -> list[tuple[float, str]]:
    """(wall time, message) of each line of a node's JSON log."""
    path = cluster.root / f"logs{node_id}" / f"metanode-{node_id}.log"
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        out.append((datetime.datetime.fromisoformat(rec["timestamp"]).timestamp(), rec["message"]))
    return out


def first(lines: list[tuple[float, str]], text: str, after: float) -> float | None:
    return next((t for t, msg in lines if t >= after - 0.001 and text in msg), None)


def join_once(keys: int, keep_logs: pathlib.Path | None) -> tuple[dict[str, float | None], list[str]]:
    """One cluster: load, snapshot, join node 4. (the points in seconds since the
    joiner's start, and RSS figures; the milestone lines). The configs and logs are
    copied to `keep_logs`, if given."""
    with bench.local_cluster() as cluster:
        leader = cluster.leader()
        if leader is None:
            raise BenchFailed("local cluster: no leader")
        t = time.monotonic()
        trio.run(load, cluster.nodes[leader].client_address, keys)
        load_s = time.monotonic() - t
        with urllib.request.urlopen(cluster.nodes[leader].admin_url + "/v1/ctrl/trigger_snapshot", timeout=300) as r:
            r.read()
        status = _http_json(cluster.nodes[leader].admin_url + "/v1/cluster/status")
        print(f"  loaded {keys:,} keys in {load_s:.1f} s; leader {leader}: last log {status['last_log_index']},"
              f" purged {(status['purged'] or {}).get('index')}", file=sys.stderr, flush=True)

        joiner = cluster.nodes[JOINER] = LocalNode(JOINER, _free_port(), _free_port(), _free_port())
        started = time.time()
        cluster._spawn(joiner, [f"127.0.0.1:{cluster.nodes[1].raft_port}"])
        assert joiner.popen is not None and joiner.log_path is not None
        seen: dict[str, float | None] = dict.fromkeys(POINTS)
        mem = (float("nan"), float("nan"))
        deadline = time.monotonic() + JOIN_TIMEOUT
        while seen["voter"] is None or seen["running"] is None:
            if time.monotonic() > deadline:
                raise BenchFailed(f"node {JOINER} not a running voter after {JOIN_TIMEOUT:.0f} s: {joiner.output_tail()}")
            if joiner.popen.poll() is not None:
                raise BenchFailed(f"node {JOINER} exited {joiner.popen.returncode}: {joiner.output_tail()}")
            now = time.time() - started
            if seen["banner"] is None and joiner.log_path.read_bytes().startswith(b"metanode "):
                seen["banner"] = now
            try:
                st = _http_json(cluster.nodes[leader].admin_url + "/v1/cluster/status")
            except (OSError, ValueError):
                st = {}
            if not st.get("is_leader", True):
                leader = cluster.leader() or leader
            if seen["learner"] is None and str(JOINER) in [n["name"] for n in st.get("non_voters", [])]:
                seen["learner"] = now
            if seen["voter"] is None and str(JOINER) in [n["name"] for n in st.get("voters", [])]:
                seen["voter"] = now
            if seen["running"] is None:
                with_log = first(log_lines(cluster, JOINER), "is running", started) if now > 0.5 else None
                if with_log is not None:
                    seen["running"] = with_log - started
                    mem = memory_mb(joiner.popen.pid)
            time.sleep(POLL_S)
        joiner_log = log_lines(cluster, JOINER)
        snap = first(joiner_log, "installs snapshot", started)
        seen["snapshot"] = None if snap is None else snap - started
        seen["rss_mb"], seen["hwm_mb"] = mem
        logs = {"leader": log_lines(cluster, leader), "joiner": joiner_log}
        notes = []
        for who, text in MILESTONES:
            notes += [(t - started, who, msg) for t, msg in logs[who] if t >= started - 0.001 and text in msg]
        if keep_logs is not None:
            shutil.copytree(cluster.root, keep_logs, dirs_exist_ok=True,
                            ignore=lambda d, names: [n for n in names if n.startswith("data")])
        return seen, [f"  {t:7.3f} s  {who:6}  {msg[:120]}" for t, who, msg in sorted(notes)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=bench._positive_int, default=1_000_000)
    parser.add_argument("--runs", type=bench._positive_int, default=1)
    parser.add_argument("--keep-logs", type=pathlib.Path, metavar="DIR",
                        help="copy the nodes' configs and logs of the last run to DIR")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _on_term)
    results: list[dict[str, float | None]] = []
    try:
        for r in range(1, args.runs + 1):
            print(f"run {r}/{args.runs}: {args.keys:,} keys", file=sys.stderr, flush=True)
            seen, notes = join_once(args.keys, args.keep_logs if r == args.runs else None)
            results.append(seen)
            print("  " + ", ".join(f"{k} {_f(v)}" for k, v in seen.items()), file=sys.stderr, flush=True)
    except BenchFailed as e:
        print(f"join_large: error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, BaseExceptionGroup) as e:
        # interrupted while loading: beside the KeyboardInterrupt, the client's requests
        # end as unknown outcomes, all in one group
        if isinstance(e, BaseExceptionGroup) and e.subgroup(lambda x: isinstance(x, KeyboardInterrupt)) is None:
            raise
        print("join_large: interrupted", file=sys.stderr)
        return 130
    cols = [*POINTS, "rss_mb", "hwm_mb"]
    med = {c: _median([r[c] for r in results]) for c in cols}
    heads = ["keys", "runs"] + [f"{c} s" for c in POINTS] + ["RSS MiB", "peak MiB"]
    row = [f"{args.keys:,}", str(args.runs)] + [_f(med[c]) for c in POINTS] + [_f(med[c], 0) for c in cols[-2:]]
    widths = [max(len(h), len(v)) for h, v in zip(heads, row)]
    print(f"node {JOINER} joining a 3-node local cluster (heartbeat {bench.HEARTBEAT_MS} ms); seconds from its"
          f" start, median of {args.runs} run(s); {os.cpu_count()} CPUs")
    print("  ".join(h.rjust(w) for h, w in zip(heads, widths)))
    print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    print("\nlog milestones of the last run (seconds from the joiner's start):")
    print("\n".join(notes))
    return 0


def _on_term(signum: int, frame: Any) -> None:
    """SIGTERM as a Ctrl-C (as `metanode bench` does): trio's SIGINT handler raises
    KeyboardInterrupt where that is safe; where SIGINT is ignored, raise it here."""
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
        raise KeyboardInterrupt
    os.kill(os.getpid(), signal.SIGINT)


def _median(values: list[Any]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
