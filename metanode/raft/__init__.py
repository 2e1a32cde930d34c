"""The pure Raft consensus core: no trio, no sockets, no clock reads, no global random."""

from metanode.raft.core import RaftConfig, RaftCore, ReadState, Ready, Role, Status
from metanode.raft.messages import MESSAGE_TYPES, Message
from metanode.raft.types import (
    EMPTY_MEMBERSHIP,
    ZERO_LOG_ID,
    Entry,
    EntryKind,
    HardState,
    LogId,
    Membership,
    PersistedState,
    Snapshot,
    SnapshotMeta,
    bootstrap_state,
)

__all__ = [
    "EMPTY_MEMBERSHIP",
    "MESSAGE_TYPES",
    "ZERO_LOG_ID",
    "Entry",
    "EntryKind",
    "HardState",
    "LogId",
    "Membership",
    "Message",
    "PersistedState",
    "RaftConfig",
    "RaftCore",
    "ReadState",
    "Ready",
    "Role",
    "Snapshot",
    "SnapshotMeta",
    "Status",
    "bootstrap_state",
]
