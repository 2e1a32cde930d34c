"""Fixtures of the robustness suite (docs/testing/robustness.md).

`cluster`: a `Cluster` whose processes and proxies the fixture stops (by PID) however
the test ends; options come from `@pytest.mark.cluster_options(heartbeat_ms=...,
raft_extra={...}, proxied=...)`. A failed test's directory (node logs and outputs,
configs, `history.jsonl`, `samples.jsonl`, `watch.jsonl`, `report.json`,
`timeline.txt`) is named in the failure report; with `ROBUSTNESS_ARTIFACTS=DIR` it is
copied to `DIR/<test name>/` as well (big data files left out).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.robustness.cluster import Cluster, copy_artifacts

ARTIFACTS_ENV = "ROBUSTNESS_ARTIFACTS"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cluster_options(**kw): options of the robustness `cluster` fixture")
    config.addinivalue_line("markers", "robustness: a fault-injection scenario on real processes (tests/robustness)")
    config.addinivalue_line(
        "markers",
        "known_bug(reason): a reproduction of a bug not fixed yet: reported as xfailed when it fails"
        " with `KnownBug` (in any exception group), as a failure when it passes or fails otherwise",
    )


def _artifact_dir(item: pytest.Item, tmp_path: Path | None) -> Path | None:
    base = os.environ.get(ARTIFACTS_ENV)
    if base:
        return Path(base) / re.sub(r"[^A-Za-z0-9_.-]+", "_", item.name)
    return tmp_path


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, "rep_" + rep.when, rep)
    bug = item.get_closest_marker("known_bug")
    if bug is not None and rep.when == "call":
        reason = bug.args[0] if bug.args else "known bug"
        # The exception line ("....KnownBug: message"), not the test's source that raises it.
        if rep.failed and ".KnownBug: " in str(rep.longrepr):
            rep.outcome = "skipped"
            rep.wasxfail = reason
            return
        if rep.passed:
            rep.outcome = "failed"
            rep.longrepr = f"[XPASS(strict)] the bug no longer reproduces: drop the known_bug mark ({reason})"
    if rep.failed and rep.when in ("call", "setup"):
        tmp = getattr(item, "_robustness_root", None)
        where = _artifact_dir(item, tmp)
        if where is not None:
            rep.sections.append(("robustness artifacts", f"node logs, history and report: {where}\n"))


@pytest.fixture
def artifacts(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    request.node._robustness_root = tmp_path
    yield tmp_path
    rep = getattr(request.node, "rep_call", None) or getattr(request.node, "rep_setup", None)
    base = os.environ.get(ARTIFACTS_ENV)
    if rep is not None and rep.failed and base:
        dest = _artifact_dir(request.node, tmp_path)
        assert dest is not None
        shutil.rmtree(dest, ignore_errors=True)  # a previous failure's copy
        copy_artifacts(tmp_path, dest)
        print(f"robustness artifacts copied to {dest}")


@pytest.fixture
async def cluster(request: pytest.FixtureRequest, artifacts: Path) -> AsyncIterator[Cluster]:
    marker = request.node.get_closest_marker("cluster_options")
    kw = dict(marker.kwargs) if marker else {}
    async with trio.open_nursery() as nursery:
        c = Cluster(artifacts, nursery, **kw)
        try:
            yield c
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await c.stop_all()
                finally:
                    c.save_timeline()
                    nursery.cancel_scope.cancel()
