"""`metanode --leave-id N --leave-via ADDR [ADDR ...]` (contract §1, the tutorial §2).

Opens no data dir and starts no server: sends `leave(N)` to the first address that
answers (a follower forwards it to the leader), which replies once the new membership
is committed and applied; prints one line and exits 0. Every address failing: exit 1
with every attempt's error on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import trio

from metanode.config import Config
from metanode.errors import ClientError, TransportError
from metanode.node import rpc
from metanode.transport import Identity, call
from metanode.wire import DecodeError


def leave_cluster(node_id: int, addresses: Sequence[str], config: Config) -> int:
    return trio.run(_leave, node_id, list(addresses), config)


async def _leave(node_id: int, addresses: list[str], config: Config) -> int:
    rc = config.raft_config
    identity = Identity(0, rc.cluster_name, None, None)
    payload = rpc.encode(rpc.LeaveRequest(node_id))
    errors = []
    for address in addresses:
        try:
            body = await call(address, identity, rpc.LEAVE, payload, timeout=rc.wait_leader_timeout / 1000)
            reply = rpc.decode(body, rpc.LeaveReply)
        except (ClientError, TransportError, DecodeError) as e:
            errors.append(f"{address}: {e}")
            continue
        if reply.was_member:
            print(f"node {node_id} left the cluster: {reply.message}")
        else:
            print(f"node {node_id} was not a member of the cluster: nothing to do")
        return 0
    print(f"metanode: error: could not remove node {node_id}:", file=sys.stderr)
    for line in errors:
        print(f"  {line}", file=sys.stderr)
    return 1
