"""Unit tests of transactions in the pure KV state machine (metanode.sm; contract §5 ``txn``,
databend-meta's TxnRequest): conditions, branches, ops seeing earlier ops, atomicity,
seq and TTL as separate upserts would have them, and the watch hook."""

from __future__ import annotations

import operator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metanode.sm import (
    MAX_TXN_CONDITIONS,
    MAX_TXN_OPS,
    ApplyError,
    Change,
    KeyChange,
    KVStateMachine,
    MatchSeq,
    NodeUpdate,
    RemoveNode,
    SeqV,
    Txn,
    TxnCondition,
    TxnDelete,
    TxnDeleteByPrefix,
    TxnDeleteByPrefixResponse,
    TxnDeleteResponse,
    TxnGet,
    TxnGetResponse,
    TxnPut,
    TxnPutResponse,
    TxnReply,
    Upsert,
)

ALL_OPS = ["==", "!=", "<", "<=", ">", ">="]
PY_OPS = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def put(sm: KVStateMachine, key: str, value: bytes | None, t: int = 0, **kw) -> Change:
    result = sm.apply(Upsert(key, value, **kw), t)
    assert isinstance(result, Change), result
    return result


def txn(sm: KVStateMachine, cmd: Txn, t: int = 0) -> TxnReply:
    result = sm.apply(cmd, t)
    assert isinstance(result, TxnReply), result
    return result


def holds(sm: KVStateMachine, cond: TxnCondition) -> bool:
    """Whether a txn with the single condition ``cond`` takes its if_then branch."""
    return txn(sm, Txn((cond,), (TxnGet("x"),), ())).success


# ---------------------------------------------------------------- conditions


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("operand", [0, 1, 2, 3, 100])
def test_seq_condition_compares_the_key_seq(op, operand):
    """target "seq" compares the key's current seq (here 2) with an int operand."""
    sm = KVStateMachine()
    put(sm, "other", b"")
    put(sm, "k", b"v")  # seq 2
    assert holds(sm, TxnCondition("k", "seq", op, operand)) == PY_OPS[op](2, operand)


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("operand", [0, 1, 5])
def test_seq_condition_on_an_absent_key_compares_seq_0(op, operand):
    """An absent key has seq 0 (contract §5), so ``seq == 0`` tests for absence."""
    sm = KVStateMachine()
    put(sm, "other", b"")
    assert holds(sm, TxnCondition("k", "seq", op, operand)) == PY_OPS[op](0, operand)


def test_seq_condition_on_an_expired_key_compares_seq_0():
    """A key expired at the txn's log time is absent for conditions."""
    sm = KVStateMachine()
    put(sm, "k", b"v", t=0, ttl_ms=10)
    assert holds(sm, TxnCondition("k", "seq", "==", 1)) is True  # t=0: still live
    cmd = Txn((TxnCondition("k", "seq", "==", 0),), (TxnPut("k", b"new"),))
    reply = txn(sm, cmd, t=10)
    assert reply == TxnReply(True, (TxnPutResponse("k", None, SeqV(2, b"new")),))


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("operand", [b"", b"a", b"b", b"ba", b"b\x00", b"bb", b"c", b"\xff"])
def test_value_condition_compares_bytes_lexicographically(op, operand):
    """target "value" compares the value bytes with a bytes operand, byte by byte."""
    sm = KVStateMachine()
    put(sm, "k", b"b")
    assert holds(sm, TxnCondition("k", "value", op, operand)) == PY_OPS[op](b"b", operand)


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("operand", [b"", b"x"])
def test_value_condition_on_an_absent_key_holds_only_for_not_equal(op, operand):
    """Documented choice: an absent key has no value; a value condition on it is false
    for every op except ``!=`` (databend-meta makes ``!=`` false too)."""
    sm = KVStateMachine()
    assert holds(sm, TxnCondition("k", "value", op, operand)) == (op == "!=")
    put(sm, "k", b"x", t=0, ttl_ms=5)
    put(sm, "other", b"", t=5)  # "k" expired: absent again
    assert holds(sm, TxnCondition("k", "value", op, operand)) == (op == "!=")


def test_value_condition_on_an_empty_value_is_not_absent():
    sm = KVStateMachine()
    put(sm, "k", b"")
    assert holds(sm, TxnCondition("k", "value", "==", b""))
    assert not holds(sm, TxnCondition("k", "value", "!=", b""))


