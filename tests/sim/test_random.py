"""Randomized simulation: many seeds of a faulty cluster under load and churn.

Each seed runs 60 simulated seconds of a 3- or 5-voter cluster (see `workload.py`).
`SIM_SEEDS=N` runs N seeds (default 500), `SIM_SEED_START=S` starts at seed S. A
failure prints the seed and the command that replays it with a transcript.
"""

from __future__ import annotations

import os

import pytest

from tests.sim.workload import run_seed

SEEDS = int(os.environ.get("SIM_SEEDS", "500"))
START = int(os.environ.get("SIM_SEED_START", "0"))


@pytest.mark.sim
@pytest.mark.parametrize("seed", range(START, START + SEEDS))
def test_seed(seed: int) -> None:
    try:
        stats = run_seed(seed)
    except BaseException as e:
        raise AssertionError(
            f"simulator seed {seed} failed: {e}\n"
            f"replay: python -m tests.sim.replay {seed} --transcript /tmp/sim-{seed}.txt"
        ) from e
    assert stats.sim_ms >= 60_000
    assert stats.ops_ok > 0
