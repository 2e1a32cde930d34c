"""The node's decisions (`metanode.node.driver`) at start, outside the simulator."""

from __future__ import annotations

import random

import msgpack
import pytest

from metanode.errors import FatalError
from metanode.node.driver import NodeDriver
from metanode.raft import RaftConfig, Snapshot
from metanode.raft.types import HardState, LogId, Membership, PersistedState, SnapshotMeta
from metanode.sm import KVStateMachine, Upsert


def _state(data: bytes) -> PersistedState:
    meta = SnapshotMeta(LogId(2, 7), Membership.of([1]))
    return PersistedState(HardState(term=2, commit=7), Snapshot(meta, data), (), LogId(2, 7))


def test_a_snapshot_whose_keys_do_not_match_its_digest_stops_the_node_naming_the_file():
    """A restore that refuses the data dir's snapshot is a fatal error naming it (the
    daemon prints it and exits 1), not a traceback."""
    sm = KVStateMachine()
    sm.apply(Upsert("a", b"1"), 1)
    good = sm.snapshot()
    assert len(NodeDriver(RaftConfig(1), _state(good), random.Random(0)).sm) == 1
    doc = msgpack.unpackb(good, raw=False)
    doc["kv"]["a"] = doc["kv"]["a"][:-1] + b"2"  # the data of its stored value
    with pytest.raises(FatalError, match=r"snapshot 2-7 \(snapshot/snap-2-7.bin\) is unreadable: .*does not match"):
        NodeDriver(RaftConfig(1), _state(msgpack.packb(doc, use_bin_type=True)), random.Random(0))
