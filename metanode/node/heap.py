"""Keeping the cyclic garbage collector's full collections short with a large state machine.

A full (generation 2) collection walks every object the collector tracks and touches
everything they refer to. The state machine's values and keys are ``bytes`` and
``str``, which it never tracks, but the ``SortedList`` of keys is lists of them, so a
full collection touches every key: ~23 ms at 1M keys alone, 35-70 ms measured in a
node, the event loop held throughout. Such a collection comes after ten younger ones
once the objects that outlived them reach a quarter of the old ones (raft log entries
do, one a write), so every few thousand writes.

`settle` collects what is garbage now and then moves every object still alive into
the collector's permanent generation (``gc.freeze``), which no collection walks: the
state machine loaded at start, installed from the leader or grown since the last
snapshot. Later collections walk only what was made after. It runs only where the heap
holds mostly long-lived state, with `MIN_KEYS` keys or more: once the node has loaded
its snapshot (before the log is replayed), after an install from the leader, and after
a snapshot built here is saved and the log purged behind it.

What it costs:
- its own collection walks what is not frozen yet: little after a snapshot of a node
  settled before, but a whole machine after an install, or at the first snapshot of a
  node that grew past `MIN_KEYS` while running (the tens of ms of one full collection,
  once);
- an object frozen alive that becomes garbage later in a reference cycle is not
  collected (nor what the cycle refers to) until ``gc.unfreeze()``, which metanode never
  calls; without a cycle, reference counting frees it as usual. Twelve snapshots of a
  300k-key node grew its RSS exactly as much as without the freeze;
- it is process-wide: a program embedding a node has its own heap frozen too.
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
    # (Not gc.get_freeze_count(): it walks every frozen object, ~5 ms at 1M keys.)
    log.debug("heap settled (%d keys) in %.1f ms", keys, (time.perf_counter() - start) * 1000)


__all__ = ["MIN_KEYS", "settle"]
