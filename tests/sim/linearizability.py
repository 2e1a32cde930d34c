"""Linearizability checker for histories of a databend-meta style KV store.

The system under test
=====================

Keys are strings, values are bytes (any hashable, comparable value other than
``None`` works).  A *global* sequence counter is incremented by every insert
and update; the seq of a key is the global seq at its last write, an absent
key has seq 0, and a delete does not bump the global seq.  Seen from a single
key this means: every write gives the key a seq strictly greater than any seq
the key ever had before (also across deletes, since the global counter never
goes back), but the jumps between consecutive seqs of one key are arbitrary.

Recorded operations (:class:`Op`)
=================================

===========  =======================  =============================================
kind         ``arg``                  ``out`` (when the outcome is known)
===========  =======================  =============================================
``put``      ``value``                ``(prev, result)``
``cas``      ``(value, expect_seq)``  ``(prev, result)``
``delete``   ``None``                 ``(prev, None)``
``get``      ``None``                 ``None`` or ``(seq, value)``
===========  =======================  =============================================

``prev`` and ``result`` are each ``None`` (absent) or ``(seq, value)``.
``put`` is an unconditional upsert.  ``cas`` is an upsert with an exact
``match_seq``: it succeeds iff the previous seq (0 when absent) equals
``expect_seq``, and then ``result == (new_seq, value)``; on a mismatch nothing
changes and ``result == prev``.

An operation whose ``ret`` is ``None`` has an *unknown outcome* (the client
timed out or lost its connection after sending it); ``out`` is ignored.  It
may have taken effect at any point after its ``call``, or never.  Unknown
reads carry no information and are dropped.  Unknown writes are modelled with
their return at +infinity; after one takes effect the key's value is known but
its seq is only known to be greater than some lower bound, until a later
observation pins it.

Algorithm
=========

Keys are checked independently (linearizability is compositional, so the
history is linearizable iff every per-key sub-history is).  Each per-key
sub-history is checked with the Wing & Gong backtracking search, with the
improvements of Lowe and of Horn & Kroening, as implemented by Porcupine:

* the history is a doubly linked list of call and return entries sorted by
  time (a call sorts before a return at the same instant, so two operations
  overlap unless one returns strictly before the other is called);
* an operation is *linearized* by applying it to the model and *lifting* its
  call and return entries out of the list; reaching a return entry whose call
  has not been lifted means the current prefix is a dead end, so the search
  backtracks (*unlift*);
* configurations ``(set of linearized ops as a bitset, model state)`` already
  explored are memoized and never explored again.

The model is non-deterministic (an unknown ``cas`` may or may not have applied)
so, as Porcupine recommends, the search runs over the *power-set* model: the
model state is a frozenset of possible per-key states (see :data:`State`).

Before searching, unknown-outcome writes whose effect is never observed by a
known-outcome operation are dropped (treated as never having taken effect),
and observed ones that wrote a unique value get the earliest return of their
observers as a deadline instead of +infinity.  Both are exact (see
:func:`_prepare_unknown`).  During the search, an optional op (unknown
outcome, return still at +infinity) is not linearized where it would not
change the model state (leaving it pending dominates), and of several pending
optional ops with the same kind and argument (e.g. timed-out deletes) only the
earliest-called one is tried (they are interchangeable).  Together these keep
timed-out writes from making the search exponential.

The state bound
===============

The number of memoized configurations explored for one key is bounded by
``max_states`` (default :data:`DEFAULT_MAX_STATES`).  A configuration is a
distinct pair (set of linearized operations, set of possible model states)
reached by the search.  If the bound is exceeded :exc:`CheckerGaveUp` is
raised instead of searching on.  Linearizable histories typically need
one to a few configurations per operation (a 300-op, 5-client key takes
~10 ms); the bound is only approached by non-linearizable histories with high
concurrency and many timed-out writes.  The search explores roughly 30-50
thousand configurations per second, so the default bound is several seconds
of CPU for one key.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import attrs

__all__ = [
    "CAS",
    "DEFAULT_MAX_STATES",
    "DELETE",
    "GET",
    "PUT",
    "CheckerGaveUp",
    "Op",
    "Result",
    "State",
    "assert_linearizable",
    "check",
]

PUT = "put"
CAS = "cas"
DELETE = "delete"
GET = "get"
KINDS = frozenset({PUT, CAS, DELETE, GET})

#: Default bound on explored (linearized-set, model-state) configurations per key.
DEFAULT_MAX_STATES = 250_000

#: One possible state of a single key: ``(value, seq, floor)``.
#:
#: * absent:                 ``(None, 0, floor)``  -- ``floor`` is the highest seq
#:   the key ever had (0 if never written); the next write's seq must exceed it.
#: * present, seq known:     ``(value, seq, seq)``.
#: * present, seq unknown:   ``(value, None, lo)`` -- the seq is some integer ``> lo``
#:   (the value was written by an unknown-outcome write that nobody has observed
#:   with its seq yet).
#:
#: The search state is a ``frozenset`` of these (power-set model).
State = tuple[Any, "int | None", int]

_ABSENT: State = (None, 0, 0)
_SHOW = 10  # how many ops to show around the failure point in explanations


class CheckerGaveUp(Exception):
    """The search for one key explored more than ``max_states`` configurations.

    This means "don't know", not "not linearizable".
    """

    def __init__(self, key: str, states: int, max_states: int) -> None:
        super().__init__(
            f"linearizability checker gave up on key {key!r}: explored more than "
            f"{max_states} (linearized-set, model-state) configurations"
        )
        self.key = key
        self.states = states
        self.max_states = max_states


@attrs.frozen
class Op:
    """One operation as recorded by a client.

    ``ret is None`` means the outcome is unknown (then ``out`` is ignored).
    ``call <= ret`` is required.  See the module docstring for ``arg``/``out``.
    The convenience constructors :meth:`put`, :meth:`cas`, :meth:`delete` and
    :meth:`get` build the right ``kind``/``arg``.
    """

    client: int
    key: str
    kind: str
    arg: Any
    call: float
    ret: float | None = None
    out: Any = None

    @property
    def unknown(self) -> bool:
        return self.ret is None

    @classmethod
    def put(cls, client: int, key: str, value: Any, call: float,
            ret: float | None = None, out: Any = None) -> "Op":
        return cls(client, key, PUT, value, call, ret, out)

    @classmethod
    def cas(cls, client: int, key: str, value: Any, expect_seq: int, call: float,
            ret: float | None = None, out: Any = None) -> "Op":
        return cls(client, key, CAS, (value, expect_seq), call, ret, out)

    @classmethod
    def delete(cls, client: int, key: str, call: float,
               ret: float | None = None, out: Any = None) -> "Op":
        return cls(client, key, DELETE, None, call, ret, out)

    @classmethod
    def get(cls, client: int, key: str, call: float,
            ret: float | None = None, out: Any = None) -> "Op":
        return cls(client, key, GET, None, call, ret, out)


@attrs.frozen
class Result:
    """Outcome of :func:`check`.  Truthy iff the history is linearizable.

    When not ok, ``key`` is the first (in sorted order) key whose sub-history
    is not linearizable, ``failed_keys`` lists all of them, and
    ``explanation`` is a human-readable account of the failure on ``key``.
    ``states`` is the total number of configurations explored.
    """

    ok: bool
    key: str | None = None
    explanation: str = ""
    failed_keys: tuple[str, ...] = ()
    states: int = 0

    def __bool__(self) -> bool:
        return self.ok


# --------------------------------------------------------------------------
# Normalized per-key operations
# --------------------------------------------------------------------------


def _sv(x: Any, what: str, op: Op) -> tuple[int, Any] | None:
    """Normalize a ``None | (seq, value)`` output element."""
    if x is None:
        return None
    try:
        seq, value = x
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be None or (seq, value), got {x!r} in {op!r}") from None
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise ValueError(f"seq in {what} must be an int, got {seq!r} in {op!r}")
    return (seq, value)


@attrs.frozen
class _KOp:
    """A validated, normalized operation of one key."""

    idx: int  # index in the original history (for messages)
    op: Op
    unknown: bool
    ret: float  # +inf when unknown
    out: Any  # normalized; None when unknown


def _normalize(idx: int, op: Op) -> _KOp | None:
    if op.kind not in KINDS:
        raise ValueError(f"unknown op kind {op.kind!r} in {op!r}")
    if op.ret is not None and op.ret < op.call:
        raise ValueError(f"op returns before it is called: {op!r}")
    if op.kind == CAS:
        try:
            _value, expect = op.arg
        except (TypeError, ValueError):
            raise ValueError(f"cas arg must be (value, expect_seq), got {op.arg!r}") from None
        if isinstance(expect, bool) or not isinstance(expect, int) or expect < 0:
            raise ValueError(f"cas expect_seq must be an int >= 0, got {expect!r}")
    if op.ret is None:
        if op.kind == GET:
            return None  # an unknown read tells nothing
        return _KOp(idx, op, True, math.inf, None)
    if op.kind == GET:
        out = _sv(op.out, "get output", op)
    else:
        try:
            prev, result = op.out
        except (TypeError, ValueError):
            raise ValueError(f"{op.kind} output must be (prev, result), got {op.out!r}") from None
        out = (_sv(prev, "prev", op), _sv(result, "result", op))
    return _KOp(idx, op, False, float(op.ret), out)


# --------------------------------------------------------------------------
# The per-key model
# --------------------------------------------------------------------------


def _observe(s: State, obs: tuple[int, Any] | None) -> State | None:
    """Return ``s`` pinned by observing ``obs``, or None if inconsistent."""
    v, q, f = s
    if obs is None:
        return s if v is None else None
    n, val = obs
    if v is None or v != val:
        return None
    if q is None:
        return (v, n, n) if n > f else None
    return s if q == n else None


def _next_floor(s: State) -> int:
    """The next write's seq must be strictly greater than this."""
    v, q, f = s
    if v is None:
        return f
    if q is not None:
        return q
    return f + 1  # seq > f, so seq >= f+1 and the next one > f+1


