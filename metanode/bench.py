"""`metanode bench` (contract §1, beyond databend-meta): throughput, latency and CPU cost.

    metanode bench [--addr HOST:PORT ...] [--concurrency 1,16,64] [--seconds 5] [--runs 1]
                   [--ops upsert,get] [--via leader|follower] [--token T] [--format table|json]

Drives upserts (16-byte keys, 100-byte values) and linearizable gets at each concurrency
for a fixed time, concurrent tasks sharing one `MetaClient` as a real application would
(the client batches what they queue into one message). Against ``--addr`` (a running
cluster's client API) it measures ops/s, p50 and p99 and the client's own CPU time;
without ``--addr`` it starts a local 3-node cluster itself (real ``metanode`` processes on
free loopback ports in a temporary dir, heartbeat 500 ms), and also reports the CPU time
per operation of every process (client, leader, each follower, their sum), read from
``/proc/PID/stat`` (utime + stime, in clock ticks) before and after each step. With
``--runs R`` every figure is the median of R runs (a new local cluster each run).

The local cluster's processes are stopped by PID on every path: at the end, on an error,
on Ctrl-C (SIGINT) or SIGTERM (SIGTERM, then SIGKILL after 10 s); they run in their own
session, so a terminal's Ctrl-C reaches only the bench, which stops them in order, and
they get SIGTERM from the kernel if the bench itself dies (PR_SET_PDEATHSIG).

Exit codes: 0 ok, 1 the benchmark failed (a cluster that does not start, a client that
cannot connect), 2 bad usage, 130 interrupted. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

PROG = "metanode bench"
KEY_BYTES = 16
VALUE = b"v" * 100
KEY_SPACE = 100_000  # upserts spread over this many keys
READ_KEYS = 1_000  # gets read these (written before the first step)
HEARTBEAT_MS = 500
OPS = ("upsert", "get")
OP_NAMES = {"upsert": "upsert", "get": "linearizable get"}
START_TIMEOUT = 30.0  # seconds for one node to serve, and for the cluster to form
STOP_TIMEOUT = 10.0  # seconds after SIGTERM before SIGKILL


def key(n: int) -> str:
    """The n-th key, always 16 bytes: ``key-000000000042``."""
    return f"key-{n % KEY_SPACE:012d}"


# ---------------------------------------------------------------- CPU time from /proc


def parse_stat_ticks(text: str) -> int:
    """utime + stime (fields 14 and 15, in clock ticks) of a ``/proc/PID/stat`` line.
    The command name (field 2) is in parentheses and may hold spaces and ``)``: the
    fields are counted from the last ``)``."""
    rest = text[text.rindex(")") + 1:].split()
    # rest[0] is field 3 (state), so field N is rest[N - 3]
    return int(rest[11]) + int(rest[12])


def cpu_ticks(pid: int) -> int:
    """The CPU time a process has used so far (all its threads, user + system), in
    clock ticks; OSError when it is gone or /proc is missing."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        return parse_stat_ticks(f.read())


def clock_ticks_per_second() -> int:
    return int(os.sysconf("SC_CLK_TCK"))


def ticks_to_us(ticks: float) -> float:
    return ticks * 1_000_000 / clock_ticks_per_second()


def sample_cpu(pids: dict[str, int]) -> dict[str, int]:
    return {role: cpu_ticks(pid) for role, pid in pids.items()}


# ---------------------------------------------------------------- the command line


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line on stderr, exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: error: {message} (see {PROG} --help)", file=sys.stderr)
        raise SystemExit(2)


def _int_list(text: str) -> list[int]:
    values = []
    for part in text.split(","):
        part = part.strip()
        if not (part.isascii() and part.isdigit()) or int(part) < 1:
            raise argparse.ArgumentTypeError(f"expected a comma list of positive integers like 1,16,64, got {text!r}")
        if int(part) > 10_000:
            raise argparse.ArgumentTypeError(f"{part}: at most 10000 concurrent tasks")
        values.append(int(part))
    return list(dict.fromkeys(values))


