"""Real processes: the operator subcommands as a shell runs them (docs/reference/cli.md):
Ctrl-C on `kv watch`, and the online backup `metanode export --addr` of a running
cluster restored by `metanode import`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import LocalCluster, run_cli, wait_until

pytestmark = pytest.mark.integration


def test_ctrl_c_ends_kv_watch_without_a_traceback(cluster: LocalCluster) -> None:
    cluster.start(1)
    grpc = cluster.client_addresses()[0]
    assert run_cli(["kv", "--addr", grpc, "put", "k", "v"], cluster.root).returncode == 0
    env = dict(os.environ)
    env.pop("METASRV_CONFIG_FILE", None)
    watch = subprocess.Popen(
        [sys.executable, "-m", "metanode", "kv", "watch", "k", "--initial-flush", "--addr", grpc],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cluster.root,
    )
    try:
        assert watch.stdout is not None
        first = json.loads(watch.stdout.readline())  # the initial flush: it is watching
        assert first["key"] == "k" and first["init"] is True
        watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=15)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(10)
    assert watch.returncode == 130 and "Traceback" not in err and err.strip() == "", err
