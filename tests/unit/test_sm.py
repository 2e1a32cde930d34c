"""Unit tests of the pure KV state machine (metanode.sm; contract §5)."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from metanode.sm import (
    SNAPSHOT_FORMAT,
    SNAPSHOT_VERSION,
    ApplyError,
    Change,
    Endpoint,
    KeyChange,
    KVStateMachine,
    MatchSeq,
    NodeRecord,
    NodeUpdate,
    RemoveNode,
    SeqV,
    SetNode,
    Upsert,
)


def put(sm: KVStateMachine, key: str, value: bytes | None, t: int = 0, **kw) -> Change:
    result = sm.apply(Upsert(key, value, **kw), t)
    assert isinstance(result, Change), result
    return result


# ---------------------------------------------------------------- seq


def test_first_write_gets_seq_1_and_every_insert_or_update_bumps_the_global_seq():
    sm = KVStateMachine()
    assert sm.last_seq == 0
    assert put(sm, "a", b"1") == Change(None, SeqV(1, b"1"))
    assert put(sm, "b", b"2") == Change(None, SeqV(2, b"2"))
    assert put(sm, "a", b"3") == Change(SeqV(1, b"1"), SeqV(3, b"3"))
    assert put(sm, "a", b"3").result == SeqV(4, b"3")  # same bytes still bump seq
    assert sm.last_seq == 4
    assert sm.get("a") == SeqV(4, b"3")
    assert sm.get("b") == SeqV(2, b"2")
    assert len(sm) == 2


def test_absent_key_reads_as_none():
    sm = KVStateMachine()
    put(sm, "a", b"1")
    assert sm.get("zz") is None
    assert sm.mget(["zz", "a", "zz"]) == [None, SeqV(1, b"1"), None]
    assert sm.mget([]) == []


# ---------------------------------------------------------------- match_seq


def test_match_seq_none_matches_anything():
    sm = KVStateMachine()
    put(sm, "a", b"1", match_seq=None)
    assert put(sm, "a", b"2", match_seq=None).result == SeqV(2, b"2")


def test_match_seq_exact_zero_writes_only_if_absent():
    sm = KVStateMachine()
    assert put(sm, "a", b"1", match_seq=MatchSeq(exact=0)) == Change(None, SeqV(1, b"1"))
    change = put(sm, "a", b"2", match_seq=MatchSeq(exact=0))
    assert change == Change(SeqV(1, b"1"), SeqV(1, b"1"))
    assert not change.changed
    assert sm.get("a") == SeqV(1, b"1")


def test_match_seq_exact_n():
    sm = KVStateMachine()
    put(sm, "a", b"1")
    put(sm, "b", b"x")
    assert put(sm, "a", b"2", match_seq=MatchSeq(exact=2)).result == SeqV(1, b"1")
    assert put(sm, "a", b"2", match_seq=MatchSeq(exact=1)).result == SeqV(3, b"2")
    assert put(sm, "absent", b"v", match_seq=MatchSeq(exact=1)) == Change(None, None)
    assert sm.get("absent") is None


def test_match_seq_ge():
    sm = KVStateMachine()
    assert put(sm, "a", b"1", match_seq=MatchSeq(ge=1)) == Change(None, None)  # absent: seq 0
    assert put(sm, "a", b"1", match_seq=MatchSeq(ge=0)).result == SeqV(1, b"1")
    put(sm, "b", b"x")  # seq 2
    put(sm, "a", b"2")  # seq 3
    assert put(sm, "a", b"3", match_seq=MatchSeq(ge=4)).result == SeqV(3, b"2")
    assert put(sm, "a", b"3", match_seq=MatchSeq(ge=3)).result == SeqV(4, b"3")
    assert put(sm, "a", b"4", match_seq=MatchSeq(ge=1)).result == SeqV(5, b"4")


def test_seq_mismatch_changes_nothing():
    sm = KVStateMachine()
    put(sm, "a", b"1", t=10)
    before = sm.snapshot()
    change = put(sm, "a", b"2", t=10, match_seq=MatchSeq(exact=7), ttl_ms=5)
    assert change.prev == change.result == SeqV(1, b"1")
    assert sm.last_changes == ()
    assert sm.last_seq == 1
    assert sm.snapshot() == before
    change = put(sm, "a", None, t=10, match_seq=MatchSeq(ge=2))
    assert change == Change(SeqV(1, b"1"), SeqV(1, b"1"))
    assert sm.snapshot() == before


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"exact": 1, "ge": 1}, {"exact": -1}, {"ge": -3}, {"exact": True}, {"ge": 1.0}, {"exact": "1"}],
)
def test_match_seq_needs_exactly_one_non_negative_int(kwargs):
    with pytest.raises(ValueError):
        MatchSeq(**kwargs)


def test_match_seq_matches():
    assert MatchSeq(exact=0).matches(0) and not MatchSeq(exact=0).matches(1)
    assert MatchSeq(ge=2).matches(2) and MatchSeq(ge=2).matches(9) and not MatchSeq(ge=2).matches(1)


# ---------------------------------------------------------------- delete


def test_delete_returns_prev_and_does_not_bump_seq():
    sm = KVStateMachine()
    put(sm, "a", b"1")
    put(sm, "b", b"2")
    assert put(sm, "a", None) == Change(SeqV(1, b"1"), None)
    assert sm.last_seq == 2
    assert sm.get("a") is None
    assert len(sm) == 1
    assert put(sm, "a", b"again").result == SeqV(3, b"again")


def test_delete_of_absent_key_is_a_no_op():
    sm = KVStateMachine()
    put(sm, "a", b"1")
    before = sm.snapshot()
    assert put(sm, "nope", None) == Change(None, None)
    assert sm.last_seq == 1
    assert sm.last_changes == ()
    assert sm.snapshot() == before


def test_delete_with_match_seq():
    sm = KVStateMachine()
    put(sm, "a", b"1")
    assert put(sm, "a", None, match_seq=MatchSeq(exact=2)) == Change(SeqV(1, b"1"), SeqV(1, b"1"))
    assert put(sm, "a", None, match_seq=MatchSeq(exact=1)) == Change(SeqV(1, b"1"), None)


def test_change_changed():
    assert Change(None, SeqV(1, b"")).changed
    assert Change(SeqV(1, b""), None).changed
    assert not Change(None, None).changed
    assert not Change(SeqV(1, b""), SeqV(1, b"")).changed


# ---------------------------------------------------------------- TTL by log time


def test_ttl_expires_at_log_time_plus_ttl_and_not_before():
    sm = KVStateMachine()
    assert put(sm, "k", b"v", t=1000, ttl_ms=100).result == SeqV(1, b"v", 1100)
    put(sm, "other", b"o", t=1099)
    assert sm.get("k") == SeqV(1, b"v", 1100)
    assert len(sm) == 2
    put(sm, "other", b"o", t=1100)
    assert sm.get("k") is None
    assert sm.mget(["k"]) == [None]
    assert [k for k, _ in sm.list("")] == ["other"]
    assert len(sm) == 1
    assert ("k" in {c.key for c in sm.last_changes})


def test_expire_at_ms_is_absolute():
    sm = KVStateMachine()
    assert put(sm, "k", b"v", t=10, expire_at_ms=500).result == SeqV(1, b"v", 500)
    put(sm, "x", b"", t=499)
    assert sm.get("k") is not None
    put(sm, "x", b"", t=500)
    assert sm.get("k") is None


def test_expired_key_counts_as_absent_for_match_seq():
    sm = KVStateMachine()
    put(sm, "lock", b"a", t=0, ttl_ms=10)
    assert put(sm, "lock", b"b", t=5, match_seq=MatchSeq(exact=0)).result == SeqV(1, b"a", 10)
    change = put(sm, "lock", b"b", t=10, match_seq=MatchSeq(exact=0))
    assert change == Change(None, SeqV(2, b"b"))


def test_update_replaces_the_expiry():
    sm = KVStateMachine()
    put(sm, "k", b"1", t=0, ttl_ms=10)
    put(sm, "k", b"2", t=5)  # no TTL: permanent now
    put(sm, "x", b"", t=1_000_000)
    assert sm.get("k") == SeqV(2, b"2")
    put(sm, "k", b"3", t=1_000_000, ttl_ms=50)  # renew with a later TTL
    put(sm, "x", b"", t=1_000_049)
    assert sm.get("k") == SeqV(4, b"3", 1_000_050)


def test_ttl_zero_writes_bumps_seq_and_is_gone_in_the_same_apply():
    sm = KVStateMachine()
    change = put(sm, "k", b"v", t=7, ttl_ms=0)
    assert change == Change(None, SeqV(1, b"v", 7))
    assert sm.get("k") is None and len(sm) == 0 and sm.last_seq == 1
    assert sm.last_changes == (
        KeyChange("k", None, SeqV(1, b"v", 7)),
        KeyChange("k", SeqV(1, b"v", 7), None),
    )


def test_log_time_never_goes_backwards():
    sm = KVStateMachine()
    put(sm, "a", b"", t=1000)
    put(sm, "k", b"v", t=400, ttl_ms=100)  # relative to the effective time, 1000
    assert sm.log_time_ms == 1000
    assert sm.get("k") == SeqV(2, b"v", 1100)
    put(sm, "a", b"", t=1099)
    assert sm.get("k") is not None
    put(sm, "a", b"", t=0)
    assert sm.log_time_ms == 1099


def test_expiry_goes_in_expire_time_then_key_order():
    sm = KVStateMachine()
    put(sm, "c", b"", t=0, expire_at_ms=20)
    put(sm, "b", b"", t=0, expire_at_ms=30)
    put(sm, "a", b"", t=0, expire_at_ms=20)
    put(sm, "z", b"", t=0)
    put(sm, "y", b"", t=25)
    assert [(c.key, c.current) for c in sm.last_changes] == [("a", None), ("c", None), ("y", SeqV(5, b""))]
    assert [k for k, _ in sm.items()] == ["b", "y", "z"]


def test_two_replicas_fed_the_same_entries_expire_identically():
    entries = [
        (Upsert("s/1", b"a", ttl_ms=30), 100),
        (Upsert("s/2", b"b", expire_at_ms=125), 101),
        (Upsert("s/3", b"c", ttl_ms=5), 90),  # stale leader clock: effective 101
        (Upsert("p", b"d"), 120),
        (Upsert("s/1", b"e", match_seq=MatchSeq(exact=0)), 126),
        (Upsert("p", None), 200),
    ]
    a, b = KVStateMachine(), KVStateMachine()
    for cmd, t in entries:
        assert a.apply(cmd, t) == b.apply(cmd, t)
        assert a.last_changes == b.last_changes
        assert a.snapshot() == b.snapshot()
    assert list(a.items()) == []
    assert a.last_seq == 4


# ---------------------------------------------------------------- list


def test_list_prefix_in_key_order_with_limit():
    sm = KVStateMachine()
    for key in ["b/2", "a", "b/10", "b/1", "b", "c/1", "b/1/x", "ba"]:
        put(sm, key, key.encode())
    assert [k for k, _ in sm.list("b/")] == ["b/1", "b/1/x", "b/10", "b/2"]
    assert [k for k, _ in sm.list("b/", limit=2)] == ["b/1", "b/1/x"]
    assert sm.list("b/", limit=0) == []
    assert [k for k, _ in sm.list("b")] == ["b", "b/1", "b/1/x", "b/10", "b/2", "ba"]
    assert [k for k, _ in sm.list("")] == sorted(["b/2", "a", "b/10", "b/1", "b", "c/1", "b/1/x", "ba"])
    assert sm.list("zz") == [] and sm.list("b/3") == []
    assert sm.list("c/") == [("c/1", SeqV(6, b"c/1"))]
    put(sm, "b/1", None)
    assert [k for k, _ in sm.list("b/", limit=10)] == ["b/1/x", "b/10", "b/2"]


def test_list_orders_by_code_point():
    sm = KVStateMachine()
    for key in ["k/é", "k/z", "k/Z", "k/€", "k/😀"]:
        put(sm, key, b"")
    assert [k for k, _ in sm.list("k/")] == ["k/Z", "k/z", "k/é", "k/€", "k/😀"]


@pytest.mark.parametrize("prefix,limit", [("a", -1), ("a", 1.5), ("a", True), (b"a", None)])
def test_list_rejects_bad_arguments(prefix, limit):
    with pytest.raises(ValueError):
        KVStateMachine().list(prefix, limit)


# ---------------------------------------------------------------- invalid commands


class NotACommand:
    pass


@pytest.mark.parametrize(
    "cmd,t",
    [
        (Upsert("k", b"v", ttl_ms=10, expire_at_ms=20), 50),
        (Upsert("k", b"v", ttl_ms=-1), 50),
        (Upsert("k", b"v", expire_at_ms=1.5), 50),  # type: ignore[arg-type]
        (Upsert("k", "text"), 50),  # type: ignore[arg-type]
        (Upsert(b"k", b"v"), 50),  # type: ignore[arg-type]
        (Upsert("\ud800", b"v"), 50),
        (Upsert("k", b"v", match_seq={"exact": 0}), 50),  # type: ignore[arg-type]
        (NotACommand(), 50),
        (Upsert("k", b"v"), -1),
        (Upsert("k", b"v"), None),
    ],
)
def test_invalid_command_returns_apply_error_and_changes_nothing(cmd, t):
    sm = KVStateMachine()
    put(sm, "k", b"old", t=10, ttl_ms=40)
    before = sm.snapshot()
    result = sm.apply(cmd, t)
    assert isinstance(result, ApplyError)
    assert result.message
    assert sm.snapshot() == before
    assert sm.log_time_ms == 10 and sm.get("k") == SeqV(1, b"old", 50)
    assert sm.last_changes == ()


def test_both_ttl_forms_is_rejected_with_a_clear_message():
    cmd = Upsert("k", b"v", ttl_ms=1, expire_at_ms=2)
    with pytest.raises(ValueError, match="ttl_ms and expire_at_ms"):
        cmd.validate()
    result = KVStateMachine().apply(cmd, 0)
    assert isinstance(result, ApplyError) and "ttl_ms and expire_at_ms" in result.message
    Upsert("k", None, ttl_ms=5).validate()  # a delete ignores a well-formed TTL


# ---------------------------------------------------------------- change reporting


def test_last_changes_reports_each_key_change_of_the_last_apply():
    sm = KVStateMachine()
    put(sm, "a", b"1", t=0, ttl_ms=10)
    assert sm.last_changes == (KeyChange("a", None, SeqV(1, b"1", 10)),)
    put(sm, "a", b"2", t=1)
    assert sm.last_changes == (KeyChange("a", SeqV(1, b"1", 10), SeqV(2, b"2")),)
    put(sm, "a", b"3", t=1, match_seq=MatchSeq(exact=0))
    assert sm.last_changes == ()
    put(sm, "e", b"", t=2, ttl_ms=3)
    put(sm, "a", None, t=5)  # "e" expires first, then the delete runs
    assert sm.last_changes == (
        KeyChange("e", SeqV(3, b"", 5), None),
        KeyChange("a", SeqV(2, b"2"), None),
    )
    sm.apply(Upsert("x", b"", ttl_ms=1, expire_at_ms=1), 6)
    assert sm.last_changes == ()


# ---------------------------------------------------------------- snapshot


def _sample() -> KVStateMachine:
    sm = KVStateMachine()
    put(sm, "b", b"\x00\xff", t=5)
    put(sm, "a", b"", t=6, ttl_ms=100)
    put(sm, "gone", b"x", t=7)
    put(sm, "gone", None, t=8)
    put(sm, "c/é", b"u", t=9, expire_at_ms=10_000)
    return sm


def test_snapshot_round_trip_gives_identical_bytes_and_state():
    sm = _sample()
    data = sm.snapshot()
    assert data == sm.snapshot()
    restored = KVStateMachine.restore(data)
    assert restored.snapshot() == data
    assert list(restored.items()) == list(sm.items())
    assert (restored.last_seq, restored.log_time_ms, len(restored)) == (4, 9, 3)
    assert restored.last_changes == ()
    assert restored.list("c/") == [("c/é", SeqV(4, b"u", 10_000))]
    # Both continue identically, including expiry.
    for cmd, t in [(Upsert("d", b"1"), 50), (Upsert("b", None), 106), (Upsert("c/é", b"w"), 10_000)]:
        assert sm.apply(cmd, t) == restored.apply(cmd, t)
        assert sm.last_changes == restored.last_changes
    assert sm.snapshot() == restored.snapshot()


def test_snapshot_layout():
    doc = msgpack.unpackb(_sample().snapshot(), raw=False)
    assert list(doc) == ["format", "version", "seq", "rev", "log_time_ms", "kv", "nodes", "digest"]
    assert doc["format"] == SNAPSHOT_FORMAT and doc["version"] == SNAPSHOT_VERSION
    # key -> seq (u64) and expire_at_ms (i64, -1: none), little-endian, then the data;
    # in the order the keys were first written.
    assert list(doc["kv"].items()) == [
        ("b", struct.pack("<Qq", 1, -1) + b"\x00\xff"),
        ("a", struct.pack("<Qq", 2, 106)),
        ("c/é", struct.pack("<Qq", 4, 10_000) + b"u"),
    ]


def test_empty_snapshot_round_trip():
    data = KVStateMachine().snapshot()
    sm = KVStateMachine.restore(data)
    assert sm.snapshot() == data and len(sm) == 0 and sm.last_seq == 0


def _doc(**override) -> bytes:
    """A hand-made document; version 4 (kv as a list) unless overridden."""
    doc = {"format": SNAPSHOT_FORMAT, "version": 4, "seq": 5, "rev": 5, "log_time_ms": 10, "kv": [],
           "nodes": [], "digest": None}
    doc.update(override)
    return msgpack.packb(doc, use_bin_type=True)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"garbage that is not msgpack at all \xff\xfe",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({1: 2}),
        _doc() + b"\x00",
        _doc(format="other"),
        _doc(version=6),
        _doc(version=5),  # kv must then be a map
        _doc(version=5, kv={"a": b"short"}),
        _doc(version=5, kv={"a": "not bytes" * 3}),
        _doc(version=5, kv={b"a": struct.pack("<Qq", 1, -1)}),  # a bytes key
        _doc(version=5, kv={"a": struct.pack("<Qq", 0, -1)}),  # seq 0
        _doc(version=5, kv={"a": struct.pack("<Qq", 6, -1)}),  # above the last seq
        _doc(version=5, kv={"a": struct.pack("<Qq", 1, -2)}),
        _doc(version=5, kv={"a": struct.pack("<Qq", 1, 2**62 + 1)}),  # past MAX_TIME_MS
        _doc(version=5, kv={"a": struct.pack("<Qq", 1, -1)}, digest=bytes(16)),  # wrong digest
        _doc(kv=True),
        _doc(version=True),  # == 1, but not an int version
        _doc(version=4.0),
        # version 5 with kv before the fields it needs (snapshot() never lays it out so)
        msgpack.packb({"kv": {}, "format": SNAPSHOT_FORMAT, "version": 5, "seq": 5, "rev": 5, "log_time_ms": 10,
                       "nodes": [], "digest": None}),
        _doc(version=5, kv=True),
        _doc(digest=b"short"),
        _doc(digest=7),
        _doc(rev=-1),
        _doc(nodes=None),
        _doc(nodes=[[1, "1", "localhost", 28004]]),
        _doc(nodes=[[-1, "1", "localhost", 28004, None]]),
        _doc(nodes=[[1, "1", "localhost", 70000, None]]),
        _doc(nodes=[[1, "1", "localhost", 28004, None], [1, "1", "h", 1, None]]),
        _doc(seq=-1),
        _doc(seq="5"),
        _doc(log_time_ms=None),
        _doc(kv={}),
        _doc(kv=[["a", 1, b""]]),
        _doc(kv=[[1, 1, b"", None]]),
        _doc(kv=[["a", 0, b"", None]]),
        _doc(kv=[["a", 6, b"", None]]),
        _doc(kv=[["a", 1, "text", None]]),
        _doc(kv=[["a", 1, b"", -3]]),
        _doc(kv=[["a", 1, b"", 2**62 + 1]]),  # past MAX_TIME_MS: a value could not store it
        _doc(seq=2**63, kv=[["a", 2**63, b"", None]]),  # seq is a signed 64-bit field
        _doc(kv=[["b", 1, b"", None], ["a", 2, b"", None]]),
        _doc(kv=[["a", 1, b"", None], ["a", 2, b"", None]]),
        "not bytes",
    ],
)
def test_restore_rejects_malformed_snapshots(data):
    with pytest.raises(ValueError):
        KVStateMachine.restore(data)  # type: ignore[arg-type]


@given(st.binary(max_size=64))
@settings(max_examples=200, deadline=None)
def test_restore_of_random_bytes_raises_only_value_error(data):
    with pytest.raises(ValueError):
        KVStateMachine.restore(data)


def test_a_snapshot_carries_its_digest_and_a_restore_checks_it():
    """Version 4: the digest travels in the snapshot; a restore hashes the keys it
    reads and keeps that digest, which stays right through writes."""
    sm = _sample()
    data = sm.snapshot()
    restored = KVStateMachine.restore(data)
    assert restored.state_digest() == sm.state_digest()
    fresh = KVStateMachine.restore(_doc(**{**msgpack.unpackb(data, raw=False), "digest": None}))
    assert fresh.state_digest() == sm.state_digest()
    for m in (restored, fresh, sm):
        m.apply(Upsert("z", b"1"), 1_000)
    assert restored.state_digest() == fresh.state_digest() == sm.state_digest()
    builder = sm.snapshot_builder()
    assert builder.result() == sm.snapshot()


def test_a_snapshot_whose_keys_do_not_match_its_digest_is_refused():
    """A snapshot packed wrong (here: one value changed after the digest was taken)
    must not install as if it were right: the restore names the mismatch."""
    doc = msgpack.unpackb(_sample().snapshot(), raw=False)
    key, value = next(iter(doc["kv"].items()))
    doc["kv"][key] = value[:16] + b"not what was hashed"
    with pytest.raises(ValueError, match=r"does not match its 3 keys.*corrupt"):
        KVStateMachine.restore(msgpack.packb(doc, use_bin_type=True))
    doc["digest"] = None  # a hand-made document: nothing to check against
    assert len(KVStateMachine.restore(msgpack.packb(doc, use_bin_type=True))) == 3


def _list_doc(data: bytes, version: int) -> dict:
    """The document of `data` (version 5) as an older version: kv as a list of
    [key, seq, data, expire_at_ms | nil] in key order."""
    doc = msgpack.unpackb(data, raw=False)
    rows = []
    for key, value in sorted(doc["kv"].items()):
        seq, expire = struct.unpack_from("<Qq", value)
        rows.append([key, seq, value[16:], None if expire < 0 else expire])
    return {**doc, "version": version, "kv": rows}


def test_version_4_snapshots_with_a_kv_list_are_still_read():
    sm = KVStateMachine.restore(msgpack.packb(_list_doc(_sample().snapshot(), 4), use_bin_type=True))
    assert list(sm.items()) == list(_sample().items())
    assert sm.state_digest() == _sample().state_digest() and sm.rev == _sample().rev


def test_version_3_snapshots_without_a_digest_are_still_read():
    doc = _list_doc(_sample().snapshot(), 3)
    del doc["digest"]
    sm = KVStateMachine.restore(msgpack.packb(doc, use_bin_type=True))
    built = KVStateMachine.restore(sm.snapshot_builder().result())
    assert sm.state_digest() == _sample().state_digest() == built.state_digest()
    # Restored from a key-ordered list, the machine's order is the key order.
    assert list(msgpack.unpackb(sm.snapshot(), raw=False)["kv"]) == ["a", "b", "c/é"]
    assert KVStateMachine.restore(sm.snapshot()).snapshot() == sm.snapshot()


def test_a_version_5_kv_map_holding_a_key_twice_is_refused():
    """A dict cannot hold a key twice, but msgpack bytes can: the restore names it."""
    p = msgpack.Packer()
    value = struct.pack("<Qq", 1, -1) + b"x"
    data = b"".join([
        p.pack_map_header(8),
        *(p.pack(x) for x in ("format", SNAPSHOT_FORMAT, "version", 5, "seq", 1, "rev", 1, "log_time_ms", 0)),
        p.pack("kv"), p.pack_map_header(2), p.pack("a"), p.pack(value), p.pack("a"), p.pack(value),
        p.pack("nodes"), p.pack([]), p.pack("digest"), p.pack(None),
    ])
    with pytest.raises(ValueError, match=r"kv entry 1: key 'a' appears twice"):
        KVStateMachine.restore(data)


def test_restore_drops_keys_already_expired_at_its_log_time():
    data = _doc(kv=[["a", 1, b"", 10], ["b", 2, b"", 11], ["c", 3, b"", None]])
    sm = KVStateMachine.restore(data)
    assert [k for k, _ in sm.items()] == ["b", "c"]
    assert sm.last_changes == ()


# ---------------------------------------------------------------- property test


class Model:
    """A tiny dict model of contract §5, written independently of the state machine."""

    def __init__(self) -> None:
        self.kv: dict[str, SeqV] = {}
        self.seq = 0
        self.now = 0

    def apply(self, cmd: Upsert, t: int):
        if cmd.ttl_ms is not None and cmd.expire_at_ms is not None:
            return "error"
        self.now = max(self.now, t)
        self.kv = {k: v for k, v in self.kv.items() if v.expire_at_ms is None or v.expire_at_ms > self.now}
        cur = self.kv.get(cmd.key)
        cur_seq = cur.seq if cur else 0
        ms = cmd.match_seq
        if ms is not None and (cur_seq != ms.exact if ms.exact is not None else cur_seq < ms.ge):
            return Change(cur, cur)
        if cmd.value is None:
            self.kv.pop(cmd.key, None)
            return Change(cur, None)
        self.seq += 1
        exp = self.now + cmd.ttl_ms if cmd.ttl_ms is not None else cmd.expire_at_ms
        self.kv[cmd.key] = SeqV(self.seq, cmd.value, exp)
        return Change(cur, self.kv[cmd.key])

    def live(self) -> list[tuple[str, SeqV]]:
        return sorted((k, v) for k, v in self.kv.items() if v.expire_at_ms is None or v.expire_at_ms > self.now)


KEYS = ["a", "ab", "abc", "b", "ba", "c"]
match_seqs = st.one_of(
    st.none(),
    st.builds(MatchSeq, exact=st.integers(0, 6)),
    st.builds(MatchSeq, ge=st.integers(0, 6)),
)
upserts = st.builds(
    Upsert,
    key=st.sampled_from(KEYS),
    value=st.one_of(st.none(), st.binary(max_size=3)),
    match_seq=match_seqs,
    ttl_ms=st.one_of(st.none(), st.none(), st.integers(0, 30)),
    expire_at_ms=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 300)),
)
steps = st.lists(st.tuples(upserts, st.integers(-20, 40)), max_size=40)


@given(steps=steps, cut=st.integers(0, 40), prefix=st.sampled_from(["", "a", "ab", "b", "z"]))
@settings(max_examples=200, deadline=None)
def test_random_commands_agree_with_a_dict_model_and_survive_snapshot(steps, cut, prefix):
    sm, model = KVStateMachine(), Model()
    mirror: dict[str, SeqV] = {}  # rebuilt only from last_changes, as a watcher would
    restored: KVStateMachine | None = None
    clock = 0
    for i, (cmd, dt) in enumerate(steps):
        if i == cut:
            restored = KVStateMachine.restore(sm.snapshot())
        clock = max(0, clock + dt)
        result = sm.apply(cmd, clock)
        expected = model.apply(cmd, clock)
        if expected == "error":
            assert isinstance(result, ApplyError)
        else:
            assert result == expected
        if restored is not None:
            assert restored.apply(cmd, clock) == result
            assert restored.last_changes == sm.last_changes
        for change in sm.last_changes:
            assert mirror.get(change.key) == change.prev
            if change.current is None:
                del mirror[change.key]
            else:
                mirror[change.key] = change.current
        assert sorted(mirror.items()) == list(sm.items())
        assert sm.last_seq == model.seq

    assert list(sm.items()) == model.live()
    assert len(sm) == len(model.live())
    assert sm.list(prefix) == [(k, v) for k, v in model.live() if k.startswith(prefix)]
    assert sm.mget(KEYS) == [dict(model.live()).get(k) for k in KEYS]
    final = sm.snapshot()
    assert KVStateMachine.restore(final).snapshot() == final
    if restored is not None:
        assert restored.snapshot() == final


def test_node_records_are_set_replaced_removed_and_snapshotted():
    """contract §3: each node's record is replicated; re-publishing replaces it; a removed
    node's record goes; records survive a snapshot round trip (version 2)."""
    sm = KVStateMachine()
    rec = NodeRecord("1", Endpoint("localhost", 28004), None)
    assert sm.apply(SetNode(1, rec), 5) == NodeUpdate(1, None, rec)
    moved = NodeRecord("1", Endpoint("localhost", 28005), "127.0.0.1:9191")
    assert sm.apply(SetNode(1, moved), 6) == NodeUpdate(1, rec, moved)
    sm.apply(SetNode(2, NodeRecord("2", Endpoint("h2", 1))), 7)
    assert [i for i, _ in sm.nodes()] == [1, 2] and sm.node(1) == moved
    assert sm.last_seq == 0  # node records are not KV writes
    restored = KVStateMachine.restore(sm.snapshot())
    assert restored.nodes() == sm.nodes() and restored.snapshot() == sm.snapshot()
    two = sm.node(2)
    assert sm.apply(RemoveNode(2), 8) == NodeUpdate(2, two, None)
    assert sm.apply(RemoveNode(2), 9) == NodeUpdate(2, None, None)
    assert isinstance(sm.apply(SetNode(-1, rec), 10), ApplyError)
    assert sm.apply(SetNode(0, rec), 10) == NodeUpdate(0, None, rec)  # id 0 is valid (databend's own config)
    sm.apply(RemoveNode(0), 10)
    assert isinstance(sm.apply(SetNode(3, NodeRecord("", Endpoint("h", 1))), 10), ApplyError)


