"""`metanode -c FILE`: run one node in the foreground until SIGTERM/SIGINT
(docs/reference/cli.md#run-a-node).

Before anything is opened: the checks of `metanode.node.preflight` (TLS files, ports,
a join list of only this node), then a short banner on stdout (version, node id, the
raft, client and admin addresses, the data dir, where the log goes), as databend-meta
prints one. While running: every leader change is logged; under systemd
(``NOTIFY_SOCKET``) ``READY=1`` is sent once the node is ready (`metanode.node.ready`)
and ``STOPPING=1`` when a signal starts the shutdown.

SIGTERM or SIGINT stops the node gracefully: the servers stop accepting, in-flight
replies are answered, storage is flushed and closed, exit 0 (well under a second when
idle). A second signal cancels whatever is left at once. A signal while the node is
still joining or replaying stops it too.

Exit codes: 0 after a graceful stop or when this node was removed from the cluster
(also when it was removed before this start: it says so and how to rejoin); 1 when
joining failed or storage is damaged; 2 for a bad config, data dir or port.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from typing import Any

import trio

from metanode import __version__
from metanode.config import Config
from metanode.errors import ConfigError, FatalError
from metanode.logsetup import log_file_path
from metanode.node import sdnotify
from metanode.node.node import JoinFailed
from metanode.server import open_server
from metanode.node.preflight import check_before_start
from metanode.node.ready import readiness_of
from metanode.trio_util import single_errors

log = logging.getLogger("metanode.node")

#: How long one readiness confirmation (a ReadIndex round) may take before retrying.
READY_CONFIRM_TIMEOUT = 5.0


def run_node(config: Config) -> int:
    try:
        check_before_start(config)
    except ConfigError as e:
        print(f"metanode: error: {e}", file=sys.stderr)
        return 2
    print(banner(config), flush=True)
    try:
        return trio.run(_main, config)
    except ConfigError as e:
        print(f"metanode: error: {e}", file=sys.stderr)
        return 2
    except JoinFailed as e:
        print(f"metanode: error: {e}", file=sys.stderr)
        return 1
    except FatalError as e:
        log.critical("stopped: %s", e)
        print(f"metanode: fatal: {e}", file=sys.stderr)
        return 1


def banner(config: Config) -> str:
    """What `metanode -c FILE` prints on start, one fact a line."""
    rc = config.raft_config
    tls = config.admin_tls_server_cert is not None
    if rc.single:
        mode = "single: start a new cluster on an empty data dir"
    elif rc.join:
        mode = "join via " + ", ".join(rc.join)
    else:
        mode = "restart from the data dir"
    if os.path.exists(os.path.join(rc.raft_dir, "meta")):
        mode = "restart from the data dir (initialized: single and join are not used)"
    outputs = []
    if config.log.file.on:
        outputs.append(f"file {log_file_path(config)} ({config.log_file_level}, {config.log.file.format})")
    if config.log.stderr.on:
        outputs.append(f"stderr ({config.log_stderr_level}, {config.log.stderr.format})")
    lines = [
        f"metanode {__version__}",
        f"    node id:     {rc.id}, cluster name {rc.cluster_name!r}",
        f"    raft:        listen {rc.raft_listen_address}, advertise {rc.raft_advertise_address}{_raft_security(rc)}",
        f"    client API:  {'wss' if config.grpc_tls_server_cert else 'ws'}://{config.grpc_api_address}/v1,"
        f" advertise {config.grpc_api_advertise_address or 'none'}",
        f"    admin API:   {'https' if tls else 'http'}://{config.admin_api_address}",
        f"    data dir:    {rc.raft_dir}",
        f"    start:       {mode}",
        f"    log:         {'; '.join(outputs) if outputs else 'off'}",
    ]
    if rc.join_skipped:
        lines.append(f"    join skips:  {', '.join(rc.join_skipped)} (this node's own raft address)")
    return "\n".join(lines)


def _raft_security(rc: Any) -> str:
    """`, mutual TLS, raft secret (strict)` as set (docs/operations/security.md)."""
    parts = ["mutual TLS"] if rc.raft_tls_server_cert else []
    if rc.raft_secret or rc.raft_accepted_secrets:
        parts.append("raft secret" + (" (strict)" if rc.raft_secret_strict else ""))
    return "".join(f", {p}" for p in parts)


async def _main(config: Config) -> int:
    rc = config.raft_config
    if rc.join_skipped:
        log.info("join: skipping %s, this node's own raft address", ", ".join(rc.join_skipped))
    stop = trio.Event()
    running = False
    # Signals are watched from the start, so SIGTERM also stops a node that is still
    # joining or replaying (then by cancelling: there is nothing to answer yet).
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with single_errors(), trio.open_nursery() as nursery:

            async def on_signals() -> None:
                async for signum in signals:
                    if stop.is_set():
                        log.info("got %s again: stopping at once", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return
                    log.info("got %s: shutting down", signal.Signals(signum).name)
                    sdnotify.notify("STOPPING=1")
                    stop.set()
                    if not running:
                        nursery.cancel_scope.cancel()

            nursery.start_soon(on_signals)
            async with open_server(config) as node:
                running = True
                if node.removed.is_set():
                    sdnotify.notify("STOPPING=1")
                    _say_removed_earlier(node)
                    nursery.cancel_scope.cancel()
                    return 0
                log.info(
                    "%d is running: raft %s, admin %s", node.id, node.advertise_address, config.admin_api_address
                )
                async with trio.open_nursery() as tasks:
                    tasks.start_soon(_log_leader_changes, node)
                    tasks.start_soon(_announce_ready, node)
                    tasks.start_soon(_cancel_when, stop, tasks.cancel_scope)
                    tasks.start_soon(_cancel_when, node.removed, tasks.cancel_scope)
                if node.removed.is_set() and not stop.is_set():
                    sdnotify.notify("STOPPING=1")
                    await trio.sleep(0.5)  # let the reply to the leave request go out
                    log.info("%d removed from the cluster: exit", node.id)
                    print(
                        f"metanode: node {node.id} was removed from the cluster"
                        f" (membership {node.applied_membership}): exiting",
                        file=sys.stderr,
                        flush=True,
                    )
                # Leaving the block normally is the graceful stop: the servers stop
                # accepting and answer what is in flight, then everything is cancelled.
            nursery.cancel_scope.cancel()
    return 0


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _say_removed_earlier(node: Any) -> None:
    rc = node.config.raft_config
    log.warning("%d was removed from the cluster earlier: not starting", node.id)
    print(
        f"metanode: node {node.id} was removed from the cluster (membership"
        f" {node.applied_membership}) and does not rejoin on its own: to rejoin, start it"
        f" with an empty raft_dir (move {rc.raft_dir} away) and join = [\"HOST:PORT\", ...]"
        " naming the raft address of a member; exiting",
        file=sys.stderr,
        flush=True,
    )


async def _log_leader_changes(node: Any) -> None:
    """Log every leader this node learns of (and losing it)."""
    seen: tuple[int, int | None] = (node.core.term, None)
    while True:
        term, leader = now = (node.core.term, node.core.leader)
        if leader != seen[1] or (leader is not None and term != seen[0]):
            if leader is None:
                log.info("%d knows no leader (term %d)", node.id, term)
            elif leader == node.id:
                log.info("%d is the leader (term %d)", node.id, term)
            else:
                log.info("%d: the leader is %d at %s (term %d)", node.id, leader, node.address_of(leader), term)
        seen = now
        await node.wait_for(lambda seen=seen: (node.core.term, node.core.leader) != seen, math.inf, "a leader change")


async def _announce_ready(node: Any) -> None:
    """Tell systemd READY=1 once the node is ready (metanode.node.ready), once."""
    readiness = readiness_of(node)
    while not await readiness.confirm(READY_CONFIRM_TIMEOUT):
        await node.wait_for(lambda: node.core.leader is not None, math.inf, "a leader")
        await trio.sleep(node.tick_s)
    leader = node.core.leader
    log.info("%d is ready: leader %s, applied %s", node.id, leader, node.applied)
    sdnotify.notify(f"READY=1\nSTATUS=ready: leader {leader}, applied {node.applied}")
