"""Commands replicated through the Raft log and applied by ``KVStateMachine``.

Construction is deliberately permissive (no ``attrs`` validators): a command decoded
from a log entry must always be buildable, so that a bad one reaches
``KVStateMachine.apply`` and is turned into a deterministic ``ApplyError`` on every
replica. Each command has ``validate()``, which raises ``ValueError`` with a clear
message; the API layer calls it before proposing, and ``apply`` calls it again.

Adding a command kind: define it here with a ``TAG`` and a
``validate()``, add it to ``Command`` and ``COMMAND_TYPES``, and add one ``case`` to
``KVStateMachine._dispatch``; `metanode.sm.codec` puts it on the wire.
"""

from __future__ import annotations

from typing import ClassVar, TypeAlias

import attrs

from metanode.sm.types import MatchSeq, NodeRecord, is_int

MAX_TXN_CONDITIONS = 1000
"""The most conditions a ``Txn`` may carry."""

MAX_TXN_OPS = 1000
"""The most ops a ``Txn`` may carry in each branch (``if_then``, ``else_then``)."""

TXN_TARGETS: tuple[str, ...] = ("seq", "value")
"""What a ``TxnCondition`` compares: the key's seq, or its value bytes."""

TXN_COMPARISONS: tuple[str, ...] = ("==", "!=", "<", "<=", ">", ">=")
"""The comparison operators of a ``TxnCondition``."""


MAX_TIME_MS = 2**62
"""The largest TTL or expiry time accepted (about 146 million years): keeps every time
well inside the signed 64 bits of the wire."""


def validate_key(key: object, what: str = "key") -> None:
    """Raise ``ValueError`` unless ``key`` is a ``str`` that encodes as UTF-8.

    ``what`` names the argument in the message (``"prefix"``, say).

    Keys are ordered by code point, which equals UTF-8 byte order for encodable
    strings; a lone surrogate could not be encoded into a snapshot, so it is refused.
    """
    if not isinstance(key, str):
        raise ValueError(f"{what} must be a str, got {type(key).__name__}")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid UTF-8: {key!r}") from e


