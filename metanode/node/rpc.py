"""Payloads of the calls nodes (and the leave CLI) make on the raft port (contract §3, §7).

A `Call` carries a method name and an opaque payload; these are the payloads, put on
the wire by the one codec. `join` and `leave` are answered by the leader (a follower
forwards them); `write` proposes a state-machine command on the leader.
"""

from __future__ import annotations

import attrs

from metanode.sm import Change, Command, NodeRecord, TxnReply, TxnResponse
from metanode.sm import codec as _sm_codec  # registers the command union first
from metanode.wire import decode, encode, register_class, register_tagged_union

JOIN = "join"
LEAVE = "leave"
WRITE = "write"
READ = "read"
WRITE_BATCH = "write_batch"
MEMBERS = "members"


@attrs.frozen
class JoinRequest:
    """`cluster_id` is the joiner's (None: an empty data dir); `promote` asks to become
    a voter (the second step of a join, once the joiner accepts the leader's appends)."""

    node_id: int
    record: NodeRecord
    learner: bool = False
    cluster_id: str | None = None
    promote: bool = False


@attrs.frozen
class NodeAddress:
    node_id: int
    address: str  # "host:port" of its raft port


@attrs.frozen
class JoinReply:
    """`members`: the raft addresses of the nodes with records; `member_ids`: the ids
    of the leader's membership, the only senders a node without one accepts;
    `joined_at`: the log index of that membership, which holds the joiner (None from
    an older leader)."""

    cluster_id: str
    members: tuple[NodeAddress, ...]
    member_ids: tuple[int, ...] = ()
    joined_at: int | None = None


@attrs.frozen
class MembersRequest:
    """Which ids are members? Asked of a member of our log about senders we dropped."""


@attrs.frozen
class MembersReply:
    member_ids: tuple[int, ...]


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
    """`change` is the result of an upsert, `txn` of a transaction; `message` the
    ApplyError's when not ok."""

    ok: bool
    message: str = ""
    change: Change | None = None
    txn: TxnReply | None = None
    code: str = ""  # the error's code when not ok (bad_request for an ApplyError)


@attrs.frozen
class WriteBatchRequest:
    """Commands proposed as one batch on the leader (one log append)."""

    cmds: tuple[Command, ...]


@attrs.frozen
class WriteBatchReply:
    replies: tuple[WriteReply, ...]


@attrs.frozen
class ReadRequest:
    """Ask the leader for a read index (ReadIndex from a follower, §6.4)."""


@attrs.frozen
class ReadReply:
    index: int  # the follower may read once it applied this index


register_tagged_union(TxnResponse, name="txn response")
for _cls in (
    JoinRequest, NodeAddress, JoinReply, MembersRequest, MembersReply, LeaveRequest, LeaveReply,
    WriteRequest, WriteReply, WriteBatchRequest, WriteBatchReply, ReadRequest, ReadReply,
):
    register_class(_cls)
del _sm_codec

__all__ = [
    "JOIN",
    "LEAVE",
    "MEMBERS",
    "READ",
    "WRITE",
    "WRITE_BATCH",
    "JoinReply",
    "JoinRequest",
    "LeaveReply",
    "LeaveRequest",
    "MembersReply",
    "MembersRequest",
    "NodeAddress",
    "ReadReply",
    "ReadRequest",
    "WriteBatchReply",
    "WriteBatchRequest",
    "WriteReply",
    "WriteRequest",
    "decode",
    "encode",
]
