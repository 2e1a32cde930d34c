"""Keeping the cyclic garbage collector's full collections short with a large state machine.

A full (generation 2) collection walks every object the collector tracks and touches
everything they refer to. The state machine's values and keys are ``bytes`` and
``str``, which it never tracks, but the ``SortedList`` of keys is lists of them, so a
full collection touches every key: ~25 ms at 1M keys alone, 35-70 ms measured in a
node, the event loop held throughout. Such a collection comes whenever the objects
that outlived younger collections reach a quarter of the old ones (raft log entries
do, one a write), so every few thousand writes.

`settle` collects what is garbage now and then moves every object still alive into
the collector's permanent generation (``gc.freeze``), which no collection walks: the
state machine loaded at start, installed from the leader or grown since the last
snapshot. Later collections walk only what was made after. What it costs: an object
frozen alive that becomes garbage later, in a reference cycle, is never collected
(without a cycle, reference counting frees it as usual). So it runs only where the
heap holds mostly long-lived state: once the node has loaded its state machine, and
after a snapshot (built or installed) of a machine of `MIN_KEYS` keys or more, where
a full collection would cost milliseconds.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("metanode.node")

MIN_KEYS = 100_000  # below this a full collection costs ~2 ms or less: left as it is


def settle(keys: int) -> None:
    """Collect, then freeze what survives, when the state machine holds `keys` keys,
    `MIN_KEYS` or more."""
    if keys < MIN_KEYS:
        return
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.debug("heap settled: %d objects frozen (%d keys) in %.1f ms",
              gc.get_freeze_count(), keys, (time.perf_counter() - start) * 1000)


__all__ = ["MIN_KEYS", "settle"]
