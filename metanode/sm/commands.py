"""Commands replicated through the Raft log and applied by ``KVStateMachine``.

Construction is deliberately permissive (no ``attrs`` validators): a command decoded
from a log entry must always be buildable, so that a bad one reaches
``KVStateMachine.apply`` and is turned into a deterministic ``ApplyError`` on every
replica. Each command has ``validate()``, which raises ``ValueError`` with a clear
message; the API layer calls it before proposing, and ``apply`` calls it again.

Adding a command kind (``Txn``, ...): define it here with a ``TAG`` and a
``validate()``, add it to ``Command`` and ``COMMAND_TYPES``, and add one ``case`` to
``KVStateMachine._dispatch``; `metanode.sm.codec` puts it on the wire.
"""

from __future__ import annotations

from typing import ClassVar, TypeAlias

import attrs

from metanode.sm.types import MatchSeq, NodeRecord, is_int


def validate_key(key: object) -> None:
    """Raise ``ValueError`` unless ``key`` is a ``str`` that encodes as UTF-8.

    Keys are ordered by code point, which equals UTF-8 byte order for encodable
    strings; a lone surrogate could not be encoded into a snapshot, so it is refused.
    """
    if not isinstance(key, str):
        raise ValueError(f"key must be a str, got {type(key).__name__}")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"key is not valid UTF-8: {key!r}") from e


@attrs.frozen
class Upsert:
    """Insert, update or delete one key (SPEC §5 ``upsert``).

    - ``value``: the new bytes, or ``None`` to delete the key.
    - ``match_seq``: ``None`` (any) or a ``MatchSeq``; on a mismatch nothing changes.
    - ``ttl_ms``: lifetime relative to the log time at which the command is applied.
    - ``expire_at_ms``: absolute expiry in log time. At most one of the two may be set.

    A write replaces the key's expiry: an upsert without TTL makes the key permanent.
    A delete ignores ``ttl_ms``/``expire_at_ms`` (as databend-meta does), but they must
    still be well-formed.
    """

    TAG: ClassVar[str] = "upsert"
    key: str
    value: bytes | None
    match_seq: MatchSeq | None = None
    ttl_ms: int | None = None
    expire_at_ms: int | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` describing the first problem, if any."""
        validate_key(self.key)
        if self.value is not None and not isinstance(self.value, bytes):
            raise ValueError(f"value must be bytes or None, got {type(self.value).__name__}")
        if self.match_seq is not None and not isinstance(self.match_seq, MatchSeq):
            raise ValueError(
                f"match_seq must be a MatchSeq or None, got {type(self.match_seq).__name__}"
            )
        if self.ttl_ms is not None and self.expire_at_ms is not None:
            raise ValueError("ttl_ms and expire_at_ms are mutually exclusive; give at most one")
        for name in ("ttl_ms", "expire_at_ms"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 0):
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")

    def expire_at(self, log_time_ms: int) -> int | None:
        """The absolute expiry of the written value when applied at ``log_time_ms``."""
        if self.ttl_ms is not None:
            return log_time_ms + self.ttl_ms
        return self.expire_at_ms

    def __str__(self) -> str:
        op = "delete" if self.value is None else f"upsert {len(self.value)}B"
        parts = [f"{op} {self.key!r}"]
        if self.match_seq is not None:
            parts.append(f"match={self.match_seq}")
        if self.ttl_ms is not None:
            parts.append(f"ttl={self.ttl_ms}")
        if self.expire_at_ms is not None:
            parts.append(f"exp={self.expire_at_ms}")
        return " ".join(parts)


@attrs.frozen
class SetNode:
    """Publish (or re-publish, when its addresses changed) the record of a node."""

    TAG: ClassVar[str] = "set_node"
    node_id: int
    record: NodeRecord

    def validate(self) -> None:
        if not is_int(self.node_id) or self.node_id <= 0:
            raise ValueError(f"node id must be a positive int, got {self.node_id!r}")
        if not isinstance(self.record, NodeRecord):
            raise ValueError("record must be a NodeRecord")
        self.record.validate()


@attrs.frozen
class RemoveNode:
    """Forget the record of a node that left the cluster."""

    TAG: ClassVar[str] = "remove_node"
    node_id: int

    def validate(self) -> None:
        if not is_int(self.node_id) or self.node_id <= 0:
            raise ValueError(f"node id must be a positive int, got {self.node_id!r}")


Command: TypeAlias = Upsert | SetNode | RemoveNode
"""Every command kind the state machine applies."""

COMMAND_TYPES: tuple[type, ...] = (Upsert, SetNode, RemoveNode)
"""The runtime counterpart of ``Command``, for ``isinstance`` checks."""
