"""The KV state machine (SPEC §5): pure, deterministic, no trio, no clock, no I/O.

``KVStateMachine.apply(cmd, log_time_ms)`` applies committed commands in log order;
``get``/``mget``/``list`` read; ``snapshot``/``restore`` (de)serialize the whole state.
"""

from metanode.sm.commands import COMMAND_TYPES, Command, RemoveNode, SetNode, Upsert, validate_key
from metanode.sm.kv import SNAPSHOT_FORMAT, SNAPSHOT_VERSION, KVStateMachine
from metanode.sm.types import (
    ApplyError,
    ApplyResult,
    Change,
    Endpoint,
    KeyChange,
    MatchSeq,
    NodeRecord,
    NodeUpdate,
    SeqV,
)

__all__ = [
    "COMMAND_TYPES",
    "SNAPSHOT_FORMAT",
    "SNAPSHOT_VERSION",
    "ApplyError",
    "ApplyResult",
    "Change",
    "Endpoint",
    "Command",
    "KVStateMachine",
    "KeyChange",
    "MatchSeq",
    "NodeRecord",
    "NodeUpdate",
    "RemoveNode",
    "SeqV",
    "SetNode",
    "Upsert",
    "validate_key",
]