def _op_list(text: str) -> list[str]:
    values = [p.strip() for p in text.split(",")]
    bad = [p for p in values if p not in OPS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"expected a comma list of {','.join(OPS)}, got {text!r}")
    return list(dict.fromkeys(values))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _address(text: str) -> str:
    from metanode.config import parse_address

    try:
        _, port = parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if port == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: port 0 cannot be reached (1..65535)")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, allow_abbrev=False, description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--addr", nargs="+", action="extend", type=_address, metavar="HOST:PORT",
                   help="client API addresses (grpc_api_address) of a running cluster; several values,"
                        " repeatable; default: start a local 3-node cluster")
    p.add_argument("--concurrency", type=_int_list, default=[1, 16, 64], metavar="N,N,...",
                   help="concurrent tasks (sharing one client) of each step (default 1,16,64)")
    p.add_argument("--seconds", type=_positive_float, default=5.0, metavar="S",
                   help="duration of each step (default 5)")
    p.add_argument("--runs", type=_positive_int, default=1, metavar="R",
                   help="runs (a new local cluster each); figures are the medians (default 1)")
    p.add_argument("--ops", type=_op_list, default=list(OPS), metavar="OP,OP",
                   help="which workloads: upsert, get (linearizable) (default upsert,get)")
    p.add_argument("--via", choices=("leader", "follower"), default=None,
                   help="local cluster: the node the client connects to (default leader)")
    p.add_argument("--token", help="grpc_api_token of the cluster, with --addr")
    p.add_argument("--timeout", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="for the connection and each request (default 30)")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="output: a table for people (default) or JSON for programs")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The options of `metanode bench` (SystemExit 2 with one line on a usage error)."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if args.addr is not None and args.via is not None:
        parser.error("--via: only for the local cluster (without --addr)")
    if args.addr is None and args.token is not None:
        parser.error("--token: only with --addr (the local cluster has no token)")
    if args.via is None:
        args.via = "leader"
    return args


# ---------------------------------------------------------------- a local cluster


class BenchFailed(Exception):
    """The benchmark cannot go on: one line for the user."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _libc_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl() if sys.platform == "linux" else None  # looked up here, not in a forked child


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGTERM when the bench dies, even by SIGKILL. Called
    between fork and exec: only the prctl call, already looked up."""
    if _PRCTL is not None:
        _PRCTL(1, 15)  # PR_SET_PDEATHSIG, SIGTERM


def _http_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@dataclass
class LocalNode:
    node_id: int
    raft_port: int
    admin_port: int
    grpc_port: int
    popen: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def client_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def output_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


