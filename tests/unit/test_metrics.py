"""The batched recorders of a message's writes (`observe_n`, `requests_done`,
`RequestStats.record_many`) against the one-at-a-time ones they replace: the same
exposition, the same counts. `observe_n` relies on prometheus_client's private
Histogram fields; this is where a version that renames them fails."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest

from metanode.api.reqstats import MAX_SAMPLES, RequestStats
from metanode.metrics import NodeMetrics, observe_n

BUCKETS = (1.0, 5.0, 25.0)


def _histogram() -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    return registry, Histogram("h", "a histogram", buckets=BUCKETS, registry=registry)


def _samples(registry: CollectorRegistry) -> dict[str, float]:
    return {
        s.name + str(sorted(s.labels.items())): s.value
        for family in registry.collect() for s in family.samples if not s.name.endswith("_created")
    }


@pytest.mark.parametrize("amount", [0.5, 1.0, 3.0, 25.0, 100.0])
@pytest.mark.parametrize("n", [1, 2, 64])
def test_observe_n_is_n_observes(amount: float, n: int) -> None:
    one_reg, one = _histogram()
    many_reg, many = _histogram()
    for _ in range(n):
        one.observe(amount)
    observe_n(many, amount, n)
    assert _samples(many_reg) == _samples(one_reg)
    assert _samples(many_reg)["h_count[]"] == n


def test_observe_n_uses_fields_this_prometheus_client_has() -> None:
    _, h = _histogram()
    assert len(h._upper_bounds) == len(BUCKETS) + 1  # + inf
    assert len(h._buckets) == len(h._upper_bounds)
    h._sum.inc(0)


def test_requests_done_is_n_request_dones() -> None:
    one, many = NodeMetrics(), NodeMetrics()
    for op, failed in (("upsert", 0), ("txn", 2), ("get", 3)):
        for i in range(5):
            one.request_done(op, 0.004, i >= failed)
        many.requests_done(op, 0.004, 5, failed)
    many.requests_done("watch", 0.004, 5, 0)  # not a kv request: not counted
    strip = lambda text: [line for line in text.splitlines() if "_created" not in line]  # noqa: E731
    assert strip(generate_latest(many.registry).decode()) == strip(generate_latest(one.registry).decode())


def test_record_many_is_n_records() -> None:
    one, many = RequestStats(random.Random(7)), RequestStats(random.Random(7))
    for _ in range(MAX_SAMPLES + 100):  # past the reservoir's size: the same draws
        one.record("write", 0.002, True)
    for i in range(3):
        one.record("write", 0.003, i != 1)
    many.record_many("write", 0.002, MAX_SAMPLES + 100, 0)
    many.record_many("write", 0.003, 3, 1)
    many.record_many("other", 0.003, 3, 1)  # not a kind: ignored
    assert many.totals == one.totals
    assert many.take() == one.take()
