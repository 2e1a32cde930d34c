"""Log entry payloads: a state-machine command stamped with the leader's clock.

An entry's `data` is `encode_command(cmd, time_ms)`: a `LogCommand` through the one
wire codec. The leader stamps `time_ms` when it proposes; every replica applies the
command at that log time (contract §5: TTL is decided by the leader's clock on the entry).
"""

from __future__ import annotations

from typing import Any

import attrs

from metanode.sm.commands import Command, TxnCondition, TxnOp
from metanode.sm.types import MatchSeq, NodeRecord
from metanode.wire import (
    DecodeError,
    converter,
    decode,
    encode,
    register_class,
    register_tagged_union,
)
from metanode.wire.codec import INT64_MAX, INT64_MIN


def _structure_int_or_bytes(value: Any, _: Any) -> int | bytes:
    """`TxnCondition.operand`: exactly an int (64-bit) or bytes; `Txn.validate` checks
    that it suits the target."""
    if type(value) is bytes:
        return value
    if type(value) is int:
        if not INT64_MIN <= value <= INT64_MAX:
            raise ValueError(f"integer {value} does not fit in 64 bits (signed)")
        return value
    raise TypeError(f"expected an int or bytes, got {type(value).__name__} {value!r:.40}")


# Order matters: hooks are captured when a class or union is first used, so members
# are registered before the unions holding them (MatchSeq and TxnCondition before the
# op union, the op union before the command union that holds Txn).
converter.register_structure_hook_func(lambda t: t == int | bytes, _structure_int_or_bytes)
register_class(MatchSeq, unsigned=True)
register_class(NodeRecord)
register_class(TxnCondition)
register_tagged_union(TxnOp, name="txn op")
register_tagged_union(Command, name="state machine command")


@attrs.frozen
class LogCommand:
    time_ms: int
    cmd: Command


register_class(LogCommand, unsigned=True)


def encode_command(cmd: Command, time_ms: int) -> bytes:
    return encode(LogCommand(time_ms, cmd), LogCommand)


def decode_command(data: bytes) -> LogCommand:
    """Raises `DecodeError` naming what is wrong (an entry from another version, say)."""
    return decode(data, LogCommand)


__all__ = ["DecodeError", "LogCommand", "decode_command", "encode_command"]
