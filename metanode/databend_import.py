"""Read a `databend-metactl export` file: migrating from databend-meta (docs/reference/cli.md).

databend-metactl writes one JSON array per line, ``[TREE, {VARIANT: VALUE}]``
(databend-meta's `RaftStoreEntry`, serde's externally tagged enum), e.g.::

    ["header",{"DataHeader":{"key":"header","value":{"version":"V004"}}}]
    ["raft_log",{"NodeId":1}]
    ["raft_log",{"Vote":{"leader_id":{"term":1,"node_id":1},"committed":true}}]
    ["raft_log",{"Committed":{"leader_id":{"term":1,"node_id":1},"index":7}}]
    ["raft_log",{"Purged":null}]
    ["raft_log",{"LogEntry":{"log_id":{...,"index":6},"payload":{"Normal":{"time_ms":1753508279673,
        "cmd":{"UpsertKV":{"key":"k","seq":{"GE":0},"value":{"Update":[53,52]},"value_meta":null}}}}}}]
    ["state_machine/0",{"Sequences":{"key":"generic-kv","value":3}}]
    ["state_machine/0",{"StateMachineMeta":{"key":"LastApplied","value":{"LogId":{...,"index":7}}}}]
    ["state_machine/0",{"StateMachineMeta":{"key":"LastMembership","value":{"Membership":{
        "log_id":{...},"membership":{"configs":[[1]],"nodes":{"1":{}}}}}}}]
    ["state_machine/0",{"Nodes":{"key":1,"value":{"name":"1","endpoint":{"addr":"localhost","port":28103},
        "grpc_api_advertise_address":"127.0.0.1:9191"}}}]
    ["state_machine/0",{"GenericKV":{"key":"k","value":{"seq":1,"meta":null,"data":[104,105]}}}]

`load_databend_lines` turns it into the `ExportedState` that `metanode import` writes
into a new data dir, keeping every key's seq and the global seq:

- the state machine's keys (``GenericKV``; ``meta.expire_at`` is seconds or, above
  100,000,000,000, milliseconds, as databend-meta reads it), its seq (``Sequences``
  ``generic-kv``), node records (``Nodes``), last applied log id and membership;
- then the log entries the state machine had not applied yet (after ``LastApplied``, up
  to ``Committed``), in order, as databend-meta replays them when it starts:
  ``UpsertKV`` (through metanode's own state machine, so seqs move the same way),
  ``AddNode``/``RemoveNode``, memberships and blank entries. Any other command there (a
  ``Transaction``...) is refused with the line: trigger a snapshot on the databend-meta
  node (``/v1/ctrl/trigger_snapshot``) and export again, so the state machine holds it;
- the expiry index (``Expire``), secondary-index and raft-state entries are not needed.

A malformed line raises ``ValueError("line N: ...")``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import msgpack

from metanode.exportfmt import ExportedState
from metanode.raft.types import LogId
from metanode.sm import SNAPSHOT_FORMAT, SNAPSHOT_LIST_VERSION, KVStateMachine
from metanode.sm.commands import Upsert, validate_key
from metanode.sm.types import Endpoint, MatchSeq, NodeRecord, SeqV, is_int

#: databend-meta's ``expire_at``: seconds, or milliseconds above this.
EXPIRE_AT_MS_THRESHOLD = 100_000_000_000

#: Variants carrying nothing metanode needs.
_IGNORED = frozenset(("DataHeader", "Expire", "NodeId", "Vote", "Purged", "RaftStateKV", "LogMeta", "ClientLastResps"))


class _Bad(Exception):
    pass


def expire_at_ms(value: Any) -> int | None:
    """databend-meta's ``KVMeta.expire_at`` (seconds or milliseconds) in milliseconds."""
    if value is None:
        return None
    if not is_int(value) or value < 0:
        raise _Bad(f"expire_at must be a non-negative int, got {value!r:.60}")
    return value if value > EXPIRE_AT_MS_THRESHOLD else value * 1000


def _log_id(value: Any, what: str) -> LogId:
    if isinstance(value, dict) and "LogId" in value and len(value) == 1:
        value = value["LogId"]
    if not isinstance(value, dict) or not is_int(value.get("index")):
        raise _Bad(f"{what}: expected a log id {{leader_id, index}}, got {value!r:.80}")
    leader_id = value.get("leader_id") or {}
    term = leader_id.get("term", 0) if isinstance(leader_id, dict) else 0
    return LogId(term if is_int(term) else 0, value["index"])


def _bytes(value: Any, what: str) -> bytes:
    if isinstance(value, list):
        try:
            return bytes(value)
        except (TypeError, ValueError):
            pass
    raise _Bad(f"{what}: expected a list of bytes (0..255), got {value!r:.60}")