# ---------------------------------------------------------------- branches


def test_no_conditions_runs_if_then():
    sm = KVStateMachine()
    reply = txn(sm, Txn((), (TxnPut("a", b"1"),), (TxnPut("b", b"2"),)))
    assert reply == TxnReply(True, (TxnPutResponse("a", None, SeqV(1, b"1")),))
    assert sm.get("b") is None


def test_all_conditions_true_runs_if_then_any_false_runs_else_then():
    """if_then runs only when every condition holds; otherwise else_then, and only it."""
    sm = KVStateMachine()
    put(sm, "a", b"1")  # seq 1
    put(sm, "b", b"2")  # seq 2
    both = (TxnCondition("a", "seq", "==", 1), TxnCondition("b", "value", "==", b"2"))
    reply = txn(sm, Txn(both, (TxnPut("then", b""),), (TxnPut("else", b""),)))
    assert reply.success and sm.get("then") is not None and sm.get("else") is None
    one_false = (TxnCondition("a", "seq", "==", 1), TxnCondition("b", "value", "==", b"3"))
    reply = txn(sm, Txn(one_false, (TxnDelete("then"),), (TxnPut("else", b"e"), TxnGet("a"))))
    assert reply == TxnReply(
        False,
        (TxnPutResponse("else", None, SeqV(4, b"e")), TxnGetResponse("a", SeqV(1, b"1"))),
    )
    assert sm.get("then") == SeqV(3, b"")


def test_empty_branch_gives_no_responses_and_changes_nothing():
    sm = KVStateMachine()
    put(sm, "a", b"1")
    before = sm.snapshot()
    reply = txn(sm, Txn((TxnCondition("a", "seq", ">", 5),), (TxnDelete("a"),), ()))
    assert reply == TxnReply(False, ())
    assert sm.snapshot() == before
    assert sm.last_changes == ()


def test_conditions_see_the_state_before_any_op():
    """All conditions are evaluated first, against the state before the txn's ops."""
    sm = KVStateMachine()
    cmd = Txn((TxnCondition("a", "seq", "==", 0),), (TxnPut("a", b"1"), TxnPut("a", b"2")))
    reply = txn(sm, cmd)
    assert reply == TxnReply(
        True,
        (TxnPutResponse("a", None, SeqV(1, b"1")), TxnPutResponse("a", SeqV(1, b"1"), SeqV(2, b"2"))),
    )


# ---------------------------------------------------------------- ops see earlier ops


def test_ops_see_the_effects_of_earlier_ops():
    """Ops run in order; each sees what the earlier ops of the same txn wrote."""
    sm = KVStateMachine()
    put(sm, "p/1", b"x")  # seq 1
    reply = txn(
        sm,
        Txn(
            (),
            (
                TxnGet("a"),
                TxnPut("a", b"1"),  # seq 2
                TxnGet("a"),
                TxnPut("a", b"2", match_seq=MatchSeq(exact=2)),  # seq 3: sees the put above
                TxnPut("a", b"no", match_seq=MatchSeq(exact=2)),  # mismatch now
                TxnDelete("a", MatchSeq(exact=3)),
                TxnGet("a"),
                TxnPut("p/2", b"y"),  # seq 4
                TxnDeleteByPrefix("p/"),
                TxnGet("p/2"),
                TxnPut("a", b"3", match_seq=MatchSeq(exact=0)),  # seq 5: absent again
            ),
        ),
    )
    assert reply.responses == (
        TxnGetResponse("a", None),
        TxnPutResponse("a", None, SeqV(2, b"1")),
        TxnGetResponse("a", SeqV(2, b"1")),
        TxnPutResponse("a", SeqV(2, b"1"), SeqV(3, b"2")),
        TxnPutResponse("a", SeqV(3, b"2"), SeqV(3, b"2")),
        TxnDeleteResponse("a", SeqV(3, b"2"), None),
        TxnGetResponse("a", None),
        TxnPutResponse("p/2", None, SeqV(4, b"y")),
        TxnDeleteByPrefixResponse("p/", 2),
        TxnGetResponse("p/2", None),
        TxnPutResponse("a", None, SeqV(5, b"3")),
    )
    assert list(sm.items()) == [("a", SeqV(5, b"3"))]
    assert sm.last_seq == 5


