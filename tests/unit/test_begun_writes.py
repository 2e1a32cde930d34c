"""Client writes proposed in a connection's reader task (`begin_client_writes`) and
waited for by their serving task (`client_write_batch(..., begun)`):
metanode/node/forward.py. A fake node whose proposal takes a given time."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import trio

from metanode.errors import Timeout
from metanode.node.events import Reply
from metanode.node.forward import Forwarding
from metanode.node.raft_loop import RaftLoop, _Batch
from metanode.sm import Upsert
from metanode.trio_util import InFlight

WAIT_S = 0.2


class _Core:
    is_leader = True


class FakeNode(RaftLoop, Forwarding):
    id = 1
    tick_s = 0.01

    def __init__(self, propose_s: float) -> None:
        self._pending: dict[int, Any] = {}
        self._req_ids = itertools.count(1)
        self.calls = InFlight()
        self.core = _Core()
        self.propose_s = propose_s

    def wait_s(self) -> float:
        return WAIT_S

    async def submit_proposals(self, cmds: list[Any], on_done: Any = None) -> _Batch:
        batch = _Batch(list(itertools.islice(self._req_ids, len(cmds))), on_done)
        for pos, req_id in enumerate(batch.ids):
            self._pending[req_id] = (batch, pos)
        await trio.sleep(self.propose_s)  # a step waiting for a slow disk, or a full inbox
        return batch


@pytest.mark.parametrize("propose_s", [0.0, WAIT_S * 1.5])
async def test_a_begun_batch_is_waited_for_even_when_its_proposal_outlasted_the_deadline(propose_s: float) -> None:
    """Proposed, it is in the log: never "unavailable" (not applied, retry); waited
    for once at least (0.1 s), then an unknown outcome; forgotten afterwards, so a
    late commit answers nobody a second time."""
    node = FakeNode(propose_s)
    early: list[Any] = []
    cmd = Upsert("k", b"v")
    begun = await node.begin_client_writes([cmd], early.append)
    assert begun is not None
    outcomes = await node.client_write_batch([cmd], early.append, begun)
    assert isinstance(outcomes[0], Timeout) and "no answer" in str(outcomes[0])
    assert not node._pending
    node._dispatch([Reply(req_id=begun.batch.ids[0], value="applied")])
    assert early == []


async def test_a_begun_batch_settled_in_time_answers_early_and_returns_the_same() -> None:
    node = FakeNode(WAIT_S * 1.5)
    early: list[Any] = []
    cmd = Upsert("k", b"v")
    begun = await node.begin_client_writes([cmd], early.append)
    assert begun is not None
    async with trio.open_nursery() as nursery:
        async def settle() -> None:
            await trio.sleep(0.05)
            node._dispatch([Reply(req_id=begun.batch.ids[0], value="applied")])

        nursery.start_soon(settle)
        outcomes = await node.client_write_batch([cmd], early.append, begun)
    assert outcomes == ["applied"] and early == [["applied"]] and not node._pending


async def test_abandoned_writes_are_forgotten() -> None:
    node = FakeNode(0.0)
    early: list[Any] = []
    begun = await node.begin_client_writes([Upsert("k", b"v")], early.append)
    assert begun is not None and node._pending
    node.abandon_client_writes(begun)
    assert not node._pending
    node._dispatch([Reply(req_id=begun.batch.ids[0], value="applied")])
    assert early == []


async def test_not_leading_nothing_is_begun() -> None:
    node = FakeNode(0.0)
    node.core.is_leader = False
    assert await node.begin_client_writes([Upsert("k", b"v")]) is None
    assert not node._pending
