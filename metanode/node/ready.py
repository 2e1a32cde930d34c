"""When a node is ready to serve: the one rule behind `GET /v1/health` and systemd's
``READY=1`` (docs/reference/admin-api.md#get-v1health, docs/operations/cluster.md).

A node is ready once it knows a leader and has applied everything that leader had
committed: it asks the leader for its commit index (a ReadIndex round, the same as a
linearizable read: `Node.client_read_barrier`) and waits until its own state machine
has applied up to it. A follower's own commit index cannot tell: it only learns the
leader's commit as far as the entries it already holds.

Readiness is then latched for that leader and term, so a node applying a steady stream
of writes does not flap between ready and not ready. It is lost when the node knows no
leader, when the leader or term changes (until it is confirmed again), when the node
shuts down or finds itself removed.
"""

from __future__ import annotations

import weakref
from typing import Any

import trio

from metanode.errors import ClientError

#: How long a health request may wait for the leader's confirmation.
HEALTH_CONFIRM_TIMEOUT = 1.0

CATCHING_UP = "catching up"


class Readiness:
    """The readiness of one running node (see the module doc)."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self._latched: tuple[int, int] | None = None  # (term, leader) confirmed
        self._lock = trio.Lock()

    def _key(self) -> tuple[int, int] | None:
        core = self.node.core
        return None if core.leader is None else (core.term, core.leader)

    def reason(self) -> str | None:
        """None when ready, else why not (one line). Never waits."""
        node = self.node
        if node.stopping.is_set():
            return "shutting down"
        if node.removed.is_set():
            return "removed from the cluster"
        key = self._key()
        if key is None:
            return "no leader known"
        if self._latched == key:
            return None
        return (
            f"{CATCHING_UP} with leader {key[1]} of term {key[0]}: applied {node.applied.index},"
            f" committed here {node.core.commit_index}"
        )

    @property
    def ready(self) -> bool:
        return self.reason() is None

    async def confirm(self, timeout: float) -> bool:
        """Ask the leader what it has committed and wait (up to `timeout` s) until this
        node applied it; latch readiness for that leader. True when ready."""
        if self.reason() is None:
            return True
        key = self._key()
        if key is None or self.node.stopping.is_set() or self.node.removed.is_set():
            return False
        with trio.move_on_after(timeout):
            async with self._lock:  # one confirmation at a time; the others wait for it
                if self._latched == self._key() == key:
                    return True
                try:
                    await self.node.client_read_barrier()
                except ClientError:
                    return False
                if self._key() == key:
                    self._latched = key
        return self.reason() is None

    async def check(self, timeout: float = HEALTH_CONFIRM_TIMEOUT) -> str | None:
        """For `/v1/health`: None when ready (confirming with the leader first when
        needed, up to `timeout` s), else the reason."""
        reason = self.reason()
        if reason is not None and reason.startswith(CATCHING_UP):
            await self.confirm(timeout)
            reason = self.reason()
        return reason


_BY_NODE: weakref.WeakKeyDictionary[Any, Readiness] = weakref.WeakKeyDictionary()


def readiness_of(node: Any) -> Readiness:
    """The `Readiness` of `node`, one per node (shared by the health route and run)."""
    found = _BY_NODE.get(node)
    if found is None:
        found = _BY_NODE[node] = Readiness(node)
    return found


__all__ = ["HEALTH_CONFIRM_TIMEOUT", "Readiness", "readiness_of"]
