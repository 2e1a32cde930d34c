"""Tests of the linearizability checker (tests/sim/linearizability.py).

Notation in docstrings: ``[a, b]`` is an op's call/return interval; ``v@n`` is
value ``v`` at seq ``n``.
"""

from __future__ import annotations

import collections
import functools
import random
import time

import attrs
import pytest

from tests.sim.linearizability import (
    CheckerGaveUp,
    Op,
    Result,
    assert_linearizable,
    check,
)

K = "k"


def ok(history: list[Op]) -> Result:
    r = check(history)
    assert r.ok, r.explanation
    assert r.key is None and r.failed_keys == ()
    return r


def bad(history: list[Op], key: str = K) -> Result:
    r = check(history)
    assert not r.ok
    assert r.key == key
    assert f"key {key!r}" in r.explanation
    return r


# --------------------------------------------------------------------------
# Hand-made histories
# --------------------------------------------------------------------------


def test_empty_history_is_linearizable():
    """No ops at all: trivially linearizable."""
    assert check([]).ok


def test_sequential_put_get_ok():
    """Put a@1, read it, overwrite with b@2, read it: the obvious sequential history."""
    ok([
        Op.get(0, K, 0, 1, None),
        Op.put(0, K, b"a", 2, 3, (None, (1, b"a"))),
        Op.get(1, K, 4, 5, (1, b"a")),
        Op.put(1, K, b"b", 6, 7, ((1, b"a"), (2, b"b"))),
        Op.get(0, K, 8, 9, (2, b"b")),
    ])


def test_stale_read_after_completed_write():
    """b@2 is written and the write returns at t=4; a read called at t=5
    still returns a@1: the read must follow the write, so it is stale."""
    r = bad([
        Op.put(0, K, b"a", 0, 1, (None, (1, b"a"))),
        Op.put(0, K, b"b", 2, 4, ((1, b"a"), (2, b"b"))),
        Op.get(1, K, 5, 6, (1, b"a")),
    ])
    assert "inconsistent with that state" in r.explanation
    assert "#2 client 1: get()" in r.explanation


def test_read_concurrent_with_write_may_see_old_or_new():
    """Reads overlapping a write may see either the old or the new value
    (even old-then-new across two readers), as long as once someone sees the
    new value, later-starting reads don't see the old one."""
    ok([
        Op.put(0, K, b"a", 0, 1, (None, (1, b"a"))),
        Op.put(0, K, b"b", 2, 10, ((1, b"a"), (2, b"b"))),
        Op.get(1, K, 3, 4, (1, b"a")),
        Op.get(2, K, 3, 9, (2, b"b")),
        Op.get(1, K, 5, 6, (1, b"a")),  # overlaps the read of b, may precede it
    ])


def test_read_sees_value_before_its_write_was_called():
    """A read returning at t=2 sees b, but the put of b is only called at t=3."""
    bad([
        Op.put(0, K, b"a", 0, 1, (None, (1, b"a"))),
        Op.get(1, K, 1.5, 2, (2, b"b")),
        Op.put(0, K, b"b", 3, 4, ((1, b"a"), (2, b"b"))),
    ])


def test_overlapping_writes_reads_agree_on_either_order():
    """Two overlapping puts A and B; readers see A then B.  That is fine: the
    order A<B is possible.  (The mirror history with B then A is also fine,
    with the seqs and prevs saying so.)"""
    ok([
        Op.put(0, K, b"A", 0, 10, (None, (1, b"A"))),
        Op.put(1, K, b"B", 0, 10, ((1, b"A"), (2, b"B"))),
        Op.get(2, K, 1, 2, (1, b"A")),
        Op.get(2, K, 3, 4, (2, b"B")),
        Op.get(3, K, 5, 6, (2, b"B")),
    ])
    ok([
        Op.put(0, K, b"A", 0, 10, ((1, b"B"), (2, b"A"))),
        Op.put(1, K, b"B", 0, 10, (None, (1, b"B"))),
        Op.get(2, K, 1, 2, (1, b"B")),
        Op.get(2, K, 3, 4, (2, b"A")),
        Op.get(3, K, 5, 6, (2, b"A")),
    ])


