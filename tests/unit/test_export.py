"""`metanode export` / `metanode import` offline on data dirs (no processes)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from metanode import backup, exportfmt, ops
from metanode.errors import ConfigError
from metanode.raft.types import Entry, EntryKind, HardState, LogId, Membership, Snapshot, SnapshotMeta
from metanode.sm import Endpoint, KVStateMachine, NodeRecord, SetNode, Txn, TxnDeleteByPrefix, TxnPut, Upsert
from metanode.sm.codec import encode_command
from metanode.storage import NodeMeta, RaftStorage

COMMANDS = [
    SetNode(1, NodeRecord("1", Endpoint("127.0.0.1", 28004), "127.0.0.1:9191")),
    Upsert("a", b"1"),
    Upsert("b", b"\x00\xff binary"),
    Upsert("c/x", b"3", ttl_ms=1_000_000),
    Upsert("c/y", b"4"),
    Upsert("a", b"1 again"),
    Upsert("b", None),  # a delete
    Txn((), (TxnPut("d", b"5"), TxnDeleteByPrefix("c/y")), ()),
    Upsert("short", b"gone", ttl_ms=10),  # expired by a later entry's log time
    Upsert("e", b"6"),
    Upsert("ünïcode/ключ", b"7"),
]


def build_dir(root: Path, *, commit_all: bool = True) -> KVStateMachine:
    """A data dir with a membership entry, a snapshot in the middle, a membership
    change, a noop and an uncommitted tail; returns the state a node would have."""
    expected = KVStateMachine()
    entries: list[Entry] = [Entry(1, 1, EntryKind.MEMBERSHIP, b"", Membership.of([1]))]
    for i, cmd in enumerate(COMMANDS):
        t = 1000 + 100 * i
        entries.append(Entry(1, len(entries) + 1, EntryKind.NORMAL, encode_command(cmd, t)))
        if i == 4:
            entries.append(Entry(2, len(entries) + 1, EntryKind.NOOP))
            entries.append(Entry(2, len(entries) + 1, EntryKind.MEMBERSHIP, b"", Membership.of([1, 2], [3])))
    # Fix terms: everything after the noop is term 2.
    seen_noop = False
    fixed = []
    for e in entries:
        seen_noop = seen_noop or e.kind == EntryKind.NOOP
        fixed.append(Entry(2 if seen_noop else 1, e.index, e.kind, e.data, e.membership))
    entries = fixed
    uncommitted = Entry(2, len(entries) + 1, EntryKind.NORMAL, encode_command(Upsert("zzz", b"no"), 99_999))
    with RaftStorage.open(root) as st:
        st.append(entries=entries + [uncommitted], hard_state=HardState(2, 1, len(entries)))
        st.save_meta(NodeMeta(1, "cid-1", "clu"))
        # a snapshot in the middle, after the 4th command (entry 5)
        mid = KVStateMachine()
        for i, cmd in enumerate(COMMANDS[:4]):
            mid.apply(cmd, 1000 + 100 * i)
        st.save_snapshot(Snapshot(SnapshotMeta(LogId(1, 5), Membership.of([1])), mid.snapshot()))
        st.purge(3)
    for i, cmd in enumerate(COMMANDS):
        expected.apply(cmd, 1000 + 100 * i)
    return expected


def export_text(root: Path) -> str:
    exported, _ = backup.read_state(root)
    return "".join(exportfmt.dump_lines(exported))


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_export_equals_the_state_of_a_state_machine_fed_the_same_commands(tmp_path: Path) -> None:
    expected = build_dir(tmp_path / "d")
    exported, sm = backup.read_state(tmp_path / "d")
    assert sm.snapshot() == expected.snapshot()
    out = lines("".join(exportfmt.dump_lines(exported)))
    assert out[0] == {
        "type": "header", "format": "metanode-export", "version": 1, "cluster_id": "cid-1",
        "cluster_name": "clu", "node_id": 1, "last_applied": {"term": 2, "index": len(COMMANDS) + 3},
    }
    assert out[1] == {"type": "membership", "voters": [1, 2], "learners": [3]}
    assert out[2] == {
        "type": "node", "id": 1, "name": "1", "endpoint": {"addr": "127.0.0.1", "port": 28004},
        "grpc_api_advertise_address": "127.0.0.1:9191",
    }
    assert out[3] == {"type": "state", "seq": expected.last_seq, "log_time_ms": expected.log_time_ms}
    kv = out[4:]
    assert [r["key"] for r in kv] == [k for k, _ in expected.items()]
    assert "zzz" not in [r["key"] for r in kv] and "b" not in [r["key"] for r in kv]
    import base64

    for r, (k, v) in zip(kv, expected.items()):
        assert r == {"type": "kv", "key": k, "seq": v.seq, "data": base64.b64encode(v.data).decode(),
                     "expire_at_ms": v.expire_at_ms}


def test_export_import_export_keeps_every_key_and_seq(tmp_path: Path) -> None:
    build_dir(tmp_path / "d")
    first = export_text(tmp_path / "d")
    cluster = {1: ("10.0.0.1", 28004), 2: ("10.0.0.2", 28004), 5: ("h5", 1234)}
    for nid in (1, 2, 5):
        backup.write_state(tmp_path / f"i{nid}", exportfmt.load_lines(io.StringIO(first)), node_id=nid,
                           initial_cluster=cluster)
    again = [lines(export_text(tmp_path / f"i{nid}")) for nid in (1, 2, 5)]
    before = lines(first)
    for nid, out in zip((1, 2, 5), again):
        assert out[0]["cluster_id"] == "cid-1" and out[0]["cluster_name"] == "clu"
        assert out[0]["node_id"] == nid and out[0]["last_applied"] == {"term": 1, "index": 1}
        assert out[1] == {"type": "membership", "voters": [1, 2, 5], "learners": []}
        assert out[2:5] == [
            {"type": "node", "id": 1, "name": "1", "endpoint": {"addr": "10.0.0.1", "port": 28004},
             "grpc_api_advertise_address": "127.0.0.1:9191"},
            {"type": "node", "id": 2, "name": "2", "endpoint": {"addr": "10.0.0.2", "port": 28004},
             "grpc_api_advertise_address": None},
            {"type": "node", "id": 5, "name": "5", "endpoint": {"addr": "h5", "port": 1234},
             "grpc_api_advertise_address": None},
        ]
        assert out[5] == before[3]  # seq and log time
        assert out[6:] == before[4:]  # every key, seq, data, expiry
        assert out[1:] == again[0][1:]  # the members differ only by node id
    # identical snapshots and logs: only the meta differs
    for name in ("snapshot", "wal"):
        for f in sorted((tmp_path / "i1" / name).iterdir()):
            assert f.read_bytes() == (tmp_path / "i2" / name / f.name).read_bytes(), f
    with RaftStorage.open(tmp_path / "i2") as st:
        assert st.meta == NodeMeta(2, "cid-1", "clu", joined_at=0)
        state = st.load()
        assert state.hard_state == HardState(1, None, 1)
        assert state.snapshot is not None and state.snapshot.meta == SnapshotMeta(LogId(1, 1), Membership.of([1, 2, 5]))


def test_cli_round_trip_through_files_and_stdio(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    build_dir(tmp_path / "d")
    assert ops.main(["export", "--raft-dir", str(tmp_path / "d"), "-o", str(tmp_path / "x.jsonl")]) == 0
    assert ops.main(["export", "--raft-dir", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert out == (tmp_path / "x.jsonl").read_text()
    monkeypatch.setattr("sys.stdin", io.StringIO(out))
    assert ops.main(["import", "--raft-dir", str(tmp_path / "n"), "--id", "1", "--initial-cluster",
                     "1=127.0.0.1:28004", "--cluster-name", "other", "--new-cluster-id"]) == 0
    with RaftStorage.open(tmp_path / "n") as st:
        assert st.meta is not None and st.meta.cluster_name == "other" and st.meta.cluster_id != "cid-1"
    assert lines(export_text(tmp_path / "n"))[3:] == lines(out)[3:]


def test_import_refuses_a_non_empty_dir_and_an_id_outside_the_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_dir(tmp_path / "d")
    (tmp_path / "x.jsonl").write_text(export_text(tmp_path / "d"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    base = ["import", "-i", str(tmp_path / "x.jsonl"), "--initial-cluster", "1=h:1", "2=h:2"]
    assert ops.main(base + ["--raft-dir", str(tmp_path / "full"), "--id", "1"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and str(tmp_path / "full") in err
    assert ops.main(base + ["--raft-dir", str(tmp_path / "new"), "--id", "3"]) == 2
    assert "--id: 3 is not in --initial-cluster [1, 2]" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert ops.main(["import", "-i", str(tmp_path / "x.jsonl"), "--raft-dir", str(tmp_path / "new"), "--id", "1",
                     "--initial-cluster", "1:h:1"]) == 2
    assert "--initial-cluster" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not in --initial-cluster"):
        backup.write_state(tmp_path / "new", backup.read_state(tmp_path / "d")[0], node_id=9,
                           initial_cluster={1: ("h", 1)})


GOOD = [
    '{"type": "header", "format": "metanode-export", "version": 1, "cluster_id": "c", "cluster_name": "n",'
    ' "node_id": 1, "last_applied": {"term": 1, "index": 5}}',
    '{"type": "membership", "voters": [1], "learners": []}',
    '{"type": "node", "id": 1, "name": "1", "endpoint": {"addr": "h", "port": 1}, "grpc_api_advertise_address": null}',
    '{"type": "state", "seq": 5, "log_time_ms": 7}',
    '{"type": "kv", "key": "a", "seq": 1, "data": "eA==", "expire_at_ms": null}',
    '{"type": "kv", "key": "b", "seq": 5, "data": "", "expire_at_ms": 100}',
]


def test_load_lines_accepts_a_good_export() -> None:
    st = exportfmt.load_lines(GOOD)
    assert st.seq == 5 and st.log_time_ms == 7 and st.last_applied == LogId(1, 5)
    assert [(k, v.seq, v.data, v.expire_at_ms) for k, v in st.kv] == [("a", 1, b"x", None), ("b", 5, b"", 100)]
    assert st.nodes == [(1, NodeRecord("1", Endpoint("h", 1), None))]
    assert "".join(exportfmt.dump_lines(st)).splitlines() == GOOD


@pytest.mark.parametrize(
    "line_no, replacement, message",
    [
        (1, "not json", "line 1: not valid JSON"),
        (1, "[1, 2]", "line 1: expected a JSON object, got list"),
        (1, GOOD[1], "line 1: expected a 'header' line, got a 'membership' line"),
        (1, GOOD[0].replace("metanode-export", "other"), "line 1: not a metanode export"),
        (1, GOOD[0].replace('"version": 1', '"version": 9'), "line 1: unsupported export version 9"),
        (2, '{"type": "membership", "voters": [0], "learners": []}', "line 2: field 'voters' must be a list"),
        (3, GOOD[2].replace('"port": 1', '"port": 0'), "line 3: node endpoint port must be in 1..65535"),
        (4, '{"type": "state", "seq": -1, "log_time_ms": 7}', "line 4: field 'seq' must be a non-negative int"),
        (5, '{"type": "what"}', "line 5: unknown line type 'what'"),
        (5, GOOD[5], "line 6: key 'b' is not after 'b'"),
        (5, GOOD[4].replace('"seq": 1', '"seq": 6'), "line 5: key 'a' has seq 6, above the state's seq 5"),
        (5, GOOD[4].replace("eA==", "!!"), "line 5: field 'data' of key 'a' is not valid base64"),
        (5, GOOD[4].replace('"key": "a", ', ""), "line 5: missing field 'key'"),
        (5, GOOD[4].replace('null', '"soon"'), "line 5: field 'expire_at_ms' must be"),
        (5, GOOD[3], "line 5: expected a 'kv' line, got a 'state' line"),
        (6, "", "line 6: not valid JSON"),
    ],
)
def test_load_lines_names_the_malformed_line(line_no: int, replacement: str, message: str) -> None:
    bad = list(GOOD)
    bad[line_no - 1] = replacement
    with pytest.raises(ValueError) as info:
        exportfmt.load_lines(bad)
    assert str(info.value).startswith(message), str(info.value)


def test_load_lines_names_a_truncated_export() -> None:
    with pytest.raises(ValueError, match=r"^line 1: unexpected end of input: expected a 'header' line"):
        exportfmt.load_lines([])
    with pytest.raises(ValueError, match=r"^line 4: unexpected end of input: expected a 'node' or 'state' line"):
        exportfmt.load_lines(GOOD[:3])


def test_import_of_a_malformed_file_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.jsonl").write_text("\n".join(GOOD[:4] + ["{oops"]) + "\n")
    assert ops.main(["import", "-i", str(tmp_path / "x.jsonl"), "--raft-dir", str(tmp_path / "n"), "--id", "1",
                     "--initial-cluster", "1=h:1"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'x.jsonl'}: line 5: not valid JSON" in err
    assert not (tmp_path / "n").exists()


def test_a_dir_in_use_or_not_a_data_dir_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_dir(tmp_path / "d")
    with RaftStorage.open(tmp_path / "d"):
        assert ops.main(["export", "--raft-dir", str(tmp_path / "d")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("metanode export: error:") and str(tmp_path / "d") in err
        assert "Traceback" not in err
    assert ops.main(["export", "--raft-dir", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()
    (tmp_path / "empty").mkdir()
    assert ops.main(["export", "--raft-dir", str(tmp_path / "empty")]) == 2
    assert "not a metanode data dir" in capsys.readouterr().err
    assert list((tmp_path / "empty").iterdir()) == []