def test_version_1_snapshots_without_nodes_are_still_read():
    data = msgpack.packb(
        {"format": SNAPSHOT_FORMAT, "version": 1, "seq": 1, "log_time_ms": 0, "kv": [["a", 1, b"x", None]]},
        use_bin_type=True,
    )
    sm = KVStateMachine.restore(data)
    assert sm.get("a") == SeqV(1, b"x") and sm.nodes() == []


def test_a_tick_only_advances_log_time_and_expires_due_keys():
    """contract §5: expiry happens at a log position; a Tick proposed by the leader moves
    the log time so due keys go without any client write."""
    from metanode.sm import Tick

    sm = KVStateMachine()
    sm.apply(Upsert("t", b"v", ttl_ms=100), 1_000)
    sm.apply(Upsert("p", b"v"), 1_000)
    assert sm.next_expiry_ms() == 1_100
    assert sm.apply(Tick(), 1_050) is None and sm.get("t") is not None
    assert sm.apply(Tick(), 1_100) is None and sm.get("t") is None
    assert [c.key for c in sm.last_changes] == ["t"] and sm.next_expiry_ms() is None
    assert sm.last_seq == 2 and sm.get("p") is not None


def test_ttls_are_bounded_so_every_time_fits_the_wire():
    """A TTL meaning "forever" (2**63-1) is refused before it is logged, and the
    largest accepted TTL cannot push an expiry past 2**62."""
    from metanode.sm.commands import MAX_TIME_MS

    with pytest.raises(ValueError, match="ttl_ms must be an int in 0.."):
        Upsert("k", b"v", ttl_ms=2**63 - 1).validate()
    with pytest.raises(ValueError, match="expire_at_ms"):
        Upsert("k", b"v", expire_at_ms=2**62 + 1).validate()
    sm = KVStateMachine()
    result = sm.apply(Upsert("k", b"v", ttl_ms=MAX_TIME_MS), 10)
    assert result.result.expire_at_ms == MAX_TIME_MS  # type: ignore[union-attr]