def test_delete_response_success_means_the_key_was_removed():
    """TxnDeleteResponse: result None when deleted or absent, == prev on a mismatch;
    ``success`` (databend-meta's) is true only when the op removed the key."""
    sm = KVStateMachine()
    put(sm, "a", b"1")
    reply = txn(sm, Txn((), (TxnDelete("a", MatchSeq(exact=9)), TxnDelete("a"), TxnDelete("a"))))
    mismatch, deleted, absent = reply.responses
    assert mismatch == TxnDeleteResponse("a", SeqV(1, b"1"), SeqV(1, b"1"))
    assert deleted == TxnDeleteResponse("a", SeqV(1, b"1"), None)
    assert absent == TxnDeleteResponse("a", None, None)
    assert [r.success for r in reply.responses] == [False, True, False]  # type: ignore[union-attr]


# ---------------------------------------------------------------- seq


def test_seq_bumps_like_separate_upserts():
    """Each put bumps the global seq once, as an upsert does; deletes and mismatched
    puts do not; later commands continue from there."""
    sm, ref = KVStateMachine(), KVStateMachine()
    for s in (sm, ref):
        put(s, "z", b"")
    ops = (
        TxnPut("a", b"1"),
        TxnPut("b", b"2"),
        TxnPut("a", b"1"),  # same bytes: still a new seq
        TxnDelete("b"),
        TxnPut("a", b"x", match_seq=MatchSeq(ge=99)),
        TxnPut("c", b"3"),
    )
    reply = txn(sm, Txn((), ops))
    results = [ref.apply(op.as_upsert(), 0) for op in ops]
    expected = [
        (TxnPutResponse if isinstance(op, TxnPut) else TxnDeleteResponse)(op.key, c.prev, c.result)
        for op, c in zip(ops, results, strict=True)
    ]
    assert list(reply.responses) == expected
    assert sm.last_seq == ref.last_seq == 5
    assert sm.snapshot() == ref.snapshot()
    assert put(sm, "d", b"").result == SeqV(6, b"")


# ---------------------------------------------------------------- delete_by_prefix


def test_delete_by_prefix_counts_and_reports_each_change_in_key_order():
    sm = KVStateMachine()
    for key in ["a/2", "b", "a/1", "a", "a/1/x", "ab"]:
        put(sm, key, key.encode())
    before = dict(sm.items())
    reply = txn(sm, Txn((), (TxnDeleteByPrefix("a/"), TxnDeleteByPrefix("zz"))))
    assert reply.responses == (
        TxnDeleteByPrefixResponse("a/", 3),
        TxnDeleteByPrefixResponse("zz", 0),
    )
    assert sm.last_changes == tuple(KeyChange(k, before[k], None) for k in ["a/1", "a/1/x", "a/2"])
    assert [k for k, _ in sm.items()] == ["a", "ab", "b"]
    assert sm.last_seq == 6  # deletes do not bump seq


def test_delete_by_empty_prefix_deletes_every_key():
    sm = KVStateMachine()
    for key in ["b", "a", "c"]:
        put(sm, key, b"")
    reply = txn(sm, Txn((), (TxnDeleteByPrefix(""),)))
    assert reply.responses == (TxnDeleteByPrefixResponse("", 3),)
    assert len(sm) == 0
    assert [c.key for c in sm.last_changes] == ["a", "b", "c"]


def test_delete_by_prefix_does_not_count_keys_expired_before_the_txn():
    sm = KVStateMachine()
    put(sm, "p/old", b"", t=0, ttl_ms=5)
    put(sm, "p/live", b"", t=0)
    reply = txn(sm, Txn((), (TxnDeleteByPrefix("p/"),)), t=5)
    assert reply.responses == (TxnDeleteByPrefixResponse("p/", 1),)
    assert sm.last_changes == (
        KeyChange("p/old", SeqV(1, b"", 5), None),  # expired by the log time first
        KeyChange("p/live", SeqV(2, b""), None),
    )


# ---------------------------------------------------------------- watch hook


