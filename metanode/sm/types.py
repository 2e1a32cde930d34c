"""Value types of the KV state machine (contract §5, the databend-meta KV model).

Pure: no I/O, no clock, no randomness. Every type is a frozen ``attrs`` class, so
values compare by content and are safe to share between the state machine, the
apply loop, watchers and clients.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeAlias, TypeGuard

import attrs


def is_int(value: Any) -> TypeGuard[int]:
    """True for a plain ``int`` (``bool`` is excluded although it subclasses ``int``)."""
    return isinstance(value, int) and not isinstance(value, bool)


@attrs.frozen
class SeqV:
    """A stored value with the global ``seq`` of the write that produced it.

    ``expire_at_ms`` is an absolute *log time* in milliseconds (the leader's clock
    stamped on log entries), never a wall-clock reading of the replica. The value is
    dead once the state machine's log time reaches it: ``expire_at_ms <= log_time_ms``.
    """

    seq: int
    data: bytes
    expire_at_ms: int | None = None

    def is_expired(self, log_time_ms: int) -> bool:
        """True when this value is dead at ``log_time_ms``."""
        return self.expire_at_ms is not None and self.expire_at_ms <= log_time_ms

    def __str__(self) -> str:
        ttl = "" if self.expire_at_ms is None else f" exp={self.expire_at_ms}"
        return f"(seq={self.seq} {len(self.data)}B{ttl})"


@attrs.frozen
class MatchSeq:
    """A condition on the current ``seq`` of a key; exactly one field is set.

    - ``MatchSeq(exact=n)``: the current seq equals ``n``; ``exact=0`` means "only if
      the key is absent" (an absent or expired key has seq 0).
    - ``MatchSeq(ge=n)``: the current seq is ``>= n``.

    "Any seq" is written as ``match_seq=None`` on the command, not as a ``MatchSeq``.
    Construction raises ``ValueError`` when both or neither field is set or a field is
    not a non-negative ``int``.
    """

    exact: int | None = None
    ge: int | None = None

    def __attrs_post_init__(self) -> None:
        if (self.exact is None) == (self.ge is None):
            raise ValueError(
                f"MatchSeq needs exactly one of exact= or ge=, got exact={self.exact!r} ge={self.ge!r}"
            )
        value = self.exact if self.exact is not None else self.ge
        if not is_int(value) or value < 0:
            raise ValueError(f"MatchSeq value must be a non-negative int, got {value!r}")

    def matches(self, seq: int) -> bool:
        """True when a key whose current seq is ``seq`` (0 if absent) satisfies this."""
        if self.exact is not None:
            return seq == self.exact
        assert self.ge is not None
        return seq >= self.ge

    def __str__(self) -> str:
        return f"exact:{self.exact}" if self.exact is not None else f"ge:{self.ge}"


@attrs.frozen
class Change:
    """The result of an ``Upsert``: the value before and after the command.

    ``prev`` and ``result`` are ``None`` for an absent key. When ``match_seq`` did not
    match, nothing changed and ``prev == result`` (both the current value). Deleting an
    absent key gives ``Change(None, None)``.
    """

    prev: SeqV | None = None
    result: SeqV | None = None

    @property
    def changed(self) -> bool:
        """True when the command modified the key (every successful write bumps seq)."""
        return self.prev != self.result

    def __str__(self) -> str:
        return f"{self.prev} -> {self.result}"


@attrs.frozen
class ApplyError:
    """A command that is semantically invalid at apply time.

    ``KVStateMachine.apply`` *returns* this instead of raising, so that every replica
    reaches the same verdict at the same log position and none of them crashes. The
    state machine is left exactly as it was (not even the log time advances). The
    node layer hands it back to the proposer, typically as ``BadRequest(message)``.
    """

    message: str

    def __str__(self) -> str:
        return f"error: {self.message}"


@attrs.frozen
class KeyChange:
    """One key modification made by an apply: what a watcher is fed.

    ``prev`` is ``None`` for an insert, ``current`` is ``None`` for a delete (explicit or
    by expiry). A write that bumps seq on an existing key has both set.
    """

    key: str
    prev: SeqV | None
    current: SeqV | None
    # The change's revision: +1 per key change, the same on every replica. Not part of
    # equality: two changes are equal when they change the same key the same way.
    rev: int = attrs.field(default=0, eq=False)

    def __str__(self) -> str:
        return f"#{self.rev} {self.key!r}: {self.prev} -> {self.current}"


@attrs.frozen
class Endpoint:
    """A raft address as the admin API shows it: ``{"addr": "localhost", "port": 28004}``."""

    addr: str
    port: int

    def __str__(self) -> str:
        return f"{self.addr}:{self.port}"


@attrs.frozen
class NodeRecord:
    """What the cluster knows of a node (contract §3), as `/v1/cluster/nodes` lists it."""

    name: str
    endpoint: Endpoint
    grpc_api_advertise_address: str | None = None

    def validate(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("node name must be a non-empty str")
        if not isinstance(self.endpoint, Endpoint):
            raise ValueError("node endpoint must be an Endpoint")
        if not isinstance(self.endpoint.addr, str) or not self.endpoint.addr:
            raise ValueError("node endpoint addr must be a non-empty str")
        if not is_int(self.endpoint.port) or not 0 < self.endpoint.port < 65536:
            raise ValueError(f"node endpoint port must be in 1..65535, got {self.endpoint.port!r}")
        g = self.grpc_api_advertise_address
        if g is not None and not isinstance(g, str):
            raise ValueError("grpc_api_advertise_address must be a str or None")


@attrs.frozen
class NodeUpdate:
    """The result of `SetNode` / `RemoveNode`: the record before and after."""

    node_id: int
    prev: NodeRecord | None
    current: NodeRecord | None


# ---------------------------------------------------------------------------- txn
# One response per op run, in op order; each has the TAG of its op.


@attrs.frozen
class TxnPutResponse:
    """The result of a ``TxnPut``: as ``Change`` (``prev == result`` on a seq mismatch)."""

    TAG: ClassVar[str] = "put"
    key: str
    prev: SeqV | None
    result: SeqV | None


@attrs.frozen
class TxnGetResponse:
    """The result of a ``TxnGet``: the live value at that point of the txn, or ``None``."""

    TAG: ClassVar[str] = "get"
    key: str
    value: SeqV | None


@attrs.frozen
class TxnDeleteResponse:
    """The result of a ``TxnDelete``: as ``Change``.

    ``result`` is ``None`` when the key was deleted or was already absent, and equals
    ``prev`` (the untouched value) on a ``match_seq`` mismatch.
    """

    TAG: ClassVar[str] = "delete"
    key: str
    prev: SeqV | None
    result: SeqV | None

    @property
    def success(self) -> bool:
        """True when this op removed the key (databend-meta's ``success``)."""
        return self.prev is not None and self.result is None


@attrs.frozen
class TxnDeleteByPrefixResponse:
    """The result of a ``TxnDeleteByPrefix``: how many live keys it deleted."""

    TAG: ClassVar[str] = "delete_by_prefix"
    prefix: str
    count: int


TxnResponse: TypeAlias = (
    TxnPutResponse | TxnGetResponse | TxnDeleteResponse | TxnDeleteByPrefixResponse
)
"""The response to one txn op."""


@attrs.frozen
class TxnReply:
    """The result of a ``Txn``: whether every condition held (so ``if_then`` ran,
    else ``else_then`` ran) and one response per op of the branch that ran."""

    success: bool
    responses: tuple[TxnResponse, ...]


ApplyResult: TypeAlias = Change | NodeUpdate | TxnReply | ApplyError | None
"""What ``KVStateMachine.apply`` returns (``None`` for a ``Tick``)."""