def _step_fn(k: _KOp) -> Callable[[State], list[State]]:
    """Single-state transition function of one op: the possible next states."""
    kind = k.op.kind
    if k.unknown:
        if kind == PUT:
            value = k.op.arg
            return lambda s: [(value, None, _next_floor(s))]
        if kind == DELETE:
            return lambda s: [(None, 0, _next_floor(s))]
        value, expect = k.op.arg

        def unknown_cas(s: State) -> list[State]:
            # Not applying is always possible (mismatch, or never executed).
            res = [s]
            v, q, f = s
            if v is None:
                if expect == 0:
                    res.append((value, None, f))
            elif (q == expect) if q is not None else (expect > f):
                res.append((value, None, expect))
            return res

        return unknown_cas

    if kind == GET:
        obs = k.out

        def get(s: State) -> list[State]:
            p = _observe(s, obs)
            return [] if p is None else [p]

        return get

    prev, result = k.out
    if kind == DELETE:

        def delete(s: State) -> list[State]:
            if result is not None:
                return []
            p = _observe(s, prev)
            return [] if p is None else [(None, 0, _next_floor(p))]

        return delete

    if kind == PUT:
        value = k.op.arg
        succeeded = True
    else:
        value, expect = k.op.arg
        succeeded = (prev[0] if prev is not None else 0) == expect

    if succeeded:

        def write(s: State) -> list[State]:
            if result is None or result[1] != value:
                return []
            p = _observe(s, prev)
            if p is None or not result[0] > _next_floor(p):
                return []
            return [(value, result[0], result[0])]

        return write

    def cas_mismatch(s: State) -> list[State]:
        if result != prev:
            return []
        p = _observe(s, prev)
        return [] if p is None else [p]

    return cas_mismatch