def _node(value: Any) -> NodeRecord:
    if not isinstance(value, dict) or not isinstance(value.get("endpoint"), dict):
        raise _Bad(f"a node must be {{name, endpoint: {{addr, port}}, ...}}, got {value!r:.80}")
    ep = value["endpoint"]
    grpc = value.get("grpc_api_advertise_address")
    return NodeRecord(str(value.get("name", "")), Endpoint(str(ep.get("addr")), ep.get("port")),
                      grpc if isinstance(grpc, str) else None)


def _membership(value: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """openraft's ``{"configs": [[ids...], ...], "nodes": {id: {}}}``: voters (of every
    config: both while joint) and learners (nodes in no config)."""
    if not isinstance(value, dict) or not isinstance(value.get("configs"), list):
        raise _Bad(f"a membership must be {{configs, nodes}}, got {value!r:.80}")
    voters = {int(i) for config in value["configs"] for i in config}
    nodes = {int(i) for i in (value.get("nodes") or {})}
    return tuple(sorted(voters)), tuple(sorted(nodes - voters))


def _match_seq(value: Any) -> MatchSeq | None:
    if value == "Any" or value is None:
        return None
    if isinstance(value, dict) and len(value) == 1:
        (kind, n), = value.items()
        if kind == "Exact" and is_int(n):
            return MatchSeq(exact=n)
        if kind == "GE" and is_int(n):
            return MatchSeq(ge=n)
    raise _Bad(f"UpsertKV: seq must be \"Any\", {{\"Exact\": n}} or {{\"GE\": n}}, got {value!r:.60}")


def _upsert(cmd: Any) -> Upsert:
    if not isinstance(cmd, dict) or not isinstance(cmd.get("key"), str):
        raise _Bad(f"UpsertKV: expected {{key, seq, value, value_meta}}, got {cmd!r:.80}")
    value = cmd.get("value")
    if value == "Delete":
        data = None
    elif isinstance(value, dict) and "Update" in value:
        data = _bytes(value["Update"], "UpsertKV value")
    else:
        raise _Bad(f"UpsertKV {cmd['key']!r}: value {value!r:.40} is not supported (Update or Delete)")
    meta = cmd.get("value_meta")
    expire = expire_at_ms(meta.get("expire_at")) if isinstance(meta, dict) else None
    return Upsert(cmd["key"], data, _match_seq(cmd.get("seq")), None, expire if data is not None else None)


def load_databend_lines(
    lines: Iterable[str | bytes], progress: Callable[[int], None] | None = None
) -> ExportedState:
    """Parse a databend-metactl export (see the module doc). `progress(n)` is called
    every 100,000 keys."""
    kv: dict[str, SeqV] = {}
    nodes: dict[int, NodeRecord] = {}
    seq = 0
    last_applied: LogId | None = None
    voters: tuple[int, ...] = ()
    learners: tuple[int, ...] = ()
    committed: LogId | None = None
    entries: list[tuple[int, int, Any]] = []  # (index, line number, payload)
    log_time_ms = 0
    n = 0
    for n, raw in enumerate(lines, 1):
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise _Bad(f"not valid JSON: {e}") from None
            if (not isinstance(obj, list) or len(obj) != 2 or not isinstance(obj[0], str)
                    or not isinstance(obj[1], dict) or len(obj[1]) != 1):
                raise _Bad("expected [TREE, {KIND: VALUE}] as databend-metactl export writes it")
            (kind, value), = obj[1].items()
            if kind in _IGNORED:
                continue
            if kind == "GenericKV":
                key, v = value.get("key"), value.get("value")
                if not isinstance(key, str) or not isinstance(v, dict) or not is_int(v.get("seq")):
                    raise _Bad(f"GenericKV: expected {{key, value: {{seq, meta, data}}}}, got {value!r:.80}")
                try:
                    validate_key(key)
                except ValueError as e:
                    raise _Bad(str(e)) from None
                meta = v.get("meta")
                kv[key] = SeqV(v["seq"], _bytes(v.get("data"), f"key {key!r}"),
                               expire_at_ms(meta.get("expire_at")) if isinstance(meta, dict) else None)
                if progress is not None and len(kv) % 100_000 == 0:
                    progress(len(kv))
            elif kind == "Sequences":
                if value.get("key") == "generic-kv":
                    if not is_int(value.get("value")):
                        raise _Bad(f"Sequences generic-kv: expected an int, got {value.get('value')!r:.40}")
                    seq = value["value"]
            elif kind == "Nodes":
                if not is_int(value.get("key")):
                    raise _Bad(f"Nodes: expected an int node id, got {value.get('key')!r:.40}")
                nodes[value["key"]] = _node(value.get("value"))
            elif kind == "StateMachineMeta":
                if value.get("key") == "LastApplied":
                    last_applied = _log_id(value.get("value"), "LastApplied")
                elif value.get("key") == "LastMembership":
                    m = value.get("value")
                    m = m.get("Membership", m) if isinstance(m, dict) else m
                    voters, learners = _membership(m.get("membership") if isinstance(m, dict) else None)
            elif kind == "Committed":
                committed = _log_id(value, "Committed") if value is not None else None
            elif kind in ("LogEntry", "Logs"):
                entry = value if kind == "LogEntry" else value.get("value")
                if not isinstance(entry, dict):
                    raise _Bad(f"{kind}: expected {{log_id, payload}}, got {entry!r:.80}")
                entries.append((_log_id(entry.get("log_id"), kind).index, n, entry.get("payload")))
            else:
                raise _Bad(f"unknown entry {kind!r} (tree {obj[0]!r})")
        except _Bad as e:
            raise ValueError(f"line {n}: {e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"line {n}: not UTF-8: {e}") from None
    if last_applied is None and not kv and not entries:
        raise ValueError(f"line {n + 1}: no state machine and no log: not a databend-metactl export")
    applied = last_applied or LogId(0, 0)
    for key, v in kv.items():
        if v.seq > seq:
            raise ValueError(f"key {key!r} has seq {v.seq}, above the state machine's seq {seq}")

    # The state machine, then the committed entries it had not applied, as databend-meta
    # replays them on start.
    sm = KVStateMachine.restore(msgpack.packb({
        "format": SNAPSHOT_FORMAT, "version": SNAPSHOT_LIST_VERSION, "seq": seq, "rev": 0, "log_time_ms": 0,
        "kv": [[k, v.seq, v.data, v.expire_at_ms] for k, v in sorted(kv.items())], "nodes": [],
        "digest": None,
    }, use_bin_type=True))
    commit = committed.index if committed is not None else applied.index
    for index, line, payload in sorted(entries, key=lambda e: e[0]):
        if index <= applied.index or index > commit:
            continue
        try:
            log_time_ms = _replay(sm, nodes, payload, log_time_ms)
            if isinstance(payload, dict) and "Membership" in payload:
                voters, learners = _membership(payload["Membership"])
        except _Bad as e:
            raise ValueError(f"line {line}: log entry {index}: {e}") from None
        applied = LogId(applied.term, index)
    return ExportedState(
        cluster_id=None,
        cluster_name=None,
        node_id=None,
        last_applied=applied,
        voters=voters,
        learners=learners,
        nodes=sorted(nodes.items()),
        seq=sm.last_seq,
        log_time_ms=max(log_time_ms, sm.log_time_ms),
        kv=list(sm.items()),
    )


def _replay(sm: KVStateMachine, nodes: dict[int, NodeRecord], payload: Any, log_time_ms: int) -> int:
    """Apply one committed entry's payload; the log time after it."""
    if payload == "Blank" or (isinstance(payload, dict) and "Membership" in payload):
        return log_time_ms
    normal = payload.get("Normal") if isinstance(payload, dict) else None
    if not isinstance(normal, dict) or not isinstance(normal.get("cmd"), dict) or len(normal["cmd"]) != 1:
        raise _Bad(f"expected Blank, Membership or Normal {{time_ms, cmd}}, got {payload!r:.80}")
    time_ms = normal.get("time_ms")
    log_time_ms = max(log_time_ms, time_ms) if is_int(time_ms) else log_time_ms
    (name, cmd), = normal["cmd"].items()
    if name == "UpsertKV":
        sm.apply(_upsert(cmd), log_time_ms)
    elif name == "AddNode":
        if not isinstance(cmd, dict) or not is_int(cmd.get("node_id")):
            raise _Bad(f"AddNode: expected {{node_id, node}}, got {cmd!r:.80}")
        if cmd.get("overriding") or cmd["node_id"] not in nodes:
            nodes[cmd["node_id"]] = _node(cmd.get("node"))
    elif name == "RemoveNode":
        if isinstance(cmd, dict) and is_int(cmd.get("node_id")):
            nodes.pop(cmd["node_id"], None)
    else:
        raise _Bad(
            f"a {name} command the state machine had not applied yet: metanode replays only UpsertKV,"
            " AddNode and RemoveNode; trigger a snapshot on the databend-meta node"
            " (GET /v1/ctrl/trigger_snapshot) and export again"
        )
    return log_time_ms


__all__ = ["EXPIRE_AT_MS_THRESHOLD", "expire_at_ms", "load_databend_lines"]
