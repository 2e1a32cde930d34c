"""Guard (design §1, §7): the pure packages import no I/O framework.

`metanode.raft`, `metanode.wire` and `metanode.sm` must run the same in the daemon,
the simulator and unit tests, so importing them must not pull in trio (nor the
servers built on it). Checked in a fresh interpreter: this test process has
pytest-trio loaded already.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import metanode

PURE_PACKAGES = ("metanode.raft", "metanode.wire", "metanode.sm", "metanode.node.driver", "metanode.node.events")
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


# The pure layers never read a clock, touch the OS or use global randomness: an
# injected `random.Random` is the only randomness (its type may be named).
NO_IO_MODULES = {"time", "datetime", "os", "socket", "threading", "asyncio", "subprocess", "select", "signal"}


def _pure_files() -> list[Path]:
    root = Path(metanode.__file__).parent
    files = [*root.joinpath("raft").glob("*.py"), *root.joinpath("wire").glob("*.py"), *root.joinpath("sm").glob("*.py")]
    return files + [root / "node" / "driver.py", root / "node" / "events.py"]


def test_pure_layers_read_no_clock_and_use_no_global_randomness() -> None:
    problems = []
    for path in _pure_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
                if names == ["random"]:
                    problems.append(f"{path.name}:{node.lineno}: from random import ...")
            else:
                names = []
            problems += [f"{path.name}:{node.lineno}: imports {n}" for n in names if n in NO_IO_MODULES]
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "random"
                and node.attr != "Random"
            ):
                problems.append(f"{path.name}:{node.lineno}: random.{node.attr} (global randomness)")
    assert problems == []


def test_the_node_runtime_does_not_import_the_apis() -> None:
    """metanode/node/ knows nothing of the servers built on it (metanode/server.py
    assembles them), so the simulator and the node never pull in Quart or wsproto."""
    probe = "import sys, metanode.node.node; print(sorted(m for m in sys.modules if m.startswith('metanode.api')))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