def test_last_changes_lists_every_change_of_the_txn_in_order():
    """Every key modification of the txn, expiries included, in the order made; no
    entry for reads, mismatches or deletes of absent keys."""
    sm = KVStateMachine()
    put(sm, "e", b"", t=0, ttl_ms=3)  # seq 1, expires at 3
    put(sm, "a", b"1", t=0)  # seq 2
    txn(
        sm,
        Txn(
            (),
            (
                TxnPut("b", b"2"),  # seq 3
                TxnGet("a"),
                TxnDelete("a"),
                TxnDelete("nope"),
                TxnPut("b", b"x", match_seq=MatchSeq(exact=0)),
                TxnPut("t", b"", ttl_ms=0),  # seq 4, already due: removed right after
                TxnPut("b", b"3"),  # seq 5
            ),
        ),
        t=3,
    )
    assert sm.last_changes == (
        KeyChange("e", SeqV(1, b"", 3), None),
        KeyChange("b", None, SeqV(3, b"2")),
        KeyChange("a", SeqV(2, b"1"), None),
        KeyChange("t", None, SeqV(4, b"", 3)),
        KeyChange("t", SeqV(4, b"", 3), None),
        KeyChange("b", SeqV(3, b"2"), SeqV(5, b"3")),
    )


# ---------------------------------------------------------------- TTL


def test_ttl_inside_a_txn_uses_the_apply_log_time():
    sm = KVStateMachine()
    put(sm, "x", b"", t=2000)
    # an entry stamped earlier than the state machine's time uses the later time
    ops = (TxnPut("a", b"", ttl_ms=100), TxnPut("b", b"", expire_at_ms=2500))
    reply = txn(sm, Txn((), ops), t=1000)
    assert reply.responses == (
        TxnPutResponse("a", None, SeqV(2, b"", 2100)),
        TxnPutResponse("b", None, SeqV(3, b"", 2500)),
    )
    put(sm, "x", b"", t=2099)
    assert sm.get("a") is not None
    put(sm, "x", b"", t=2100)
    assert sm.get("a") is None and sm.get("b") is not None


def test_a_put_already_due_is_written_then_gone_for_the_next_op():
    """As two separate commands would: a ``ttl_ms=0`` put bumps seq and reports its
    value, and the next op of the same txn no longer sees it."""
    sm = KVStateMachine()
    reply = txn(sm, Txn((), (TxnPut("k", b"v", ttl_ms=0), TxnGet("k"))), t=50)
    assert reply.responses == (
        TxnPutResponse("k", None, SeqV(1, b"v", 50)),
        TxnGetResponse("k", None),
    )
    assert sm.last_seq == 1 and sm.get("k") is None


# ---------------------------------------------------------------- atomicity and validation


class NotAnOp:
    TAG = "put"


GOOD = TxnPut("new", b"v")
INVALID_TXNS = [
    Txn((), (GOOD, TxnPut("\ud800", b"v"))),
    Txn((), (GOOD, TxnPut("k", None))),  # type: ignore[arg-type]
    Txn((), (GOOD, TxnPut("k", "text"))),  # type: ignore[arg-type]
    Txn((), (GOOD, TxnPut("k", b"v", ttl_ms=1, expire_at_ms=2))),
    Txn((), (GOOD, TxnPut("k", b"v", ttl_ms=-1))),
    Txn((), (GOOD, TxnPut("k", b"v", match_seq={"exact": 1}))),  # type: ignore[arg-type]
    Txn((), (GOOD, TxnGet(b"k"))),  # type: ignore[arg-type]
    Txn((), (GOOD, TxnDelete("k", MatchSeq(exact=1)), TxnDelete(1))),  # type: ignore[arg-type]
    Txn((), (GOOD, TxnDeleteByPrefix(None))),  # type: ignore[arg-type]
    Txn((), (GOOD, TxnDeleteByPrefix("\udfff"))),
    Txn((), (GOOD, Upsert("k", b"v"))),  # type: ignore[arg-type]
    Txn((), (GOOD, NotAnOp())),  # type: ignore[arg-type]
    Txn((), (GOOD,), (TxnPut(3, b""),)),  # type: ignore[arg-type]  # the branch not taken
    Txn((TxnCondition("k", "seq", "==", 0),), (GOOD,), (GOOD, TxnGet("\ud800"))),
    Txn((TxnCondition("k", "seq", "==", b"0"),), (GOOD,)),
    Txn((TxnCondition("k", "seq", "==", -1),), (GOOD,)),
    Txn((TxnCondition("k", "seq", "==", 2**63),), (GOOD,)),
    Txn((TxnCondition("k", "seq", "==", True),), (GOOD,)),  # type: ignore[arg-type]
    Txn((TxnCondition("k", "value", "==", 0),), (GOOD,)),
    Txn((TxnCondition("k", "value", "==", "v"),), (GOOD,)),  # type: ignore[arg-type]
    Txn((TxnCondition("k", "version", "==", 0),), (GOOD,)),
    Txn((TxnCondition("k", "seq", "=", 0),), (GOOD,)),
    Txn((TxnCondition("k", "seq", "<>", 0),), (GOOD,)),
    Txn((TxnCondition("\ud800", "seq", "==", 0),), (GOOD,)),
    Txn((TxnCondition("k", "seq", "==", 0), ("k", "seq", "==", 0))),  # type: ignore[arg-type]
    Txn([TxnCondition("k", "seq", "==", 0)], (GOOD,)),  # type: ignore[arg-type]
    Txn((), [GOOD]),  # type: ignore[arg-type]
    Txn((), (), None),  # type: ignore[arg-type]
    Txn((TxnCondition("k", "seq", ">=", 0),) * (MAX_TXN_CONDITIONS + 1), (GOOD,)),
    Txn((), (GOOD,) * (MAX_TXN_OPS + 1)),
    Txn((), (), (TxnGet("k"),) * (MAX_TXN_OPS + 1)),
]


