"""heap.settle: a full collection first, then the survivors frozen; only for a large
state machine."""

from __future__ import annotations

import gc
import weakref

import pytest

from metanode.node import heap


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def thawed():
    """The test process is left as it was: nothing frozen."""
    assert gc.get_freeze_count() == 0
    gc.disable()  # no automatic collection between making garbage and settling
    yield
    gc.enable()
    gc.unfreeze()


def test_a_small_state_machine_is_left_alone(thawed):
    garbage = weakref.ref(_Cycle())
    heap.settle(heap.MIN_KEYS - 1)
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert garbage() is None


def test_a_large_one_collects_the_garbage_then_freezes_what_lives(thawed):
    live = _Cycle()
    garbage = weakref.ref(_Cycle())  # a cycle nobody refers to
    heap.settle(heap.MIN_KEYS)
    assert garbage() is None  # collected before the freeze, not frozen alive
    assert gc.get_freeze_count() > 0
    assert all(o is not live for o in gc.get_objects())  # out of the generations
    later = weakref.ref(_Cycle())  # made after the freeze: collected as usual
    gc.collect()
    assert later() is None