def _power_step(fn: Callable[[State], list[State]]) -> Callable[[frozenset], frozenset]:
    def step(states: frozenset) -> frozenset:
        if len(states) == 1:
            for s in states:
                return frozenset(fn(s))
        out: set[State] = set()
        for s in states:
            out.update(fn(s))
        return frozenset(out)

    return step


# --------------------------------------------------------------------------
# Pruning unobserved unknown-outcome writes
# --------------------------------------------------------------------------


def _prepare_unknown(kops: list[_KOp]) -> tuple[list[_KOp], int]:
    """Simplify the unknown-outcome writes of one key before the search.

    Returns the ops to search and how many were dropped.  Two exact
    simplifications (neither changes the verdict):

    1. *Drop unobserved ones.*  An unknown ``put``/``cas`` of value ``v`` is
       kept iff some known op returning after its call observes ``v`` (a get
       returning ``v``, or a write whose ``prev`` has value ``v``).  An
       unknown ``delete`` is kept iff some known op returning after its call
       observes the key absent.  Dropping means "never took effect", which
       is always allowed, so it cannot hide a violation.  Conversely, take a
       linearization in which a dropped op X takes effect.  Every known op
       observes the state it is applied to, so no known op comes between X
       and the next write that overwrites X's effect; only unknown put/delete
       ops can.  Unknown puts and deletes are unconditional and behave the
       same without X (except that X's seq no longer raises the seq floor,
       which only admits more).  An unknown ``cas`` C right after X could
       only have succeeded if its ``expect_seq`` is X's seq.  Seqs of one key
       strictly increase, so that seq cannot be 0 nor any seq appearing in a
       known op's output of this key (that op would then have observed or
       written X's version).  So if every kept unknown cas expects such an
       "explained" seq, removing X leaves a valid linearization; otherwise
       no put/cas is dropped.  Likewise an unknown cas right after a delete X
       succeeds only if it expects seq 0, so unknown deletes are dropped only
       if no kept unknown cas expects 0.

    2. *Deadlines for observed ones.*  A kept unknown ``put``/``cas`` whose
       value no other op of the key writes surely took effect, before every
       op observing its value, so it is given the earliest return time among
       those observers instead of +infinity.  This keeps the search from
       trying it at every point of the rest of the history.
    """
    unknown = [k for k in kops if k.unknown]
    if not unknown:
        return kops, 0
    # value -> rets of known ops observing it; likewise for "absent".
    seen_value: dict[Any, list[float]] = defaultdict(list)
    seen_absent: list[float] = []
    writers: dict[Any, int] = defaultdict(int)
    explained_seqs = {0}
    try:
        for k in kops:
            if k.op.kind in (PUT, CAS):
                writers[_written_value(k)] += 1
            if k.unknown:
                continue
            if k.op.kind == GET:
                obs = k.out
            else:
                obs = k.out[0]
                if k.out[1] is not None:
                    explained_seqs.add(k.out[1][0])
            if obs is None:
                seen_absent.append(k.ret)
            else:
                seen_value[obs[1]].append(k.ret)
                explained_seqs.add(obs[0])
    except TypeError:  # unhashable values: be conservative
        return kops, 0

    def observers(k: _KOp) -> list[float]:
        rets = seen_absent if k.op.kind == DELETE else seen_value.get(_written_value(k), [])
        return [r for r in rets if r >= k.op.call]

    keep = {id(k) for k in unknown if observers(k)}
    kept_cas_expects = {k.op.arg[1] for k in unknown if k.op.kind == CAS and id(k) in keep}
    drop_writes = kept_cas_expects <= explained_seqs
    drop_deletes = 0 not in kept_cas_expects
    out = []
    for k in kops:
        if k.unknown and id(k) not in keep:
            if drop_deletes if k.op.kind == DELETE else drop_writes:
                continue
        if k.unknown:
            if k.op.kind != DELETE and writers[_written_value(k)] == 1:
                seen = observers(k)
                if seen:
                    k = attrs.evolve(k, ret=min(seen))
        out.append(k)
    return out, len(kops) - len(out)


