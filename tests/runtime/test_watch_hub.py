"""The node's WatchHub: history, filtering, overflow and reset (pure data + channels)."""

from __future__ import annotations

import pytest

from metanode.errors import BadRequest, Unavailable
from metanode.node import watch
from metanode.sm import KeyChange, SeqV

pytestmark = pytest.mark.runtime


def change(rev: int, key: str = "k", deleted: bool = False) -> KeyChange:
    return KeyChange(key, SeqV(rev - 1, b"p") if rev > 1 else None, None if deleted else SeqV(rev, b"v"), rev)


def test_history_filters_and_compaction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "HISTORY", 5)
    hub = watch.WatchHub(0)
    hub.history = type(hub.history)(maxlen=5)
    w = hub.subscribe("a", "c", "update")
    hub.on_changes([change(1, "a"), change(2, "b", deleted=True), change(3, "c"), change(4, "b")])
    assert [c.rev for c in hub.since(0, w)] == [1, 4]  # range [a, c), updates only
    hub.on_changes([change(r) for r in range(5, 9)])  # history keeps 4..8 now
    assert hub.base == 3
    with pytest.raises(BadRequest, match="compacted"):
        hub.since(2, w)
    assert [c.rev for c in hub.since(3, w)] == [4]


def test_a_slow_watcher_fails_and_a_reset_fails_everyone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "QUEUE", 3)
    hub = watch.WatchHub(0)
    slow = hub.subscribe("k", None, "all")
    other = hub.subscribe("z", None, "all")
    hub.on_changes([change(r) for r in range(1, 5)])
    assert isinstance(slow.error, Unavailable) and slow not in hub.watchers
    hub.reset(10)
    assert isinstance(other.error, Unavailable) and not hub.watchers and hub.base == 10
    with pytest.raises(BadRequest):
        hub.subscribe("k", "a", "all")  # key_end before key
    with pytest.raises(BadRequest):
        hub.subscribe("k", None, "sometimes")
