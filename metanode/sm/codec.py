"""Log entry payloads: a state-machine command stamped with the leader's clock.

An entry's `data` is `encode_command(cmd, time_ms)`: a `LogCommand` through the one
wire codec. The leader stamps `time_ms` when it proposes; every replica applies the
command at that log time (SPEC §5: TTL is decided by the leader's clock on the entry).
"""

from __future__ import annotations

import attrs

from metanode.sm.commands import Command
from metanode.sm.types import MatchSeq, NodeRecord
from metanode.wire import DecodeError, decode, encode, register_class, register_tagged_union

register_class(MatchSeq, unsigned=True)
register_class(NodeRecord)
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