def test_overlapping_writes_unknown_prevs_either_order_ok():
    """Two overlapping puts whose outputs were lost (unknown outcome): reads
    may see them in either order; one reader sees A then B, which is fine."""
    ok([
        Op.put(0, K, b"A", 0),
        Op.put(1, K, b"B", 0),
        Op.get(2, K, 1, 2, (3, b"A")),
        Op.get(2, K, 3, 4, (7, b"B")),
    ])
    ok([
        Op.put(0, K, b"A", 0),
        Op.put(1, K, b"B", 0),
        Op.get(2, K, 1, 2, (3, b"B")),
        Op.get(2, K, 3, 4, (7, b"A")),
    ])


def test_readers_disagree_on_order_of_overlapping_writes():
    """Overlapping puts A and B (outcomes unknown).  Client 2 sees A then B;
    client 3, strictly later, sees B then A.  Each put happens once, so A
    cannot come back after B overwrote it: not linearizable."""
    bad([
        Op.put(0, K, b"A", 0),
        Op.put(1, K, b"B", 0),
        Op.get(2, K, 1, 2, (3, b"A")),
        Op.get(2, K, 3, 4, (7, b"B")),
        Op.get(3, K, 5, 6, (7, b"B")),
        Op.get(3, K, 7, 8, (3, b"A")),
    ])


def test_readers_disagree_on_order_known_outcomes():
    """Same as above with known-outcome puts whose outputs don't constrain
    the order by themselves, and reads seeing A-B then B-A: not linearizable."""
    bad([
        Op.put(0, K, b"A", 0, 20, (None, (3, b"A"))),
        Op.put(1, K, b"B", 0, 20, (None, (7, b"B"))),
        Op.get(2, K, 1, 2, (3, b"A")),
        Op.get(2, K, 3, 4, (7, b"B")),
        Op.get(3, K, 5, 6, (7, b"B")),
        Op.get(3, K, 7, 8, (3, b"A")),
    ])


def test_cas_succeeding_twice_on_same_expect_seq():
    """Two concurrent cas(expect_seq=1) on a@1 both report success: only the
    first one can see seq 1, the second must see the first's new seq."""
    bad([
        Op.put(0, K, b"a", 0, 1, (None, (1, b"a"))),
        Op.cas(1, K, b"x", 1, 2, 5, ((1, b"a"), (2, b"x"))),
        Op.cas(2, K, b"y", 1, 2, 5, ((1, b"a"), (3, b"y"))),
    ])


def test_cas_create_if_absent_succeeding_twice():
    """Two cas(expect_seq=0) ("create if absent") both succeed: not linearizable."""
    bad([
        Op.cas(1, K, b"x", 0, 0, 5, (None, (1, b"x"))),
        Op.cas(2, K, b"y", 0, 0, 5, (None, (2, b"y"))),
    ])


def test_cas_one_wins_other_mismatches_ok():
    """Two concurrent cas(expect_seq=1): one wins, the other sees the winner's
    seq and fails, returning prev unchanged as result."""
    ok([
        Op.put(0, K, b"a", 0, 1, (None, (1, b"a"))),
        Op.cas(1, K, b"x", 1, 2, 5, ((1, b"a"), (2, b"x"))),
        Op.cas(2, K, b"y", 1, 2, 5, ((2, b"x"), (2, b"x"))),
        Op.get(3, K, 6, 7, (2, b"x")),
    ])


def test_cas_mismatch_changes_nothing():
    """cas with a wrong expect_seq fails and leaves the value; a later read
    still sees the old value."""
    ok([
        Op.put(0, K, b"a", 0, 1, (None, (4, b"a"))),
        Op.cas(1, K, b"x", 3, 2, 3, ((4, b"a"), (4, b"a"))),
        Op.get(2, K, 4, 5, (4, b"a")),
    ])


