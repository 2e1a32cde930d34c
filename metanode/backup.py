"""Offline export and import of a data dir (`metanode export` / `metanode import`).

Blocking code, no trio; the node owning the dir must be stopped (the storage's dir
lock refuses a dir in use with a `ConfigError`).

- `read_state(raft_dir)`: rebuild the applied state exactly as a node does at start
  (restore the snapshot, then apply the committed entries after it in order) and
  return it as an `ExportedState` whose ``kv`` is the live state machine's items.
- `write_state(raft_dir, exported, ...)`: build a new data dir whose snapshot at
  LogId(1, 1) holds exactly the exported keys and seq, the initial cluster's node
  records and membership, hard state term 1 commit 1, and the node meta. Every member
  imported from the same file with the same initial cluster gets the same log, so
  they start as a cluster without `single` or `join`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path

import msgpack

from metanode.errors import ConfigError, FatalError
from metanode.exportfmt import ExportedState
from metanode.raft.types import EntryKind, HardState, LogId, Membership, Snapshot, SnapshotMeta
from metanode.sm import SNAPSHOT_FORMAT, SNAPSHOT_LIST_VERSION, KVStateMachine
from metanode.sm.codec import DecodeError, decode_command
from metanode.storage import NodeMeta, RaftStorage

IMPORT_LOG_ID = LogId(1, 1)


def read_state(raft_dir: str | Path) -> tuple[ExportedState, KVStateMachine]:
    """The applied state of `raft_dir` (the export's content) and the state machine.

    Raises `ConfigError` when the dir is missing, not a data dir or in use;
    `FatalError` when it is damaged (including an undecodable committed entry).
    """
    root = Path(raft_dir)
    if not root.is_dir():
        raise ConfigError(f"--raft-dir: {str(root)!r} is not a directory")
    if not (root / "wal").is_dir():
        raise ConfigError(f"--raft-dir: {str(root)!r} is not a metanode data dir (no wal/)")
    with RaftStorage.open(root) as storage:
        meta = storage.meta
        state = storage.load()
    sm = KVStateMachine()
    applied = LogId(0, 0)
    membership = Membership(())
    if state.snapshot is not None:
        try:
            sm = KVStateMachine.restore(state.snapshot.data)
        except ValueError as e:
            raise FatalError(f"{root}: snapshot {state.snapshot.meta.last_log_id} is unreadable: {e}") from None
        applied = state.snapshot.meta.last_log_id
        membership = state.snapshot.meta.membership
    commit = state.hard_state.commit
    for entry in state.entries:
        if entry.index <= applied.index:
            continue
        if entry.index > commit:
            break
        if entry.kind == EntryKind.NORMAL:
            try:
                logged = decode_command(entry.data)
            except DecodeError as e:
                raise FatalError(f"{root}: committed entry {entry.log_id} is undecodable: {e}") from None
            sm.apply(logged.cmd, logged.time_ms)
        elif entry.kind == EntryKind.MEMBERSHIP and entry.membership is not None:
            membership = entry.membership
        applied = entry.log_id
    exported = ExportedState(
        cluster_id=meta.cluster_id if meta else None,
        cluster_name=meta.cluster_name if meta else None,
        node_id=meta.node_id if meta else None,
        last_applied=applied,
        voters=tuple(sorted(membership.voter_ids)),
        learners=tuple(membership.learners),
        nodes=sm.nodes(),
        seq=sm.last_seq,
        log_time_ms=sm.log_time_ms,
        kv=sm.items(),
    )
    return exported, sm


def build_state_machine(
    exported: ExportedState, initial_cluster: Mapping[int, tuple[str, int]]
) -> KVStateMachine:
    """A state machine holding exactly the exported keys, seq and log time, and one
    node record per initial member (name str(id), the given endpoint, the grpc address
    the export recorded for that id, else None). Raises `ValueError` if invalid."""
    grpc = {i: r.grpc_api_advertise_address for i, r in exported.nodes}
    doc = {
        "format": SNAPSHOT_FORMAT,
        "version": SNAPSHOT_LIST_VERSION,
        "seq": exported.seq,
        "rev": 0,  # watch revisions restart with the restored cluster
        "log_time_ms": exported.log_time_ms,
        "kv": [[k, v.seq, v.data, v.expire_at_ms] for k, v in exported.kv],
        "nodes": [
            [i, str(i), host, port, grpc.get(i)] for i, (host, port) in sorted(initial_cluster.items())
        ],
        "digest": None,  # computed while restoring
    }
    return KVStateMachine.restore(msgpack.packb(doc, use_bin_type=True))


def is_empty_dir(path: Path) -> bool:
    """True when `path` does not exist or is an empty directory."""
    if not path.exists():
        return True
    return path.is_dir() and not any(path.iterdir())


def write_state(
    raft_dir: str | Path,
    exported: ExportedState,
    *,
    node_id: int,
    initial_cluster: Mapping[int, tuple[str, int]],
    cluster_id: str | None = None,
    cluster_name: str | None = None,
) -> KVStateMachine:
    """Write a new data dir from `exported` (see the module doc); returns its state
    machine. `cluster_id`/`cluster_name` default to the export's (a new uuid4 hex /
    "metanode" when it has none).

    Raises `ConfigError` when `raft_dir` is not empty, `node_id` is not in
    `initial_cluster`, or the dir cannot be created; `ValueError` when the exported
    state is inconsistent.
    """
    root = Path(raft_dir)
    if node_id not in initial_cluster:
        raise ConfigError(f"--id: {node_id} is not in --initial-cluster {sorted(initial_cluster)}")
    if not is_empty_dir(root):
        raise ConfigError(f"--raft-dir: {str(root)!r} is not empty: import only into a new or empty dir")
    sm = build_state_machine(exported, initial_cluster)
    cid = cluster_id or exported.cluster_id or uuid.uuid4().hex
    cname = cluster_name or exported.cluster_name or "metanode"
    snapshot = Snapshot(SnapshotMeta(IMPORT_LOG_ID, Membership.of(initial_cluster)), sm.snapshot())
    # The log first, the meta last (as a bootstrap does): a dir without a meta is not
    # taken for an initialized one.
    with RaftStorage.open(root) as storage:
        storage.append(snapshot=snapshot, hard_state=HardState(term=1, vote=None, commit=1))
        storage.save_meta(NodeMeta(node_id, cid, cname, joined_at=0))
    return sm