@attrs.frozen
class Upsert:
    """Insert, update or delete one key (contract §5 ``upsert``).

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
        key = self.key
        if type(key) is not str or not key.isascii():  # (an ASCII str encodes: the common case, checked in O(1))
            validate_key(key)
        if self.value is not None and not isinstance(self.value, bytes):
            raise ValueError(f"value must be bytes or None, got {type(self.value).__name__}")
        if self.match_seq is not None and not isinstance(self.match_seq, MatchSeq):
            raise ValueError(
                f"match_seq must be a MatchSeq or None, got {type(self.match_seq).__name__}"
            )
        if self.ttl_ms is None and self.expire_at_ms is None:
            return
        if self.ttl_ms is not None and self.expire_at_ms is not None:
            raise ValueError("ttl_ms and expire_at_ms are mutually exclusive; give at most one")
        for name in ("ttl_ms", "expire_at_ms"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or not 0 <= v <= MAX_TIME_MS):
                raise ValueError(f"{name} must be an int in 0..{MAX_TIME_MS}, got {v!r}")

    def expire_at(self, log_time_ms: int) -> int | None:
        """The absolute expiry of the written value when applied at ``log_time_ms``."""
        if self.ttl_ms is not None:
            return min(log_time_ms + self.ttl_ms, MAX_TIME_MS)
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
        if not is_int(self.node_id) or self.node_id < 0:
            raise ValueError(f"node id must be an int >= 0, got {self.node_id!r}")
        if not isinstance(self.record, NodeRecord):
            raise ValueError("record must be a NodeRecord")
        self.record.validate()


@attrs.frozen
class RemoveNode:
    """Forget the record of a node that left the cluster."""

    TAG: ClassVar[str] = "remove_node"
    node_id: int

    def validate(self) -> None:
        if not is_int(self.node_id) or self.node_id < 0:
            raise ValueError(f"node id must be an int >= 0, got {self.node_id!r}")


# ---------------------------------------------------------------------------- txn


@attrs.frozen
class TxnCondition:
    """One condition of a ``Txn``: ``<target of key> <op> <operand>``.

    - ``target="seq"``: the key's current seq (0 when absent or expired) compared
      with ``operand``, a non-negative ``int``.
    - ``target="value"``: the key's value bytes compared with ``operand``, ``bytes``,
      lexicographically byte by byte (as Rust compares ``Vec<u8>``). When the key is
      absent (or expired) there is no value to compare: the condition is **false for
      every op except** ``"!="``, which is true (an absent value differs from any
      bytes). databend-meta makes every value condition on an absent key false,
      ``!=`` included; this is a deliberate departure. Use a seq condition
      (``seq == 0``) to test for absence.
    - ``op``: one of ``TXN_COMPARISONS`` (``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``).
    """

    key: str
    target: str
    op: str
    operand: int | bytes

    def validate(self) -> None:
        validate_key(self.key)
        if self.target not in TXN_TARGETS:
            raise ValueError(f"target must be 'seq' or 'value', got {self.target!r}")
        if self.op not in TXN_COMPARISONS:
            raise ValueError(f"op must be one of {', '.join(TXN_COMPARISONS)}; got {self.op!r}")
        if self.target == "seq":
            if not is_int(self.operand) or not 0 <= self.operand < 2**63:
                raise ValueError(
                    f"a seq condition needs an int operand in [0, 2**63), got {self.operand!r}"
                )
        elif not isinstance(self.operand, bytes):
            raise ValueError(
                f"a value condition needs a bytes operand, got {type(self.operand).__name__}"
            )

    def __str__(self) -> str:
        return f"{self.target}({self.key!r}) {self.op} {self.operand!r}"


@attrs.frozen
class TxnPut:
    """Txn op: write ``value`` to ``key``, as ``Upsert`` with a non-``None`` value does."""

    TAG: ClassVar[str] = "put"
    key: str
    value: bytes
    match_seq: MatchSeq | None = None
    ttl_ms: int | None = None
    expire_at_ms: int | None = None

    def as_upsert(self) -> Upsert:
        return Upsert(self.key, self.value, self.match_seq, self.ttl_ms, self.expire_at_ms)

    def validate(self) -> None:
        if not isinstance(self.value, bytes):
            raise ValueError(f"value must be bytes, got {type(self.value).__name__}")
        self.as_upsert().validate()


@attrs.frozen
class TxnGet:
    """Txn op: read ``key`` (seeing the writes of earlier ops of the same txn)."""

    TAG: ClassVar[str] = "get"
    key: str

    def validate(self) -> None:
        validate_key(self.key)


@attrs.frozen
class TxnDelete:
    """Txn op: delete ``key``, as ``Upsert(key, None, match_seq)`` does."""

    TAG: ClassVar[str] = "delete"
    key: str
    match_seq: MatchSeq | None = None

    def as_upsert(self) -> Upsert:
        return Upsert(self.key, None, self.match_seq)

    def validate(self) -> None:
        self.as_upsert().validate()


@attrs.frozen
class TxnDeleteByPrefix:
    """Txn op: delete every live key starting with ``prefix`` (``""``: every key)."""

    TAG: ClassVar[str] = "delete_by_prefix"
    prefix: str

    def validate(self) -> None:
        validate_key(self.prefix, "prefix")


TxnOp: TypeAlias = TxnPut | TxnGet | TxnDelete | TxnDeleteByPrefix
"""One operation of a ``Txn`` branch (a tagged union on the wire)."""

TXN_OP_TYPES: tuple[type[TxnPut], type[TxnGet], type[TxnDelete], type[TxnDeleteByPrefix]] = (
    TxnPut,
    TxnGet,
    TxnDelete,
    TxnDeleteByPrefix,
)
"""The runtime counterpart of ``TxnOp``."""


@attrs.frozen
class Txn:
    """A conditional multi-key transaction (contract §5 ``txn``; databend-meta ``TxnRequest``).

    When every condition holds (an empty ``conditions`` always holds) ``if_then`` runs,
    otherwise ``else_then``. Ops run in order, each seeing the effects of the earlier
    ones; each op behaves exactly like the equivalent separate command at the same log
    time (a put bumps seq as an upsert does, a write already due to expire is removed
    right after its op). The whole txn is one log entry and one ``apply``: it is
    atomic and every op uses that apply's log time for TTLs.

    Validation covers both branches, whichever runs: any invalid condition or op
    rejects the whole txn (``ApplyError``, nothing changes). Limits: at most
    ``MAX_TXN_CONDITIONS`` (1000) conditions and ``MAX_TXN_OPS`` (1000) ops per
    branch; keys and prefixes must be valid UTF-8 ``str`` (as ``Upsert``'s);
    ``conditions``, ``if_then`` and ``else_then`` must be tuples.
    """

    TAG: ClassVar[str] = "txn"
    conditions: tuple[TxnCondition, ...] = ()
    if_then: tuple[TxnOp, ...] = ()
    else_then: tuple[TxnOp, ...] = ()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad part (``if_then[2]: ...``)."""
        if not isinstance(self.conditions, tuple):
            raise ValueError(f"conditions must be a tuple, got {type(self.conditions).__name__}")
        if len(self.conditions) > MAX_TXN_CONDITIONS:
            raise ValueError(
                f"too many conditions: {len(self.conditions)} (at most {MAX_TXN_CONDITIONS})"
            )
        for i, cond in enumerate(self.conditions):
            if not isinstance(cond, TxnCondition):
                raise ValueError(
                    f"conditions[{i}] must be a TxnCondition, got {type(cond).__name__}"
                )
            try:
                cond.validate()
            except ValueError as e:
                raise ValueError(f"conditions[{i}]: {e}") from None
        for name in ("if_then", "else_then"):
            ops = getattr(self, name)
            if not isinstance(ops, tuple):
                raise ValueError(f"{name} must be a tuple, got {type(ops).__name__}")
            if len(ops) > MAX_TXN_OPS:
                raise ValueError(f"too many ops in {name}: {len(ops)} (at most {MAX_TXN_OPS})")
            for i, op in enumerate(ops):
                if not isinstance(op, TXN_OP_TYPES):
                    raise ValueError(f"{name}[{i}]: unknown txn op type {type(op).__name__}")
                try:
                    op.validate()
                except ValueError as e:
                    raise ValueError(f"{name}[{i}] ({op.TAG}): {e}") from None

    def __str__(self) -> str:
        return (
            f"txn {len(self.conditions)} conditions, "
            f"{len(self.if_then)} then / {len(self.else_then)} else ops"
        )


@attrs.frozen
class Tick:
    """Advance the log time only: the leader proposes one when keys are due to expire,
    so expiry happens at a log position on every replica without a client write
    (contract §5: TTL by the leader's clock)."""

    TAG: ClassVar[str] = "tick"

    def validate(self) -> None:
        pass


Command: TypeAlias = Upsert | SetNode | RemoveNode | Txn | Tick
"""Every command kind the state machine applies."""

COMMAND_TYPES: tuple[type, ...] = (Upsert, SetNode, RemoveNode, Txn, Tick)
"""The runtime counterpart of ``Command``, for ``isinstance`` checks."""
