"""The `metanode` command line (contract §1): modes, flags, exit codes, messages."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from metanode import __version__
from metanode.cli import main
from metanode.config import CONFIG_FILE_ENV, KEYS, Config

ROOT = Path(__file__).resolve().parents[2]
ETC = ROOT / "etc"


@pytest.fixture(autouse=True)
def no_config_file_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_FILE_ENV, raising=False)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "metanode.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {err!r}"
    assert lines[0].startswith("metanode: error: ")
    return lines[0]


# ------------------------------------------------------------------------- help, ver


def test_help_lists_every_flag_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: metanode")
    assert "Raft-replicated metadata service" in out
    assert "Exit codes: 0 ok, 1 the operation failed, 2 bad usage or bad config" in out
    for flag in ("-c FILE, --config-file FILE", "--cmd {ver,show-config}", "--leave-id N",
                 "--leave-via ADDR [ADDR ...]", "--version"):  # fmt: skip
        assert flag in out
    flat = " ".join(out.split())  # undo argparse's wrapping
    for key in KEYS:
        assert f"{key.flag} " in flat, key.flag
        assert f"[{key.dotted}] (default: {key.default})" in flat, key.dotted
    assert flat.count("(default:") == len(KEYS) + 4  # -c, --cmd, --leave-id, --leave-via


VER = f"version: {__version__}\nmin-compatible-client-version: 0.1.0\ndata-version: V001\n"


def test_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"metanode {__version__}\n"


@pytest.mark.parametrize("argv", [["--cmd", "ver"], ["--cmd=ver"]])
def test_cmd_ver_prints_what_databend_meta_prints(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # databend's scripts read it with `grep min-compatible-client-version | awk '{print $2}'`.
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out == VER
    assert [line.split()[1] for line in out.splitlines() if "min-compatible-client-version" in line] == ["0.1.0"]


def test_ver_loads_no_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--cmd", "ver", "-c", "/no/such/file.toml"]) == 0
    assert capsys.readouterr().out == VER


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--cmd", "bench"], "invalid choice: 'bench'"),
        (["--vers"], "unrecognized arguments: --vers"),  # no silent abbreviations
        (["--id"], "argument --id: expected one argument"),
        (["positional"], "unrecognized arguments: positional"),
    ],
)
def test_bad_usage_exits_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: metanode")
    assert err.splitlines()[-1].startswith("metanode: error: ")
    assert message in err


# -------------------------------------------------------------------- show-config


def test_show_config_prints_the_effective_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        'admin_api_token = "hunter2"\n[raft_config]\nid = 3\nraft_secret = "s3"\n'
        'join = ["localhost:1"]\n',
    )
    assert main(["-c", path, "--cmd", "show-config", "--join", "a:1", "--join", "b:2"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    out = json.loads(captured.out)
    assert out["raft_config"]["id"] == 3
    assert out["raft_config"]["join"] == ["a:1", "b:2"]
    assert out["admin_api_token"] == "***" and out["raft_config"]["raft_secret"] == "***"
    assert "hunter2" not in captured.out and "s3" not in captured.out
    assert out["grpc_api_address"] == "127.0.0.1:9191"


def test_show_config_does_not_need_an_id(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--cmd", "show-config"]) == 0
    assert json.loads(capsys.readouterr().out)["raft_config"]["id"] is None


def test_show_config_honours_the_env_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(CONFIG_FILE_ENV, write(tmp_path, "[raft_config]\nid = 12\n"))
    assert main(["--cmd", "show-config"]) == 0
    assert json.loads(capsys.readouterr().out)["raft_config"]["id"] == 12


def test_unknown_keys_warn_once_and_do_not_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "metric_api_address = 1\n[raft_config]\nid = 1\nsled = 2\n")
    assert main(["-c", path, "--cmd", "show-config"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"metanode: warning: config file {path}: unknown keys ignored: "
        "metric_api_address, raft_config.sled"
    ]


# --------------------------------------------------------------------- bad configs

BAD = [
    # (file text or None, extra argv, the key or flag named)
    ("[raft_config]\nid = 1\nraft_api_port = 70000\n", [], "raft_config.raft_api_port"),
    ('[raft_config]\nid = "1"\n', [], "raft_config.id"),
    ("[raft_config]\nid = 1\nheartbeat_interval = 0\n", [], "raft_config.heartbeat_interval"),
    ('[raft_config]\nid = 1\njoin = "a:1"\n', [], "raft_config.join"),
    # Only this node in `join`: skipped, so an empty data dir has nothing to join
    # (checked when running; --cmd show-config shows the list without it).
    ('[raft_config]\nid = 1\nraft_advertise_host = "localhost"\njoin = ["localhost:28004"]\n',
     [], "raft_config.join: lists only this node's own raft address"),
    ('admin_api_address = "localhost"\n[raft_config]\nid = 1\n', [], "admin_api_address"),
    ("[raft_config\nid = 1\n", [], "bad TOML"),
    (None, ["--raft-api-port", "-1", "--id", "1"], "--raft-api-port"),
    (None, ["--heartbeat-interval", "x", "--id", "1"], "--heartbeat-interval"),
    (None, ["--id", "-1"], "--id"),
    (None, [], "raft_config.id: missing"),
    (None, ["-c", "/no/such/metanode.toml"], "config file /no/such/metanode.toml: does not exist"),
]  # fmt: skip


BAD_CASES = [
    pytest.param(text, argv, named, cmd, id=f"{mode}-{i}")
    for mode, cmd in (("run", []), ("show-config", ["--cmd", "show-config"]))
    for i, (text, argv, named) in enumerate(BAD)
    # show-config needs no id, and does not look at the data dir
    if not (cmd and named.startswith(("raft_config.id: missing", "raft_config.join: lists only")))
]


@pytest.mark.parametrize(("text", "argv", "named", "cmd"), BAD_CASES)
def test_bad_config_exits_2_with_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    text: str | None,
    argv: list[str],
    named: str,
    cmd: list[str],
) -> None:
    file_args = ["-c", write(tmp_path, text)] if text is not None else []
    assert main([*file_args, *argv, *cmd]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert named in one_error_line(captured.err)


# ---------------------------------------------------------------------------- run


@pytest.fixture
def fake_node(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A stand-in metanode.node.run and metanode.node.leave that record their calls."""
    calls: dict[str, Any] = {"code": 0}

    def run_node(config: Config) -> int:
        calls["run"] = config
        calls["handlers"] = [
            type(h).__name__ for h in logging.getLogger("metanode").handlers
        ]
        logging.getLogger("metanode.node").warning("node %s running", config.raft_config.id)
        return int(calls["code"])

    def leave_cluster(node_id: int, addresses: list[str], config: Config) -> int:
        calls["leave"] = (node_id, addresses, config)
        return int(calls["code"])

    run_module = types.ModuleType("metanode.node.run")
    run_module.run_node = run_node  # type: ignore[attr-defined]
    leave_module = types.ModuleType("metanode.node.leave")
    leave_module.leave_cluster = leave_cluster  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "metanode.node.run", run_module)
    monkeypatch.setitem(sys.modules, "metanode.node.leave", leave_module)
    yield calls


