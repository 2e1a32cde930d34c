"""Real processes: the operator subcommands as a shell runs them (docs/reference/cli.md):
Ctrl-C on `kv watch`, and the online backup `metanode export --addr` of a running
cluster restored by `metanode import`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import LocalCluster, run_cli, wait_until

pytestmark = pytest.mark.integration


def test_ctrl_c_ends_kv_watch_without_a_traceback(cluster: LocalCluster) -> None:
    cluster.start(1)
    grpc = cluster.client_addresses()[0]
    assert run_cli(["kv", "--addr", grpc, "put", "k", "v"], cluster.root).returncode == 0
    env = dict(os.environ)
    env.pop("METASRV_CONFIG_FILE", None)
    watch = subprocess.Popen(
        [sys.executable, "-m", "metanode", "kv", "watch", "k", "--initial-flush", "--addr", grpc],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cluster.root,
    )
    try:
        assert watch.stdout is not None
        first = json.loads(watch.stdout.readline())  # the initial flush: it is watching
        assert first["key"] == "k" and first["init"] is True
        watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=15)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(10)
    assert watch.returncode == 130 and "Traceback" not in err and err.strip() == "", err


def start_imported(cluster: LocalCluster, node_id: int, raft_dir: str) -> None:
    """Start node `node_id` on an imported `raft_dir` (no single, no join)."""
    from tests.integration.harness import Proc, write_config

    raft, admin, grpc = cluster.ports[node_id]
    cfg = write_config(cluster.root / f"node{node_id}.toml", node_id, raft, admin, grpc,
                       heartbeat_ms=cluster.heartbeat_ms)
    text = cfg.read_text().replace(f'raft_dir = "data{node_id}"', f'raft_dir = "{raft_dir}"')
    cfg.write_text(text)
    cluster.procs[node_id] = Proc(f"node{node_id}", ["-c", str(cfg)], cluster.root).start()
    cluster.wait_healthy(node_id)


def test_online_export_of_a_cluster_under_writes_restores_into_a_new_cluster(cluster: LocalCluster) -> None:
    from metanode.client import SyncMetaClient
    from tests.net import free_port

    cluster.start(3)
    addresses = cluster.client_addresses()
    root = cluster.root
    with SyncMetaClient(addresses) as c:
        for i in range(200):
            c.upsert(f"before/{i:04d}", f"v{i}".encode())
        base = c.get("before/0199").seq  # type: ignore[union-attr]
        # One writer goes on writing new keys, one write (one seq) each, while a
        # follower streams the export.
        writer = subprocess.Popen(
            [sys.executable, "-c", (
                "import sys\nfrom metanode.client import SyncMetaClient\n"
                "with SyncMetaClient(sys.argv[1:]) as c:\n"
                "    for i in range(100000):\n        c.upsert(f'during/{i:06d}', b'x')\n"
            ), *addresses], cwd=root,
        )
        try:
            wait_until(lambda: c.get("during/000050") is not None, 30, "writes under way")
            result = run_cli(["export", "--addr", addresses[1], "-o", "backup.jsonl"], root)
        finally:
            writer.kill()
            writer.wait(10)
    assert result.returncode == 0, result.stderr
    assert "keys, seq" in result.stderr and "-> backup.jsonl" in result.stderr
    lines = [json.loads(line) for line in (root / "backup.jsonl").read_text().splitlines()]
    state = next(line for line in lines if line["type"] == "state")
    keys = {line["key"]: line["seq"] for line in lines if line["type"] == "kv"}
    # One consistent snapshot at one log index: exactly the writes up to its seq.
    during = sorted(k for k in keys if k.startswith("during/"))
    assert len(during) == state["seq"] - base > 50
    assert during == [f"during/{i:06d}" for i in range(len(during))]
    assert max(keys.values()) == state["seq"]
    assert not (root / "backup.jsonl.tmp").exists()
    header = lines[0]
    assert header["node_id"] == 2 and header["last_applied"]["index"] > 0

    # Restored into a new one-node cluster: the same keys with the same seqs.
    cluster.stop_all()
    cluster.ports[9] = (free_port(), free_port(), free_port())
    imported = run_cli(["import", "--raft-dir", "restored", "--id", "9", "-i", "backup.jsonl",
                        "--initial-cluster", f"9={cluster.raft_address(9)}", "--new-cluster-id"], root)
    assert imported.returncode == 0, imported.stderr
    start_imported(cluster, 9, "restored")
    grpc = f"127.0.0.1:{cluster.ports[9][2]}"
    with SyncMetaClient([grpc]) as c:
        items = dict((k, v.seq) for k, v in c.list(""))
        assert items == keys
        assert c.upsert("after", b"1").result.seq == state["seq"] + 1  # type: ignore[union-attr]


def test_export_addr_failures_are_one_line(cluster: LocalCluster) -> None:
    cluster.start(1)
    admin = cluster.admin(1).base.removeprefix("http://")
    for args, needle in (
        (["export", "--addr", admin], "not a WebSocket: is it a client API (grpc_api_address)?"),
        (["export", "--addr", "nonsense"], "--addr"),
        (["export", "--addr", "127.0.0.1:1", "--timeout", "5"], "cannot connect to ws://127.0.0.1:1/v1"),
    ):
        result = run_cli(args, cluster.root)
        err = result.stderr.strip()
        assert result.returncode in (1, 2) and len(err.splitlines()) == 1 and needle in err, (args, err)
        assert "Traceback" not in err


def test_a_databend_metactl_export_moves_to_metanode_with_its_keys_and_seqs(cluster: LocalCluster) -> None:
    from metanode.client import SyncMetaClient
    from tests.net import free_port
    from tests.unit.test_databend_import import export, kv

    root = cluster.root
    lines = export(seq=12, keys=[kv("app/config/timeout", 3, b"30"), kv("app/db/host", 12, b"localhost"),
                                 kv("app/db/port", 2, b"5432", {"expire_at": 4_000_000_000})])
    (root / "databend.jsonl").write_text("\n".join(lines) + "\n")
    cluster.ports[1] = (free_port(), free_port(), free_port())
    result = run_cli(["import", "--format", "databend", "-i", "databend.jsonl", "--raft-dir", "migrated",
                      "--id", "1", "--initial-cluster", f"1={cluster.raft_address(1)}", "--new-cluster-id"], root)
    assert result.returncode == 0, result.stderr
    assert "3 keys, seq 12" in result.stderr
    start_imported(cluster, 1, "migrated")
    with SyncMetaClient(cluster.client_addresses()) as c:
        assert [(k, v.seq, v.data, v.expire_at_ms) for k, v in c.list("app/")] == [
            ("app/config/timeout", 3, b"30", None), ("app/db/host", 12, b"localhost", None),
            ("app/db/port", 2, b"5432", 4_000_000_000_000)]
        assert c.upsert("app/new", b"x").result.seq == 13  # type: ignore[union-attr]
    bad = root / "bad.jsonl"
    bad.write_text(lines[0] + "\nnot json\n")
    result = run_cli(["import", "--format", "databend", "-i", str(bad), "--raft-dir", "other",
                      "--id", "1", "--initial-cluster", "1=127.0.0.1:1"], root)
    assert result.returncode == 1 and result.stderr.startswith(f"metanode import: error: {bad}: line 2: not valid JSON")
    assert not (root / "other").exists()


def test_an_interrupt_caught_in_a_string_eval_still_exits_130(tmp_path: Path) -> None:
    """`python -m metanode` keeps the exit code its main chose (130 for Ctrl-C) even when
    the interrupt ended a string eval() (CPython then kills itself with SIGINT at exit:
    `metanode bench` in CI exited -2 this way)."""
    (tmp_path / "sitecustomize.py").write_text(
        "import metanode.cli\n"
        "def main(argv=None):\n"
        "    try:\n"
        "        exec('raise KeyboardInterrupt', {})\n"
        "    except KeyboardInterrupt:\n"
        "        return 130\n"
        "metanode.cli.main = main\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    proc = subprocess.run([sys.executable, "-m", "metanode", "ver"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
