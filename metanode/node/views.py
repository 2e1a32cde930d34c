"""What the admin API reads of a node (docs/reference/admin-api.md)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING


from metanode.raft import Role

from metanode.node import status

log = logging.getLogger("metanode.node")

if TYPE_CHECKING:
    from metanode.node.node import Node  # noqa: F401



class Views:
    """A part of `Node` (metanode/node/node.py), by concern."""

    # ------------------------------------------------------------------ views (admin API)
    def config_json(self) -> dict:
        return self.config.redacted()

    def cluster_nodes(self) -> list[dict]:
        members = self.applied_membership.node_ids
        return [
            {
                "name": r.name,
                "endpoint": {"addr": r.endpoint.addr, "port": r.endpoint.port},
                "grpc_api_advertise_address": r.grpc_api_advertise_address,
            }
            for i, r in self.sm.nodes()
            if i in members
        ]

    def cluster_status(self) -> dict:
        return status.cluster_status(self)

    def _leader_json(self, leader: int | None) -> dict | None:
        if leader is None:
            return None
        rec = self.sm.node(leader)
        endpoint = {"addr": rec.endpoint.addr, "port": rec.endpoint.port} if rec else None
        return {"id": leader, "endpoint": endpoint}

    def metrics(self) -> dict[str, float]:
        st = self.core.status()
        return {
            "metanode_raft_term": st.term,
            "metanode_raft_is_leader": float(st.role is Role.LEADER),
            "metanode_raft_leader_id": float(st.leader or 0),
            "metanode_raft_last_log_index": st.last_log_id.index,
            "metanode_raft_commit_index": st.commit,
            "metanode_raft_applied_index": self.applied.index,
            "metanode_raft_voters": len(st.committed_membership.voter_ids),
            "metanode_sm_keys": len(self.sm),
            "metanode_sm_last_seq": self.sm.last_seq,
        }