def test_cas_mismatch_that_wrote_is_not_ok():
    """cas reports a mismatch, but a later read sees its value."""
    bad([
        Op.put(0, K, b"a", 0, 1, (None, (4, b"a"))),
        Op.cas(1, K, b"x", 3, 2, 3, ((4, b"a"), (4, b"a"))),
        Op.get(2, K, 4, 5, (5, b"x")),
    ])


def test_cas_reporting_success_on_mismatching_seq_is_not_ok():
    """prev seq is 4 but expect_seq was 3: it cannot have succeeded."""
    bad([
        Op.put(0, K, b"a", 0, 1, (None, (4, b"a"))),
        Op.cas(1, K, b"x", 3, 2, 3, ((4, b"a"), (5, b"x"))),
    ])


def test_delete_then_read_none():
    """Delete returns prev; later reads see the key absent."""
    ok([
        Op.put(0, K, b"a", 0, 1, (None, (1, b"a"))),
        Op.delete(0, K, 2, 3, ((1, b"a"), None)),
        Op.get(1, K, 4, 5, None),
        Op.delete(1, K, 6, 7, (None, None)),
        Op.cas(1, K, b"b", 0, 8, 9, (None, (2, b"b"))),
    ])


def test_read_after_delete_sees_deleted_value():
    """A read strictly after a completed delete still sees the deleted value."""
    bad([
        Op.put(0, K, b"a", 0, 1, (None, (1, b"a"))),
        Op.delete(0, K, 2, 3, ((1, b"a"), None)),
        Op.get(1, K, 4, 5, (1, b"a")),
    ])


def test_seq_not_reused_after_delete():
    """Global seq never goes back, so a key recreated after a delete gets a
    seq above every seq it had before: re-creating it at seq 1 after it was
    at seq 5 is not linearizable."""
    history = [
        Op.put(0, K, b"a", 0, 1, (None, (5, b"a"))),
        Op.delete(0, K, 2, 3, ((5, b"a"), None)),
        Op.put(0, K, b"b", 4, 5, (None, (1, b"b"))),
    ]
    bad(history)
    history[2] = Op.put(0, K, b"b", 4, 5, (None, (6, b"b")))
    ok(history)


def test_unknown_write_later_observed_ok():
    """A put times out (outcome unknown) but a later read sees its value at
    some seq; a later write's prev pins the same seq."""
    ok([
        Op.put(0, K, b"a", 0, 1, (None, (1, b"a"))),
        Op.put(1, K, b"lost", 2),
        Op.get(2, K, 10, 11, (9, b"lost")),
        Op.put(2, K, b"c", 12, 13, ((9, b"lost"), (12, b"c"))),
    ])


def test_unknown_write_takes_effect_late_ok():
    """An unknown put may take effect long after its call: a read first sees
    the old value, then a later one sees the lost write."""
    ok([
        Op.put(0, K, b"a", 0, 1, (None, (1, b"a"))),
        Op.put(1, K, b"lost", 2),
        Op.get(2, K, 10, 11, (1, b"a")),
        Op.get(2, K, 20, 21, (5, b"lost")),
    ])


def test_unknown_write_observed_with_inconsistent_seqs():
    """The lost write's seq is unknown until observed, but then it is pinned:
    two later reads can't see the same (unrewritten) value at two seqs."""
    bad([
        Op.put(0, K, b"a", 0, 1, (None, (1, b"a"))),
        Op.put(1, K, b"lost", 2),
        Op.get(2, K, 10, 11, (9, b"lost")),
        Op.get(2, K, 12, 13, (8, b"lost")),
    ])


def test_unknown_write_seq_must_exceed_previous():
    """An unknown write observed at a seq not above the seq it overwrote."""
    bad([
        Op.put(0, K, b"a", 0, 1, (None, (4, b"a"))),
        Op.put(1, K, b"lost", 2),
        Op.get(2, K, 10, 11, (3, b"lost")),
    ])


