"""Plain data of the consensus core: log ids, entries, membership, hard state, snapshots.

Everything here is immutable (`attrs.frozen`) and pure. Reference: the Raft thesis
(Ongaro 2014); sections are cited where a rule lives.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

import attrs


@attrs.frozen(order=True)
class LogId:
    """Identifies a log entry: the term it was created in and its index (§3.5)."""

    term: int
    index: int

    def __str__(self) -> str:
        return f"{self.term}-{self.index}"


ZERO_LOG_ID = LogId(0, 0)


class EntryKind(enum.IntEnum):
    NOOP = 0  # appended by every new leader (§6.4: commit an entry of its own term)
    NORMAL = 1  # opaque application command
    MEMBERSHIP = 2  # a cluster configuration (§4.3 joint consensus)


def _sorted_ids(ids: Iterable[int]) -> tuple[int, ...]:
    return tuple(sorted(set(ids)))


def _sorted_configs(cs: Iterable[Iterable[int]]) -> tuple[tuple[int, ...], ...]:
    return tuple(_sorted_ids(c) for c in cs)


@attrs.frozen
class Membership:
    """A cluster configuration: one voter set, or two during joint consensus (§4.3).

    `configs` holds C_old and C_new while joint, only C_new otherwise. `learners`
    receive the log but never vote or count for a quorum; they are disjoint from
    every voter set.
    """

    configs: tuple[tuple[int, ...], ...] = attrs.field(converter=_sorted_configs)
    learners: tuple[int, ...] = attrs.field(default=(), converter=_sorted_ids)

    def __attrs_post_init__(self) -> None:
        if len(self.configs) > 2:
            raise ValueError(f"a membership has 1 or 2 voter sets, got {len(self.configs)}")
        overlap = set(self.learners) & self.voter_ids
        if overlap:
            raise ValueError(f"nodes {sorted(overlap)} are both learners and voters")

    @classmethod
    def of(cls, voters: Iterable[int], learners: Iterable[int] = ()) -> Membership:
        return cls((tuple(voters),), tuple(learners))

    @property
    def is_joint(self) -> bool:
        return len(self.configs) == 2

    @property
    def voter_ids(self) -> frozenset[int]:
        """Every node that votes in any of the configurations."""
        return frozenset(i for c in self.configs for i in c)

    @property
    def node_ids(self) -> frozenset[int]:
        return self.voter_ids | frozenset(self.learners)

    @property
    def final_voters(self) -> tuple[int, ...]:
        """C_new: the voter set this membership is heading to."""
        return self.configs[-1] if self.configs else ()

    def is_voter(self, node_id: int) -> bool:
        return any(node_id in c for c in self.configs)

    def is_quorum(self, ids: Iterable[int]) -> bool:
        """True when `ids` hold a majority of every configuration (§4.3)."""
        got = set(ids)
        if not self.configs:
            return False
        return all(c and 2 * len(got.intersection(c)) > len(c) for c in self.configs)

    def committed_index(self, matched: Mapping[int, int]) -> int:
        """The highest index stored on a majority of every configuration (§4.3)."""
        result: int | None = None
        for config in self.configs:
            if not config:
                continue
            indexes = sorted((matched.get(i, 0) for i in config), reverse=True)
            quorum_index = indexes[len(config) // 2]
            result = quorum_index if result is None else min(result, quorum_index)
        return 0 if result is None else result

    def finalized(self) -> Membership:
        """The configuration after leaving the joint state: C_new only."""
        return Membership((self.final_voters,), self.learners)

    def __str__(self) -> str:
        voters = "&".join("{" + ",".join(map(str, c)) + "}" for c in self.configs)
        if self.learners:
            return f"{voters}+learners{{{','.join(map(str, self.learners))}}}"
        return voters


EMPTY_MEMBERSHIP = Membership(())


@attrs.frozen
class Entry:
    """One log entry. `data` is opaque to the core (an encoded state-machine command)."""

    term: int
    index: int
    kind: EntryKind = EntryKind.NORMAL
    data: bytes = b""
    membership: Membership | None = None

    @property
    def log_id(self) -> LogId:
        return LogId(self.term, self.index)

    def __str__(self) -> str:
        if self.kind == EntryKind.MEMBERSHIP:
            return f"{self.term}-{self.index}:conf{self.membership}"
        if self.kind == EntryKind.NOOP:
            return f"{self.term}-{self.index}:noop"
        return f"{self.term}-{self.index}:{len(self.data)}B"


@attrs.frozen
class HardState:
    """What must be on disk before a vote is granted or an append acknowledged (§3.8)."""

    term: int = 0
    vote: int | None = None
    commit: int = 0


@attrs.frozen
class SnapshotMeta:
    """The last log id covered by a snapshot and the membership as of that entry (§5.1)."""

    last_log_id: LogId
    membership: Membership


@attrs.frozen
class Snapshot:
    meta: SnapshotMeta
    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")


@attrs.frozen
class PersistedState:
    """What a node finds on disk when it starts: the input of `RaftCore`."""

    hard_state: HardState = HardState()
    snapshot: Snapshot | None = None
    entries: tuple[Entry, ...] = ()
    purged: LogId = ZERO_LOG_ID  # the id of the entry just before entries[0]


def bootstrap_state(voters: Iterable[int], learners: Iterable[int] = ()) -> PersistedState:
    """The state of a freshly initialized cluster: one committed membership entry.

    Every initial member starts from the same entry 1 at term 1, so their logs agree.
    """
    entry = Entry(1, 1, EntryKind.MEMBERSHIP, b"", Membership.of(voters, learners))
    return PersistedState(HardState(term=1, vote=None, commit=1), None, (entry,))
