"""The replicated log as one core sees it: entries after the purge point, kept in memory.

The live log is bounded by compaction (`snapshot_logs_since_last`,
`max_applied_log_to_keep`), so the core holds it whole; storage only has to make it
durable. Indexes: `purged` is the id of the last entry removed from the front (or
`0-0`), `entries[i]` has index `purged.index + 1 + i`. `data_bytes` is the sum of
their payload sizes, kept as entries come and go (a status poll reads it: O(1)).
"""

from __future__ import annotations

from metanode.errors import RaftInvariantError
from metanode.raft.types import ZERO_LOG_ID, Entry, LogId, Snapshot


class RaftLog:
    def __init__(self, purged: LogId, entries: list[Entry], commit: int, applied: int) -> None:
        if entries and entries[0].index != purged.index + 1:
            raise RaftInvariantError(
                f"log starts at {entries[0].index} but the purge point is {purged}"
            )
        for a, b in zip(entries, entries[1:]):
            if b.index != a.index + 1 or b.term < a.term:
                raise RaftInvariantError(f"log entries out of order: {a} then {b}")
        self.purged = purged
        self.entries = entries
        self.data_bytes = sum(len(e.data) for e in entries)
        self.stable = self.last_index  # everything handed to us at start is on disk
        self.commit = min(commit, self.last_index)
        self.applied = max(applied, purged.index)
        self.snapshot: Snapshot | None = None

    # -- reading ---------------------------------------------------------------
    @property
    def first_index(self) -> int:
        return self.purged.index + 1

    @property
    def last_index(self) -> int:
        return self.purged.index + len(self.entries)

    @property
    def last_log_id(self) -> LogId:
        return self.entries[-1].log_id if self.entries else self.purged

    def term_at(self, index: int) -> int | None:
        """The term of the entry at `index`, or None when it is purged or absent."""
        if index == self.purged.index:
            return self.purged.term
        pos = index - self.purged.index - 1
        if 0 <= pos < len(self.entries):
            return self.entries[pos].term
        return None

    def entry(self, index: int) -> Entry:
        return self.entries[index - self.purged.index - 1]

    def slice(self, lo: int, hi: int, max_count: int, max_bytes: int) -> list[Entry]:
        """Entries [lo, hi): at most `max_count`, and at least one even if it exceeds
        `max_bytes`."""
        start = lo - self.purged.index - 1
        stop = min(hi - self.purged.index - 1, start + max_count)
        out: list[Entry] = []
        size = 0
        for e in self.entries[start:stop]:
            size += len(e.data) + 32
            if out and size > max_bytes:
                break
            out.append(e)
        return out

    def matches(self, log_id: LogId) -> bool:
        return self.term_at(log_id.index) == log_id.term

    def is_up_to_date(self, other: LogId) -> bool:
        """§3.6.1: a candidate's log is at least as up-to-date as ours."""
        last = self.last_log_id
        return (other.term, other.index) >= (last.term, last.index)

    def first_index_of_term(self, index: int) -> int:
        """The first index of the run of entries sharing the term of `index`."""
        term = self.term_at(index)
        while index - 1 > self.purged.index and self.term_at(index - 1) == term:
            index -= 1
        return index

    def last_index_of_term(self, term: int, upto: int) -> int | None:
        """The last index <= `upto` holding `term`, or None when no entry has it."""
        index = min(upto, self.last_index)
        while index >= self.purged.index:
            t = self.term_at(index)
            if t is None or t < term:
                return None
            if t == term:
                return index
            index -= 1
        return None

    def unstable(self) -> list[Entry]:
        return self.entries[self.stable - self.purged.index :]

    def to_apply(self, max_count: int) -> list[Entry]:
        hi = min(self.commit, self.stable)
        if hi <= self.applied:
            return []
        start = self.applied - self.purged.index
        return self.entries[start : start + min(hi - self.applied, max_count)]

    # -- writing ---------------------------------------------------------------
    def append(self, entries: list[Entry]) -> None:
        """Append entries, cutting any existing suffix from `entries[0].index` on."""
        if not entries:
            return
        first = entries[0].index
        if first > self.last_index + 1 or first <= self.purged.index:
            raise RaftInvariantError(
                f"append at {first} does not fit log {self.first_index}..{self.last_index}"
            )
        if first <= self.commit:
            raise RaftInvariantError(f"truncating committed entry {first} (commit {self.commit})")
        cut = first - self.purged.index - 1
        if cut < len(self.entries):
            self.data_bytes -= sum(len(e.data) for e in self.entries[cut:])
            del self.entries[cut:]
        self.entries.extend(entries)
        self.data_bytes += sum(len(e.data) for e in entries)
        self.stable = min(self.stable, first - 1)

    def stable_to(self, log_id: LogId) -> None:
        if self.matches(log_id) and log_id.index > self.stable:
            self.stable = log_id.index

    def purge(self, upto: int) -> None:
        """Drop entries up to `upto` (only applied ones, behind a snapshot)."""
        if upto <= self.purged.index:
            return
        if upto > self.applied:
            raise RaftInvariantError(f"purging {upto} beyond applied {self.applied}")
        term = self.term_at(upto)
        assert term is not None
        cut = upto - self.purged.index
        self.data_bytes -= sum(len(e.data) for e in self.entries[:cut])
        del self.entries[:cut]
        self.purged = LogId(term, upto)

    def restore(self, snapshot: Snapshot) -> None:
        """Reset to a snapshot received from the leader (§5.1, Figure 5.3): the log is discarded."""
        last = snapshot.meta.last_log_id
        self.purged = last
        self.entries = []
        self.data_bytes = 0
        self.stable = self.commit = self.applied = last.index
        self.snapshot = snapshot

    def __repr__(self) -> str:
        return (
            f"RaftLog(purged={self.purged}, last={self.last_log_id}, stable={self.stable},"
            f" commit={self.commit}, applied={self.applied})"
        )


__all__ = ["RaftLog", "ZERO_LOG_ID"]
