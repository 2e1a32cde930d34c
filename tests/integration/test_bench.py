"""Real processes: `metanode bench` (docs/reference/cli.md#measure-a-cluster-metanode-bench)
against a local cluster it starts and stops itself, against a running cluster (--addr),
and interrupted. Checks the output's shape only: no assertion on speed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.harness import LocalCluster, wait_until

pytestmark = pytest.mark.integration

ROLES = ["client", "leader", "follower1", "follower2"]


def _popen(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.pop("METASRV_CONFIG_FILE", None)
    return subprocess.Popen(
        [sys.executable, "-m", "metanode", "bench", *args], cwd=cwd, env=env, text=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # a Ctrl-C must reach it even when this test runs with SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509
    )


def _children(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (from /proc/*/stat)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    """A metanode process of ours with this pid still exists (not a reused pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"metanode" in f.read()
    except OSError:
        return False


def _finish(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """Wait for the bench; on a timeout stop it, and the nodes it started, by PID."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kids = _children(proc.pid)
        proc.kill()
        proc.communicate(timeout=10)
        for kid in kids:
            if _alive(kid):
                os.kill(kid, signal.SIGKILL)
        raise


def test_bench_starts_measures_and_stops_a_local_cluster(tmp_path: Path) -> None:
    proc = _popen(["--seconds", "1", "--concurrency", "1,4", "--format", "json"], tmp_path)
    out, err = _finish(proc, 180)
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert doc["target"] == "local" and doc["cluster_size"] == 3 and doc["heartbeat_ms"] == 500
    assert doc["concurrency"] == [1, 4] and doc["runs"] == 1 and doc["seconds"] == 1.0
    assert doc["key_bytes"] == 16 and doc["value_bytes"] == 100 and doc["processes"] == ROLES
    assert [(r["op"], r["concurrency"]) for r in doc["results"]] == [("upsert", 1), ("upsert", 4), ("get", 1), ("get", 4)]
    for r in doc["results"]:
        assert r["ops_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] and isinstance(r["errors"], int)
        assert set(r["cpu_us_per_op"]) == {*ROLES, "total"}
        assert all(v >= 0 for v in r["cpu_us_per_op"].values())
        assert r["cpu_us_per_op"]["total"] == pytest.approx(sum(r["cpu_us_per_op"][k] for k in ROLES), abs=1)
        (run,) = r["runs"]
        assert run["ops"] > 0 and set(run["cpu_us"]) == set(ROLES)
    (cluster,) = doc["cluster"]
    assert sorted([cluster["leader"], *cluster["followers"]]) == [1, 2, 3]
    # every node it started is gone, and so is its temporary dir
    assert not [pid for pid in cluster["pids"].values() if _alive(pid)]
    assert not _children(proc.pid)


def test_bench_against_a_running_cluster_prints_a_table(cluster: LocalCluster, tmp_path: Path) -> None:
    cluster.start(3)
    proc = _popen(["--addr", *cluster.client_addresses(), "--seconds", "1", "--concurrency", "1,4"], tmp_path)
    out, err = _finish(proc, 120)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("metanode bench: ") and cluster.client_addresses()[0] in lines[0]
    header = next(line for line in lines if line.startswith("op "))
    assert header.split() == ["op", "concurrency", "ops/s", "p50", "ms", "p99", "ms", "errors", "client"]
    rows = [line.split() for line in lines if line.startswith(("upsert ", "linearizable get "))]
    # op, concurrency, ops/s, p50, p99, errors, client CPU µs per op
    assert [(" ".join(r[:-6]), r[-6]) for r in rows] == [
        ("upsert", "1"), ("upsert", "4"), ("linearizable get", "1"), ("linearizable get", "4")]
    for r in rows:
        ops, p50, p99 = float(r[-5].replace(",", "")), float(r[-4]), float(r[-3])
        assert ops > 0 and 0 < p50 <= p99 and int(r[-2]) >= 0 and float(r[-1].replace(",", "")) >= 0
    # the keys it wrote are there
    assert cluster.admin(1).status()["last_seq"] > 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_bench_stops_its_cluster(tmp_path: Path, sig: int) -> None:
    proc = _popen(["--seconds", "30", "--concurrency", "1"], tmp_path)
    try:
        kids = wait_until(lambda: len(_children(proc.pid)) == 3 and _children(proc.pid), 60,
                          "the bench to start 3 nodes")
        time.sleep(1)  # nodes 1 and 2 serve, node 3 joins or the workload runs: either way
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            _finish(proc, 1)
    assert proc.returncode == 130, err
    assert err.strip() == "metanode bench: interrupted" and out == ""
    assert not [pid for pid in kids if _alive(pid)]
