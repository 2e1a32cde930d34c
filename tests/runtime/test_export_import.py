"""Export a stopped node's data dir, import it for a new 1-node cluster, start that
node (no single, no join): every key and the seq are the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from metanode import ops
from metanode.node.node import open_node
from metanode.sm import Upsert
from tests.net import until
from tests.runtime.test_node import Ports, config

pytestmark = pytest.mark.runtime


async def test_export_then_import_starts_a_cluster_with_the_same_keys(tmp_path: Path) -> None:
    ports = Ports()
    async with open_node(config(tmp_path / "old", ports, 1, "--single")) as n:
        await until(lambda: n.cluster_status()["is_leader"], "leader")
        for i in range(50):
            await n.propose(Upsert(f"k/{i:03d}", f"v{i}".encode()))
        await n.propose(Upsert("k/010", None))
        await n.propose(Upsert("ttl", b"t", ttl_ms=3_600_000))
        before = list(n.sm.items())
        seq = n.sm.last_seq
    export = tmp_path / "x.jsonl"
    assert await trio.to_thread.run_sync(
        ops.main, ["export", "--raft-dir", str(tmp_path / "old" / "d1"), "-o", str(export)]
    ) == 0
    new_ports = Ports()
    cfg = config(tmp_path / "new", new_ports, 1)
    assert await trio.to_thread.run_sync(
        ops.main,
        ["import", "--raft-dir", cfg.raft_config.raft_dir, "--id", "1", "-i", str(export),
         "--initial-cluster", f"1={new_ports.address(1)}"],
    ) == 0
    async with open_node(cfg) as m:
        await until(lambda: m.cluster_status()["is_leader"], "leader")
        assert list(m.sm.items()) == before
        assert m.sm.last_seq == seq
        assert [v["name"] for v in m.cluster_status()["voters"]] == ["1"]
        await m.propose(Upsert("after", b"x"))
        assert m.sm.get("after").seq == seq + 1  # type: ignore[union-attr]