def _written_value(k: _KOp) -> Any:
    return k.op.arg if k.op.kind == PUT else k.op.arg[0]


# --------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------


@attrs.frozen
class _KeyOutcome:
    ok: bool
    states: int
    explanation: str = ""


def _check_key(key: str, kops: list[_KOp], max_states: int) -> _KeyOutcome:
    kops, n_dropped = _prepare_unknown(kops)
    n = len(kops)
    # Ops that must be linearized; the rest (unknown outcome, return at +inf)
    # can always be linearized at the end, so the search stops when these are.
    known = [k.ret != math.inf for k in kops]
    known_total = sum(known)
    if known_total == 0:
        return _KeyOutcome(True, 0)
    fns = [_step_fn(k) for k in kops]
    steps = [_power_step(fn) for fn in fns]

    # Entry 2*i is the call of op i, 2*i+1 its return; HEAD is a sentinel.
    def entry_key(e: int) -> tuple[float, int, int]:
        k = kops[e >> 1]
        return (k.ret if e & 1 else k.op.call, e & 1, e)

    order = sorted(range(2 * n), key=entry_key)
    head = 2 * n
    nxt = [-1] * (2 * n + 1)
    prv = [-1] * (2 * n + 1)
    last = head
    for e in order:
        nxt[last] = e
        prv[e] = last
        last = e

    # Optional ops with the same kind and arg are interchangeable once called
    # (same effect, return at +inf), so only the earliest-called unlifted one
    # of each such class is ever tried: then the lifted members of a class are
    # always its first ccount[c] members, and ``rank`` says which one is next.
    cls = [-1] * n
    rank = [0] * n
    class_ids: dict[Any, int] = {}
    for i in sorted((i for i in range(n) if not known[i]), key=lambda i: (kops[i].op.call, i)):
        try:
            c = class_ids.setdefault((kops[i].op.kind, kops[i].op.arg), len(class_ids))
        except TypeError:  # unhashable arg: a class of its own
            c = class_ids.setdefault(("unhashable", i), len(class_ids))
        cls[i] = c
    ccount = [0] * len(class_ids)
    for i in sorted((i for i in range(n) if not known[i]), key=lambda i: (kops[i].op.call, i)):
        rank[i] = ccount[cls[i]]
        ccount[cls[i]] += 1
    ccount = [0] * len(class_ids)

    state: frozenset = frozenset([_ABSENT])
    linearized = 0
    known_done = 0
    cache: set[tuple[int, frozenset]] = set()
    stack: list[tuple[int, frozenset]] = []
    best: list[int] = []
    best_state = state
    e = nxt[head]
    while known_done < known_total:
        if e == -1:  # cannot happen: the list always ends with a return entry
            break
        if not e & 1:  # call entry
            i = e >> 1
            c = cls[i]
            if c >= 0 and ccount[c] != rank[i]:
                e = nxt[e]
                continue
            new = steps[i](state)
            # An optional op (unknown outcome, no deadline) that cannot change
            # the state is better left pending: it can still go at the end.
            if new and (known[i] or not new <= state):
                lin2 = linearized | (1 << i)
                ck = (lin2, new)
                if ck not in cache:
                    cache.add(ck)
                    if len(cache) > max_states:
                        raise CheckerGaveUp(key, len(cache), max_states)
                    stack.append((e, state))
                    state = new
                    linearized = lin2
                    known_done += known[i]
                    if c >= 0:
                        ccount[c] += 1
                    # lift the call entry and its return entry
                    r = e + 1
                    nxt[prv[e]] = nxt[e]
                    prv[nxt[e]] = prv[e]
                    nxt[prv[r]] = nxt[r]
                    if nxt[r] != -1:
                        prv[nxt[r]] = prv[r]
                    if len(stack) > len(best):
                        best = [c >> 1 for c, _ in stack]
                        best_state = state
                    e = nxt[head]
                    continue
            e = nxt[e]
        else:  # return entry of a pending op: dead end, backtrack
            if not stack:
                return _KeyOutcome(
                    False, len(cache),
                    _explain(key, kops, n_dropped, best, best_state, fns))
            e, state = stack.pop()
            i = e >> 1
            linearized ^= 1 << i
            known_done -= known[i]
            if cls[i] >= 0:
                ccount[cls[i]] -= 1
            # unlift
            r = e + 1
            nxt[prv[r]] = r
            if nxt[r] != -1:
                prv[nxt[r]] = r
            nxt[prv[e]] = e
            prv[nxt[e]] = e
            e = nxt[e]
    return _KeyOutcome(True, len(cache))


