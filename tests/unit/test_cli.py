"""The `metanode` command line as it exists so far (SPEC §1: --cmd ver, exit codes)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from metanode import __version__
from metanode.cli import main


def test_help_lists_what_exists(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: metanode")
    assert "--version" in out and "--cmd {ver}" in out
    assert "Raft-replicated metadata service" in out
    assert "later issues" in out


@pytest.mark.parametrize("argv", [["--version"], ["--cmd", "ver"], ["--cmd=ver"]])
def test_version_is_printed(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    assert capsys.readouterr().out == f"metanode {__version__}\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--cmd", "show-config"], "invalid choice: 'show-config'"),
        (["--vers"], "unrecognized arguments: --vers"),  # no silent abbreviations
        ([], "nothing to do: running a node is not implemented yet"),
    ],
)
def test_bad_usage_exits_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: metanode")
    assert message in err


def test_python_dash_m() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "metanode", "--cmd", "ver"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"metanode {__version__}\n", "")
    proc = subprocess.run(
        [sys.executable, "-m", "metanode", "--bogus"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "unrecognized arguments: --bogus" in proc.stderr