def test_run_loads_the_config_sets_up_logging_and_runs_the_node(
    tmp_path: Path, fake_node: dict[str, Any]
) -> None:
    path = write(tmp_path, "[raft_config]\nid = 5\nsingle = true\n")
    logs = tmp_path / "logs"
    assert main(["-c", path, "--log-dir", str(logs), "--heartbeat-interval", "200"]) == 0
    config = fake_node["run"]
    assert config.raft_config.id == 5 and config.raft_config.single
    assert config.raft_config.heartbeat_interval == 200
    assert "RotatingFileHandler" in fake_node["handlers"]
    assert "node 5 running" in (logs / "metanode-5.log").read_text(encoding="utf-8")
    assert not any(
        getattr(h, "_metanode_installed", False) for h in logging.getLogger("metanode").handlers
    ), "handlers are closed when the node returns"


def test_run_returns_the_node_exit_code(tmp_path: Path, fake_node: dict[str, Any]) -> None:
    fake_node["code"] = 1
    assert main(["--id", "1", "--log-file-on=false"]) == 1


def test_run_with_an_unwritable_log_dir_exits_2(
    tmp_path: Path, fake_node: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    assert main(["--id", "1", "--log-dir", str(blocker / "logs")]) == 2
    assert "log.file.dir" in one_error_line(capsys.readouterr().err)
    assert "run" not in fake_node


@pytest.mark.parametrize("missing", ["metanode.node", "metanode.node.run"])
def test_run_without_the_node_package_says_so(
    missing: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delitem(sys.modules, "metanode.node.run", raising=False)
    monkeypatch.setitem(sys.modules, missing, None)
    assert main(["--id", "1", "--log-file-on=false"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "running a node is not available in this build" in line


# -------------------------------------------------------------------------- leave


@pytest.mark.parametrize(
    "argv",
    [
        ["--leave-id", "3", "--leave-via", "a:1", "b:2", "c:3"],
        ["--leave-via", "a:1", "--leave-id", "3", "--leave-via", "b:2", "c:3"],
        ["--leave-id=3", "--leave-via=a:1", "--leave-via", "b:2", "--leave-via", "c:3"],
    ],
)
def test_leave_calls_leave_cluster(
    argv: list[str], tmp_path: Path, fake_node: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0
    node_id, addresses, config = fake_node["leave"]
    assert (node_id, addresses) == (3, ["a:1", "b:2", "c:3"])
    assert isinstance(config, Config) and config.raft_config.id is None
    assert "run" not in fake_node
    assert list(tmp_path.iterdir()) == [], "leave mode opens no data dir and writes no logs"


def test_leave_passes_the_config_and_the_exit_code(
    tmp_path: Path, fake_node: dict[str, Any]
) -> None:
    fake_node["code"] = 1
    path = write(tmp_path, '[raft_config]\nid = 7\ncluster_name = "prod"\n')
    assert main(["-c", path, "--leave-id", "2", "--leave-via", "localhost:28004"]) == 1
    assert fake_node["leave"][2].raft_config.cluster_name == "prod"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--leave-id", "3"], "--leave-id needs --leave-via"),
        (["--leave-via", "a:1"], "--leave-via needs --leave-id"),
        (["--leave-id", "3", "--leave-via"], "argument --leave-via: expected at least one"),
        (["--leave-id", "3", "--leave-via", "a:1", "--cmd", "show-config"], "--cmd cannot"),
        (["--leave-id", "3", "--leave-via", "a:1", "--cmd", "ver"], "--cmd cannot"),
    ],
)
def test_leave_usage_errors_exit_2(
    argv: list[str], message: str, fake_node: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: metanode")
    assert message in err.splitlines()[-1]
    assert "leave" not in fake_node


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--leave-id", "x", "--leave-via", "a:1"], "--leave-id: expected a node id"),
        (["--leave-id", "x", "--leave-via", "a:1"], "--leave-id: expected a node id"),
        (["--leave-id", "-2", "--leave-via", "a:1"], "--leave-id: expected a node id"),
        (["--leave-id", "9223372036854775808", "--leave-via", "a:1"], "--leave-id: expected a node id"),
        (["--leave-id", "3", "--leave-via", "a:1", "nohost"], "--leave-via: expected 'host:port'"),
        (["--leave-id", "3", "--leave-via", "a:99999"], "--leave-via: port 99999"),
        (["--leave-id", "3", "--leave-via", "a:0"], "--leave-via: 'a:0': port 0"),
        (["--leave-id", "3", "--leave-via", "a:1", "--raft-api-port", "0"], "--raft-api-port"),
    ],
)
def test_leave_bad_values_exit_2(
    argv: list[str], message: str, fake_node: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert "leave" not in fake_node


def test_leave_without_the_node_package_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "metanode.node.leave", None)
    assert main(["--leave-id", "3", "--leave-via", "a:1"]) == 1
    assert "leaving a cluster is not available" in one_error_line(capsys.readouterr().err)


# --------------------------------------------------------------- real processes


def run_metanode(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "metanode", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )


def test_python_dash_m() -> None:
    proc = run_metanode("--cmd", "ver")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, VER, "")
    proc = run_metanode("--bogus")
    assert proc.returncode == 2
    assert "unrecognized arguments: --bogus" in proc.stderr


def test_python_dash_m_show_config_of_the_tutorial_node() -> None:
    proc = run_metanode("-c", str(ETC / "databend-meta-7.toml"), "--cmd", "show-config")
    assert (proc.returncode, proc.stderr) == (0, "")
    out = json.loads(proc.stdout)
    assert out["admin_api_address"] == "0.0.0.0:28701"
    assert out["raft_config"]["join"] == ["localhost:28004"]


def test_python_dash_m_bad_config(tmp_path: Path) -> None:
    path = write(tmp_path, "[raft_config]\nid = 1\nraft_api_port = 65536\n")
    proc = run_metanode("-c", path, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    line = one_error_line(proc.stderr)
    assert line.startswith("metanode: error: raft_config.raft_api_port: must be 1..65535")
    assert list(tmp_path.iterdir()) == [tmp_path / "metanode.toml"], "nothing was created"