@dataclass
class LocalCluster:
    """Three real ``metanode`` processes on 127.0.0.1, each with a config file and data
    dir in `root`. `stop` stops every process by PID: SIGTERM, then SIGKILL."""

    root: Path
    size: int = 3
    heartbeat_ms: int = HEARTBEAT_MS
    nodes: dict[int, LocalNode] = field(default_factory=dict)

    def _config(self, n: LocalNode, join: list[str]) -> Path:
        lines = [
            f'log_dir = "logs{n.node_id}"',
            f'admin_api_address = "127.0.0.1:{n.admin_port}"',
            f'grpc_api_address = "127.0.0.1:{n.grpc_port}"',
            "[raft_config]",
            f"id = {n.node_id}",
            f'raft_dir = "data{n.node_id}"',
            f"raft_api_port = {n.raft_port}",
            'raft_listen_host = "127.0.0.1"',
            'raft_advertise_host = "127.0.0.1"',
            f"heartbeat_interval = {self.heartbeat_ms}",
        ]
        lines.append("single = true" if not join else "join = " + json.dumps(join))
        path = self.root / f"node{n.node_id}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _spawn(self, n: LocalNode, join: list[str]) -> None:
        cfg = self._config(n, join)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("METASRV_CONFIG_FILE", None)
        env.pop("NOTIFY_SOCKET", None)
        n.log_path = self.root / f"node{n.node_id}.out"
        with open(n.log_path, "ab") as out:
            n.popen = subprocess.Popen(
                [sys.executable, "-m", "metanode", "-c", str(cfg)], cwd=self.root, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl call
            )

    def _wait(self, pred: Callable[[], bool], what: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for n in self.nodes.values():
                if n.popen is not None and n.popen.poll() is not None:
                    raise BenchFailed(f"local cluster: node {n.node_id} exited {n.popen.returncode} while waiting"
                                      f" for {what}: {n.output_tail()}")
            try:
                if pred():
                    return
            except (OSError, ValueError):  # not up yet
                pass
            time.sleep(0.05)
        raise BenchFailed(f"local cluster: timed out after {timeout:.0f} s waiting for {what}")

    def _healthy(self, n: LocalNode) -> bool:
        try:
            with urllib.request.urlopen(n.admin_url + "/v1/health", timeout=2) as r:
                return r.status == 200
        except urllib.error.HTTPError:
            return False

    def _names(self, n: LocalNode) -> list[str]:
        return [m["name"] for m in _http_json(n.admin_url + "/v1/cluster/nodes")]

    def start(self) -> None:
        """Node 1 initializes the cluster, the others join it; returns once every node
        serves and a leader lists every member."""
        for i in range(1, self.size + 1):
            self.nodes[i] = LocalNode(i, _free_port(), _free_port(), _free_port())
        first = self.nodes[1]
        self._spawn(first, [])
        self._wait(lambda: self._healthy(first), "node 1 to serve")
        for i in range(2, self.size + 1):
            n = self.nodes[i]
            self._spawn(n, [f"127.0.0.1:{first.raft_port}"])
            self._wait(lambda n=n: self._healthy(n), f"node {i} to join")  # type: ignore[misc]
        names = [str(i) for i in range(1, self.size + 1)]
        self._wait(lambda: self.leader() is not None and self._names(self.nodes[self.leader() or 1]) == names,
                   f"{self.size} members")

    def leader(self) -> int | None:
        for n in self.nodes.values():
            try:
                if _http_json(n.admin_url + "/v1/cluster/status").get("is_leader"):
                    return n.node_id
            except (OSError, ValueError):
                continue
        return None

    def pids(self) -> dict[int, int]:
        return {i: n.popen.pid for i, n in self.nodes.items() if n.popen is not None}

    def stop(self) -> None:
        """Stop every node by PID (`stop_pids`). A second Ctrl-C during the wait kills at once."""
        stop_pids([n.popen for n in self.nodes.values() if n.popen is not None])


def stop_pids(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each by PID, wait up to STOP_TIMEOUT, then SIGKILL what is left."""
    try:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)


@contextlib.contextmanager
def local_cluster(size: int = 3, heartbeat_ms: int = HEARTBEAT_MS, attempts: int = 3) -> Iterator[LocalCluster]:
    """A started local cluster in a temporary dir, stopped and removed on every path.
    A start that fails (a free port taken meanwhile by someone else) is retried."""
    root = Path(tempfile.mkdtemp(prefix="metanode-bench-"))
    try:
        for attempt in range(1, attempts + 1):
            cluster = LocalCluster(root / f"try{attempt}", size=size, heartbeat_ms=heartbeat_ms)
            cluster.root.mkdir()
            try:
                cluster.start()
            except BenchFailed:
                cluster.stop()
                if attempt == attempts:
                    raise
                continue
            except BaseException:
                cluster.stop()
                raise
            try:
                yield cluster
            finally:
                cluster.stop()
            return
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- the workload


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (q in 0..1); NaN when empty."""
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))]


