"""`metanode import --format databend`: reading a `databend-metactl export` file
(metanode/databend_import.py): keys with their seqs, the global seq, node records, the
membership, expiries in seconds or milliseconds, the committed log entries the state
machine had not applied yet, and one-line errors naming the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metanode import backup
from metanode.databend_import import load_databend_lines
from metanode.raft.types import LogId


def log_id(term: int, index: int, node: int = 1) -> dict:
    return {"leader_id": {"term": term, "node_id": node}, "index": index}


def upsert(index: int, key: str, value: bytes | None, seq: object = {"GE": 0}, meta: object = None,
           time_ms: int = 1_753_508_279_000) -> str:
    v: object = "Delete" if value is None else {"Update": list(value)}
    cmd = {"UpsertKV": {"key": key, "seq": seq, "value": v, "value_meta": meta}}
    return json.dumps(["raft_log", {"LogEntry": {"log_id": log_id(1, index),
                                                 "payload": {"Normal": {"time_ms": time_ms + index, "cmd": cmd}}}}])


def kv(key: str, seq: int, data: bytes, meta: object = None) -> str:
    return json.dumps(["state_machine/0", {"GenericKV": {"key": key, "value": {"seq": seq, "meta": meta,
                                                                              "data": list(data)}}}])


def export(*, applied: int = 7, committed: int = 7, seq: int = 3, extra_log: list[str] = (),  # type: ignore[assignment]
           keys: list[str] | None = None) -> list[str]:
    """A databend-meta V004 export of a one-node cluster that wrote three keys."""
    node = {"name": "1", "endpoint": {"addr": "localhost", "port": 28103}, "grpc_api_advertise_address": "127.0.0.1:9191"}
    lines = [
        json.dumps(["header", {"DataHeader": {"key": "header", "value": {"version": "V004"}}}]),
        json.dumps(["raft_log", {"NodeId": 1}]),
        json.dumps(["raft_log", {"Vote": {"leader_id": {"term": 1, "node_id": 1}, "committed": True}}]),
        json.dumps(["raft_log", {"Committed": log_id(1, committed)}]),
        json.dumps(["raft_log", {"Purged": None}]),
        json.dumps(["raft_log", {"LogEntry": {"log_id": log_id(0, 0, 0),
                                              "payload": {"Membership": {"configs": [[1]], "nodes": {"1": {}}}}}}]),
        json.dumps(["raft_log", {"LogEntry": {"log_id": log_id(1, 1), "payload": "Blank"}}]),
        upsert(5, "app/db/host", b"localhost"),
        upsert(6, "app/db/port", b"5432"),
        upsert(7, "app/config/timeout", b"30"),
        *extra_log,
        json.dumps(["state_machine/0", {"Sequences": {"key": "generic-kv", "value": seq}}]),
        json.dumps(["state_machine/0", {"StateMachineMeta": {"key": "LastApplied", "value": {"LogId": log_id(1, applied)}}}]),
        json.dumps(["state_machine/0", {"StateMachineMeta": {"key": "LastMembership", "value": {"Membership": {
            "log_id": log_id(1, 3), "membership": {"configs": [[1]], "nodes": {"1": {}}}}}}}]),
        json.dumps(["state_machine/0", {"Nodes": {"key": 1, "value": node}}]),
        json.dumps(["state_machine/0", {"Expire": {"key": {"time_ms": 1, "seq": 1}, "value": {"key": "x", "seq": 1}}}]),
    ]
    lines += keys if keys is not None else [
        kv("app/config/timeout", 3, b"30"), kv("app/db/host", 1, b"localhost"), kv("app/db/port", 2, b"5432"),
    ]
    return lines


def test_keys_seqs_nodes_and_membership() -> None:
    st = load_databend_lines(export())
    assert [(k, v.seq, v.data) for k, v in st.kv] == [
        ("app/config/timeout", 3, b"30"), ("app/db/host", 1, b"localhost"), ("app/db/port", 2, b"5432")]
    assert st.seq == 3 and st.last_applied == LogId(1, 7)
    assert st.voters == (1,) and st.learners == ()
    assert [(i, r.name, r.endpoint.addr, r.endpoint.port, r.grpc_api_advertise_address) for i, r in st.nodes] == [
        (1, "1", "localhost", 28103, "127.0.0.1:9191")]


def test_expire_at_in_seconds_or_milliseconds_as_databend_reads_it() -> None:
    st = load_databend_lines(export(seq=5, keys=[
        kv("a", 4, b"x", {"expire_at": 2_000_000_000}),  # seconds
        kv("b", 5, b"y", {"expire_at": 2_000_000_000_123}),  # milliseconds
        kv("c", 1, b"z", {"expire_at": None}),
    ]))
    assert {k: v.expire_at_ms for k, v in st.kv} == {"a": 2_000_000_000_000, "b": 2_000_000_000_123, "c": None}


def test_committed_entries_after_the_state_machine_are_replayed() -> None:
    # The state machine was last saved at index 6 (two keys, seq 2); entries 7..11 are
    # committed: an insert, an update, an insert with a TTL, a delete, a seq mismatch
    # that changes nothing; 12 is not committed.
    lines = export(applied=6, committed=11, seq=2, keys=[kv("app/db/host", 1, b"localhost"),
                                                        kv("app/db/port", 2, b"5432")], extra_log=[
        upsert(8, "app/db/port", b"6543", seq={"Exact": 2}),
        upsert(9, "tmp/lease", b"l", meta={"expire_at": 4_000_000_000}),
        upsert(10, "app/db/host", None),
        upsert(11, "app/db/port", b"ignored", seq={"Exact": 99}),
        upsert(12, "not/committed", b"x"),
    ])
    st = load_databend_lines(lines)
    assert {k: (v.seq, v.data, v.expire_at_ms) for k, v in st.kv} == {
        "app/config/timeout": (3, b"30", None), "app/db/port": (4, b"6543", None),
        "tmp/lease": (5, b"l", 4_000_000_000_000)}
    assert st.seq == 5 and st.last_applied.index == 11 and st.log_time_ms == 1_753_508_279_011


def test_a_transaction_not_yet_applied_is_refused_with_what_to_do() -> None:
    txn = json.dumps(["raft_log", {"LogEntry": {"log_id": log_id(1, 8), "payload": {"Normal": {
        "time_ms": 1, "cmd": {"Transaction": {"condition": [], "if_then": [], "else_then": []}}}}}}])
    lines = export(applied=7, committed=8, extra_log=[txn])
    with pytest.raises(ValueError, match=rf"^line {lines.index(txn) + 1}: log entry 8: a Transaction command .*trigger_snapshot"):
        load_databend_lines(lines)


@pytest.mark.parametrize("bad, message", [
    ("not json", "not valid JSON"),
    ('{"type": "header"}', r"expected \[TREE, \{KIND: VALUE\}\]"),
    ('["state_machine/0", {"Frobnicate": {}}]', "unknown entry 'Frobnicate'"),
    ('["state_machine/0", {"GenericKV": {"key": "k", "value": {"seq": 1, "meta": null, "data": [300]}}}]',
     "key 'k': expected a list of bytes"),
])
def test_malformed_lines_name_the_line(bad: str, message: str) -> None:
    lines = export()
    lines.insert(3, bad)
    with pytest.raises(ValueError, match=rf"^line 4: .*{message}"):
        load_databend_lines(lines)


def test_a_seq_above_the_global_seq_is_refused() -> None:
    with pytest.raises(ValueError, match="key 'app/db/host' has seq 9, above the state machine's seq 3"):
        load_databend_lines(export(keys=[kv("app/db/host", 9, b"x")]))


def test_imported_into_a_data_dir_with_its_seqs(tmp_path: Path) -> None:
    st = load_databend_lines(export())
    backup.write_state(tmp_path / "d", st, node_id=1, initial_cluster={1: ("127.0.0.1", 28004)}, cluster_id="c1")
    exported, sm = backup.read_state(tmp_path / "d")
    assert [(k, v.seq, v.data) for k, v in sm.items()] == [
        ("app/config/timeout", 3, b"30"), ("app/db/host", 1, b"localhost"), ("app/db/port", 2, b"5432")]
    assert sm.last_seq == 3 and exported.cluster_id == "c1"
    assert [(i, r.grpc_api_advertise_address) for i, r in sm.nodes()] == [(1, "127.0.0.1:9191")]