@pytest.mark.parametrize("cmd", INVALID_TXNS, ids=range(len(INVALID_TXNS)))
def test_an_invalid_op_or_condition_anywhere_rejects_the_whole_txn(cmd):
    """Validation covers every condition and both branches before anything runs: the
    result is ApplyError and the state (snapshot bytes, log time) is unchanged."""
    sm = KVStateMachine()
    put(sm, "k", b"old", t=10, ttl_ms=40)
    before = sm.snapshot()
    result = sm.apply(cmd, 100)  # would also expire "k" if it ran
    assert isinstance(result, ApplyError), result
    assert result.message.startswith("invalid txn: ")
    assert sm.snapshot() == before
    assert sm.log_time_ms == 10 and sm.get("k") == SeqV(1, b"old", 50)
    assert sm.last_changes == ()


def test_error_messages_name_the_bad_part():
    sm = KVStateMachine()
    result = sm.apply(Txn((), (GOOD,), (GOOD, TxnPut("k", b"", ttl_ms=1, expire_at_ms=1))), 0)
    assert isinstance(result, ApplyError)
    assert "else_then[1] (put)" in result.message and "ttl_ms and expire_at_ms" in result.message
    result = sm.apply(Txn((TxnCondition("k", "value", "<", 3),)), 0)
    assert isinstance(result, ApplyError)
    assert "conditions[0]" in result.message and "bytes operand" in result.message
    result = sm.apply(Txn((), (GOOD,) * (MAX_TXN_OPS + 1)), 0)
    assert isinstance(result, ApplyError) and "too many ops in if_then" in result.message
    with pytest.raises(ValueError, match="prefix must be a str"):
        TxnDeleteByPrefix(b"p").validate()  # type: ignore[arg-type]


def test_the_limits_themselves_are_accepted():
    sm = KVStateMachine()
    conds = (TxnCondition("k", "seq", "==", 0),) * MAX_TXN_CONDITIONS
    ops = tuple(TxnPut(f"k{i:04}", b"") for i in range(MAX_TXN_OPS))
    reply = txn(sm, Txn(conds, ops, ops))
    assert reply.success and len(reply.responses) == MAX_TXN_OPS
    assert len(sm) == MAX_TXN_OPS and sm.last_seq == MAX_TXN_OPS
    assert len(sm.last_changes) == MAX_TXN_OPS


def test_txn_and_its_parts_are_valid_commands():
    Txn().validate()
    Txn(
        (TxnCondition("k", "seq", "<", 2**63 - 1), TxnCondition("é", "value", "!=", b"")),
        (TxnPut("k", b"", MatchSeq(ge=0), expire_at_ms=5), TxnDelete("k")),
        (TxnGet(""), TxnDeleteByPrefix("")),
    ).validate()


# ---------------------------------------------------------------- property


