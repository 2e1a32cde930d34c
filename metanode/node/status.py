"""`GET /v1/cluster/status` and the client API's `cluster_status`: databend-meta's
`MetaNodeStatus`, field for field, plus metanode's `cluster_id`.

The shape is documented in docs/reference/admin-api.md. `cluster_status(node)` reads
only local state (no raft round trip) and never blocks:

- log ids are openraft's ``{"leader_id": {"term": T, "node_id": N}, "index": I}``;
  metanode's log does not record which node led each term, so ``node_id`` is the
  leader this node knows for ``T`` when ``T`` is the current term, else 0;
- a node (``leader``, ``voters``, ``non_voters``) is its record as
  ``/v1/cluster/nodes`` lists it; a member whose record this node has not applied yet
  (a moment after a bootstrap or a join) shows its name with ``endpoint: null``,
  so ``int(voter["name"])`` always lists every voter;
- ``raft_log`` describes the in-memory log (``cache_*``: the entries after the purge
  point, all of which metanode keeps in memory) and the WAL segment files
  (``wal_*``; a segment is databend-meta's WAL chunk, named by its file number).
"""

from __future__ import annotations

from typing import Any

from metanode import __version__
from metanode.config import format_address
from metanode.raft import LogId, Role
from metanode.sm import NodeRecord
from metanode.storage import wal

#: The on-disk format this build reads and writes (the WAL format version), named as
#: databend-meta names its data versions.
DATA_VERSION = f"V{wal.FORMAT_VERSION:03d}"

_STATE = {
    Role.LEADER: "Leader",
    Role.FOLLOWER: "Follower",
    Role.CANDIDATE: "Candidate",
    Role.PRE_CANDIDATE: "Candidate",
}


def node_json(record: NodeRecord) -> dict[str, Any]:
    """A node record as ``/v1/cluster/nodes`` shows it."""
    return {
        "name": record.name,
        "endpoint": {"addr": record.endpoint.addr, "port": record.endpoint.port},
        "grpc_api_advertise_address": record.grpc_api_advertise_address,
    }


def cluster_status(node: Any) -> dict[str, Any]:
    """The status document of `node` (a running `metanode.node.node.Node`)."""
    core = node.core
    st = core.status()
    leader = st.leader

    def log_id(lid: LogId | None) -> dict[str, Any] | None:
        if lid is None:
            return None
        owner = leader if leader is not None and lid.term == st.term else 0
        return {"leader_id": {"term": lid.term, "node_id": owner}, "index": lid.index}

    def member(node_id: int) -> dict[str, Any]:
        record = node.sm.node(node_id)
        if record is None and node_id == node.id:
            record = node.record
        if record is None:
            return {"name": str(node_id), "endpoint": None, "grpc_api_advertise_address": None}
        return node_json(record)

    own = node.sm.node(node.id) or node.record
    state = _STATE[st.role]
    if state == "Follower" and not st.membership.is_voter(node.id):
        state = "Learner"
    membership = node.applied_membership
    return {
        "id": node.id,
        "binary_version": f"metanode {__version__}",
        "data_version": DATA_VERSION,
        "endpoint": format_address(own.endpoint.addr, own.endpoint.port),
        "raft_log": raft_log(node),
        "snapshot_key_count": len(node.sm),
        "state": state,
        "is_leader": st.role is Role.LEADER,
        "current_term": st.term,
        "last_log_index": st.last_log_id.index,
        "last_applied": log_id(node.applied),
        "snapshot_last_log_id": log_id(st.snapshot_last_log_id),
        "purged": log_id(st.purged) if st.purged.index else None,
        "leader": member(leader) if leader is not None else None,
        "replication": replication(node, log_id) if st.role is Role.LEADER else None,
        "voters": [member(i) for i in sorted(membership.voter_ids)],
        "non_voters": [member(i) for i in sorted(membership.learners)],
        "last_seq": node.sm.last_seq,
        "cluster_id": node.meta.cluster_id if node.meta is not None else None,
        "state_digest": state_digest(node),
    }


def state_digest(node: Any) -> str:
    """A hash of the KV state at `last_applied` (every key with its seq, value and
    expiry, then `last_seq`), the same on every replica that applied the same log:
    replicas converged when their `last_applied` and `state_digest` are equal. Kept
    up to date by the state machine itself, so a status poll costs O(1)."""
    return node.sm.state_digest()  # type: ignore[no-any-return]


def replication(node: Any, log_id: Any) -> dict[str, Any]:
    """On the leader: every voter and learner (the leader too) -> its matched log id,
    or None when nothing is known to match yet. Keys are node ids as strings (JSON)."""
    core = node.core
    lg = core.log
    members = core.membership.node_ids | core.committed_membership.node_ids | {node.id}
    out: dict[str, Any] = {}
    for peer in sorted(members):
        if peer == node.id:
            matched = lg.last_log_id
        else:
            pr = core.progress.get(peer)
            index = pr.match if pr is not None else 0
            # An entry behind the purge point has no term left in the log: 0.
            matched = LogId(lg.term_at(index) or 0, index)
        out[str(peer)] = log_id(matched) if matched.index else None
    return out


def raft_log(node: Any) -> dict[str, Any]:
    """databend-meta's `RaftLogStatus` from the in-memory log and the WAL segments."""
    lg = node.core.log
    segments = node.storage.wal_segments()
    closed, open_ = segments[:-1], segments[-1:]
    closed_total = sum(size for _, size in closed)
    open_size = sum(size for _, size in open_)
    return {
        "cache_items": len(lg.entries),
        "cache_used_size": lg.data_bytes,
        "wal_total_size": closed_total + open_size,
        "wal_open_chunk_size": open_size,
        # databend-meta counts from the WAL's creation; metanode from its oldest
        # segment still on disk.
        "wal_offset": closed_total + open_size,
        "wal_closed_chunk_count": len(closed),
        "wal_closed_chunk_total_size": closed_total,
        "wal_closed_chunk_sizes": {name: size for name, size in closed},
    }


__all__ = ["DATA_VERSION", "cluster_status", "node_json", "raft_log", "replication", "state_digest"]
