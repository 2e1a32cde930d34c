"""What a leader knows about each follower's log (etcd's Progress; thesis §3.5, §10.2)."""

from __future__ import annotations

import enum
from collections import deque

from metanode.raft.types import Snapshot


class ProgressState(enum.Enum):
    PROBE = "probe"  # one append in flight until the follower answers: find the match
    REPLICATE = "replicate"  # optimistic: stream entries, up to `max_inflight` messages
    SNAPSHOT = "snapshot"  # the follower is behind the purged log: send a snapshot


class Progress:
    __slots__ = (
        "match",
        "next",
        "state",
        "probe_sent",
        "inflight",
        "recent_active",
        "read_acked",
        "snapshot",
        "snap_offset",
        "snap_idle_ticks",
        "snap_resent",
        "stalled_heartbeats",
        "acked_before",
        "tell_lost",
    )

    def __init__(self, next_index: int) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.inflight: deque[int] = deque()  # last index of each append in flight
        self.recent_active = False  # heard from within this CheckQuorum period
        self.read_acked = 0  # highest ReadIndex heartbeat round acknowledged
        self.snapshot: Snapshot | None = None
        self.snap_offset = 0
        self.snap_idle_ticks = 0
        self.snap_resent = False  # the current chunk was resent on a heartbeat answer
        self.stalled_heartbeats = 0
        self.acked_before = 0  # its match before its raft stream restarted (it may have lost entries)
        self.tell_lost = 0  # tell it, in the next append, that it acknowledged up to here

    def become_probe(self, next_index: int) -> None:
        self.state = ProgressState.PROBE
        self.next = max(next_index, self.match + 1)
        self.probe_sent = False
        self.inflight.clear()
        self.snapshot = None

    def become_replicate(self) -> None:
        self.state = ProgressState.REPLICATE
        self.next = self.match + 1
        self.probe_sent = False
        self.inflight.clear()

    def become_snapshot(self, snapshot: Snapshot) -> None:
        self.state = ProgressState.SNAPSHOT
        self.snapshot = snapshot
        self.snap_offset = 0
        self.snap_idle_ticks = 0
        self.snap_resent = False  # the current chunk was resent on a heartbeat answer
        self.inflight.clear()

    def acked(self, index: int) -> bool:
        """Record that the follower matches up to `index`; True when that is news."""
        while self.inflight and self.inflight[0] <= index:
            self.inflight.popleft()
        if index > self.match:
            self.match = index
            self.next = max(self.next, index + 1)
            self.stalled_heartbeats = 0
            return True
        return False

    def __repr__(self) -> str:
        return f"Progress({self.state.value} match={self.match} next={self.next} inflight={len(self.inflight)})"