def test_every_key_change_gets_the_next_revision_and_snapshots_keep_it():
    """Watch revisions (docs/reference/client-protocol.md): +1 per key change of any
    kind (insert, update, delete, expiry), none for a no-op; restored with a snapshot."""
    sm = KVStateMachine()
    sm.apply(Upsert("a", b"1"), 0)
    sm.apply(Upsert("a", b"2", ttl_ms=10), 0)
    sm.apply(Upsert("b", None), 0)  # deleting an absent key changes nothing
    sm.apply(Upsert("c", b"3"), 20)  # "a" expires first, then "c" is written
    assert [c.rev for c in sm.last_changes] == [3, 4] and sm.rev == 4
    assert KVStateMachine.restore(sm.snapshot()).rev == 4


def test_a_snapshot_built_in_slices_is_the_state_when_it_began():
    """The builder packs a frozen view: updates, deletes, inserts and expiries applied
    between its slices do not reach its bytes, which equal `snapshot()` taken when it
    began; afterwards the machine snapshots normally."""
    from metanode.sm import KVStateMachine, Upsert

    sm = KVStateMachine()
    for i in range(1000):
        sm.apply(Upsert(f"k{i:04d}", b"v%d" % i, None, 5000 if i % 7 == 0 else None, None), 1)
    want = sm.snapshot()
    builder = sm.snapshot_builder()
    builder.step(100)
    for i in range(0, 1000, 3):
        sm.apply(Upsert(f"k{i:04d}", None, None, None, None), 2)
    sm.apply(Upsert("new", b"x", None, None, None), 3)
    builder.step(450)
    sm.apply(Upsert("k0001", b"changed", None, None, None), 6000)  # and the TTL keys expire
    assert builder.result() == want
    assert sm.snapshot() != want
    assert sm.snapshot_builder().result() == sm.snapshot()
    assert len(KVStateMachine.restore(want)) == 1000


