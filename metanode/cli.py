"""The `metanode` command line (contract §1).

Three modes, chosen by the flags:

- run a node (the default): load the config (``-c FILE``, ``$METASRV_CONFIG_FILE``,
  flags), set up logging, then ``metanode.node.run.run_node(config)`` until it exits;
- ``--cmd ver`` / ``--cmd show-config``: print the version / the effective config as
  JSON with secrets redacted (the config is loaded as for running, but ``id`` may be
  missing);
- leave: ``--leave-id N --leave-via ADDR [ADDR ...]`` calls
  ``metanode.node.leave.leave_cluster(N, addresses, config)``; it opens no data dir and
  starts no server.

Exit codes: 0 ok, 1 the operation failed, 2 bad usage or bad config (one line naming
the flag or key). The node package is imported only when it is needed: a build without
it says so and exits 1 rather than pretending. The operator subcommands (``kv``,
``status``, ``transfer-leader``, ``trigger-snapshot``, ``export``, ``import``,
``bench``) are in `metanode.ops` (``bench`` in `metanode.bench`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from metanode import __version__
from metanode.config import (
    CONFIG_FILE_ENV,
    MAX_ID,
    Config,
    add_config_arguments,
    config_from_args,
    parse_address,
)
from metanode.errors import ConfigError
from metanode.ops import SUBCOMMANDS

DESCRIPTION = f"""\
metanode is a Raft-replicated metadata service, a work-alike of Databend's
databend-meta. It runs one node in the foreground until SIGTERM or SIGINT.

The configuration comes from a TOML file (-c FILE, or ${CONFIG_FILE_ENV}) with
databend-meta's key names; every key also has a flag, and flags override the file.
List flags take several values (--join A B) and may be repeated (--join A --join B).
Boolean flags may be bare (--single) or take a value (--single=false).

Exit codes: 0 ok, 1 the operation failed, 2 bad usage or bad config.
Operator subcommands: metanode kv get|put|delete|list ..., metanode status,
metanode transfer-leader, metanode trigger-snapshot (see metanode kv --help),
metanode export and metanode import (offline, on a stopped node's data dir),
metanode bench (throughput, latency and CPU per op; metanode bench --help).
"""

USAGE = """metanode [-c FILE] [--KEY VALUE ...]
       metanode --cmd {ver,show-config} [-c FILE] [--KEY VALUE ...]
       metanode --leave-id N --leave-via ADDR [ADDR ...] [-c FILE]
       metanode {kv,status,transfer-leader,trigger-snapshot,export,import,bench} ..."""

CMDS = ("ver", "show-config")


#: The oldest metanode client (`metanode.client`) this build's client API serves.
MIN_COMPATIBLE_CLIENT_VERSION = "0.1.0"


def version_line() -> str:
    return f"metanode {__version__}"


def ver_lines() -> str:
    """`--cmd ver`, as databend-meta prints it: the version, the oldest compatible
    client, and the on-disk data version (as /v1/cluster/status names it)."""
    from metanode.storage.wal import FORMAT_VERSION

    return (
        f"version: {__version__}\n"
        f"min-compatible-client-version: {MIN_COMPATIBLE_CLIENT_VERSION}\n"
        f"data-version: V{FORMAT_VERSION:03d}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metanode",
        usage=USAGE,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=version_line())
    commands = parser.add_argument_group("commands (without one, metanode runs a node)")
    commands.add_argument(
        "--cmd",
        choices=CMDS,
        help="one-shot command instead of a node: 'ver' prints the version (and the "
        "oldest compatible client and the data version, as databend-meta does), "
        "'show-config' prints the effective config as JSON, secrets redacted "
        "(default: none, run a node)",
    )
    commands.add_argument(
        "--leave-id",
        metavar="N",
        help="remove node N from its cluster, then exit; needs --leave-via (default: none)",
    )
    commands.add_argument(
        "--leave-via",
        metavar="ADDR",
        nargs="+",
        action="extend",
        help="raft addresses (host:port) of members to send the leave request to, "
        "tried in order (default: none)",
    )
    add_config_arguments(parser)
    return parser


def _error(message: str) -> None:
    print(f"metanode: error: {message}", file=sys.stderr)


def _warning(message: str) -> None:
    print(f"metanode: warning: {message}", file=sys.stderr)


def _output(text: str) -> int:
    """Print ``text`` to stdout; a closed pipe (``| head``) is not a traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at devnull so that is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    return 0


def _usage_error(parser: argparse.ArgumentParser, message: str) -> int:
    parser.print_usage(sys.stderr)
    _error(message)
    return 2


def _node_function(module: str, name: str) -> Callable[..., Any] | None:
    """``module.name``, or None when the node package is not in this build."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name in ("metanode.node", module):
            return None
        raise
    function: Callable[..., Any] = getattr(mod, name)
    return function


def _parse_leave(leave_id: str, leave_via: Sequence[str]) -> tuple[int, list[str]]:
    text = leave_id.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_ID:
        raise ConfigError(f"--leave-id: expected a node id (an integer in 0..2^63-1), got {leave_id!r}")
    for address in leave_via:
        try:
            _, port = parse_address(address)
        except ValueError as exc:
            raise ConfigError(f"--leave-via: {exc}") from None
        if port == 0:
            raise ConfigError(f"--leave-via: {address!r}: port 0 cannot be reached (1..65535)")
    return int(text), list(leave_via)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failed, 2 bad usage/config)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        from metanode.ops import main as ops_main

        return ops_main(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2

    if args.cmd == "ver":
        if args.leave_id is not None or args.leave_via is not None:
            return _usage_error(parser, "--cmd cannot be combined with --leave-id/--leave-via")
        return _output(ver_lines())

    leaving = args.leave_id is not None or args.leave_via is not None
    if leaving:
        if args.cmd is not None:
            return _usage_error(parser, "--cmd cannot be combined with --leave-id/--leave-via")
        if args.leave_id is None:
            return _usage_error(parser, "--leave-via needs --leave-id N (the node to remove)")
        if args.leave_via is None:
            return _usage_error(parser, "--leave-id needs --leave-via ADDR [ADDR ...]")

    node_id, addresses = 0, []
    try:
        if leaving:
            node_id, addresses = _parse_leave(args.leave_id, args.leave_via)
        config = config_from_args(
            args, os.environ, require_id=not leaving and args.cmd is None, on_warning=_warning
        )
    except ConfigError as exc:
        _error(str(exc))
        return 2

    if args.cmd == "show-config":
        return _output(json.dumps(config.redacted(), indent=2))
    if leaving:
        return _leave(node_id, addresses, config)
    return _run(config)


def _leave(node_id: int, addresses: list[str], config: Config) -> int:
    leave_cluster = _node_function("metanode.node.leave", "leave_cluster")
    if leave_cluster is None:
        _error("leaving a cluster is not available in this build (no metanode.node.leave)")
        return 1
    code: int = leave_cluster(node_id, addresses, config)
    return code


def _run(config: Config) -> int:
    run_node = _node_function("metanode.node.run", "run_node")
    if run_node is None:
        _error("running a node is not available in this build (no metanode.node.run)")
        return 1
    from metanode.logsetup import configure_logging, shutdown_logging

    try:
        configure_logging(config)
    except ConfigError as exc:
        _error(str(exc))
        return 2
    try:
        code: int = run_node(config)
    finally:
        shutdown_logging()
    return code
