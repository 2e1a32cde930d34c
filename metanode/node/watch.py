"""Watchers of key changes (docs/reference/client-protocol.md, "Watch").

The apply loop hands every applied change (`KeyChange`, with its revision) to the
`WatchHub`, which keeps the last `HISTORY` changes (so a watcher can resume with
`from_seq` after a reconnect, on any node) and pushes each change to the watchers of
its key. A watcher whose queue overflows, or whose node's state was replaced by a
snapshot from the leader, fails with `Unavailable` and resumes elsewhere or later.
Subscribing and reading the history or the current values happen in one step (no
await in between), so nothing falls between the flush and the live events.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import trio

from metanode.errors import BadRequest, Unavailable
from metanode.sm import KeyChange

HISTORY = 100_000
QUEUE = 10_000
FILTERS = ("all", "update", "delete")


class Watcher:
    def __init__(self, hub: WatchHub, key: str, key_end: str | None, filter: str) -> None:
        self.hub = hub
        self.key = key
        self.key_end = key_end
        self.filter = filter
        self._send, self.events = trio.open_memory_channel[KeyChange](QUEUE)
        self.error: Exception | None = None

    def wants(self, change: KeyChange) -> bool:
        if self.key_end is None:
            if change.key != self.key:
                return False
        elif not self.key <= change.key < self.key_end:
            return False
        if self.filter == "update":
            return change.current is not None
        if self.filter == "delete":
            return change.current is None
        return True

    def push(self, change: KeyChange) -> None:
        try:
            self._send.send_nowait(change)
        except trio.WouldBlock:
            self.fail(Unavailable(f"watch too slow: over {QUEUE} events queued; resume with from_seq"))

    def fail(self, error: Exception) -> None:
        self.error = error
        self.hub.unsubscribe(self)
        self._send.close()

    def close(self) -> None:
        self.hub.unsubscribe(self)
        self._send.close()


class WatchHub:
    def __init__(self, rev: int) -> None:
        self.base = rev  # history holds the changes after this revision
        self.history: deque[KeyChange] = deque(maxlen=HISTORY)
        self.watchers: set[Watcher] = set()

    def on_changes(self, changes: Iterable[KeyChange]) -> None:
        history = self.history
        for change in changes:
            if len(history) == HISTORY:
                self.base = history[0].rev
            history.append(change)
            if self.watchers:
                for w in list(self.watchers):  # a push may unsubscribe its watcher
                    if w.wants(change):
                        w.push(change)

    def reset(self, rev: int) -> None:
        """A snapshot from the leader replaced the state: history is discontinuous."""
        self.history.clear()
        self.base = rev
        for w in list(self.watchers):
            w.fail(Unavailable("this node's state was replaced by a snapshot; resume with from_seq"))

    def subscribe(self, key: str, key_end: str | None, filter: str) -> Watcher:
        if filter not in FILTERS:
            raise BadRequest(f"watch: filter must be one of {', '.join(FILTERS)}, got {filter!r}")
        if key_end is not None and key_end <= key:
            raise BadRequest("watch: key_end must be greater than key")
        w = Watcher(self, key, key_end, filter)
        self.watchers.add(w)
        return w

    def unsubscribe(self, w: Watcher) -> None:
        self.watchers.discard(w)

    def since(self, rev: int, w: Watcher) -> list[KeyChange]:
        """The changes after `rev` that `w` wants; BadRequest if they are gone."""
        if rev < self.base:
            raise BadRequest(
                f"watch: history compacted: from_seq {rev} is older than this node's oldest"
                f" kept revision {self.base + 1}; watch again with initial_flush"
            )
        return [c for c in self.history if c.rev > rev and w.wants(c)]
