"""`metanode bench` without a cluster (docs/reference/cli.md#measure-a-cluster-metanode-bench):
its options, the CPU reader of /proc/PID/stat, percentiles, medians and the table."""

from __future__ import annotations

import os
import time

import pytest

from metanode import bench
from metanode.bench import Step, Summary, parse_args, parse_stat_ticks
from metanode.cli import main as cli_main


def test_defaults() -> None:
    args = parse_args([])
    assert args.addr is None and args.concurrency == [1, 16, 64] and args.seconds == 5.0
    assert args.runs == 1 and args.format == "table" and args.ops == ["upsert", "get"] and args.via == "leader"
    assert args.token is None and args.timeout == 30.0


def test_lists_and_values() -> None:
    args = parse_args(["--concurrency", "1, 4,4,64", "--seconds", "0.5", "--runs", "3", "--format", "json",
                       "--ops", "get", "--addr", "127.0.0.1:9191", "[::1]:9192", "--addr", "meta3:9191",
                       "--token", "t"])
    assert args.concurrency == [1, 4, 64] and args.seconds == 0.5 and args.runs == 3 and args.format == "json"
    assert args.ops == ["get"] and args.addr == ["127.0.0.1:9191", "[::1]:9192", "meta3:9191"] and args.token == "t"
    assert parse_args(["--via", "follower"]).via == "follower"


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--concurrency", "0"], "--concurrency"),
    (["--concurrency", "1,,4"], "--concurrency"),
    (["--concurrency", "a"], "comma list of positive integers"),
    (["--concurrency", "-1"], "--concurrency"),
    (["--seconds", "0"], "--seconds"),
    (["--seconds", "nan"], "--seconds"),
    (["--runs", "0"], "--runs"),
    (["--ops", "put"], "--ops"),
    (["--format", "xml"], "--format"),
    (["--addr", "nohost"], "no port"),
    (["--addr", "127.0.0.1:0"], "port 0"),
    (["--addr", "127.0.0.1:70000"], "out of range"),
    (["--addr", "127.0.0.1:9191", "--via", "leader"], "--via"),
    (["--token", "t"], "--token"),
    (["--conc", "1"], "unrecognized"),  # never abbreviated
    (["extra"], "unrecognized"),
])
def test_usage_errors_exit_2_with_one_line(argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metanode bench: error: ") and fragment in lines[0], err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--addr", "--concurrency", "--seconds", "--runs", "--format", "--ops", "--via"):
        assert flag in out


def test_stat_line_is_read_after_the_last_parenthesis() -> None:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    fields = ["S", "1", "2", "3", "0", "-1", "4194560", "10", "0", "0", "0", "1234", "567", "8", "9", "20"]
    assert parse_stat_ticks("42 (python3) " + " ".join(fields)) == 1234 + 567
    # a command name with spaces and parentheses
    assert parse_stat_ticks("42 (a) b (c)) " + " ".join(fields) + "\n") == 1801


def test_cpu_ticks_of_a_live_process_grow_with_work() -> None:
    pid = os.getpid()
    before = bench.cpu_ticks(pid)
    assert before >= 0
    deadline = time.monotonic() + 10  # bounded: one clock tick of CPU is ~10 ms
    x = 0
    while bench.cpu_ticks(pid) == before and time.monotonic() < deadline:
        for i in range(100_000):
            x += i
    assert bench.cpu_ticks(pid) > before
    assert bench.sample_cpu({"me": pid})["me"] >= bench.cpu_ticks(pid) - 1_000


def test_cpu_ticks_of_a_missing_process_is_an_os_error() -> None:
    with pytest.raises(OSError):
        bench.cpu_ticks(2**22 + 12345)  # above the kernel's pid_max limit


def test_ticks_to_microseconds() -> None:
    hz = os.sysconf("SC_CLK_TCK")
    assert bench.clock_ticks_per_second() == hz
    assert bench.ticks_to_us(hz) == 1_000_000


