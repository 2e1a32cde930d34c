"""The operator tutorial (reference/cluster-management), verbatim but for the program name.

Uses the tutorial's fixed ports (28002/28004, 28201-28203, 28301-28303, 28701-28703)
and the sample files in etc/, run from a fresh directory so their relative
`metadata/...` paths land there.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest

from tests.integration.harness import Admin, Proc, run_cli, voter_ids, wait_until

pytestmark = pytest.mark.integration

ETC = Path(__file__).resolve().parents[2] / "etc"
ADMIN = {1: "127.0.0.1:28002", 2: "127.0.0.1:28201", 3: "127.0.0.1:28301", 7: "127.0.0.1:28701"}
RAFT_PORT = {1: 28004, 2: 28203, 3: 28303, 7: 28703}


def expected(ids: list[int]) -> list[dict]:
    return [
        {"name": str(i), "endpoint": {"addr": "localhost", "port": RAFT_PORT[i]}, "grpc_api_advertise_address": None}
        for i in ids
    ]


def assert_ports_free() -> None:
    for port in (28002, 28004, 28201, 28203, 28301, 28303, 28701, 28703):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError as e:
                pytest.fail(f"the tutorial's port {port} is taken by another process: {e}")


def test_the_cluster_management_tutorial(tmp_path: Path) -> None:
    assert_ports_free()
    for i in (1, 2, 3, 7):
        shutil.copy(ETC / f"databend-meta-{i}.toml", tmp_path)
    procs: dict[int, Proc] = {}

    def start(i: int) -> Proc:
        procs[i] = Proc(f"meta{i}", ["-c", f"./databend-meta-{i}.toml"], tmp_path).start()
        return procs[i]

    def logs(i: int) -> str:
        return "".join(p.read_text() for p in (tmp_path / "metadata" / f"_logs{i}").glob("*.log"))

    def nodes_on(i: int) -> list[dict]:
        return Admin(ADMIN[i]).nodes()

    def wait_nodes(ids: list[int], on: list[int]) -> None:
        for i in on:
            wait_until(lambda: nodes_on(i) == expected(ids), 30, f"node {i} to list {ids}")

    try:
        start(1)
        wait_nodes([1], on=[1])
        start(2)
        wait_nodes([1, 2], on=[1, 2])
        start(3)
        wait_nodes([1, 2, 3], on=[1, 2, 3])

        # 1.2: `./databend-meta -c ./databend-meta-7.toml > meta7.log 2>&1 &`
        started = time.monotonic()
        start(7)
        wait_until(lambda: 7 in voter_ids(Admin(ADMIN[1]).status()), 30, "node 7 to be a voter")
        print(f"node 7 became a voter {time.monotonic() - started:.2f} s after it started")
        wait_nodes([1, 2, 3, 7], on=[1, 2, 3, 7])

        # 2: remove a node; the command blocks until the leave completed.
        result = run_cli(["--leave-id", "7", "--leave-via", "localhost:28004"], tmp_path)
        assert result.returncode == 0, result.stderr
        assert "node 7 left the cluster" in result.stdout
        assert nodes_on(1) == expected([1, 2, 3])  # at once: the leave was applied
        assert procs[7].wait(30) == 0  # the removed node exits by itself
        assert "removed from the cluster" in logs(7)
        wait_nodes([1, 2, 3], on=[2, 3])

        # Removing a node that is not a member says so and succeeds.
        again = run_cli(["--leave-id", "7", "--leave-via", "localhost:28203"], tmp_path)
        assert again.returncode == 0 and "was not a member" in again.stdout

        # A restarted member skips join (its committed membership has it).
        assert procs[2].stop() == 0
        start(2)
        wait_nodes([1, 2, 3], on=[2])
        assert "already a member: join skipped" in logs(2)
    finally:
        for proc in procs.values():
            proc.stop()