def test_unknown_write_never_observed_ok():
    """Unknown puts, cas and deletes that nobody observes: fine (they may never
    have happened, or have been overwritten before anyone looked)."""
    ok([
        Op.put(0, K, b"a", 0, 1, (None, (1, b"a"))),
        Op.put(1, K, b"lost", 2),
        Op.cas(2, K, b"lost2", 1, 2),
        Op.delete(3, K, 2),
        Op.get(0, K, 10, 11, (1, b"a")),
        Op.put(0, K, b"b", 12, 13, ((1, b"a"), (7, b"b"))),
        Op.get(0, K, 14, 15, (7, b"b")),
    ])


def test_unknown_write_observed_before_its_call():
    """A read that returns at t=2 sees the value of a put called at t=3 whose
    outcome is unknown: it cannot have taken effect before being called."""
    bad([
        Op.put(0, K, b"a", 0, 1, (None, (1, b"a"))),
        Op.get(1, K, 1.5, 2, (5, b"lost")),
        Op.put(0, K, b"lost", 3),
    ])


def test_unknown_cas_observed_ok_and_not_ok():
    """An unknown cas(expect_seq=1) on a@1 may have applied (a later read sees
    its value); but an unknown cas(expect_seq=2) on a@1 cannot have applied."""
    ok([
        Op.put(0, K, b"a", 0, 1, (None, (1, b"a"))),
        Op.cas(1, K, b"x", 1, 2),
        Op.get(2, K, 10, 11, (3, b"x")),
    ])
    bad([
        Op.put(0, K, b"a", 0, 1, (None, (1, b"a"))),
        Op.cas(1, K, b"x", 2, 2),
        Op.get(2, K, 10, 11, (3, b"x")),
    ])


def test_unknown_delete_observed_ok():
    """An unknown delete explains a later read of None."""
    ok([
        Op.put(0, K, b"a", 0, 1, (None, (1, b"a"))),
        Op.delete(1, K, 2),
        Op.get(2, K, 10, 11, None),
    ])


def test_unknown_read_is_ignored():
    """A read with unknown outcome carries no information."""
    ok([
        Op.put(0, K, b"a", 0, 1, (None, (1, b"a"))),
        Op.get(1, K, 2, None, (99, b"garbage")),
    ])


def test_seq_going_backwards():
    """Writes on a key completed one after the other, the second reporting a
    seq lower than the first's."""
    bad([
        Op.put(0, K, b"a", 0, 1, (None, (5, b"a"))),
        Op.put(1, K, b"b", 2, 3, ((5, b"a"), (3, b"b"))),
    ])


def test_seq_going_backwards_seen_by_reads():
    """Two reads of the same value at different seqs with no write between."""
    bad([
        Op.put(0, K, b"a", 0, 1, (None, (5, b"a"))),
        Op.get(1, K, 2, 3, (5, b"a")),
        Op.get(1, K, 4, 5, (4, b"a")),
    ])


def test_seq_jumps_are_fine():
    """seq is global, so one key's seq may jump by arbitrary amounts."""
    ok([
        Op.put(0, K, b"a", 0, 1, (None, (5, b"a"))),
        Op.put(1, K, b"b", 2, 3, ((5, b"a"), (105, b"b"))),
        Op.cas(1, K, b"c", 105, 4, 5, ((105, b"b"), (1000, b"c"))),
    ])