@dataclass
class Step:
    """One op at one concurrency, one run."""

    op: str
    concurrency: int
    ops: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu_us: dict[str, float] | None  # role -> CPU microseconds used during the step
    first_error: str | None = None

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    def cpu_us_per_op(self) -> dict[str, float] | None:
        if self.cpu_us is None or self.ops == 0:
            return None
        per = {role: us / self.ops for role, us in self.cpu_us.items()}
        per["total"] = sum(self.cpu_us.values()) / self.ops
        return per

    def to_json(self) -> dict[str, Any]:
        return {
            "ops": self.ops, "errors": self.errors, "seconds": round(self.seconds, 4),
            "ops_per_s": round(self.ops_per_s, 1), "p50_ms": _r(self.p50_ms), "p99_ms": _r(self.p99_ms),
            "cpu_us": None if self.cpu_us is None else {k: round(v) for k, v in self.cpu_us.items()},
            "cpu_us_per_op": _rd(self.cpu_us_per_op()),
        }


def _r(x: float, digits: int = 3) -> float | None:
    return None if math.isnan(x) else round(x, digits)


def _rd(d: dict[str, float] | None) -> dict[str, float] | None:
    return None if d is None else {k: round(v, 1) for k, v in d.items()}


async def drive(client: Any, op: str, concurrency: int, seconds: float,
                pids: dict[str, int]) -> Step:
    """`concurrency` tasks sharing `client` run `op` back to back for `seconds`; CPU
    time of `pids` (role -> pid) is sampled right before and right after."""
    import trio

    from metanode.client import MetaError

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
                    await client.upsert(key(w * 7919 + n * 13), VALUE)
                else:
                    await client.get(key((w * 31 + n) % READ_KEYS))
            except MetaError as e:
                errors += 1
                if not first_error:
                    first_error.append(f"{type(e).__name__}: {e}")
            else:
                latencies.append(perf() - start)
            n += 1

    before = sample_cpu(pids)
    started = perf()
    deadline = started + seconds
    async with trio.open_nursery() as nursery:
        for w in range(concurrency):
            nursery.start_soon(worker, w)
    elapsed = perf() - started
    after = sample_cpu(pids)
    latencies.sort()
    return Step(
        op=op, concurrency=concurrency, ops=len(latencies), errors=errors, seconds=elapsed,
        p50_ms=percentile(latencies, 0.50) * 1000, p99_ms=percentile(latencies, 0.99) * 1000,
        cpu_us={role: ticks_to_us(after[role] - before[role]) for role in pids},
        first_error=first_error[0] if first_error else None,
    )


async def preload(client: Any) -> None:
    """Write the keys the gets read (64 at a time)."""
    import trio

    async def write(start: int) -> None:
        for i in range(start, READ_KEYS, 64):
            await client.upsert(key(i), VALUE)

    async with trio.open_nursery() as nursery:
        for s in range(min(64, READ_KEYS)):
            nursery.start_soon(write, s)


async def run_once(addresses: list[str], args: argparse.Namespace, pids: dict[str, int],
                   progress: Callable[[Step], None]) -> list[Step]:
    from metanode.client import MetaClient, MetaError

    steps: list[Step] = []
    try:
        async with MetaClient.connect(addresses, token=args.token, timeout=args.timeout) as client:
            if "get" in args.ops:
                await preload(client)
            for op in args.ops:
                for conc in args.concurrency:
                    step = await drive(client, op, conc, args.seconds, pids)
                    steps.append(step)
                    progress(step)
    except MetaError as e:
        raise BenchFailed(f"{', '.join(addresses)}: {type(e).__name__}: {e}") from None
    except OSError as e:
        raise BenchFailed(f"{', '.join(addresses)}: {e}") from None
    return steps


# ---------------------------------------------------------------- medians and output


