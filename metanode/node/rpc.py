"""Payloads of the calls nodes (and the leave CLI) make on the raft port (SPEC §3, §7).

A `Call` carries a method name and an opaque payload; these are the payloads, put on
the wire by the one codec. `join` and `leave` are answered by the leader (a follower
forwards them); `write` proposes a state-machine command on the leader.
"""

from __future__ import annotations

import attrs

from metanode.sm import Command, NodeRecord
from metanode.sm import codec as _sm_codec  # registers the command union first
from metanode.wire import decode, encode, register_class

JOIN = "join"
LEAVE = "leave"
WRITE = "write"


@attrs.frozen
class JoinRequest:
    node_id: int
    record: NodeRecord
    learner: bool = False


@attrs.frozen
class NodeAddress:
    node_id: int
    address: str  # "host:port" of its raft port


@attrs.frozen
class JoinReply:
    cluster_id: str
    members: tuple[NodeAddress, ...]


@attrs.frozen
class LeaveRequest:
    node_id: int


@attrs.frozen
class LeaveReply:
    was_member: bool
    message: str


@attrs.frozen
class WriteRequest:
    cmd: Command


@attrs.frozen
class WriteReply:
    ok: bool
    message: str = ""


for _cls in (JoinRequest, NodeAddress, JoinReply, LeaveRequest, LeaveReply, WriteRequest, WriteReply):
    register_class(_cls)
del _sm_codec

__all__ = [
    "JOIN",
    "LEAVE",
    "WRITE",
    "JoinReply",
    "JoinRequest",
    "LeaveReply",
    "LeaveRequest",
    "NodeAddress",
    "WriteReply",
    "WriteRequest",
    "decode",
    "encode",
]