def test_keys_are_independent_and_violation_is_reported_with_its_key():
    """Key "x" has a valid history; key "y" has a stale read; key "z" reuses
    seqs that "x" used (fine: only per-key order matters).  The failure is
    reported for "y" only."""
    history = [
        Op.put(0, "x", b"a", 0, 1, (None, (1, b"a"))),
        Op.get(1, "x", 2, 3, (1, b"a")),
        Op.put(0, "y", b"a", 0, 1, (None, (2, b"a"))),
        Op.put(0, "y", b"b", 2, 3, ((2, b"a"), (3, b"b"))),
        Op.get(1, "y", 4, 5, (2, b"a")),
        Op.put(2, "z", b"q", 0, 1, (None, (1, b"q"))),
        Op.get(2, "z", 2, 3, (1, b"q")),
    ]
    r = bad(history, key="y")
    assert r.failed_keys == ("y",)
    assert "'x'" not in r.explanation and "'z'" not in r.explanation


def test_several_failing_keys_listed():
    """Two broken keys: the first in sorted order is explained, both listed."""
    history = [
        Op.get(0, "b", 0, 1, (1, b"nope")),
        Op.get(0, "a", 0, 1, (1, b"nope")),
    ]
    r = bad(history, key="a")
    assert r.failed_keys == ("a", "b")
    with pytest.raises(AssertionError, match="also not linearizable"):
        assert_linearizable(history)


def test_assert_linearizable():
    """assert_linearizable passes silently or raises with the explanation."""
    assert_linearizable([Op.put(0, K, b"a", 0, 1, (None, (1, b"a")))])
    with pytest.raises(AssertionError, match="key 'k': history is not linearizable"):
        assert_linearizable([Op.get(0, K, 0, 1, (1, b"a"))])


def test_touching_intervals_overlap():
    """ret == call counts as overlapping: a read called exactly when a write
    returns may still see the old value."""
    ok([
        Op.put(0, K, b"a", 0, 1, (None, (1, b"a"))),
        Op.put(0, K, b"b", 2, 3, ((1, b"a"), (2, b"b"))),
        Op.get(1, K, 3, 4, (1, b"a")),
    ])


def test_malformed_ops_rejected():
    """Malformed input is a ValueError, not a verdict."""
    with pytest.raises(ValueError):
        check([Op.get(0, K, 2, 1, None)])
    with pytest.raises(ValueError):
        check([Op(0, K, "frob", None, 0, 1, None)])
    with pytest.raises(ValueError):
        check([Op.put(0, K, b"a", 0, 1, (1, b"a"))])
    with pytest.raises(ValueError):
        check([Op(0, K, "cas", b"a", 0, 1, (None, None))])


def test_gives_up_when_state_bound_exceeded():
    """With a tiny bound the checker raises CheckerGaveUp instead of answering."""
    history = generate(random.Random(1), n_ops=100, n_clients=5, keys=[K])
    with pytest.raises(CheckerGaveUp) as info:
        check(history, max_states=10)
    assert info.value.key == K


def test_unknown_delete_needed_by_unknown_cas():
    """An unknown delete, then an unknown cas(expect_seq=0) whose value is
    later seen: only explicable if the delete took effect first, so the
    unobserved delete must not be discarded as irrelevant."""
    ok([
        Op.put(0, K, b"a", 0, 1, (None, (1, b"a"))),
        Op.delete(1, K, 2),
        Op.cas(2, K, b"x", 0, 3),
        Op.get(3, K, 10, 11, (4, b"x")),
    ])


def test_unobserved_unknown_put_needed_by_unknown_cas():
    """An unknown put of b is never observed, but an unknown
    cas(expect_seq=7) whose value is later seen can only have succeeded on
    b's version (b got seq 7).  Without the put it is not linearizable."""
    history = [
        Op.put(0, K, b"a", 0, 1, (None, (1, b"a"))),
        Op.put(1, K, b"b", 2),
        Op.cas(2, K, b"x", 7, 3),
        Op.get(3, K, 10, 11, (9, b"x")),
    ]
    ok(history)
    bad(history[:1] + history[2:])