@dataclass
class Summary:
    op: str
    concurrency: int
    runs: list[Step]

    def median(self, value: Callable[[Step], float]) -> float:
        values = [v for v in map(value, self.runs) if not math.isnan(v)]
        return statistics.median(values) if values else math.nan

    def cpu_us_per_op(self) -> dict[str, float] | None:
        per_run = [s.cpu_us_per_op() for s in self.runs]
        known = [p for p in per_run if p is not None]
        if not known:
            return None
        return {role: statistics.median(p[role] for p in known) for role in known[0]}

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.op, "concurrency": self.concurrency,
            "ops_per_s": _r(self.median(lambda s: s.ops_per_s), 1),
            "p50_ms": _r(self.median(lambda s: s.p50_ms)), "p99_ms": _r(self.median(lambda s: s.p99_ms)),
            "errors": sum(s.errors for s in self.runs),
            "cpu_us_per_op": _rd(self.cpu_us_per_op()),
            "runs": [s.to_json() for s in self.runs],
        }


def summarize(runs: list[list[Step]]) -> list[Summary]:
    by: dict[tuple[str, int], Summary] = {}
    for steps in runs:
        for s in steps:
            by.setdefault((s.op, s.concurrency), Summary(s.op, s.concurrency, [])).runs.append(s)
    return list(by.values())


def _mu() -> str:
    """"µs", or "us" where stdout cannot print it."""
    try:
        "µ".encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "us"
    return "µs"


def _fmt(x: float | None, digits: int) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def table_lines(doc: dict[str, Any]) -> list[str]:
    """The human table of a result document (as `--format json` prints it)."""
    roles: list[str] = doc["processes"]
    names = {"client": "client", "leader": "leader"}
    cpu_cols = [names.get(r, "follower") for r in roles] + (["sum"] if len(roles) > 1 else [])
    header = ["op", "concurrency", "ops/s", "p50 ms", "p99 ms", "errors"] + cpu_cols
    rows = [header]
    for res in doc["results"]:
        cpu = res.get("cpu_us_per_op") or {}
        row = [OP_NAMES[res["op"]], str(res["concurrency"]), _fmt(res["ops_per_s"], 0), _fmt(res["p50_ms"], 2),
               _fmt(res["p99_ms"], 2), str(res["errors"])]
        row += [_fmt(cpu.get(r), 0) for r in roles]
        if len(roles) > 1:
            row.append(_fmt(cpu.get("total"), 0))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    out = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        out.append("  ".join(cells))
    cpu_width = sum(widths[6:]) + 2 * (len(widths) - 7)
    lead = sum(widths[:6]) + 2 * 6
    out.insert(0, " " * lead + f"CPU {_mu()} per op".center(cpu_width).rstrip())
    runs = doc["runs"]
    if doc["target"] == "local":
        what = (f"a local {doc['cluster_size']}-node cluster (real processes on 127.0.0.1, heartbeat"
                f" {doc['heartbeat_ms']} ms), the client via the {doc['via']}")
    else:
        what = ", ".join(doc["addresses"])
    title = [
        f"{PROG}: {what}",
        f"{doc['key_bytes']}-byte keys, {doc['value_bytes']}-byte values, concurrent tasks sharing one MetaClient;"
        f" {doc['seconds']:g} s per step, " + ("one run" if runs == 1 else f"median of {runs} runs")
        + f"; CPU from /proc/PID/stat ({doc['clk_tck']} ticks/s), {os.cpu_count()} CPUs",
        "",
    ]
    notes = [f"first error: {e}" for e in doc.get("first_errors", [])]
    return title + out + ([""] + notes if notes else [])


def result_doc(args: argparse.Namespace, runs: list[list[Step]], roles: list[str],
               extra: dict[str, Any]) -> dict[str, Any]:
    summaries = summarize(runs)
    return {
        "target": "addr" if args.addr else "local",
        **extra,
        "seconds": args.seconds, "runs": args.runs, "concurrency": args.concurrency, "ops": args.ops,
        "key_bytes": KEY_BYTES, "value_bytes": len(VALUE), "clk_tck": clock_ticks_per_second(),
        "cpus": os.cpu_count(), "processes": roles,
        "results": [s.to_json() for s in summaries],
        "first_errors": sorted({s.first_error for steps in runs for s in steps if s.first_error}),
    }