@given(
    start=st.lists(st.integers(0, 40), max_size=40),
    script=st.lists(
        st.one_of(
            st.tuples(st.just("step"), st.integers(1, 12)),
            st.tuples(st.sampled_from(["put", "delete", "ttl"]), st.integers(0, 40)),
            st.tuples(st.just("close"), st.just(0)),
        ),
        max_size=60,
    ),
)
@example(start=[1, 2, 3], script=[("delete", 2), ("put", 2), ("step", 12)])  # removed, then back
@example(start=[1, 2, 3], script=[("step", 1), ("delete", 1), ("delete", 3), ("put", 0), ("step", 5)])
@example(start=[1, 2, 3], script=[("put", 4), ("delete", 4), ("put", 4), ("put", 1), ("step", 1)])
@example(start=[3, 1, 2], script=[("delete", 1), ("put", 1), ("delete", 1), ("put", 5), ("put", 1), ("close", 0)])
@settings(max_examples=400, deadline=None)
def test_a_snapshot_built_in_slices_equals_the_state_of_its_start(start, script):
    """Any mix of slices and writes (updates, inserts of new keys, deletes, keys
    deleted then written again, keys that expire, before or after the builder passed
    them) packs exactly the keys and values of the start. Meanwhile and afterwards the
    machine reads, and snapshots (its map's order included), exactly as a twin fed the
    same writes without a build."""
    from metanode.sm import KVStateMachine, Upsert

    sm, twin = KVStateMachine(), KVStateMachine()
    for m in (sm, twin):
        for i in start:  # unsorted, repeated: the map's order is not the key order
            m.apply(Upsert(f"k{i:02d}", b"%d" % i), 1)
    want = sm.snapshot()
    builder = sm.snapshot_builder()
    for n, (what, arg) in enumerate(script):
        if what == "step":
            builder.step(arg)
        elif what == "close":
            builder.close()
        else:
            cmd = Upsert(f"k{arg:02d}", None if what == "delete" else b"w%d" % n, ttl_ms=3 if what == "ttl" else None)
            assert sm.apply(cmd, 2 + n) == twin.apply(cmd, 2 + n)
            assert sm.last_changes == twin.last_changes
        assert list(sm.items()) == list(twin.items()) and len(sm) == len(twin)
        assert sm.list("k1") == twin.list("k1") and sm.get(f"k{arg:02d}") == twin.get(f"k{arg:02d}")
        assert sm.state_digest() == twin.state_digest()
        assert sm.snapshot() == twin.snapshot()  # during the build too
    closed = ("close", 0) in script
    if not closed:
        assert builder.result() == want
    assert sm.snapshot() == twin.snapshot()
    assert KVStateMachine.restore(want).state_digest() != ""
    # Built and packed again: the next build works on the merged map.
    assert sm.snapshot_builder().result() == twin.snapshot()