def test_many_unknown_deletes_are_cheap():
    """Timed-out deletes are interchangeable: 60 of them, two before each
    put whose prev is None (so the search could pick which ones took effect
    in exponentially many ways), and a final stale read that forces the
    search to exhaust every alternative, must not make it exponential."""
    history = []
    for i in range(30):
        t = 10.0 * i
        history.append(Op.delete(1 + i % 4, K, t))
        history.append(Op.delete(5 + i % 4, K, t))
        history.append(Op.put(0, K, b"v%d" % i, t + 5, t + 6, (None, (i + 1, b"v%d" % i))))
    assert check(history, max_states=20_000).ok
    history.append(Op.get(0, K, 1000, 1001, (1, b"v0")))
    bad(history)
    assert check(history, max_states=20_000).states < 20_000


# --------------------------------------------------------------------------
# Randomized histories from a sequential reference model
# --------------------------------------------------------------------------


def generate(rng: random.Random, n_ops: int, n_clients: int, keys: list[str],
             p_unknown: float = 0.0, oracle_cas: bool = False) -> list[Op]:
    """A linearizable history by construction.

    Each client issues ops one after the other with random durations; each
    op gets a linearization point uniformly inside its [call, ret] interval
    and the outputs come from applying the ops to a sequential reference
    model (global seq counter) in linearization-point order.  With
    probability ``p_unknown`` an op's outcome is lost: its effect happens at
    a random point after its call (possibly long after) or never, and the
    client moves on after a timeout.

    A cas expects the seq the client last saw for the key (0 if none), or
    that plus one.  With ``oracle_cas`` it instead expects the key's true
    current seq half of the time, even if no one ever saw that seq (harder
    for the checker: see ``_prepare_unknown`` in the checker).
    """
    drafts = []  # [client, key, kind, value, call, ret, lin_point]
    t_next = [rng.uniform(0, 0.5) for _ in range(n_clients)]
    for j in range(n_ops):
        c = min(range(n_clients), key=lambda i: t_next[i])
        call = t_next[c]
        ret = call + rng.expovariate(1.0) + 1e-3
        kind = rng.choices(["put", "cas", "delete", "get"], [3, 3, 1, 5])[0]
        key = rng.choice(keys)
        if kind != "get" and rng.random() < p_unknown:
            lp = None if rng.random() < 0.3 else call + rng.expovariate(0.3)
            ret = None
            t_next[c] = call + 3.0
        else:
            lp = rng.uniform(call, ret)
            t_next[c] = ret + rng.uniform(0, 0.3)
        drafts.append([c, key, kind, f"v{j}".encode(), call, ret, lp])

    store: dict[str, tuple[int, bytes]] = {}
    seq = 0
    last_seen: dict[tuple[int, str], int] = {}  # (client, key) -> seq
    history: list[Op | None] = [None] * n_ops
    applied = sorted((d[6], j) for j, d in enumerate(drafts) if d[6] is not None)
    for _, j in applied:
        c, key, kind, value, call, ret, _lp = drafts[j]
        prev = store.get(key)
        cur = prev[0] if prev else 0
        expect = None
        if kind == "put":
            seq += 1
            store[key] = (seq, value)
        elif kind == "delete":
            store.pop(key, None)
        elif kind == "cas":
            if oracle_cas:
                expect = cur if rng.random() < 0.5 else rng.choice([0, max(cur - 1, 0), cur + 1])
            else:
                expect = last_seen.get((c, key), 0) + (rng.random() < 0.2)
            if expect == cur:
                seq += 1
                store[key] = (seq, value)
        now = store.get(key)
        if ret is None:
            out = None
        else:
            out = prev if kind == "get" else (prev, now)
            last_seen[c, key] = now[0] if now else 0
        arg = {"put": value, "cas": (value, expect)}.get(kind)
        history[j] = Op(c, key, kind, arg, call, ret, out)
    for j, d in enumerate(drafts):  # never applied (lost) ops
        if history[j] is None:
            c, key, kind, value, call, _ret, _lp = d
            arg = (value, rng.randrange(3)) if kind == "cas" else value if kind == "put" else None
            history[j] = Op(c, key, kind, arg, call, None, None)
    return history  # type: ignore[return-value]


