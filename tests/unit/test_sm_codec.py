"""Log entry payloads (`metanode.sm.codec`): every command round-trips through the one
wire codec with the leader's time stamp; anything else is a DecodeError."""

import attrs
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metanode.sm import (
    Endpoint,
    MatchSeq,
    NodeRecord,
    RemoveNode,
    SetNode,
    Txn,
    TxnCondition,
    TxnDelete,
    TxnDeleteByPrefix,
    TxnGet,
    TxnPut,
    Upsert,
)
from metanode.sm.codec import (
    DecodeError,
    LogCommand,
    _fast_upsert,
    decode_command,
    decode_entry_command,
    encode_command,
    encode_known,
)
from metanode.wire import decode, encode

COMMANDS = [
    Upsert("k", b"v"),
    Upsert("k", None, MatchSeq(exact=0)),
    Upsert("k", b"", MatchSeq(ge=3), ttl_ms=1000),
    Upsert("k", b"\xff", None, expire_at_ms=5),
    SetNode(7, NodeRecord("7", Endpoint("localhost", 28703), "127.0.0.1:28702")),
    SetNode(1, NodeRecord("1", Endpoint("localhost", 28004))),
    RemoveNode(3),
    Txn(),
    Txn(
        (
            TxnCondition("k", "seq", "==", 0),
            TxnCondition("k", "seq", ">=", 2**63 - 1),
            TxnCondition("é", "value", "!=", b"\x00\xff"),
        ),
        (
            TxnPut("k", b"v"),
            TxnPut("k", b"", MatchSeq(exact=3), ttl_ms=10),
            TxnPut("k", b"x", expire_at_ms=99),
            TxnGet("k"),
            TxnDelete("k"),
            TxnDelete("k", MatchSeq(ge=1)),
            TxnDeleteByPrefix(""),
        ),
        (TxnGet("other"),),
    ),
    # invalid for apply, but must still decode so that apply can refuse it everywhere
    Txn((TxnCondition("k", "target?", "=", b"1"),), (), (TxnPut("k", b"", ttl_ms=-1),)),
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=str)
def test_commands_round_trip_with_their_log_time(cmd):
    assert decode_command(encode_command(cmd, 1234)) == LogCommand(1234, cmd)


def test_txn_fields_come_back_as_tuples_of_the_right_classes():
    cmd = COMMANDS[-2]
    back = decode_command(encode_command(cmd, 1)).cmd
    assert isinstance(back, Txn)
    for name in ("conditions", "if_then", "else_then"):
        assert type(getattr(back, name)) is tuple
    assert [type(op) for op in back.if_then] == [type(op) for op in cmd.if_then]
    assert type(back.conditions[2].operand) is bytes and type(back.conditions[0].operand) is int


def test_txn_ops_carry_their_tag():
    body = msgpack.unpackb(encode_command(COMMANDS[-2], 1))["cmd"]
    assert body["t"] == "txn"
    assert [op["t"] for op in body["if_then"]] == [
        "put", "put", "put", "get", "delete", "delete", "delete_by_prefix"
    ]
    assert body["if_then"][0] == {"t": "put", "key": "k", "value": b"v"}


def txn(**fields) -> bytes:
    return msgpack.packb({"time_ms": 1, "cmd": {"t": "txn", **fields}})


def cond(**fields) -> dict:
    return {"key": "k", "target": "seq", "op": "==", "operand": 0, **fields}


@pytest.mark.parametrize(
    "body, problem",
    [
        (b"\xc1", "msgpack"),
        (msgpack.packb({"time_ms": 1, "cmd": {"t": "nope"}}), "unknown state machine command tag"),
        (msgpack.packb({"time_ms": -1, "cmd": {"t": "remove_node", "node_id": 1}}), "time_ms"),
        (msgpack.packb({"time_ms": 1, "cmd": {"t": "upsert", "key": 1, "value": None}}), "key"),
        (msgpack.packb({"time_ms": 1, "cmd": {"t": "remove_node", "node_id": "1"}}), "node_id"),
        (txn(if_then=[{"t": "zap"}]), r"if_then\[0\]: unknown txn op tag 'zap'"),
        (txn(else_then=[{"key": "k"}]), r"else_then\[0\]: no tag"),
        (txn(if_then={"t": "get", "key": "k"}), "if_then: expected an array"),
        (txn(if_then=[{"t": "upsert", "key": "k", "value": None}]), "unknown txn op tag 'upsert'"),
        (txn(if_then=[{"t": "get", "key": "k", "x": 1}]), "unexpected field"),
        (txn(conditions=[cond(operand="1")]), r"conditions\[0\]\.operand: expected an int or b"),
        (txn(conditions=[cond(operand=True)]), "operand"),
        (txn(conditions=[cond(operand=2**64 - 1)]), "64 bits"),
        (txn(conditions=[{"key": "k", "target": "seq", "op": "=="}]), "operand: required field"),
    ],
)
def test_bad_payloads_are_decode_errors_naming_the_problem(body, problem):
    with pytest.raises(DecodeError, match=problem):
        decode_command(body)


def test_a_tick_round_trips():
    from metanode.sm import Tick

    assert decode_command(encode_command(Tick(), 5)) == LogCommand(5, Tick())


