"""The `metanode export` format: JSON lines, one object per line (contract §8). Pure.

Lines, in this order (every line is one JSON object with a ``type``)::

    {"type": "header", "format": "metanode-export", "version": 1, "cluster_id": "...",
     "cluster_name": "...", "node_id": 1, "last_applied": {"term": 3, "index": 120}}
    {"type": "membership", "voters": [1, 2, 3], "learners": []}
    {"type": "node", "id": 1, "name": "1", "endpoint": {"addr": "127.0.0.1", "port": 28004},
     "grpc_api_advertise_address": "127.0.0.1:9191"}          (zero or more, by id)
    {"type": "state", "seq": 57, "log_time_ms": 1700000000000}
    {"type": "kv", "key": "a/b", "seq": 12, "data": "<base64>", "expire_at_ms": null}
                                                               (zero or more, key order)

`dump_lines` writes them from an `ExportedState` (its ``kv`` may be any iterable, e.g.
``KVStateMachine.items()``, consumed once); `load_lines` parses and validates them and
raises ``ValueError("line N: ...")`` naming the first problem.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs

from metanode.raft.types import LogId
from metanode.sm.commands import SetNode, validate_key
from metanode.sm.types import Endpoint, NodeRecord, SeqV, is_int

FORMAT = "metanode-export"
VERSION = 1


@attrs.define
class ExportedState:
    """Everything an export holds. ``voters`` is every voter (of both configurations
    while a membership change is in flight)."""

    cluster_id: str | None
    cluster_name: str | None
    node_id: int | None
    last_applied: LogId
    voters: tuple[int, ...]
    learners: tuple[int, ...]
    nodes: list[tuple[int, NodeRecord]]
    seq: int
    log_time_ms: int
    kv: Iterable[tuple[str, SeqV]]


def _line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": ")) + "\n"


def dump_lines(state: ExportedState) -> Iterator[str]:
    """The export of `state`, one ``\\n``-terminated JSON line at a time."""
    yield _line(
        {
            "type": "header",
            "format": FORMAT,
            "version": VERSION,
            "cluster_id": state.cluster_id,
            "cluster_name": state.cluster_name,
            "node_id": state.node_id,
            "last_applied": {"term": state.last_applied.term, "index": state.last_applied.index},
        }
    )
    yield _line({"type": "membership", "voters": sorted(state.voters), "learners": sorted(state.learners)})
    for node_id, r in sorted(state.nodes, key=lambda n: n[0]):
        yield _line(
            {
                "type": "node",
                "id": node_id,
                "name": r.name,
                "endpoint": {"addr": r.endpoint.addr, "port": r.endpoint.port},
                "grpc_api_advertise_address": r.grpc_api_advertise_address,
            }
        )
    yield _line({"type": "state", "seq": state.seq, "log_time_ms": state.log_time_ms})
    for key, v in state.kv:
        yield _line(
            {
                "type": "kv",
                "key": key,
                "seq": v.seq,
                "data": base64.b64encode(v.data).decode("ascii"),
                "expire_at_ms": v.expire_at_ms,
            }
        )


class _Bad(Exception):
    pass


def _get(obj: dict[str, Any], name: str, check: Callable[[Any], bool], what: str) -> Any:
    if name not in obj:
        raise _Bad(f"missing field {name!r}")
    value = obj[name]
    if not check(value):
        raise _Bad(f"field {name!r} must be {what}, got {value!r:.80}")
    return value


def _nonneg(v: Any) -> bool:
    return is_int(v) and v >= 0


def _pos(v: Any) -> bool:
    return is_int(v) and v > 0


def _ids(v: Any) -> bool:
    return isinstance(v, list) and all(_pos(i) for i in v)


def _opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


_ORDER = {"header": 0, "membership": 1, "node": 2, "state": 3, "kv": 4}
_NEXT = {
    0: "a 'header' line",
    1: "a 'membership' line",
    2: "a 'node' or 'state' line",
    3: "a 'node' or 'state' line",
    4: "a 'kv' line",
}


def load_lines(lines: Iterable[str | bytes], progress: Callable[[int], None] | None = None) -> ExportedState:
    """Parse an export. Raises ``ValueError`` starting with ``line N:`` (1-based) for
    the first malformed line: not JSON, not an object, an unknown or out-of-order
    ``type``, a missing or mistyped field, bad base64, keys not strictly ascending, a
    key seq above the state's seq; or naming what is missing at the end.
    `progress(n)` is called every 100,000 keys."""
    header: dict[str, Any] | None = None
    voters: tuple[int, ...] = ()
    learners: tuple[int, ...] = ()
    nodes: dict[int, NodeRecord] = {}
    seq = log_time_ms = 0
    kv: list[tuple[str, SeqV]] = []
    stage = 0  # the order rank expected at least
    last_key: str | None = None
    n = 0
    for n, raw in enumerate(lines, 1):
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise _Bad(f"not valid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise _Bad(f"expected a JSON object, got {type(obj).__name__}")
            kind = obj.get("type")
            rank = _ORDER.get(kind) if isinstance(kind, str) else None
            if rank is None:
                raise _Bad(f"unknown line type {kind!r}")
            ok = rank == stage if stage in (0, 1) else (rank in (2, 3) if stage == 2 else rank == 4)
            if not ok:
                raise _Bad(f"expected {_NEXT[stage]}, got a {kind!r} line")
            if kind == "header":
                if obj.get("format") != FORMAT:
                    raise _Bad(f"not a metanode export: format is {obj.get('format')!r}")
                if obj.get("version") != VERSION:
                    raise _Bad(f"unsupported export version {obj.get('version')!r} (this build reads {VERSION})")
                _get(obj, "cluster_id", _opt_str, "a string or null")
                _get(obj, "cluster_name", _opt_str, "a string or null")
                _get(obj, "node_id", lambda v: v is None or _pos(v), "a positive int or null")
                la = _get(obj, "last_applied", lambda v: isinstance(v, dict), "an object")
                _get(la, "term", _nonneg, "a non-negative int")
                _get(la, "index", _nonneg, "a non-negative int")
                header = obj
                stage = 1
            elif kind == "membership":
                voters = tuple(_get(obj, "voters", _ids, "a list of positive ints"))
                learners = tuple(_get(obj, "learners", _ids, "a list of positive ints"))
                stage = 2
            elif kind == "node":
                node_id = _get(obj, "id", _pos, "a positive int")
                ep = _get(obj, "endpoint", lambda v: isinstance(v, dict), "an object")
                record = NodeRecord(
                    _get(obj, "name", lambda v: isinstance(v, str), "a string"),
                    Endpoint(ep.get("addr"), ep.get("port")),
                    _get(obj, "grpc_api_advertise_address", _opt_str, "a string or null"),
                )
                try:
                    SetNode(node_id, record).validate()
                except ValueError as e:
                    raise _Bad(str(e)) from None
                if node_id in nodes:
                    raise _Bad(f"node {node_id} listed twice")
                nodes[node_id] = record
            elif kind == "state":
                seq = _get(obj, "seq", _nonneg, "a non-negative int")
                log_time_ms = _get(obj, "log_time_ms", _nonneg, "a non-negative int")
                stage = 4
            else:
                key = _get(obj, "key", lambda v: isinstance(v, str), "a string")
                try:
                    validate_key(key)
                except ValueError as e:
                    raise _Bad(str(e)) from None
                if last_key is not None and key <= last_key:
                    raise _Bad(f"key {key!r} is not after {last_key!r}: keys must be strictly ascending")
                kseq = _get(obj, "seq", _pos, "a positive int")
                if kseq > seq:
                    raise _Bad(f"key {key!r} has seq {kseq}, above the state's seq {seq}")
                data_text = _get(obj, "data", lambda v: isinstance(v, str), "a base64 string")
                try:
                    data = base64.b64decode(data_text, validate=True)
                except (binascii.Error, ValueError) as e:
                    raise _Bad(f"field 'data' of key {key!r} is not valid base64: {e}") from None
                exp = _get(obj, "expire_at_ms", lambda v: v is None or _nonneg(v), "a non-negative int or null")
                kv.append((key, SeqV(kseq, data, exp)))
                last_key = key
                if progress is not None and len(kv) % 100_000 == 0:
                    progress(len(kv))
        except _Bad as e:
            raise ValueError(f"line {n}: {e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"line {n}: not UTF-8: {e}") from None
    if stage < 4:
        raise ValueError(f"line {n + 1}: unexpected end of input: expected {_NEXT[stage]}")
    assert header is not None
    la = header["last_applied"]
    return ExportedState(
        cluster_id=header["cluster_id"],
        cluster_name=header["cluster_name"],
        node_id=header["node_id"],
        last_applied=LogId(la["term"], la["index"]),
        voters=voters,
        learners=learners,
        nodes=sorted(nodes.items()),
        seq=seq,
        log_time_ms=log_time_ms,
        kv=kv,
    )
