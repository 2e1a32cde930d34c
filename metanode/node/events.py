"""What the raft loop is told, and what it answers (docs/architecture/node.md).

The runtime puts these frozen events in the raft loop's inbox; `NodeDriver.handle`
applies them to the core. Requests carry a `req_id`; their outcome comes back as a
`Reply` with the same id (a value, or a `ClientError`), never as a closure. Pure: no
trio, no clock.
"""

from __future__ import annotations

from typing import Any, Union

import attrs

from metanode.raft import Message, Snapshot
from metanode.sm.commands import Command


@attrs.frozen
class Tick:
    """One tick of the node's ticker (heartbeat_interval / 5)."""


@attrs.frozen
class Receive:
    """A raft message from a peer, admitted by the transport."""

    msg: Message


@attrs.frozen
class Propose:
    """Commands to append, each answered once applied (or failed): `items` holds
    (req_id, entry payload) pairs, appended in order in one Ready. `known`, when not
    empty, holds for each item the ``(time_ms, command)`` its payload decodes to, or
    None (`metanode.sm.codec.encode_known`): this node applies its own entry from
    that, without decoding it again."""

    items: tuple[tuple[int, bytes], ...]
    known: tuple[tuple[int, Command] | None, ...] = ()


@attrs.frozen
class ReadIndex:
    """Linearizable reads (§6.4): each req_id is answered with the read index once it
    is safe to read at it."""

    req_ids: tuple[int, ...]


@attrs.frozen
class ChangeMembership:
    req_id: int
    voters: frozenset[int]
    learners: frozenset[int]


@attrs.frozen
class Compact:
    """A snapshot the runtime built and saved: keep it and purge the log to `purge_to`.
    Answered with the index the core purged to."""

    req_id: int
    snapshot: Snapshot
    purge_to: int


@attrs.frozen
class TransferLeader:
    req_id: int
    target: int


@attrs.frozen
class PeerConnected:
    """A peer's raft stream started again (it may have restarted), or a node with an
    empty disk joins under a member's id: count nothing of it until it acknowledges
    again. With a `req_id` (the join's case) it is answered once done."""

    peer: int
    req_id: int = 0


@attrs.frozen
class Trust:
    """Members named by a member of the cluster (a join reply, or the answer about
    senders we dropped)."""

    node_ids: frozenset[int]


Event = Union[Tick, Receive, Propose, ReadIndex, ChangeMembership, Compact, TransferLeader, PeerConnected, Trust]


@attrs.frozen
class Reply:
    """The outcome of the request `req_id`: `error` (a ClientError) or `value`."""

    req_id: int
    value: Any = None
    error: BaseException | None = None


__all__ = [
    "ChangeMembership",
    "Compact",
    "Event",
    "PeerConnected",
    "Propose",
    "ReadIndex",
    "Receive",
    "Reply",
    "Tick",
    "TransferLeader",
    "Trust",
]