KEYS = ["a", "ab", "abc", "b", "ba", "c"]
match_seqs = st.one_of(
    st.none(),
    st.builds(MatchSeq, exact=st.integers(0, 8)),
    st.builds(MatchSeq, ge=st.integers(0, 8)),
)
ttls = st.one_of(st.none(), st.none(), st.integers(0, 20))
values = st.binary(max_size=2)
txn_ops = st.one_of(
    st.builds(
        TxnPut,
        key=st.sampled_from(KEYS),
        value=values,
        match_seq=match_seqs,
        ttl_ms=ttls,
    ),
    st.builds(TxnPut, key=st.sampled_from(KEYS), value=values, expire_at_ms=st.integers(0, 40)),
    st.builds(TxnGet, key=st.sampled_from(KEYS)),
    st.builds(TxnDelete, key=st.sampled_from(KEYS), match_seq=match_seqs),
    st.builds(TxnDeleteByPrefix, prefix=st.sampled_from(["", "a", "ab", "b", "z"])),
)
conditions = st.one_of(
    st.builds(
        TxnCondition,
        key=st.sampled_from(KEYS),
        target=st.just("seq"),
        op=st.sampled_from(ALL_OPS),
        operand=st.integers(0, 8),
    ),
    st.builds(
        TxnCondition,
        key=st.sampled_from(KEYS),
        target=st.just("value"),
        op=st.sampled_from(ALL_OPS),
        operand=values,
    ),
)
txns = st.builds(
    Txn,
    conditions=st.lists(conditions, max_size=3).map(tuple),
    if_then=st.lists(txn_ops, max_size=6).map(tuple),
    else_then=st.lists(txn_ops, max_size=6).map(tuple),
)
setup = st.lists(
    st.tuples(st.sampled_from(KEYS), values, ttls, st.integers(0, 20)),
    max_size=8,
)


def reference_condition(sm: KVStateMachine, cond: TxnCondition) -> bool:
    """The documented condition semantics, written independently of the state machine."""
    current = sm.get(cond.key)
    if cond.target == "seq":
        return PY_OPS[cond.op](current.seq if current else 0, cond.operand)
    if current is None:
        return cond.op == "!="
    return PY_OPS[cond.op](current.data, cond.operand)


def reference_op(sm: KVStateMachine, op, t: int):
    """Apply one txn op as separate commands; return the response and the changes."""
    if isinstance(op, TxnGet):
        return TxnGetResponse(op.key, sm.get(op.key)), []
    if isinstance(op, TxnDeleteByPrefix):
        changes = []
        keys = [k for k, _ in sm.list(op.prefix)]
        for key in keys:
            assert isinstance(sm.apply(Upsert(key, None), t), Change)
            changes += sm.last_changes
        return TxnDeleteByPrefixResponse(op.prefix, len(keys)), changes
    change = sm.apply(op.as_upsert(), t)
    assert isinstance(change, Change)
    cls = TxnPutResponse if isinstance(op, TxnPut) else TxnDeleteResponse
    return cls(op.key, change.prev, change.result), list(sm.last_changes)


@given(setup=setup, cmd=txns, dt=st.integers(-5, 25))
@settings(max_examples=300, deadline=None)
def test_a_txn_equals_its_branch_applied_op_by_op(setup, cmd, dt):
    """A random txn leaves the same snapshot bytes, gives the same responses and
    reports the same changes as applying its chosen branch's ops one by one as
    separate commands at the same log time, on a copy."""
    sm = KVStateMachine()
    for key, value, ttl, t in setup:
        put(sm, key, value, t=t, ttl_ms=ttl)
    t = max(0, sm.log_time_ms + dt)
    ref = KVStateMachine.restore(sm.snapshot())

    reply = txn(sm, cmd, t)

    # a no-op command moves the copy to the txn's log time, expiring what is due
    assert ref.apply(RemoveNode(99), t) == NodeUpdate(99, None, None)
    changes = list(ref.last_changes)
    success = all(reference_condition(ref, c) for c in cmd.conditions)
    responses = []
    for op in cmd.if_then if success else cmd.else_then:
        response, op_changes = reference_op(ref, op, t)
        responses.append(response)
        changes += op_changes
    assert reply == TxnReply(success, tuple(responses))
    assert sm.snapshot() == ref.snapshot()
    assert sm.last_changes == tuple(changes)
