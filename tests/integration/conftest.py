"""Fixtures of the real-process tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import LocalCluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """Nodes on free loopback ports; every process is stopped at the end."""
    c = LocalCluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()
