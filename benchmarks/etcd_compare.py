"""metanode against etcd on this machine: the same workload, side by side, in one run.

Runs `metanode bench`'s workload (upserts of 16-byte keys with 100-byte values, then
linearizable gets, at each concurrency for a fixed time; concurrent tasks sharing one
client) against

- etcd: 3 members on 127.0.0.1 (free ports, temporary data dirs, etcd's default
  heartbeat of 100 ms), driven through etcd's gRPC API by the `aetcd` package (grpc.aio)
  from this process: puts with ``prev_kv`` (metanode's upsert returns the previous value
  too), gets linearizable (etcd's default, a ReadIndex like metanode's); the client
  talks to the leader;
- metanode: ``metanode bench --runs 1 --format json`` (its local 3-node cluster,
  heartbeat 500 ms, the client via the leader), as a subprocess;

alternating etcd and metanode run by run, so noise from other work on the machine falls
on both alike. Prints ops/s, p50 and p99 of each, the ratios (metanode / etcd ops/s at
each concurrency, metanode / etcd p50), and the CPU microseconds per operation of every
process (client, leader, each follower, their sum) read from /proc/PID/stat before and
after each step: CPU per op is what contention distorts least. Every figure is the
median of `--runs` runs. Every process it starts is stopped by PID (SIGTERM, then
SIGKILL), on Ctrl-C too.

Needs etcd (`apt-get install -y etcd-server`: etcd 3.4) and `pip install aetcd`.

Usage: python benchmarks/etcd_compare.py [--seconds 5] [--runs 3] [--concurrency 1,16,64]
                                         [--format table|markdown|json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from metanode import bench
from metanode.bench import (
    READ_KEYS,
    VALUE,
    Step,
    key,
    percentile,
    sample_cpu,
    stop_pids,
    ticks_to_us,
)

ROLES = ["client", "leader", "follower1", "follower2"]
ROLE_NAMES = {"client": "client", "leader": "leader", "follower1": "follower", "follower2": "follower",
              "total": "sum"}
STOP_TIMEOUT = 10.0
START_TIMEOUT = 30.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=2) as r:
        return json.loads(r.read())


class EtcdCluster:
    """Three etcd members on 127.0.0.1 in `root`."""

    def __init__(self, root: pathlib.Path, etcd: str, size: int = 3) -> None:
        self.root, self.etcd, self.size = root, etcd, size
        self.procs: dict[str, subprocess.Popen] = {}
        self.client_ports: dict[str, int] = {}

    def start(self) -> None:
        names = [f"m{i}" for i in range(1, self.size + 1)]
        peers = {n: _free_port() for n in names}
        self.client_ports = {n: _free_port() for n in names}
        initial = ",".join(f"{n}=http://127.0.0.1:{peers[n]}" for n in names)
        token = f"bench-{uuid.uuid4().hex[:12]}"
        for n in names:
            c = f"http://127.0.0.1:{self.client_ports[n]}"
            args = [
                self.etcd, "--name", n, "--data-dir", str(self.root / n),
                "--listen-client-urls", c, "--advertise-client-urls", c,
                "--listen-peer-urls", f"http://127.0.0.1:{peers[n]}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peers[n]}",
                "--initial-cluster", initial, "--initial-cluster-token", token,
                "--initial-cluster-state", "new", "--logger", "zap", "--log-level", "warn",
            ]
            with open(self.root / f"{n}.out", "ab") as out:
                self.procs[n] = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                                 start_new_session=True,
                                                 preexec_fn=bench._die_with_parent)  # noqa: PLW1509
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for n, p in self.procs.items():
                if p.poll() is not None:
                    tail = (self.root / f"{n}.out").read_text(errors="replace").strip().splitlines()[-2:]
                    raise bench.BenchFailed(f"etcd member {n} exited {p.returncode}: {' | '.join(tail)}")
            if self.leader() is not None and all(self._healthy(n) for n in names):
                return
            time.sleep(0.1)
        raise bench.BenchFailed(f"etcd: no healthy 3-member cluster after {START_TIMEOUT:.0f} s")

    def _healthy(self, name: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.client_ports[name]}/health", timeout=2) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def leader(self) -> str | None:
        for n, port in self.client_ports.items():
            try:
                st = _post(f"http://127.0.0.1:{port}/v3/maintenance/status", {})
            except (OSError, ValueError):
                continue
            if st.get("leader") and st.get("leader") == st.get("header", {}).get("member_id"):
                return n
        return None

    def stop(self) -> None:
        stop_pids(list(self.procs.values()))


async def etcd_drive(client: Any, op: str, concurrency: int, seconds: float, pids: dict[str, int]) -> Step:
    import aetcd.exceptions
    import grpc

    latencies: list[float] = []
    errors = 0
    first_error: list[str] = []
    perf = time.perf_counter

    async def worker(w: int) -> None:
        nonlocal errors
        n = 0
        while True:
            start = perf()
            if start >= deadline:
                return
            try:
                if op == "upsert":
                    await client.put(key(w * 7919 + n * 13).encode(), VALUE, prev_kv=True)
                else:
                    await client.get(key((w * 31 + n) % READ_KEYS).encode())
            except (aetcd.exceptions.ClientError, grpc.RpcError, TimeoutError) as e:
                errors += 1
                if not first_error:
                    first_error.append(f"{type(e).__name__}: {e}")
            else:
                latencies.append(perf() - start)
            n += 1

    before = sample_cpu(pids)
    started = perf()
    deadline = started + seconds
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = perf() - started
    after = sample_cpu(pids)
    latencies.sort()
    return Step(op=op, concurrency=concurrency, ops=len(latencies), errors=errors, seconds=elapsed,
                p50_ms=percentile(latencies, 0.5) * 1000, p99_ms=percentile(latencies, 0.99) * 1000,
                cpu_us={r: ticks_to_us(after[r] - before[r]) for r in pids},
                first_error=first_error[0] if first_error else None)


async def etcd_run_once(port: int, args: argparse.Namespace, pids: dict[str, int]) -> list[Step]:
    import aetcd

    steps = []
    async with aetcd.Client(host="127.0.0.1", port=port, timeout=args.timeout) as client:
        sem = asyncio.Semaphore(64)

        async def put(i: int) -> None:
            async with sem:
                await client.put(key(i).encode(), VALUE)

        await asyncio.gather(*(put(i) for i in range(READ_KEYS)))
        for op in ("upsert", "get"):
            for conc in args.concurrency:
                step = await etcd_drive(client, op, conc, args.seconds, pids)
                steps.append(step)
                progress("etcd", step)
    return steps


def progress(system: str, step: Step) -> None:
    print(f"  {system:8} {bench.OP_NAMES[step.op]:16} x{step.concurrency:<3} {step.ops_per_s:8,.0f} ops/s"
          f"  p50 {step.p50_ms:6.2f} ms  p99 {step.p99_ms:6.2f} ms"
          + (f"  cpu {step.cpu_us_per_op()['total']:,.0f} µs/op" if step.cpu_us_per_op() else "")
          + (f"  {step.errors} errors" if step.errors else ""), file=sys.stderr, flush=True)


def run_etcd(etcd: str, args: argparse.Namespace) -> list[Step]:
    root = pathlib.Path(tempfile.mkdtemp(prefix="etcd-bench-"))
    cluster = EtcdCluster(root, etcd)
    try:
        cluster.start()
        leader = cluster.leader()
        assert leader is not None
        followers = sorted(n for n in cluster.procs if n != leader)
        pids = {"client": os.getpid(), "leader": cluster.procs[leader].pid,
                "follower1": cluster.procs[followers[0]].pid, "follower2": cluster.procs[followers[1]].pid}
        steps = asyncio.run(etcd_run_once(cluster.client_ports[leader], args, pids))
        if cluster.leader() != leader:
            print("warning: etcd's leader changed during the run", file=sys.stderr)
        return steps
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def run_metanode(args: argparse.Namespace) -> list[Step]:
    cmd = [sys.executable, "-m", "metanode", "bench", "--runs", "1", "--format", "json", "--seconds",
           str(args.seconds), "--concurrency", ",".join(map(str, args.concurrency)), "--timeout", str(args.timeout)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True, preexec_fn=bench._die_with_parent)  # noqa: PLW1509
    try:
        out, err = p.communicate()
    finally:
        if p.poll() is None:  # interrupted: SIGTERM makes it stop its cluster
            stop_pids([p])
    if p.returncode != 0:
        raise bench.BenchFailed(f"metanode bench exited {p.returncode}: {err.strip()}")
    doc = json.loads(out)
    steps = []
    for res in doc["results"]:
        r = res["runs"][0]
        s = Step(op=res["op"], concurrency=res["concurrency"], ops=r["ops"], errors=r["errors"],
                 seconds=r["seconds"], p50_ms=r["p50_ms"] if r["p50_ms"] is not None else math.nan,
                 p99_ms=r["p99_ms"] if r["p99_ms"] is not None else math.nan, cpu_us=r["cpu_us"])
        steps.append(s)
        progress("metanode", s)
    return steps


# ---------------------------------------------------------------- medians and output


def medians(runs: list[list[Step]]) -> dict[tuple[str, int], dict[str, Any]]:
    out = {}
    for summary in bench.summarize(runs):
        out[(summary.op, summary.concurrency)] = {
            "ops_per_s": summary.median(lambda s: s.ops_per_s),
            "p50_ms": summary.median(lambda s: s.p50_ms),
            "p99_ms": summary.median(lambda s: s.p99_ms),
            "errors": sum(s.errors for s in summary.runs),
            "cpu_us_per_op": summary.cpu_us_per_op(),
        }
    return out


def _f(x: float | None, digits: int = 0) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:,.{digits}f}"


def tables(doc: dict[str, Any], markdown: bool) -> list[str]:
    def render(rows: list[list[str]]) -> list[str]:
        if markdown:
            lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            return lines + ["| " + " | ".join(r) + " |" for r in rows[1:]]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return ["  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]) for r in rows]

    res = {(r["op"], r["concurrency"]): r for r in doc["results"]}
    rows = [["op", "concurrency", "etcd ops/s", "metanode ops/s", "ratio", "etcd p50 ms", "metanode p50 ms",
             "etcd p99 ms", "metanode p99 ms"]]
    for (op, conc), r in res.items():
        e, m = r["etcd"], r["metanode"]
        rows.append([bench.OP_NAMES[op], str(conc), _f(e["ops_per_s"]), _f(m["ops_per_s"]), _f(r["ops_ratio"], 2) + "x",
                     _f(e["p50_ms"], 2), _f(m["p50_ms"], 2), _f(e["p99_ms"], 2), _f(m["p99_ms"], 2)])
    mu = bench._mu()
    cpu_rows = [["op", "concurrency", "system"] + [ROLE_NAMES[r] for r in ROLES] + ["sum"]]
    for (op, conc), r in res.items():
        for system in ("etcd", "metanode"):
            cpu = r[system]["cpu_us_per_op"] or {}
            cpu_rows.append([bench.OP_NAMES[op], str(conc), system] + [_f(cpu.get(k)) for k in ROLES + ["total"]])
    head = [
        f"metanode vs etcd {doc['etcd_version']}, same machine, same run: {doc['machine']}",
        (f"{doc['seconds']:g} s per step, median of {doc['runs']} runs (alternating etcd and metanode);"
         " 16-byte keys, 100-byte values; concurrent tasks sharing one client;"),
        f"etcd client: {doc['etcd_client']}; metanode client: MetaClient (metanode bench)",
        "",
    ]
    ratios = [f"ops/s ratio = metanode / etcd; p50 at concurrency {doc['p50_ratio_concurrency']}, metanode / etcd: "
              + ", ".join(f"{bench.OP_NAMES[op]} {r:.2f}x" for op, r in doc["p50_ratio_c1"].items())]
    return (head + render(rows) + [""] + ratios + ["", f"CPU {mu} per operation, by process"]
            + render(cpu_rows))


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} CPUs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=bench._positive_float, default=5.0)
    parser.add_argument("--runs", type=bench._positive_int, default=3)
    parser.add_argument("--concurrency", type=bench._int_list, default=[1, 16, 64])
    parser.add_argument("--timeout", type=bench._positive_float, default=30.0)
    parser.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    parser.add_argument("--etcd", default=shutil.which("etcd"), help="the etcd binary (default: etcd on PATH)")
    args = parser.parse_args()
    if not args.etcd:
        print("etcd_compare: error: etcd is not installed (apt-get install -y etcd-server)", file=sys.stderr)
        return 1
    try:
        from importlib.metadata import version

        import aetcd  # noqa: F401
        import grpc
    except ImportError as e:
        print(f"etcd_compare: error: {e} (pip install aetcd)", file=sys.stderr)
        return 1
    etcd_version = subprocess.run([args.etcd, "--version"], capture_output=True, text=True, check=False,
                                  timeout=10).stdout.split("\n")[0].removeprefix("etcd Version: ").strip()
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    etcd_runs: list[list[Step]] = []
    meta_runs: list[list[Step]] = []
    try:
        for r in range(1, args.runs + 1):
            print(f"run {r}/{args.runs}", file=sys.stderr, flush=True)
            etcd_runs.append(run_etcd(args.etcd, args))
            meta_runs.append(run_metanode(args))
    except bench.BenchFailed as e:
        print(f"etcd_compare: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("etcd_compare: interrupted", file=sys.stderr)
        return 130
    e_med, m_med = medians(etcd_runs), medians(meta_runs)

    def rnd(d: dict[str, Any]) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else round(v, 3) if isinstance(v, float)
                    else {kk: round(vv, 1) for kk, vv in v.items()} if isinstance(v, dict) else v)
                for k, v in d.items()}

    results = []
    for k in e_med:
        e, m = e_med[k], m_med.get(k)
        if m is None:
            continue
        results.append({"op": k[0], "concurrency": k[1], "etcd": rnd(e), "metanode": rnd(m),
                        "ops_ratio": round(m["ops_per_s"] / e["ops_per_s"], 3) if e["ops_per_s"] else None})
    c1 = min(args.concurrency)
    doc = {
        "machine": machine(), "etcd_version": etcd_version,
        "etcd_client": f"aetcd {version('aetcd')} (grpc.aio {grpc.__version__}), one client to the leader",
        "seconds": args.seconds, "runs": args.runs, "concurrency": args.concurrency,
        "results": results,
        "p50_ratio_concurrency": c1,
        "p50_ratio_c1": {op: round(m_med[(op, c1)]["p50_ms"] / e_med[(op, c1)]["p50_ms"], 3)
                         for op in ("upsert", "get") if (op, c1) in m_med and (op, c1) in e_med},
    }
    if args.format == "json":
        print(json.dumps(doc))
    else:
        print("\n".join(tables(doc, markdown=args.format == "markdown")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
