"""Log entry payloads: a state-machine command stamped with the leader's clock.

An entry's `data` is `encode_command(cmd, time_ms)`: a `LogCommand` through the one
wire codec. The leader stamps `time_ms` when it proposes; every replica applies the
command at that log time (contract §5: TTL is decided by the leader's clock on the entry).

The hot path: a plain `Upsert` (no `match_seq`) is encoded and decoded by hand, without
the converter (every write crosses both on every replica). The bytes are the
converter's, and the decoder takes only what the strict path accepts; anything else
takes the strict path, with its error messages.
"""

from __future__ import annotations

from typing import Any

import attrs

from metanode.sm.commands import Command, TxnCondition, TxnOp, Upsert
from metanode.sm.types import MatchSeq, NodeRecord
from metanode.wire import (
    DecodeError,
    converter,
    encode,
    pack,
    register_class,
    register_tagged_union,
    structure,
    unpack,
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


_INT64_LIMIT = INT64_MAX + 1
_UPSERT_KEYS = frozenset(("t", "key", "value"))
_UPSERT_OPTIONAL = ("ttl_ms", "expire_at_ms")


def encode_command(cmd: Command, time_ms: int) -> bytes:
    if type(cmd) is Upsert and cmd.match_seq is None and type(time_ms) is int and 0 <= time_ms < _INT64_LIMIT:
        body: dict[str, Any] = {"t": "upsert", "key": cmd.key, "value": cmd.value}
        if cmd.ttl_ms is not None:
            body["ttl_ms"] = cmd.ttl_ms
        if cmd.expire_at_ms is not None:
            body["expire_at_ms"] = cmd.expire_at_ms
        return pack({"time_ms": time_ms, "cmd": body})
    return encode(LogCommand(time_ms, cmd), LogCommand)


def encode_known(cmd: Command, time_ms: int) -> tuple[bytes, tuple[int, Command] | None]:
    """`encode_command(cmd, time_ms)`, and ``(time_ms, cmd)`` when decoding those bytes
    is sure to give back exactly that (`decode_entry_command`: a plain upsert whose
    fields have the exact types the decoder makes), else None. The leader applies
    the entries it proposed from that, without decoding them again
    (metanode/node/driver.py)."""
    data = encode_command(cmd, time_ms)
    if type(time_ms) is not int or not 0 <= time_ms < _INT64_LIMIT:  # (the decoder refuses it)
        return data, None
    if type(cmd) is not Upsert or cmd.match_seq is not None or type(cmd.key) is not str:
        return data, None
    if cmd.value is not None and type(cmd.value) is not bytes:
        return data, None
    for v in (cmd.ttl_ms, cmd.expire_at_ms):
        if v is not None and (type(v) is not int or not INT64_MIN <= v <= INT64_MAX):
            return data, None
    return data, (time_ms, cmd)


def _fast_upsert(doc: Any) -> tuple[int, Upsert] | None:
    """(time_ms, command) of a well-formed plain upsert, or None (then the strict path)."""
    if type(doc) is not dict or len(doc) != 2:
        return None
    time_ms, body = doc.get("time_ms"), doc.get("cmd")  # (with len 2: no other key)
    if type(time_ms) is not int or not 0 <= time_ms < _INT64_LIMIT or type(body) is not dict:
        return None
    if body.get("t") != "upsert":
        return None
    if len(body) == 3:  # the common shape, without a set made each time
        if "key" not in body or "value" not in body:
            return None
    elif not body.keys() - _UPSERT_OPTIONAL == _UPSERT_KEYS:
        return None
    key, value = body["key"], body["value"]
    if type(key) is not str or not (value is None or type(value) is bytes):
        return None
    ttl_ms, expire_at_ms = body.get("ttl_ms"), body.get("expire_at_ms")
    for v in (ttl_ms, expire_at_ms):
        if v is not None and (type(v) is not int or not INT64_MIN <= v <= INT64_MAX):
            return None
    return time_ms, Upsert(key, value, None, ttl_ms, expire_at_ms)


def decode_entry_command(data: bytes) -> tuple[int, Command]:
    """`decode_command` as ``(time_ms, cmd)``, without a `LogCommand` (the apply path)."""
    doc = unpack(data)
    fast = _fast_upsert(doc)
    if fast is not None:
        return fast
    logged: LogCommand = structure(doc, LogCommand)
    return logged.time_ms, logged.cmd


def decode_command(data: bytes) -> LogCommand:
    """Raises `DecodeError` naming what is wrong (an entry from another version, say)."""
    return LogCommand(*decode_entry_command(data))


__all__ = ["DecodeError", "LogCommand", "decode_command", "decode_entry_command", "encode_command", "encode_known"]
