"""Operator subcommands (`metanode kv|status|transfer-leader|trigger-snapshot`) against
a real node in-process; the command runs in a worker thread like a separate program."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from metanode.config import load_config
from metanode.server import open_server
from metanode.ops import main as ops_main
from tests.net import free_port

pytestmark = pytest.mark.runtime


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, object]:
    code = await trio.to_thread.run_sync(ops_main, list(argv))
    out = capsys.readouterr()
    if code == 0 and out.out.startswith(("{", "[", "null")) and "\n{" not in out.out.strip():
        return code, json.loads(out.out)
    return code, out


async def test_kv_and_admin_subcommands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grpc, admin = free_port(), free_port()
    cfg = load_config(
        ["--id", "1", "--single", "--raft-dir", str(tmp_path / "d"), "--log-dir", str(tmp_path / "l"),
         "--raft-api-port", str(free_port()), "--raft-advertise-host", "127.0.0.1",
         "--grpc-api-address", f"127.0.0.1:{grpc}", "--admin-api-address", f"127.0.0.1:{admin}",
         "--admin-api-token", "s3cret", "--heartbeat-interval", "50"],
        {},
    )
    addr = ["--addr", f"127.0.0.1:{grpc}"]
    async with open_server(cfg) as n:
        with trio.fail_after(10):
            while not n.core.is_leader:
                await trio.sleep(0.01)
        code, out = await run(capsys, "kv", *addr, "put", "app/a", "hello")
        assert code == 0 and out["result"]["data"] == "hello" and out["result"]["seq"] == 1  # type: ignore[index]
        code, out = await run(capsys, "kv", *addr, "put", "app/a", "x", "--match-seq", "9")
        # Not applied: the change is printed (prev == result), then one line and exit 1.
        assert code == 1 and json.loads(out.out)["prev"] == json.loads(out.out)["result"]  # type: ignore[union-attr]
        assert out.err == (  # type: ignore[union-attr]
            "metanode: error: kv put 'app/a': not applied: --match-seq 9, but the key's seq is 1\n")
        code, out = await run(capsys, "kv", *addr, "put", "app/new", "x", "--match-seq", "0")
        assert code == 0 and out["result"]["seq"] == 2  # type: ignore[index]
        code, out = await run(capsys, "kv", *addr, "delete", "app/new", "--match-seq", "1")
        assert code == 1 and "not applied: --match-seq 1, but the key's seq is 2" in out.err  # type: ignore[union-attr]
        code, out = await run(capsys, "kv", *addr, "delete", "app/new", "--match-seq", "2")
        assert code == 0 and out["result"] is None  # type: ignore[index]
        code, out = await run(capsys, "kv", *addr, "get", "app/a")
        assert out == {"seq": 1, "data": "hello", "expire_at_ms": None}
        code, out = await run(capsys, "kv", *addr, "list", "app/")
        assert [r["key"] for r in out] == ["app/a"]  # type: ignore[union-attr]
        code, out = await run(capsys, "kv", *addr, "watch", "app/", "--key-end", "app0", "--initial-flush", "--count", "1")
        assert code == 0 and out["current"]["data"] == "hello" and out["init"] is True  # type: ignore[index]
        code, out = await run(capsys, "kv", *addr, "delete", "app/a")
        assert code == 0 and out["result"] is None  # type: ignore[index]
        code, out = await run(capsys, "--format", "table", "kv", *addr, "list", "")
        assert code == 0
        code, out = await run(capsys, "status", "--admin", f"127.0.0.1:{admin}")
        assert code == 0 and out["is_leader"] is True  # type: ignore[index]
        assert [v["name"] for v in out["voters"]] == ["1"]  # type: ignore[index]
        code, out = await run(capsys, "status", "--admin", f"127.0.0.1:{admin}", "--format", "table")
        lines = out.out.splitlines()  # type: ignore[union-attr]
        assert code == 0 and lines[0].startswith("node 1: Leader, term ") and "leader 1," in lines[0]
        assert lines[1].startswith("log: last ") and lines[3].split() == ["name", "raft", "role", "leader", "matched"]
        assert lines[4].split()[:4] == ["1", n.advertise_address, "voter", "*"]
        code, out = await run(capsys, "trigger-snapshot", "--admin", f"127.0.0.1:{admin}")
        assert code == 1 and "401" in out.err  # type: ignore[union-attr]
        code, out = await run(capsys, "trigger-snapshot", "--admin", f"127.0.0.1:{admin}", "--token", "s3cret")
        assert code == 0 and out is None
        code, out = await run(capsys, "transfer-leader", "--admin", f"127.0.0.1:{admin}", "--token", "s3cret")
        # One human line, not a Python dict.
        assert code == 1 and out.err == (  # type: ignore[union-attr]
            f"metanode: error: 127.0.0.1:{admin}/v1/ctrl/trigger_transfer_leader answered 400:"
            " no other voter to transfer leadership to\n")
        # Options after the positional arguments, as before them.
        code, out = await run(capsys, "kv", "put", "app/b", "hello", *addr, "--ttl-ms", "60000")
        assert code == 0 and out["result"]["seq"] == 3  # type: ignore[index]
        code, out = await run(capsys, "kv", "get", "app/b", "--format", "table", *addr)
        assert code == 0 and out.out.split()[:6] == ["field", "value", "seq", "3", "data", "hello"]  # type: ignore[union-attr]
        code, out = await run(capsys, "kv", "list", "app/", *addr, "--limit", "1", "--timeout", "5")
        assert code == 0 and [r["key"] for r in out] == ["app/b"]  # type: ignore[union-attr]
        code, out = await run(capsys, "status", "--format", "table", "--admin", f"127.0.0.1:{admin}")
        assert code == 0 and out.out.startswith("node 1: Leader")  # type: ignore[union-attr]
    code, out = await run(capsys, "kv", "--addr", f"127.0.0.1:{free_port()}", "--timeout", "1", "get", "k")
    assert code == 1 and "error" in out.err  # type: ignore[union-attr]
    assert await trio.to_thread.run_sync(ops_main, ["kv", "frob"]) == 2


async def test_bad_usage_of_kv_exits_2_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["kv", "--addr", "nonsense", "get", "k"], ["kv", "--timeout", "0", "get", "k"],
                 ["kv", "list", "--limit", "-1"], ["kv", "put", "k", "v", "--match-seq", "x"],
                 ["kv", "get", "k", "--addr", "nonsense"], ["kv", "watch", "k", "--count", "-2"]):
        code = await trio.to_thread.run_sync(ops_main, argv)
        err = capsys.readouterr().err
        # One error line (after the usage, for what argparse refuses), no traceback.
        last = err.strip().splitlines()[-1]
        assert code == 2 and last.startswith("metanode") and ": error: " in last and "Traceback" not in err, err