def test_one_build_at_a_time():
    from metanode.sm import KVStateMachine, Upsert

    sm = KVStateMachine()
    sm.apply(Upsert("a", b"1"), 1)
    builder = sm.snapshot_builder()
    with pytest.raises(RuntimeError, match="being built already"):
        sm.snapshot_builder()
    builder.close()
    assert sm.snapshot_builder().result() == sm.snapshot()


def test_the_state_digest_is_kept_up_to_date_and_equal_on_equal_state():
    """Replicas holding equal state have equal digests, whether they applied the log or
    restored a snapshot; every change moves it; it costs O(1) per write and read."""
    from metanode.sm import KVStateMachine, Upsert

    a, b = KVStateMachine(), KVStateMachine()
    for sm in (a, b):
        for i in range(50):
            sm.apply(Upsert(f"k{i}", b"v%d" % i, None, None, None), 1)
        sm.apply(Upsert("k3", None, None, None, None), 2)
    assert a.state_digest() == b.state_digest()
    restored = KVStateMachine.restore(a.snapshot())
    assert restored.state_digest() == a.state_digest()
    before = a.state_digest()
    a.apply(Upsert("k4", b"other", None, None, None), 3)
    restored.apply(Upsert("k4", b"other", None, None, None), 3)
    assert a.state_digest() != before and a.state_digest() == restored.state_digest()
    b.apply(Upsert("k4", b"different", None, None, None), 3)
    assert b.state_digest() != a.state_digest()