def is_effective_write(op: Op) -> bool:
    """A known-outcome op that surely changed the key (put, delete, cas success)."""
    if op.ret is None or op.kind == "get":
        return False
    if op.kind == "cas":
        prev = op.out[0]
        return (prev[0] if prev else 0) == op.arg[1]
    return True


SEEDS = range(20)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_histories_are_linearizable(seed):
    """Histories generated from the reference model are linearizable."""
    rng = random.Random(seed)
    history = generate(rng, n_ops=150, n_clients=5, keys=["a", "b", "c"],
                       p_unknown=0.1 if seed % 2 else 0.0, oracle_cas=seed % 4 == 3)
    assert_linearizable(history)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_history_with_never_written_read_is_not_linearizable(seed):
    """Change one known read's output to a value nobody ever wrote."""
    rng = random.Random(1000 + seed)
    history = generate(rng, n_ops=150, n_clients=5, keys=["a", "b", "c"],
                       p_unknown=0.1 if seed % 2 else 0.0)
    reads = [j for j, op in enumerate(history) if op.kind == "get" and op.ret is not None]
    j = rng.choice(reads)
    seq = history[j].out[0] if history[j].out else 1
    history[j] = attrs.evolve(history[j], out=(seq, b"never-written"))
    r = check(history)
    assert not r.ok
    assert r.key == history[j].key


@pytest.mark.parametrize("seed", SEEDS)
def test_random_history_with_provably_stale_read_is_not_linearizable(seed):
    """Change one known read R of key k to return the version written by a
    known-outcome write X, where another write W of k that surely changed it
    (put, delete or successful cas) was called after X returned and returned
    before R was called.  Versions are unique (seqs never repeat), so R
    cannot see X's version."""
    rng = random.Random(2000 + seed)
    history = generate(rng, n_ops=150, n_clients=5, keys=["a", "b", "c"],
                       p_unknown=0.1 if seed % 2 else 0.0)
    candidates = []
    for r_idx, r in enumerate(history):
        if r.kind != "get" or r.ret is None:
            continue
        for x in history:
            if (x.key != r.key or x.kind not in ("put", "cas") or not is_effective_write(x)
                    or x.ret >= r.call):
                continue
            if any(w.key == r.key and is_effective_write(w) and w.call > x.ret
                   and w.ret < r.call for w in history):
                candidates.append((r_idx, x.out[1]))
    assert candidates
    r_idx, stale = rng.choice(candidates)
    history[r_idx] = attrs.evolve(history[r_idx], out=stale)
    res = check(history)
    assert not res.ok
    assert res.key == history[r_idx].key


def test_performance_sanity_1000_ops():
    """A 1,000-op, 5-client history over 3 keys (with some lost outcomes)
    completes without CheckerGaveUp (no timing assertion)."""
    history = generate(random.Random(42), n_ops=1000, n_clients=5, keys=["a", "b", "c"],
                       p_unknown=0.05)
    t0 = time.perf_counter()
    r = check(history)
    assert r.ok, r.explanation
    print(f"1000 ops: {time.perf_counter() - t0:.3f}s, {r.states} states")


# --------------------------------------------------------------------------
# Cross-check against brute force on small histories
# --------------------------------------------------------------------------


