"""The `metanode` command line (SPEC §1).

For now it only tells its version: running a node (``-c FILE.toml``), joining and
leaving (``--join``, ``--leave-id``) and the operator subcommands (``status``,
``kv``, ``export``, ...) land with later issues, and are not offered until they work.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from metanode import __version__

DESCRIPTION = """\
metanode is a Raft-replicated metadata service, a work-alike of Databend's
databend-meta. This build only reports its version: running a node
(-c FILE.toml), joining and leaving a cluster (--join, --leave-id) and the
operator subcommands (status, kv, export, import, ...) land with later issues.
"""


def version_line() -> str:
    return f"metanode {__version__}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metanode",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=version_line())
    parser.add_argument(
        "--cmd",
        choices=["ver"],
        help="run a one-shot command instead of a node: 'ver' prints the version",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    if args.cmd == "ver":
        print(version_line())
        return 0
    parser.print_usage(sys.stderr)
    print(
        "metanode: error: nothing to do: running a node is not implemented yet (try --help)",
        file=sys.stderr,
    )
    return 2
