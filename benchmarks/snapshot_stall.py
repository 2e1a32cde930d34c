"""A large state machine: memory, restart to serving, and the write stall of a snapshot.

Builds a one-node data dir holding `--keys` keys of 100 bytes (by `metanode import` of a
generated export), starts the node and measures:

- start to serving: from spawning the process to the first answered linearizable get;
- RSS of the node process (VmRSS from /proc) once serving, and after the snapshot;
- the write stall: one writer upserts back to back (concurrency 1) for `--seconds`; in
  the middle a snapshot is built (`GET /v1/ctrl/trigger_snapshot`). Prints the p50 and
  p99 write latency before the snapshot, and the worst write while it was being built.

Usage: python benchmarks/snapshot_stall.py [--keys 1000000] [--seconds 12] [--runs 1]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import trio  # noqa: E402

from metanode.client import MetaClient  # noqa: E402
from tests.net import free_port  # noqa: E402

VALUE = base64.b64encode(b"v" * 100).decode()


def write_export(path: pathlib.Path, keys: int) -> None:
    with path.open("w") as f:
        f.write(json.dumps({"type": "header", "format": "metanode-export", "version": 1, "cluster_id": None,
                            "cluster_name": "metanode", "node_id": None,
                            "last_applied": {"term": 1, "index": 1}}) + "\n")
        f.write(json.dumps({"type": "membership", "voters": [1], "learners": []}) + "\n")
        f.write(json.dumps({"type": "state", "seq": keys, "log_time_ms": 1}) + "\n")
        for i in range(keys):
            f.write(f'{{"type": "kv", "key": "key-{i:012d}", "seq": {i + 1}, "data": "{VALUE}", "expire_at_ms": null}}\n')


def rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def writer(address: str, admin: str, seconds: float) -> tuple[list[float], list[float], float]:
    """(latencies before the snapshot, latencies during it, snapshot seconds)."""
    before: list[float] = []
    during: list[float] = []
    state = {"phase": "before"}
    snap_s = 0.0
    async with MetaClient.connect([address], timeout=60) as c:
        deadline = time.perf_counter() + seconds

        async def write() -> None:
            n = 0
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                await c.upsert(f"w-{n % 1000:012d}", b"x" * 100)
                (before if state["phase"] == "before" else during if state["phase"] == "during" else []).append(
                    time.perf_counter() - t
                )
                n += 1

        async def snapshot() -> None:
            nonlocal snap_s
            # The HTTP client is made before the measured window: making one (its TLS
            # context) holds this process's event loop, the writer's, for tens of ms.
            async with httpx.AsyncClient(base_url=f"http://{admin}", timeout=120) as http:
                await trio.sleep(seconds / 3)
                state["phase"] = "during"
                t = time.perf_counter()
                r = await http.get("/v1/ctrl/trigger_snapshot")
                r.raise_for_status()
                snap_s = time.perf_counter() - t
                state["phase"] = "after"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            nursery.start_soon(snapshot)
    return before, during, snap_s


def run(keys: int, seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        root = pathlib.Path(d)
        export = root / "export.jsonl"
        write_export(export, keys)
        raft, admin, grpc = free_port(), free_port(), free_port()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        subprocess.run(
            [sys.executable, "-m", "metanode", "import", "--raft-dir", str(root / "data"), "--id", "1",
             "-i", str(export), "--initial-cluster", f"1=127.0.0.1:{raft}"],
            check=True, env=env, capture_output=True,
        )
        export.unlink()
        config = root / "node.toml"
        config.write_text(
            f'log_dir = "{root}/logs"\nadmin_api_address = "127.0.0.1:{admin}"\n'
            f'grpc_api_address = "127.0.0.1:{grpc}"\n[raft_config]\nid = 1\nraft_dir = "{root}/data"\n'
            f'raft_api_port = {raft}\nraft_listen_host = "127.0.0.1"\nraft_advertise_host = "127.0.0.1"\n'
            'snapshot_logs_since_last = 1000000000\n'
        )
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "metanode", "-c", str(config)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            async def first_get() -> None:
                async with MetaClient.connect([f"127.0.0.1:{grpc}"], timeout=120) as c:
                    assert await c.get("key-000000000000") is not None

            for _ in range(600):
                try:
                    trio.run(first_get)
                    break
                except Exception:
                    time.sleep(0.05)
            serving_s = time.perf_counter() - started
            rss_serving = rss_mb(proc.pid)
            spy = None
            if os.environ.get("PYSPY_OUT"):  # profile the node while it writes and snapshots
                spy = subprocess.Popen(["py-spy", "record", "-p", str(proc.pid), "-o", os.environ["PYSPY_OUT"],
                                        "--format", "raw", "-d", str(int(seconds) + 2), "-r", "200"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            before, during, snap_s = trio.run(writer, f"127.0.0.1:{grpc}", f"127.0.0.1:{admin}", seconds)
            rss_after = rss_mb(proc.pid)
            if spy is not None:
                spy.wait(60)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    before.sort()
    return {
        "serving_s": serving_s,
        "rss_serving_mb": rss_serving,
        "rss_after_snapshot_mb": rss_after,
        "snapshot_s": snap_s,
        "p50_ms": before[len(before) // 2] * 1000 if before else float("nan"),
        "p99_ms": before[int(len(before) * 0.99)] * 1000 if before else float("nan"),
        "worst_during_snapshot_ms": max(during) * 1000 if during else float("nan"),
        "writes_during_snapshot": len(during),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    results = [run(args.keys, args.seconds) for _ in range(args.runs)]
    for r in results:
        print(json.dumps({k: round(v, 2) for k, v in r.items()}))
    if len(results) > 1:
        print("median:", json.dumps({k: round(statistics.median(r[k] for r in results), 2) for k in results[0]}))


if __name__ == "__main__":
    main()