def test_keys_are_16_bytes() -> None:
    assert {len(bench.key(n).encode()) for n in (0, 7, 99_999, 100_000, 10**9)} == {bench.KEY_BYTES}
    assert len(bench.VALUE) == 100


def test_percentile_is_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert bench.percentile(values, 0.5) == 50.0 and bench.percentile(values, 0.99) == 99.0
    assert bench.percentile([3.0], 0.99) == 3.0
    assert bench.percentile([], 0.5) != bench.percentile([], 0.5)  # NaN


def _step(ops: int, p50: float, cpu: dict[str, float] | None) -> Step:
    return Step(op="upsert", concurrency=16, ops=ops, errors=0, seconds=1.0, p50_ms=p50, p99_ms=2 * p50, cpu_us=cpu)


def test_cpu_per_op_and_medians() -> None:
    s = _step(100, 1.0, {"client": 1000.0, "leader": 3000.0})
    assert s.cpu_us_per_op() == {"client": 10.0, "leader": 30.0, "total": 40.0}
    assert _step(0, 1.0, {"client": 5.0}).cpu_us_per_op() is None
    summary = Summary("upsert", 16, [_step(100, 1.0, {"client": 100.0}), _step(300, 3.0, {"client": 900.0}),
                                     _step(200, 9.0, {"client": 1000.0})])
    assert summary.median(lambda x: x.ops_per_s) == 200 and summary.median(lambda x: x.p50_ms) == 3.0
    assert summary.cpu_us_per_op() == {"client": 3.0, "total": 3.0}
    doc = summary.to_json()
    assert doc["ops_per_s"] == 200 and doc["p50_ms"] == 3.0 and len(doc["runs"]) == 3


def _doc(target: str, roles: list[str]) -> dict:
    cpu = {r: 10.0 * (i + 1) for i, r in enumerate(roles)}
    cpu["total"] = sum(cpu.values())
    doc = {
        "target": target, "seconds": 5.0, "runs": 3, "key_bytes": 16, "value_bytes": 100, "clk_tck": 100,
        "processes": roles, "first_errors": [],
        "results": [{"op": op, "concurrency": c, "ops_per_s": 1234.5, "p50_ms": 1.5, "p99_ms": 9.25, "errors": 0,
                     "cpu_us_per_op": cpu} for op in ("upsert", "get") for c in (1, 64)],
    }
    if target == "local":
        doc.update(cluster_size=3, heartbeat_ms=500, via="leader")
    else:
        doc.update(addresses=["127.0.0.1:9191"])
    return doc


def test_table_of_a_local_cluster() -> None:
    lines = bench.table_lines(_doc("local", ["client", "leader", "follower1", "follower2"]))
    assert "local 3-node cluster" in lines[0] and "median of 3 runs" in lines[1]
    header = next(line for line in lines if line.startswith("op "))
    assert header.split()[:10] == ["op", "concurrency", "ops/s", "p50", "ms", "p99", "ms", "errors", "client", "leader"]
    assert header.split()[10:] == ["follower", "follower", "sum"]
    rows = [line for line in lines if line.startswith(("upsert", "linearizable get"))]
    assert len(rows) == 4
    assert rows[0].split() == ["upsert", "1", "1,234", "1.50", "9.25", "0", "10", "20", "30", "40", "100"]
    assert any("per op" in line for line in lines)


def test_table_of_a_running_cluster_has_the_client_column_only() -> None:
    lines = bench.table_lines(_doc("addr", ["client"]))
    assert "127.0.0.1:9191" in lines[0]
    header = next(line for line in lines if line.startswith("op "))
    assert header.split()[-1] == "client"
    rows = [line for line in lines if line.startswith(("upsert", "linearizable get"))]
    assert rows[-1].split() == ["linearizable", "get", "64", "1,234", "1.50", "9.25", "0", "10"]
