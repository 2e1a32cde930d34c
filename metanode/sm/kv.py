"""The KV state machine: databend-meta's KV model (contract §5), pure and deterministic.

``KVStateMachine`` is fed committed log entries in order through
``apply(cmd, log_time_ms)`` and answers local reads. It does no I/O, reads no clock and
uses no randomness: replicas fed the same entries hold the same state and produce the
same snapshot bytes (Reference: Raft thesis §3.5 and §5, replicated state machines).

Time. Each entry carries the *log time* stamped by the leader. The state machine keeps
``log_time_ms = max(previous, given)``, so time never goes backwards, and expiry is
decided by that time only (contract §5: every replica expires the same keys at the same log
position).

Invariant. Between two calls to ``apply`` (and after ``restore``), the map holds no key
that is expired at ``log_time_ms``: ``apply`` removes expired keys before running the
command and again after it (a write whose expiry is already due, e.g. ``ttl_ms=0``,
takes effect, bumps seq, and is then removed in the same apply). Reads therefore hide
expired keys without filtering, and ``len()`` counts live keys.

Indexes. A ``dict`` maps key -> its value as one ``bytes``: seq and expire_at_ms in
16 bytes, then the data; reads hand out ``SeqV``s made from it. Python's cyclic garbage
collector never tracks bytes, so it never tracks the dict either: no collection walks a
million values (as ``SeqV`` objects a full collection took ~125 ms; as tuples, which
the collector tracks until it has seen them, a dict that every write re-tracked was
walked in the next young collection, ~20 ms at 1M keys), and a value costs ~90 bytes
less than a tuple of three. A ``sortedcontainers.SortedList`` of keys makes
prefix listing a bisect plus a walk, with O(log n) insert and delete (a plain ``list``
with ``bisect.insort`` would cost an O(n) memmove per insert at ~1e6 keys); a second
``SortedList`` of ``(expire_at_ms, key)`` holds only keys with an expiry, so expiring is
a walk from its front and never a scan of all keys. Expired keys go in
``(expire_at_ms, key)`` order, which is deterministic.

Snapshots. A snapshot packs the map in its own order (a dict's: by first insertion,
a key removed and written again comes last), and a restore inserts in that order. The
order follows from the writes applied since the machine was empty, or since it
restored a snapshot, so replicas with the same history pack the same bytes; one that
restored a version 1-4 snapshot (a list in key order: after an upgrade) may hold the
same state in another order, and ``state_digest`` is what compares replicas. While a
``SnapshotBuilder`` packs the map in slices, the map stays as it was: writes go to an
overlay (key -> value, ``b""`` for removed; keys new to the map in the order a plain
dict would hold them) that every read consults first, and the keys of the map removed
and written again are noted. When the build ends, the overlay goes into the map, which
is then exactly what the same writes made directly would have left, order included.
``_keys`` and ``_expiry`` are always live.

Watch hook. Every key modification made by an apply, including removals by expiry, is
recorded as a ``KeyChange(key, prev, current)`` in apply order; ``last_changes`` holds
those of the most recent ``apply`` (empty after an ``ApplyError`` or ``restore``). The
apply loop reads it right after each ``apply`` to feed watchers. Keeping only the last
apply's changes bounds memory when nobody is watching.

Errors. ``apply`` never raises for a bad command: it returns ``ApplyError(message)`` and
changes nothing (not even the log time), identically on every replica. Reads raise
``ValueError`` for bad arguments (they are local, not replicated). ``restore`` raises
``ValueError`` for malformed snapshot bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, assert_never

import builtins
import hashlib
import itertools
import struct

import msgpack
from sortedcontainers import SortedList

from metanode.wire.codec import INT64_MAX
from metanode.sm.commands import (
    COMMAND_TYPES,
    MAX_TIME_MS,
    Command,
    RemoveNode,
    SetNode,
    Tick,
    Txn,
    TxnCondition,
    TxnDelete,
    TxnDeleteByPrefix,
    TxnGet,
    TxnOp,
    TxnPut,
    Upsert,
)
from metanode.sm.types import (
    ApplyError,
    ApplyResult,
    Change,
    Endpoint,
    KeyChange,
    NodeRecord,
    NodeUpdate,
    SeqV,
    TxnDeleteByPrefixResponse,
    TxnDeleteResponse,
    TxnGetResponse,
    TxnPutResponse,
    TxnReply,
    TxnResponse,
    is_int,
)

SNAPSHOT_FORMAT = "metanode.sm.kv"
"""The ``format`` field of a snapshot document."""

SNAPSHOT_VERSION = 5
"""The ``version`` field of a snapshot document; bump it when the layout changes.
Version 1 had no ``nodes``, version 2 no ``rev``, version 3 no ``digest``, and versions
1-4 held ``kv`` as a list of ``[key, seq, data, expire_at_ms]`` in key order; all are
still read (``rev`` 0; the digest is then computed while restoring)."""

SNAPSHOT_LIST_VERSION = 4
"""The last version with ``kv`` as a list of ``[key, seq, data, expire_at_ms]`` in key
order: the form documents made by hand (imports) use, checked key by key by
`KVStateMachine.restore`."""

# A stored value (see "Indexes" above): seq and expire_at_ms (-1: none) in 16 bytes,
# then the data. A bytes object, which the cyclic garbage collector never tracks.
_Value = bytes
_VALUE_HEAD = struct.Struct("<Qq")
_HEAD = _VALUE_HEAD.size


def _stored(seq: int, data: bytes, expire_at_ms: int | None) -> _Value:
    return _VALUE_HEAD.pack(seq, -1 if expire_at_ms is None else expire_at_ms) + data


def _fields(v: _Value) -> tuple[int, bytes, int | None]:
    """(seq, data, expire_at_ms) of a stored value."""
    seq, expire = _VALUE_HEAD.unpack_from(v)
    return seq, v[_HEAD:], None if expire < 0 else expire


def _seqv(v: _Value) -> SeqV:
    return SeqV(*_fields(v))


def _expiry_of(v: _Value) -> int | None:
    expire: int = _VALUE_HEAD.unpack_from(v)[1]
    return None if expire < 0 else expire


class KVStateMachine:
    """The replicated KV map with its global ``seq`` counter and log time.

    Create an empty one with ``KVStateMachine()`` or load one with
    ``KVStateMachine.restore(snapshot_bytes)``.
    """

    def __init__(self) -> None:
        self._kv: dict[str, _Value] = {}
        self._keys: SortedList = SortedList()
        self._expiry: SortedList = SortedList()  # (expire_at_ms, key), only keys with a TTL
        self._nodes: dict[int, NodeRecord] = {}  # cluster node records (contract §3)
        self._seq = 0
        self._rev = 0  # key changes so far (watch revisions)
        self._log_time_ms = 0
        self._changes: list[KeyChange] = []  # collects the changes of the running apply
        self._last_changes: tuple[KeyChange, ...] = ()
        # `state_digest`: a sum of per-key hashes, kept up to date by `_write`.
        self._digest = 0
        # While a `SnapshotBuilder` packs `_kv`, which then stays as it was: the writes
        # since, key -> value (b"": removed), and the keys of `_kv` removed and written
        # again since (see "Snapshots" in the module doc).
        self._overlay: dict[str, _Value] | None = None
        self._moved: set[str] = set()

    # ------------------------------------------------------------------ inspection

    @property
    def last_seq(self) -> int:
        """The seq given to the most recent insert or update (0 before any)."""
        return self._seq

    @property
    def rev(self) -> int:
        """The revision of the latest key change (0 before any): watchers resume from it."""
        return self._rev

    @property
    def log_time_ms(self) -> int:
        """The state machine's time: the largest log time applied so far (0 initially)."""
        return self._log_time_ms

    @property
    def last_changes(self) -> tuple[KeyChange, ...]:
        """The key changes made by the most recent ``apply``, in the order made."""
        return self._last_changes

    def __len__(self) -> int:
        """The number of live keys."""
        return len(self._keys)

    def items(self) -> Iterator[tuple[str, SeqV]]:
        """Every live ``(key, SeqV)`` in key order."""
        value = self._reader()
        for key in self._keys:
            yield key, _seqv(value(key))

    def __repr__(self) -> str:
        return (
            f"<KVStateMachine keys={len(self._keys)} last_seq={self._seq} "
            f"log_time_ms={self._log_time_ms}>"
        )

    def next_expiry_ms(self) -> int | None:
        """The earliest `expire_at_ms` of a live key, or None."""
        return self._expiry[0][0] if self._expiry else None

    def nodes(self) -> list[tuple[int, NodeRecord]]:
        """Every published node record, by node id."""
        return sorted(self._nodes.items())

    def node(self, node_id: int) -> NodeRecord | None:
        return self._nodes.get(node_id)

    # ------------------------------------------------------------------ reads

    def _value(self, key: str) -> _Value | None:
        """The stored value of ``key``, or ``None``: the one place reads see a build's
        overlay."""
        overlay = self._overlay
        if overlay is not None:
            v = overlay.get(key)
            if v is not None:
                return v or None
        return self._kv.get(key)

    def _reader(self) -> Callable[[str], _Value]:
        """The stored value of a live key, for walks over ``_keys``."""
        return self._kv.__getitem__ if self._overlay is None else self._value  # type: ignore[return-value]

    def get(self, key: str) -> SeqV | None:
        """The live value of ``key``, or ``None`` if it is absent or expired."""
        v = self._value(key)
        return None if v is None else _seqv(v)

    def mget(self, keys: Iterable[str]) -> list[SeqV | None]:
        """``get`` for each key, in the order given."""
        get = self.get
        return [get(key) for key in keys]

    def list(self, prefix: str, limit: int | None = None) -> list[tuple[str, SeqV]]:
        """Live ``(key, SeqV)`` pairs whose key starts with ``prefix``, in key order.

        At most ``limit`` pairs when ``limit`` is given. Cost: O(log n + returned).
        Raises ``ValueError`` if ``prefix`` is not a ``str`` or ``limit`` is negative.
        """
        if not isinstance(prefix, str):
            raise ValueError(f"prefix must be a str, got {type(prefix).__name__}")
        if limit is not None and (not is_int(limit) or limit < 0):
            raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
        out: list[tuple[str, SeqV]] = []
        if limit == 0:
            return out
        value = self._reader()
        start = self._keys.bisect_left(prefix)
        for key in self._keys.islice(start):
            if not key.startswith(prefix):
                break
            out.append((key, _seqv(value(key))))
            if limit is not None and len(out) >= limit:
                break
        return out

    def range(self, start: str, end: str) -> builtins.list[tuple[str, SeqV]]:
        """Live ``(key, SeqV)`` pairs with ``start <= key < end``, in key order."""
        value = self._reader()
        return [(k, _seqv(value(k))) for k in self._keys.irange(start, end, inclusive=(True, False))]

    # ------------------------------------------------------------------ apply

    def apply(self, cmd: Command, log_time_ms: int) -> ApplyResult:
        """Apply one committed command stamped with the leader's ``log_time_ms``.

        Steps: validate (on failure return ``ApplyError`` and change nothing); advance
        the log time to ``max(log_time_ms, self.log_time_ms)``; remove keys expired at
        that time; run the command; remove keys already expired by the command's own
        writes. Returns the command's result (``Change`` for ``Upsert``, ``NodeUpdate`` for
        ``SetNode``/``RemoveNode``, ``TxnReply`` for ``Txn``). Total and
        deterministic: it never raises because of the command or the log time.
        """
        self._last_changes = ()
        error = self._check(cmd, log_time_ms)
        if error is not None:
            return ApplyError(error)
        self._changes = []
        self._log_time_ms = max(self._log_time_ms, log_time_ms)
        self._expire()
        result = self._dispatch(cmd)
        self._expire()
        self._last_changes = tuple(self._changes)
        self._changes = []
        return result

    @staticmethod
    def _check(cmd: object, log_time_ms: object) -> str | None:
        """The reason ``cmd`` cannot be applied at ``log_time_ms``, or ``None``."""
        if (type(log_time_ms) is not int and not is_int(log_time_ms)) or log_time_ms < 0:
            return f"log time must be a non-negative int, got {log_time_ms!r}"
        if not isinstance(cmd, COMMAND_TYPES):
            return f"unknown command type {type(cmd).__name__}"
        try:
            cmd.validate()  # type: ignore[attr-defined]
        except ValueError as e:
            return f"invalid {type(cmd).__name__.lower()}: {e}"
        return None

    def _dispatch(self, cmd: Command) -> ApplyResult:
        """Run a validated command; one ``case`` per command kind."""
        match cmd:
            case Upsert():
                return self._upsert(cmd)
            case SetNode():
                prev = self._nodes.get(cmd.node_id)
                self._nodes[cmd.node_id] = cmd.record
                return NodeUpdate(cmd.node_id, prev, cmd.record)
            case RemoveNode():
                return NodeUpdate(cmd.node_id, self._nodes.pop(cmd.node_id, None), None)
            case Txn():
                return self._txn(cmd)
            case Tick():
                return None
            case _:
                assert_never(cmd)

    def _txn(self, cmd: Txn) -> TxnReply:
        """Evaluate the conditions, then run the chosen branch's ops in order.

        Conditions are all evaluated on the state before any op runs. After each op
        the keys already due are expired, so every op behaves exactly like the same
        operation applied as its own command at this log time (a ``ttl_ms=0`` put is
        gone for the next op, as it would be for the next command).
        """
        success = all(self._condition_holds(c) for c in cmd.conditions)
        ops = cmd.if_then if success else cmd.else_then
        responses: list[TxnResponse] = []
        for op in ops:
            responses.append(self._txn_op(op))
            self._expire()
        return TxnReply(success, tuple(responses))

    def _condition_holds(self, cond: TxnCondition) -> bool:
        current = self._value(cond.key)
        left: int | bytes
        if cond.target == "seq":
            left = _VALUE_HEAD.unpack_from(current)[0] if current is not None else 0
        elif current is None:
            return cond.op == "!="  # no value: it differs from any bytes, nothing else holds
        else:
            left = current[_HEAD:]
        right = cond.operand
        match cond.op:
            case "==":
                return left == right
            case "!=":
                return left != right
            case "<":
                return left < right  # type: ignore[operator]
            case "<=":
                return left <= right  # type: ignore[operator]
            case ">":
                return left > right  # type: ignore[operator]
            case ">=":
                return left >= right  # type: ignore[operator]
        raise AssertionError(f"unvalidated comparison {cond.op!r}")  # pragma: no cover

    def _txn_op(self, op: TxnOp) -> TxnResponse:
        match op:
            case TxnPut():
                change = self._upsert(op.as_upsert())
                return TxnPutResponse(op.key, change.prev, change.result)
            case TxnGet():
                return TxnGetResponse(op.key, self.get(op.key))
            case TxnDelete():
                change = self._upsert(op.as_upsert())
                return TxnDeleteResponse(op.key, change.prev, change.result)
            case TxnDeleteByPrefix():
                keys = [key for key, _ in self.list(op.prefix)]
                for key in keys:
                    self._remove(key)
                return TxnDeleteByPrefixResponse(op.prefix, len(keys))
            case _:
                assert_never(op)

    def _upsert(self, cmd: Upsert) -> Change:
        """Conditional insert/update/delete of one key (also the building block of txn ops).

        An absent key has seq 0 for ``match_seq``. On a mismatch, ``prev == result``.
        Only inserts and updates bump seq; a delete does not (databend-meta).
        """
        key = cmd.key
        old = self._value(key)
        prev = None if old is None else _seqv(old)
        if cmd.match_seq is not None and not cmd.match_seq.matches(prev.seq if prev else 0):
            return Change(prev, prev)
        if cmd.value is None:
            if prev is not None:
                self._write(key, None, old, prev)
            return Change(prev, None)
        self._seq += 1
        new = SeqV(self._seq, cmd.value, cmd.expire_at(self._log_time_ms))
        self._write(key, new, old, prev)
        return Change(prev, new)

    def _remove(self, key: str) -> None:
        """`_write` of a removal, for callers that have not read the key's value."""
        old = self._value(key)
        self._write(key, None, old, None if old is None else _seqv(old))

    def _write(self, key: str, new: SeqV | None, old: _Value | None, prev: SeqV | None) -> None:
        """Set (``new``) or remove (``None``) ``key``, keep the indexes, record the change.

        The only place that mutates the map (or, while a snapshot is built, its
        overlay, which `_end_build` folds in). Removing an absent key is a no-op.
        `old`: the key's stored value as the caller just read it (`_value`), `prev`
        the `SeqV` made from it (read once per write).
        """
        value = None if new is None else _stored(new.seq, new.data, new.expire_at_ms)
        new_expiry = None if new is None else new.expire_at_ms
        if old is None:
            if value is None:
                return
            self._keys.add(key)
        else:
            old_expiry = _expiry_of(old)
            if old_expiry is not None:
                self._expiry.remove((old_expiry, key))
            if value is None:
                self._keys.remove(key)
        if value is not None and new_expiry is not None:
            self._expiry.add((new_expiry, key))
        self._digest = (self._digest - _key_hash(key, old) + _key_hash(key, value)) % _DIGEST_MOD
        overlay = self._overlay
        if overlay is None:
            if value is None:
                del self._kv[key]
            else:
                self._kv[key] = value
        elif value is None:
            if key in self._kv:
                overlay[key] = b""
            else:  # written since the build began
                del overlay[key]
        elif old is None:
            # An insertion: a plain dict puts the key last, so the overlay does too.
            overlay.pop(key, None)
            overlay[key] = value
            if key in self._kv:
                self._moved.add(key)
        else:
            overlay[key] = value
        self._rev += 1
        self._changes.append(KeyChange(key, prev, new, self._rev))

    def _expire(self) -> None:
        """Remove every key whose ``expire_at_ms <= log_time_ms``, earliest first."""
        expiry = self._expiry
        now = self._log_time_ms
        while expiry and expiry[0][0] <= now:
            self._remove(expiry[0][1])

    # ------------------------------------------------------------------ snapshot

    def state_digest(self) -> str:
        """A hash of the whole KV state (every key with its seq, value and expiry, and
        the last seq), equal on replicas holding equal state: a sum of per-key hashes
        kept up to date by each write, so it costs O(1)."""
        return f"{(self._digest + self._seq * _SEQ_MIX) % _DIGEST_MOD:032x}"

    def snapshot_builder(self) -> SnapshotBuilder:
        """A frozen view of the state as of now, serialized in slices (`step`) while
        `apply` goes on: the bytes are exactly `snapshot()`'s at this moment. One at a
        time; a builder dropped unfinished must be `close`d (the machine keeps writes
        aside until then)."""
        if self._overlay is not None:
            raise RuntimeError("a snapshot is being built already")
        return SnapshotBuilder(self, self._kv, freeze=True)

    def snapshot(self) -> bytes:
        """The whole state as msgpack bytes; identical state gives identical bytes.

        Layout (a map, fields in this order): ``format`` (``"metanode.sm.kv"``),
        ``version`` (5), ``seq`` (last seq), ``rev`` (last change revision),
        ``log_time_ms``, ``kv``: a map of key -> its stored value (16 bytes: seq as u64
        and expire_at_ms as i64, -1 for none, both little-endian; then the data), in the
        machine's insertion order, ``nodes``: a list by node id of ``[id, name, addr,
        port, grpc_api_advertise_address | nil]``, ``digest``: the sum of the per-key
        hashes behind `state_digest` over the keys in the snapshot (16 bytes,
        little-endian; nil in hand-made documents). `restore` hashes every key it reads
        and refuses a snapshot whose keys do not add up to its digest: a snapshot packed
        wrong cannot be installed as if it were right.

        Insertion order, not key order: packing a slice is then one C call over values
        laid out in order (~0.15 us a key, against ~1.4 us walking the sorted keys and
        looking each up). It follows from the writes applied, and a restore inserts in
        the snapshot's order, so replicas with the same history pack the same bytes
        (see "Snapshots" in the module doc).
        """
        kv = self._kv
        if self._overlay is not None:  # a build is running: pack the state as it is now
            kv = dict(kv)
            _merge(kv, self._overlay, self._moved)
        return SnapshotBuilder(self, kv, freeze=False).result()

    def _end_build(self) -> None:
        """The running build is done: its overlay goes into the map (O(writes since))."""
        assert self._overlay is not None
        _merge(self._kv, self._overlay, self._moved)
        self._overlay, self._moved = None, set()

    @classmethod
    def restore(cls, data: bytes) -> KVStateMachine:
        """Build a state machine from ``snapshot()`` bytes.

        Raises ``ValueError`` naming the problem when ``data`` is not a well-formed
        snapshot of a supported version (bad msgpack, missing or mistyped fields, a
        malformed stored value, a key twice, keys of a version 1-4 list not strictly
        ascending, a key seq above the last seq, keys that do not add up to the
        snapshot's digest). Keys
        already expired at the snapshot's log time are dropped, so the invariant holds;
        a snapshot taken by ``snapshot()`` never has any, and restores to identical bytes.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"snapshot must be bytes, got {type(data).__name__}")
        # Streamed: one kv entry is decoded at a time, so a million keys never sit in
        # the memory twice (as msgpack objects and as stored values).
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=max(len(data), 1))
        unpacker.feed(data)
        sm = cls()
        kv: dict[str, _Value] = {}
        total = 0  # the digest of the keys read
        expiry: list[tuple[int, str]] = []
        doc: dict[str, Any] = {}
        try:
            try:
                fields = unpacker.read_map_header()
            except msgpack.UnpackValueError:
                raise ValueError("snapshot must be a msgpack map") from None
            for _ in range(fields):
                name = unpacker.unpack()
                if name in doc:
                    raise ValueError(f"snapshot field {name!r} appears twice")
                if name == "kv" and "seq" in doc and doc.get("format") == SNAPSHOT_FORMAT:
                    version = _version(doc)
                    seq = _field_int(doc, "seq")
                    if version == SNAPSHOT_VERSION:
                        # Pair by pair: msgpack interns the keys of a map it decodes
                        # whole, and the interpreter's table of them cost ~45 MB at 1M.
                        try:
                            n = unpacker.read_map_header()
                        except msgpack.UnpackValueError:
                            raise ValueError("snapshot field 'kv' must be a map") from None
                        for i in range(n):
                            key = unpacker.unpack()
                            total += _take_value(i, key, unpacker.unpack(), seq, kv, expiry)
                    else:
                        try:
                            n = unpacker.read_array_header()
                        except msgpack.UnpackValueError:
                            raise ValueError("snapshot field 'kv' must be a list") from None
                        total += _take_rows((unpacker.unpack() for _ in range(n)), seq, kv, expiry)
                    doc["kv"] = _STREAMED
                else:
                    doc[name] = unpacker.unpack()
            rest = unpacker.tell() != len(data)
        except ValueError:
            raise
        except (TypeError, msgpack.UnpackException, msgpack.OutOfData) as e:
            raise ValueError(f"snapshot is not valid msgpack: {e}") from e
        if rest:
            raise ValueError("snapshot is not valid msgpack: extra data after the document")
        if doc.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"not a KV snapshot: format is {doc.get('format')!r}")
        _version(doc)
        seq = _field_int(doc, "seq")
        log_time_ms = _field_int(doc, "log_time_ms")
        entries = doc.get("kv")
        if entries is _STREAMED:
            pass
        elif doc["version"] == SNAPSHOT_VERSION:  # as `snapshot()` lays it out, or refused
            raise ValueError("snapshot field 'kv' must be a map after 'format', 'version' and 'seq'")
        else:  # a list, before the fields it needs (a document made by hand)
            if not isinstance(entries, list):
                raise ValueError("snapshot field 'kv' must be a list")
            total += _take_rows(entries, seq, kv, expiry)
        sm._kv = kv
        sm._keys = SortedList(kv)
        sm._expiry = SortedList(expiry)
        if doc["version"] >= 2 and "nodes" not in doc:
            raise ValueError("snapshot field 'nodes' is missing")
        sm._nodes = _parse_nodes(doc.get("nodes", []))
        sm._seq = seq
        sm._rev = _field_int(doc, "rev") if doc["version"] >= 3 else 0
        sm._log_time_ms = log_time_ms
        if doc["version"] >= 4:
            if "digest" not in doc:
                raise ValueError("snapshot field 'digest' is missing")
            digest = doc["digest"]
            if digest is not None and (not isinstance(digest, bytes) or len(digest) != 16):
                raise ValueError(f"snapshot field 'digest' must be 16 bytes or nil, got {digest!r}")
            if digest is not None and int.from_bytes(digest, "little") != total % _DIGEST_MOD:
                raise ValueError(
                    f"snapshot digest {digest.hex()} does not match its {len(kv)} keys"
                    f" ({_digest_bytes(total % _DIGEST_MOD).hex()}): the snapshot is corrupt"
                )
        sm._digest = total % _DIGEST_MOD
        sm._expire()
        sm._changes = []
        return sm


def _merge(kv: dict[str, _Value], overlay: dict[str, _Value], moved: set[str]) -> None:
    """Apply a build's overlay to the map it froze, leaving the map exactly as the same
    writes made directly would have, order included: a key updated stays in place, a
    key removed goes, a key written anew (first, or after its removal) comes last, in
    the order of those writes (the overlay's)."""
    for key, value in overlay.items():
        if not value:
            del kv[key]
        else:
            if key in moved:
                del kv[key]
            kv[key] = value


_LIST_VERSIONS = tuple(range(1, SNAPSHOT_LIST_VERSION + 1))
_STREAMED = object()  # `restore`: the kv field was read as it was decoded


def _version(doc: dict[str, Any]) -> int:
    """The snapshot's version, if this build reads it."""
    version = doc.get("version")
    if type(version) is not int or version not in (*_LIST_VERSIONS, SNAPSHOT_VERSION):
        raise ValueError(f"unsupported KV snapshot version {version!r} (this build reads version {SNAPSHOT_VERSION})")
    return version


def _take_rows(rows: Iterable[object], last_seq: int, kv: dict[str, _Value],
               expiry: builtins.list[tuple[int, str]]) -> int:
    """Check the rows of a version 1-4 kv list (``[key, seq, data, expire_at_ms]``,
    keys strictly ascending), keep them in `kv` (and their expiries in `expiry`);
    return the sum of their key hashes."""
    total = 0
    last_key: str | None = None
    for i, row in enumerate(rows):
        key, value = _parse_entry(i, row, last_seq)
        if last_key is not None and key <= last_key:
            raise ValueError(f"snapshot kv entry {i}: keys not strictly ascending at {key!r}")
        last_key = key
        kv[key] = stored = _stored(*value)
        total += _key_hash(key, stored)
        if value[2] is not None:
            expiry.append((value[2], key))
    return total


def _take_value(i: int, key: object, v: object, last_seq: int, kv: dict[str, _Value],
                expiry: builtins.list[tuple[int, str]]) -> int:
    """Check pair `i` of a version 5 kv map (key -> stored value), keep it in `kv` (and
    its expiry in `expiry`); return its key hash (the snapshot's digest sums them)."""
    if type(key) is not str:
        raise ValueError(f"snapshot kv entry {i}: key must be a str, got {type(key).__name__}")
    if type(v) is not bytes or len(v) < _HEAD:
        raise ValueError(f"snapshot kv entry {i} ({key!r}): value must be {_HEAD} or more bytes")
    if key in kv:
        raise ValueError(f"snapshot kv entry {i}: key {key!r} appears twice")
    seq, expire = _VALUE_HEAD.unpack_from(v)
    if not 1 <= seq <= last_seq:
        raise ValueError(f"snapshot kv entry {i} ({key!r}): seq {seq} not in 1..{last_seq}")
    if expire != -1:
        if not 0 <= expire <= MAX_TIME_MS:
            raise ValueError(f"snapshot kv entry {i} ({key!r}): bad expire_at_ms {expire}")
        expiry.append((expire, key))
    kv[key] = v
    return _key_hash(key, v)


_DIGEST_MOD = 1 << 128
_SEQ_MIX = 0x9E3779B97F4A7C15F39CC0605CEDC835  # an odd constant: mixes the last seq in
_KEY_LEN = struct.Struct("<Q")
_blake2b = hashlib.blake2b


def _digest_bytes(digest: int) -> bytes:
    return digest.to_bytes(16, "little")


def _key_hash(key: str, v: _Value | None) -> int:
    """A stable 128-bit hash of one key's value (0 for an absent key): blake2b-128 of
    len(key) (u64), seq (u64), expire_at_ms (i64, -1 for none), key, data."""
    if v is None:
        return 0
    k = key.encode()
    h = _blake2b(_KEY_LEN.pack(len(k)), digest_size=16)  # (fewest instructions of the ways tried)
    h.update(v[:_HEAD])
    h.update(k)
    h.update(v[_HEAD:])
    return int.from_bytes(h.digest(), "little")


class SnapshotBuilder:
    """`KVStateMachine.snapshot()` of one moment, built a slice at a time.

    At the start it packs what is small (the header, the node records) and freezes
    the machine's map: writes go to the machine's overlay until the build ends (see
    "Snapshots" in the module doc). Each `step(n)` packs the next `n` pairs of the
    frozen map, in its order, as one part: a single C call over entries laid out in
    order (~0.15 us a key). So the bytes are those of the start whatever is applied in
    between, and nothing of the size of the machine is copied (a copy of the map held
    the event loop ~30 ms at 1M keys). Parts of a few thousand keys (~0.5 MB at
    100-byte values) are large enough that malloc gives them back to the system when
    they are freed. Reference: the Raft thesis §5.2 (snapshotting concurrently with the
    state machine).
    """

    def __init__(self, sm: KVStateMachine, kv: dict[str, _Value], *, freeze: bool) -> None:
        self._items = iter(kv.items())
        self.keys = len(kv)  # the keys of the start: what the snapshot holds
        self._at = 0  # pairs packed so far
        self._packer = msgpack.Packer(use_bin_type=True)
        # The machine's digest at the start is that of the keys packed: `restore`
        # checks the one against the other.
        self._digest = sm._digest
        p = self._packer
        head = [p.pack_map_header(8)]
        for name, value in (
            ("format", SNAPSHOT_FORMAT), ("version", SNAPSHOT_VERSION), ("seq", sm._seq),
            ("rev", sm._rev), ("log_time_ms", sm._log_time_ms),
        ):
            head += [p.pack(name), p.pack(value)]
        head += [p.pack("kv"), p.pack_map_header(self.keys)]
        self._parts: builtins.list[bytes] = head
        self._tail = p.pack("nodes") + p.pack(
            [[i, r.name, r.endpoint.addr, r.endpoint.port, r.grpc_api_advertise_address] for i, r in sm.nodes()]
        ) + p.pack("digest")
        self._sm = sm if freeze and kv else None  # the machine whose map is frozen
        if self._sm is not None:
            sm._overlay = {}  # last: nothing above can leave the machine frozen

    @property
    def done(self) -> bool:
        return self._at == self.keys

    def step(self, n: int) -> None:
        """Pack the next `n` key-value pairs of the start (fewer at the end)."""
        if self.done or n < 1:  # a closed builder is done
            return
        chunk = dict(itertools.islice(self._items, n))
        # A map of the slice, less its header: the pairs follow the one header of the
        # whole map in the head.
        packed = self._packer.pack(chunk)
        header = self._packer.pack_map_header(len(chunk))
        if not chunk or not packed.startswith(header):  # our bug
            raise RuntimeError(f"snapshot builder: {len(chunk)} keys left of {self.keys - self._at}")
        self._parts.append(packed[len(header):])
        self._at += len(chunk)
        if self.done:
            self._thaw()

    def _thaw(self) -> None:
        if self._sm is not None:
            self._sm._end_build()
            self._sm = None
        self._items = iter(())

    def result(self) -> bytes:
        """The snapshot bytes (after every step); closes the builder."""
        return b"".join(self.result_parts())

    def result_parts(self) -> builtins.list[bytes]:
        """The snapshot bytes as the pieces packed (their concatenation is `result()`),
        to write one after the other; closes the builder."""
        while not self.done:
            self.step(1 << 16)
        parts = self._parts + [self._tail + self._packer.pack(_digest_bytes(self._digest))]
        self.close()
        return parts

    def close(self) -> None:
        """Ends the build (finished or not): the machine's writes go to its map again."""
        self._thaw()
        self._parts = []
        self.keys = self._at


def _field_int(doc: dict[str, Any], name: str) -> int:
    value = doc.get(name)
    if not is_int(value) or not 0 <= value <= INT64_MAX:  # stored in signed 64-bit fields
        raise ValueError(f"snapshot field {name!r} must be an int in 0..{INT64_MAX}, got {value!r}")
    return value


def _parse_entry(i: int, entry: object, last_seq: int) -> tuple[str, tuple[int, bytes, int | None]]:
    if not isinstance(entry, list) or len(entry) != 4:
        raise ValueError(f"snapshot kv entry {i} must be [key, seq, data, expire_at_ms]")
    key, seq, data, expire_at_ms = entry
    if not isinstance(key, str):
        raise ValueError(f"snapshot kv entry {i}: key must be a str")
    if not is_int(seq) or not 1 <= seq <= last_seq:
        raise ValueError(f"snapshot kv entry {i} ({key!r}): seq {seq!r} not in 1..{last_seq}")
    if not isinstance(data, bytes):
        raise ValueError(f"snapshot kv entry {i} ({key!r}): data must be bytes")
    if expire_at_ms is not None and (not is_int(expire_at_ms) or not 0 <= expire_at_ms <= MAX_TIME_MS):
        raise ValueError(f"snapshot kv entry {i} ({key!r}): bad expire_at_ms {expire_at_ms!r}")
    return key, (seq, data, expire_at_ms)


def _parse_nodes(rows: object) -> dict[int, NodeRecord]:
    if not isinstance(rows, list):
        raise ValueError("snapshot field 'nodes' must be a list")
    nodes: dict[int, NodeRecord] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != 5:
            raise ValueError(f"snapshot node {i} must be [id, name, addr, port, grpc_address]")
        node_id, name, addr, port, grpc = row
        record = NodeRecord(name, Endpoint(addr, port), grpc)
        try:
            SetNode(node_id, record).validate()
        except ValueError as e:
            raise ValueError(f"snapshot node {i}: {e}") from None
        if node_id in nodes:
            raise ValueError(f"snapshot node {i}: node {node_id} listed twice")
        nodes[node_id] = record
    return nodes
