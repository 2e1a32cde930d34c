"""Real processes: what an operator of databend-meta expects around a node's start and
stop (docs/operations/cluster.md, docs/reference/config.md): the banner, an "all
members" join list, --log-level over the file, checks before the data dir is touched,
systemd's READY=1/STOPPING=1, a quick SIGTERM, a removed node restarted. (The unit
file is verified by tests/unit/test_config.py.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from metanode import __version__
from tests.integration.harness import LocalCluster, Proc, run_cli, voter_ids, wait_until, write_config
from tests.net import free_port

pytestmark = pytest.mark.integration



def log_records(root: Path, node_id: int) -> list[dict]:
    path = root / f"logs{node_id}" / f"metanode-{node_id}.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_banner_all_members_join_list_and_log_level_flag(cluster: LocalCluster) -> None:
    root = cluster.root
    for i in (1, 2, 3):
        cluster.ports[i] = (free_port(), free_port(), free_port())
    everyone = [1, 2, 3]
    cluster.add(1, single=True)
    cluster.wait_healthy(1)
    # Nodes 2 and 3 get the same list of all three members: each skips its own address.
    for i in (2, 3):
        raft, admin, grpc = cluster.ports[i]
        cfg = write_config(root / f"node{i}.toml", i, raft, admin, grpc,
                           join=[cluster.raft_address(j) for j in everyone],
                           extra='[log.file]\nlevel = "INFO"', heartbeat_ms=cluster.heartbeat_ms)
        args = ["-c", str(cfg)] + (["--log-level=DEBUG"] if i == 2 else [])
        cluster.procs[i] = Proc(f"node{i}", args, root).start()
        cluster.wait_healthy(i)
    wait_until(lambda: voter_ids(cluster.admin(1).status()) == everyone, 30, "three voters")
    out = cluster.procs[2].output()
    assert f"metanode {__version__}" in out and "node id:     2" in out
    assert f"raft:        listen 127.0.0.1:{cluster.ports[2][0]}" in out
    assert f"admin API:   http://127.0.0.1:{cluster.ports[2][1]}" in out
    assert f"join skips:  {cluster.raft_address(2)}" in out and "data dir:    data2" in out
    assert "log:         file logs2/metanode-2.log (DEBUG, json)" in out
    # --log-level=DEBUG wins over [log.file] level = "INFO"; node 3 keeps INFO.
    assert any(r["level"] == "DEBUG" for r in log_records(root, 2))
    assert not any(r["level"] == "DEBUG" for r in log_records(root, 3))
    # Followers log who the leader is.
    messages = [r["message"] for r in log_records(root, 3)]
    assert any(m.startswith("3: the leader is 1 at ") for m in messages), messages[-20:]
    assert any("skipping" in m and cluster.raft_address(3) in m for m in messages)


@pytest.mark.parametrize("case", ["grpc-port-in-use", "admin-port-in-use", "missing-tls-cert", "join-only-itself"])
def test_bad_starts_exit_2_before_the_data_dir_is_touched(tmp_path: Path, case: str) -> None:
    raft, admin, grpc = free_port(), free_port(), free_port()
    extra, join, single = "", None, True
    busy = None
    if case.endswith("port-in-use"):
        busy = socket.socket()
        busy.bind(("127.0.0.1", grpc if case.startswith("grpc") else admin))
        busy.listen()
    elif case == "missing-tls-cert":
        (tmp_path / "key.pem").write_text("not a key")
        extra = f'admin_tls_server_cert = "{tmp_path / "cert.pem"}"\nadmin_tls_server_key = "{tmp_path / "key.pem"}"'
    else:
        join, single = [f"127.0.0.1:{raft}"], False
    cfg = write_config(tmp_path / "n.toml", 1, raft, admin, grpc, single=single, join=join, extra=extra)
    try:
        result = run_cli(["-c", str(cfg)], tmp_path, timeout=30)
    finally:
        if busy is not None:
            busy.close()
    key = {
        "grpc-port-in-use": "grpc_api_address:", "admin-port-in-use": "admin_api_address:",
        "missing-tls-cert": "admin_tls_server_cert:", "join-only-itself": "raft_config.join:",
    }[case]
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"metanode: error: {key}"), result.stderr
    assert not (tmp_path / "data1").exists(), "nothing written to the data dir"


def test_systemd_ready_and_stopping_and_a_quick_sigterm(tmp_path: Path) -> None:
    """Under NOTIFY_SOCKET (here in the abstract namespace) READY=1 comes once the node
    is ready, STOPPING=1 at SIGTERM; an idle node exits 0 well within 2.5 s."""
    name = f"@metanode-notify-{os.getpid()}-{free_port()}"
    raft, admin, grpc = free_port(), free_port(), free_port()
    cfg = write_config(tmp_path / "n.toml", 1, raft, admin, grpc, single=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name[1:])
        sock.settimeout(20)
        proc = Proc("notified", ["-c", str(cfg)], tmp_path, env={"NOTIFY_SOCKET": name}).start()
        try:
            ready = sock.recv(4096).decode()
            assert ready.splitlines()[0] == "READY=1", ready
            assert httpx_health(admin) == 200, "READY=1 and /v1/health follow one rule"
            time.sleep(0.5)  # idle
            started = time.monotonic()
            assert proc.stop(signal.SIGTERM, timeout=10) == 0
            took = time.monotonic() - started
            assert sock.recv(4096) == b"STOPPING=1"
        finally:
            proc.stop(signal.SIGKILL)
    print(f"idle node exited {took:.3f} s after SIGTERM")
    assert took < 2.5


def httpx_health(admin_port: int) -> int:
    import httpx

    return httpx.get(f"http://127.0.0.1:{admin_port}/v1/health", timeout=5).status_code


def test_a_removed_node_restarted_says_so_and_exits_0(cluster: LocalCluster) -> None:
    cluster.add(1, single=True)
    cluster.wait_healthy(1)
    cluster.add(2, join=[1])
    cluster.wait_healthy(2)
    result = run_cli(["--leave-id", "2", "--leave-via", cluster.raft_address(1)], cluster.root)
    assert result.returncode == 0, result.stderr
    assert cluster.procs[2].wait(30) == 0
    assert "metanode: node 2 was removed from the cluster" in cluster.procs[2].output()
    # Started again on its old data dir and config (with its join list): it stays out.
    cluster.restart(2)
    assert cluster.procs[2].wait(30) == 0
    again = cluster.procs[2].output().split(f"metanode {__version__}")[-1]
    assert "node 2 was removed from the cluster" in again and "empty raft_dir" in again, again
    assert voter_ids(cluster.admin(1).status()) == [1]