# --------------------------------------------------------------------------
# Explanations
# --------------------------------------------------------------------------


def _fmt_sv(x: tuple[int, Any] | None) -> str:
    return "None" if x is None else f"({x[0]}, {x[1]!r})"


def _fmt_op(k: _KOp) -> str:
    op = k.op
    if op.kind == PUT:
        desc = f"put({op.arg!r})"
    elif op.kind == CAS:
        desc = f"cas({op.arg[0]!r}, expect_seq={op.arg[1]})"
    else:
        desc = f"{op.kind}()"
    if k.unknown:
        when = f"[{op.call:.6g}, ?]"
        res = "outcome unknown"
    else:
        when = f"[{op.call:.6g}, {k.ret:.6g}]"
        if op.kind == GET:
            res = _fmt_sv(k.out)
        else:
            res = f"prev={_fmt_sv(k.out[0])} result={_fmt_sv(k.out[1])}"
    return f"#{k.idx} client {op.client}: {desc} {when} -> {res}"


def _fmt_states(states: frozenset) -> str:
    parts = []
    for v, q, f in sorted(states, key=repr):
        if v is None:
            parts.append(f"absent (seq floor {f})")
        elif q is None:
            parts.append(f"{v!r} with unknown seq > {f}")
        else:
            parts.append(f"{v!r} at seq {q}")
    return " | ".join(parts)