# ---------------------------------------------------------------- the upsert fast path

_ints = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1))


@given(
    key=st.text(max_size=8),
    value=st.one_of(st.none(), st.binary(max_size=8)),
    ttl_ms=_ints,
    expire_at_ms=_ints,
    time_ms=st.integers(0, 2**63 - 1),
)
@settings(max_examples=300, deadline=None)
def test_a_plain_upsert_takes_the_fast_path_with_the_converters_bytes(key, value, ttl_ms, expire_at_ms, time_ms):
    """The hand-written encoder and decoder of a plain upsert (the hot path) give the
    converter's bytes and the converter's object."""
    cmd = Upsert(key, value, None, ttl_ms, expire_at_ms)
    data = encode_command(cmd, time_ms)
    assert data == encode(LogCommand(time_ms, cmd), LogCommand)
    assert _fast_upsert(msgpack.unpackb(data, raw=False)) == (time_ms, cmd)
    assert decode_command(data) == decode(data, LogCommand)


@pytest.mark.parametrize(
    "doc",
    [
        {"time_ms": 1, "cmd": {"t": "upsert", "key": "k", "value": b"v", "ttl_ms": True}},
        {"time_ms": 1, "cmd": {"t": "upsert", "key": "k", "value": b"v", "ttl_ms": 2**63}},
        {"time_ms": 1, "cmd": {"t": "upsert", "key": "k", "value": "v"}},
        {"time_ms": 1, "cmd": {"t": "upsert", "key": b"k", "value": b"v"}},
        {"time_ms": 1, "cmd": {"t": "upsert", "key": "k"}},
        {"time_ms": 1, "cmd": {"t": "upsert", "key": "k", "value": None, "extra": 1}},
        {"time_ms": -1, "cmd": {"t": "upsert", "key": "k", "value": None}},
        {"time_ms": 1, "cmd": {"t": "upsert", "key": "k", "value": None}, "more": 1},
        {"time_ms": 1, "cmd": {"t": "upsert", "key": "k", "value": None, "match_seq": {"exact": 1}}},
        {"time_ms": 1, "cmd": {"t": "upsert", "key": "k", "other": b"v"}},
        {"time_ms": 1, "cmd": {"t": "upsert", "value": b"v", "other": "k"}},
        {"time_ms": 1, "other": {"t": "upsert", "key": "k", "value": b"v"}},
        {"cmd": {"t": "upsert", "key": "k", "value": b"v"}, "other": 1},
    ],
)
def test_the_fast_path_leaves_anything_unusual_to_the_strict_one(doc):
    """It accepts nothing the converter refuses: such payloads get the strict path's
    answer (an error naming the problem, or the object for a match_seq)."""
    assert _fast_upsert(doc) is None
    data = msgpack.packb(doc, use_bin_type=True)
    try:
        want = decode(data, LogCommand)
    except DecodeError as e:
        with pytest.raises(DecodeError) as got:
            decode_command(data)
        assert str(got.value) == str(e)
    else:
        assert decode_command(data) == want


class _Str(str):
    pass


class _Bytes(bytes):
    pass


@given(
    key=st.one_of(st.text(max_size=8), st.text(max_size=4).map(_Str)),
    value=st.one_of(st.none(), st.binary(max_size=8), st.binary(max_size=4).map(_Bytes)),
    ttl_ms=st.one_of(_ints, st.booleans()),
    expire_at_ms=_ints,
    match_seq=st.one_of(st.none(), st.just(MatchSeq(exact=1))),
    time_ms=st.one_of(st.integers(0, 2**63 - 1), st.integers(2**63, 2**64 - 1), st.integers(-(2**63), -1)),
)
@settings(max_examples=300, deadline=None)
def test_encode_known_gives_exactly_what_decoding_gives_back(key, value, ttl_ms, expire_at_ms, match_seq, time_ms):
    """The leader applies its own entries from `encode_known`'s pair instead of
    decoding them: the pair must be what every other replica decodes, field types
    included (a str subclass, a bool for an int would decode as something else)."""
    cmd = Upsert(key, value, match_seq, ttl_ms, expire_at_ms)
    data, known = encode_known(cmd, time_ms)
    assert data == encode_command(cmd, time_ms)
    if known is None:
        return
    assert 0 <= time_ms < 2**63  # (out of range: refused by the decoder, so never known)
    decoded = decode_entry_command(data)
    assert decoded == known
    assert [type(v) for v in attrs.astuple(decoded[1], recurse=False)] == [
        type(v) for v in attrs.astuple(known[1], recurse=False)
    ]


def test_encode_known_declines_what_it_cannot_vouch_for():
    assert encode_known(Upsert("k", b"v"), 5)[1] == (5, Upsert("k", b"v"))
    assert encode_known(Upsert("k", b"v", MatchSeq(exact=0)), 5)[1] is None
    assert encode_known(Upsert(_Str("k"), b"v"), 5)[1] is None
    assert encode_known(Upsert("k", b"v", ttl_ms=True), 5)[1] is None
    assert encode_known(Txn(), 5)[1] is None
    assert encode_known(Upsert("k", b"v"), 2**63)[1] is None  # encodes, but does not decode
    assert encode_known(Upsert("k", b"v"), -1)[1] is None