# ---------------------------------------------------------------- main


def _progress_printer(run: int, runs: int) -> Callable[[Step], None]:
    if not sys.stderr.isatty():
        return lambda step: None

    def show(step: Step) -> None:
        print(f"{PROG}: run {run}/{runs} {OP_NAMES[step.op]} x{step.concurrency}: {step.ops_per_s:,.0f} ops/s,"
              f" p50 {step.p50_ms:.2f} ms", file=sys.stderr, flush=True)

    return show


def _bench(args: argparse.Namespace) -> dict[str, Any]:
    import trio

    # Imported before any cluster starts, not in `run_once`: a Ctrl-C landing in an
    # import while a class is created comes out as a RuntimeError, not as the
    # KeyboardInterrupt that makes the bench stop its cluster and exit 130.
    import metanode.client  # noqa: F401

    runs: list[list[Step]] = []
    me = os.getpid()
    if args.addr:
        for r in range(1, args.runs + 1):
            runs.append(trio.run(run_once, list(args.addr), args, {"client": me}, _progress_printer(r, args.runs)))
        return result_doc(args, runs, ["client"], {"addresses": list(args.addr)})
    roles = ["client", "leader", "follower1", "follower2"]
    per_run: list[dict[str, Any]] = []
    for r in range(1, args.runs + 1):
        with local_cluster() as cluster:
            leader = cluster.leader()
            if leader is None:
                raise BenchFailed("local cluster: no leader")
            followers = sorted(i for i in cluster.nodes if i != leader)
            target = leader if args.via == "leader" else followers[0]
            order = [target] + [i for i in sorted(cluster.nodes) if i != target]
            addresses = [cluster.nodes[i].client_address for i in order]
            node_pids = cluster.pids()
            pids = {"client": me, "leader": node_pids[leader],
                    "follower1": node_pids[followers[0]], "follower2": node_pids[followers[1]]}
            steps = trio.run(run_once, addresses, args, pids, _progress_printer(r, args.runs))
            after = cluster.leader()
            per_run.append({"leader": leader, "followers": followers, "pids": node_pids,
                            "leader_after": after})
            if after != leader:
                print(f"{PROG}: warning: run {r}: the leader changed from node {leader} to {after} during the run;"
                      " its CPU figures mix roles", file=sys.stderr)
            runs.append(steps)
    return result_doc(args, runs, roles, {
        "cluster_size": 3, "heartbeat_ms": HEARTBEAT_MS, "via": args.via, "cluster": per_run,
    })


def _interrupted() -> int:
    """Say so; exit code 130. An interrupt that lands inside `nursery.start_soon`
    abandons the coroutine just made, and Python would warn "coroutine ... was never
    awaited" at exit: that says nothing to the user, so it is silenced."""
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    print(f"{PROG}: interrupted", file=sys.stderr)
    return 130


def main(argv: Sequence[str]) -> int:
    """`metanode bench ARGS`; the exit code."""
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        # as a Ctrl-C: inside trio.run its SIGINT handler raises KeyboardInterrupt where
        # that is safe, elsewhere Python's does (unless SIGINT is ignored: then here)
        if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGTERM, on_term)  # stop the local cluster on SIGTERM too
    try:
        doc = _bench(args)
    except BenchFailed as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return _interrupted()
    except BaseExceptionGroup as group:
        # Interrupted while the workers ran: their requests end with the client (as
        # unknown outcomes) beside the KeyboardInterrupt, all in one group.
        if group.subgroup(lambda e: isinstance(e, KeyboardInterrupt)) is None:
            raise
        return _interrupted()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.format == "json":
        print(json.dumps(doc))
    else:
        print("\n".join(table_lines(doc)))
    return 0
