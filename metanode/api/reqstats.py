"""Counts and latencies of the client API requests one node serves, for the dashboard.

The client API records each request it answers (`RequestStats.record`: its kind, how
long it took from decoding to the reply being ready, whether it succeeded); the
dashboard's sampler takes the totals once a second (`RequestStats.take`). Both reach
the same object through `stats_for(node)`, keyed by the node object, so neither the
node nor `open_node` has to carry it.

Only requests this node's client API served are counted: a write a follower forwards
to the leader counts on the follower (its latency includes the forwarding), not on
the leader. Latencies are kept as samples (at most `MAX_SAMPLES` per kind per period,
a uniform reservoir beyond that), so p50/p99 are exact up to that many requests per
second and sampled above it.
"""

from __future__ import annotations

import math
import random
import weakref
from typing import Any

#: Kinds of request by client API op; other ops (handshake, member_list,
#: cluster_status, watch) are not counted.
KIND_OF_OP: dict[str, str] = {
    "upsert": "write",
    "txn": "write",
    "get": "read",
    "mget": "read",
    "list": "read",
}

KINDS = ("write", "read")

#: Latency samples kept per kind between two `take`s.
MAX_SAMPLES = 4096


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


class _Period:
    __slots__ = ("count", "errors", "samples")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.samples: list[float] = []


class RequestStats:
    """Requests served since the last `take`, by kind (``"write"``, ``"read"``)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()
        self._periods = {kind: _Period() for kind in KINDS}
        self.totals = {kind: 0 for kind in KINDS}

    def record(self, kind: str, seconds: float, ok: bool) -> None:
        self.record_many(kind, seconds, 1, 0 if ok else 1)

    def record_many(self, kind: str, seconds: float, n: int, errors: int) -> None:
        """`n` requests of `kind` that took `seconds` each, `errors` of them failed."""
        period = self._periods.get(kind)
        if period is None:
            return
        self.totals[kind] += n
        period.errors += errors
        samples = period.samples
        for _ in range(n):
            period.count += 1
            if len(samples) < MAX_SAMPLES:
                samples.append(seconds)
            else:  # reservoir sampling: every request equally likely to be kept
                slot = self._rng.randrange(period.count)
                if slot < MAX_SAMPLES:
                    samples[slot] = seconds

    def take(self) -> dict[str, dict[str, Any]]:
        """Per kind: ``count``, ``errors``, ``p50_ms``, ``p99_ms`` (None without
        requests) since the last call; starts a new period."""
        out: dict[str, dict[str, Any]] = {}
        for kind, period in self._periods.items():
            samples = sorted(period.samples)
            p50 = percentile(samples, 0.50)
            p99 = percentile(samples, 0.99)
            out[kind] = {
                "count": period.count,
                "errors": period.errors,
                "p50_ms": None if p50 is None else round(p50 * 1000, 3),
                "p99_ms": None if p99 is None else round(p99 * 1000, 3),
            }
            self._periods[kind] = _Period()
        return out


_STATS: weakref.WeakKeyDictionary[Any, RequestStats] = weakref.WeakKeyDictionary()


def stats_for(node: Any) -> RequestStats | None:
    """The one `RequestStats` of `node` (created on first use); None for an object
    that cannot be weakly referenced (then nothing is counted)."""
    try:
        stats = _STATS.get(node)
        if stats is None:
            stats = _STATS[node] = RequestStats()
    except TypeError:
        return None
    return stats