def brute_force_linearizable(history: list[Op]) -> bool:
    """Exhaustive, independent check of small single-key histories.

    Tries every order of the ops consistent with real time, lets every
    unknown-outcome op either take effect at any point after its call or
    never, and gives unknown writes concrete seqs: any seq appearing in the
    history above the floor, or the two smallest other candidates.
    """
    ops = [o for o in history if not (o.kind == "get" and o.ret is None)]
    seen = {o.arg[1] for o in ops if o.kind == "cas"}
    for o in ops:
        if o.ret is not None:
            for x in [o.out] if o.kind == "get" else list(o.out):
                if x is not None:
                    seen.add(x[0])

    def seqs_above(m):
        c = {s for s in seen if s > m} | {m + 1}
        n = m + 1
        while n in seen:
            n += 1
        return c | {n}

    def step(o, st):
        v, q, m = st  # value (None = absent), seq, highest seq ever
        cur = None if v is None else (q, v)
        if o.ret is None:
            if o.kind == "delete":
                return [(None, 0, m)]
            val = o.arg if o.kind == "put" else o.arg[0]
            if o.kind == "cas" and q != o.arg[1]:
                return []  # a failed unknown cas is the same as "never"
            return [(val, n, n) for n in seqs_above(m)]
        if o.kind == "get":
            return [st] if o.out == cur else []
        prev, res = o.out
        if prev != cur:
            return []
        if o.kind == "delete":
            return [(None, 0, m)] if res is None else []
        val = o.arg if o.kind == "put" else o.arg[0]
        if o.kind == "put" or q == o.arg[1]:
            ok_ = res is not None and res[1] == val and res[0] > m
            return [(val, res[0], res[0])] if ok_ else []
        return [st] if res == prev else []

    @functools.lru_cache(maxsize=None)
    def rec(remaining: frozenset, st) -> bool:
        pending = [i for i in remaining if ops[i].ret is not None]
        if not pending:
            return True
        first_ret = min(ops[i].ret for i in pending)
        return any(rec(remaining - {i}, ns)
                   for i in remaining if ops[i].call <= first_ret
                   for ns in step(ops[i], st))

    return rec(frozenset(range(len(ops))), (None, 0, 0))


def perturb(rng: random.Random, history: list[Op]) -> list[Op]:
    """Randomly corrupt 0-2 ops: outputs, expect_seqs, values, times, outcomes."""
    h = list(history)
    values = [o.arg if o.kind == "put" else o.arg[0] for o in h if o.kind in ("put", "cas")]
    values.append(b"zz")

    def rand_sv():
        return None if rng.random() < 0.25 else (rng.randrange(9), rng.choice(values))

    for _ in range(rng.choice([0, 1, 1, 2])):
        j = rng.randrange(len(h))
        o = h[j]
        r = rng.random()
        if r < 0.2:
            d = rng.uniform(-2, 2)
            call = max(0.0, o.call + d)
            h[j] = attrs.evolve(o, call=call, ret=None if o.ret is None else call + o.ret - o.call)
        elif r < 0.3 and o.kind == "cas":
            h[j] = attrs.evolve(o, arg=(o.arg[0], rng.randrange(6)))
        elif r < 0.4:
            h[j] = attrs.evolve(o, ret=None, out=None)
        elif r < 0.5 and o.kind in ("put", "cas"):
            v = rng.choice(values)
            h[j] = attrs.evolve(o, arg=v if o.kind == "put" else (v, o.arg[1]))
        elif o.ret is None:
            continue
        elif o.kind == "get":
            h[j] = attrs.evolve(o, out=rand_sv())
        elif rng.random() < 0.5:
            h[j] = attrs.evolve(o, out=(rand_sv(), o.out[1]))
        else:
            h[j] = attrs.evolve(o, out=(o.out[0], None if o.kind == "delete" else rand_sv()))
    return h


def test_agrees_with_brute_force_on_small_histories():
    """On 400 small random (often corrupted) single-key histories, including
    unknown outcomes and cas expecting never-observed seqs, the checker's
    verdict equals the brute-force one."""
    verdicts = collections.Counter()
    for seed in range(400):
        rng = random.Random(seed)
        history = generate(rng, n_ops=rng.randint(3, 8), n_clients=rng.randint(2, 4), keys=[K],
                           p_unknown=rng.choice([0, 0.3, 0.6]), oracle_cas=rng.random() < 0.5)
        history = perturb(rng, history)
        expected = brute_force_linearizable(history)
        assert check(history).ok == expected, (seed, history)
        verdicts[expected] += 1
    assert verdicts[True] > 100 and verdicts[False] > 100
