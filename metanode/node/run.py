"""`metanode -c FILE`: run one node in the foreground until SIGTERM/SIGINT (SPEC §1).

Exit codes: 0 after a graceful stop or when this node was removed from the cluster;
1 when joining failed or storage is damaged; 2 for a bad config or data dir.
"""

from __future__ import annotations

import logging
import signal
import sys

import trio

from metanode.config import Config
from metanode.errors import ConfigError, FatalError
from metanode.node.node import JoinFailed, open_node
from metanode.trio_util import single_errors

log = logging.getLogger("metanode.node")


def run_node(config: Config) -> int:
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


async def _main(config: Config) -> int:
    # Signals are watched from the start, so SIGTERM also stops a node that is still
    # joining or replaying (a graceful stop: exit 0).
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with single_errors(), trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for signum in signals:
                    log.info("got %s: shutting down", signal.Signals(signum).name)
                    break
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)
            async with open_node(config) as node:
                log.info("%d is running: raft %s, admin %s", node.id, node.advertise_address, config.admin_api_address)
                await node.removed.wait()
                await trio.sleep(0.5)  # let the reply to the leave request go out
                log.info("%d removed from the cluster: exit", node.id)
            nursery.cancel_scope.cancel()
    return 0