def _explain(key: str, kops: list[_KOp], n_dropped: int, best: list[int],
             best_state: frozenset, fns: list[Callable[[State], list[State]]]) -> str:
    lines = [
        f"key {key!r}: history is not linearizable. {len(kops)} ops on this key"
        + (f" (plus {n_dropped} unobserved unknown-outcome writes ignored)" if n_dropped else "")
        + f"; the longest linearizable prefix found has {len(best)} ops."
    ]
    if best:
        shown = best[-_SHOW:]
        lines.append(
            f"Last {len(shown)} ops of that prefix, in linearization order:"
            if len(shown) < len(best) else "That prefix, in linearization order:")
        lines.extend("  " + _fmt_op(kops[i]) for i in shown)
    lines.append(f"Model state after it: {_fmt_states(best_state)}")
    in_best = set(best)
    remaining = [i for i in range(len(kops)) if i not in in_best]
    deadline = min((kops[i].ret for i in remaining if not kops[i].unknown), default=math.inf)
    frontier = sorted((i for i in remaining if kops[i].op.call <= deadline),
                      key=lambda i: (kops[i].op.call, i))
    lines.append("Ops that could come next (called before the earliest pending return), none of "
                 "which extends it to a full linearization:")
    for i in frontier[:_SHOW]:
        possible = any(fns[i](s) for s in best_state)
        note = "" if possible else "   <-- inconsistent with that state"
        lines.append("  " + _fmt_op(kops[i]) + note)
    if len(frontier) > _SHOW:
        lines.append(f"  ... and {len(frontier) - _SHOW} more")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def check(history: Iterable[Op], *, max_states: int = DEFAULT_MAX_STATES) -> Result:
    """Check whether ``history`` is linearizable w.r.t. the KV model.

    Each key is checked independently.  Raises :exc:`ValueError` for malformed
    ops, and :exc:`CheckerGaveUp` if the search for some key exceeds
    ``max_states`` configurations and no other key was found to be
    non-linearizable.
    """
    by_key: dict[str, list[_KOp]] = defaultdict(list)
    for idx, op in enumerate(history):
        k = _normalize(idx, op)
        if k is not None:
            by_key[op.key].append(k)
    total = 0
    failures: list[tuple[str, str]] = []
    gave_up: CheckerGaveUp | None = None
    for key in sorted(by_key):
        try:
            outcome = _check_key(key, by_key[key], max_states)
        except CheckerGaveUp as exc:
            gave_up = gave_up or exc
            total += exc.states
            continue
        total += outcome.states
        if not outcome.ok:
            failures.append((key, outcome.explanation))
    if failures:
        return Result(False, failures[0][0], failures[0][1],
                      tuple(k for k, _ in failures), total)
    if gave_up is not None:
        raise gave_up
    return Result(True, states=total)


def assert_linearizable(history: Sequence[Op] | Iterable[Op], *,
                        max_states: int = DEFAULT_MAX_STATES) -> None:
    """Raise :exc:`AssertionError` with an explanation unless linearizable."""
    result = check(history, max_states=max_states)
    if not result.ok:
        extra = ""
        if len(result.failed_keys) > 1:
            extra = f"\n(also not linearizable: keys {list(result.failed_keys[1:])!r})"
        raise AssertionError(result.explanation + extra)
