"""Messages exchanged between raft cores. Each has a short stable tag (`TAG`) for the wire.

Every message carries the sender's `term`, `src` and `dst`. Reference: thesis §3.4-§3.5
(RequestVote, AppendEntries), §4.2.3 and §9.6 (PreVote), §3.10 (TimeoutNow), §5.1, Figure 5.3
(InstallSnapshot), §6.4 (ReadIndex heartbeats).
"""

from __future__ import annotations

from typing import ClassVar, Union

import attrs

from metanode.raft.types import Entry, LogId, SnapshotMeta


@attrs.frozen
class VoteRequest:
    """RequestVote, or its PreVote probe when `pre_vote` (term is then the *next* term).

    `transfer` marks a campaign started by TimeoutNow: voters then skip the
    disruptive-server check because the old leader asked for it (§3.10, §4.2.3).
    """

    TAG: ClassVar[str] = "vote"
    term: int
    src: int
    dst: int
    last_log_id: LogId
    pre_vote: bool = False
    transfer: bool = False

    def __str__(self) -> str:
        kind = "prevote" if self.pre_vote else "vote"
        return f"{self.src}->{self.dst} {kind} t{self.term} last={self.last_log_id}" + (
            " transfer" if self.transfer else ""
        )


@attrs.frozen
class VoteResponse:
    TAG: ClassVar[str] = "vote_resp"
    term: int
    src: int
    dst: int
    granted: bool
    pre_vote: bool = False

    def __str__(self) -> str:
        kind = "prevote" if self.pre_vote else "vote"
        return f"{self.src}->{self.dst} {kind}_resp t{self.term} {'yes' if self.granted else 'no'}"


@attrs.frozen
class AppendRequest:
    """AppendEntries (§3.5). `commit` is the leader's commit index; `acked`, when not 0,
    tells a follower that came back with a shorter log how far it had acknowledged
    (so it can say it lost acknowledged entries; Raft assumes disks keep them)."""

    TAG: ClassVar[str] = "append"
    term: int
    src: int
    dst: int
    prev_log_id: LogId
    entries: tuple[Entry, ...]
    commit: int
    acked: int = 0

    def __str__(self) -> str:
        if self.entries:
            body = f"[{self.entries[0].index}..{self.entries[-1].index}]"
        else:
            body = "[]"
        return f"{self.src}->{self.dst} append t{self.term} prev={self.prev_log_id} {body} c{self.commit}"


@attrs.frozen
class AppendResponse:
    """Reply to AppendEntries.

    On success `index` is the last index known to match the leader. On rejection
    `index` is the rejected `prev_log_id.index` and (`hint_term`, `hint_index`) tell the
    leader where to retry: the term of the follower's conflicting entry and the first
    index it holds of that term, or `hint_term == 0` and `hint_index` one past the
    follower's last entry (fast back-off, §3.5 last paragraphs).
    """

    TAG: ClassVar[str] = "append_resp"
    term: int
    src: int
    dst: int
    success: bool
    index: int
    hint_term: int = 0
    hint_index: int = 0

    def __str__(self) -> str:
        if self.success:
            return f"{self.src}->{self.dst} append_resp t{self.term} ok {self.index}"
        return (
            f"{self.src}->{self.dst} append_resp t{self.term} reject {self.index}"
            f" hint={self.hint_term}-{self.hint_index}"
        )


@attrs.frozen
class Heartbeat:
    """Leader liveness; `commit` is capped at what the follower matches.

    `ctx` numbers heartbeat rounds: a read waits for a quorum to answer a round that
    started after the read arrived (ReadIndex, §6.4).
    """

    TAG: ClassVar[str] = "hb"
    term: int
    src: int
    dst: int
    commit: int
    ctx: int = 0

    def __str__(self) -> str:
        return f"{self.src}->{self.dst} hb t{self.term} c{self.commit} ctx{self.ctx}"


@attrs.frozen
class HeartbeatResponse:
    TAG: ClassVar[str] = "hb_resp"
    term: int
    src: int
    dst: int
    ctx: int = 0
    commit: int = 0  # the follower's commit index: tells a leader a removed peer knows

    def __str__(self) -> str:
        return f"{self.src}->{self.dst} hb_resp t{self.term} ctx{self.ctx} c{self.commit}"


@attrs.frozen
class SnapshotRequest:
    """One chunk of InstallSnapshot (§5.1, Figure 5.3); `offset` is the chunk's byte position."""

    TAG: ClassVar[str] = "snap"
    term: int
    src: int
    dst: int
    meta: SnapshotMeta
    offset: int
    data: bytes
    done: bool

    def __str__(self) -> str:
        return (
            f"{self.src}->{self.dst} snap t{self.term} last={self.meta.last_log_id}"
            f" @{self.offset}+{len(self.data)}{' done' if self.done else ''}"
        )


@attrs.frozen
class SnapshotResponse:
    """Ack of a chunk of the snapshot ending at `last_log_id`: `next_offset` is the byte
    the follower expects next; `done` once the follower holds everything up to
    `last_log_id` (installed, or already committed)."""

    TAG: ClassVar[str] = "snap_resp"
    term: int
    src: int
    dst: int
    last_log_id: LogId
    next_offset: int
    done: bool = False

    def __str__(self) -> str:
        return (
            f"{self.src}->{self.dst} snap_resp t{self.term} last={self.last_log_id}"
            f" next@{self.next_offset}{' done' if self.done else ''}"
        )


@attrs.frozen
class TimeoutNow:
    """Leadership transfer: start an election now, skipping PreVote (§3.10)."""

    TAG: ClassVar[str] = "timeout_now"
    term: int
    src: int
    dst: int

    def __str__(self) -> str:
        return f"{self.src}->{self.dst} timeout_now t{self.term}"


Message = Union[
    VoteRequest,
    VoteResponse,
    AppendRequest,
    AppendResponse,
    Heartbeat,
    HeartbeatResponse,
    SnapshotRequest,
    SnapshotResponse,
    TimeoutNow,
]

MESSAGE_TYPES: tuple[type, ...] = Message.__args__  # type: ignore[attr-defined]
