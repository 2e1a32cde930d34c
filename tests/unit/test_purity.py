"""Guard (DESIGN §1, §7): the pure packages import no I/O framework.

`metanode.raft`, `metanode.wire` and `metanode.sm` must run the same in the daemon,
the simulator and unit tests, so importing them must not pull in trio (nor the
servers built on it). Checked in a fresh interpreter: this test process has
pytest-trio loaded already.
"""

from __future__ import annotations

import json
import subprocess
import sys

PURE_PACKAGES = ("metanode.raft", "metanode.wire", "metanode.sm")
FORBIDDEN = ("trio", "trio_websocket", "hypercorn", "quart", "quart_trio", "httpx", "asyncio")

PROBE = f"""
import importlib, json, sys
for name in {PURE_PACKAGES!r}:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in {FORBIDDEN!r} if m in sys.modules)))
"""


def test_pure_packages_do_not_import_trio() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    imported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert imported == [], f"importing {PURE_PACKAGES} imported {imported}"
