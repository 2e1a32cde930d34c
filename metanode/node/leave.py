"""`metanode --leave-id N --leave-via ADDR [ADDR ...]` (contract §1, the tutorial §2).

Opens no data dir and starts no server: sends `leave(N)` to the first address that
answers (a follower forwards it to the leader), which replies once the new membership
is committed and applied; prints one line and exits 0. Every address failing: exit 1
with every attempt's error on stderr. The raft port's TLS and secret come from the
config (`-c FILE`); a certificate problem is exit 2 naming the key.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import trio

from metanode.config import Config
from metanode.errors import ClientError, ConfigError, TransportError
from metanode.node import rpc
from metanode.tls import peer_security
from metanode.transport import Identity, call
from metanode.transport.security import PeerSecurity
from metanode.wire import DecodeError


def leave_cluster(node_id: int, addresses: Sequence[str], config: Config) -> int:
    try:
        security = peer_security(config)
    except ConfigError as e:
        print(f"metanode: error: {e}", file=sys.stderr)
        return 2
    return trio.run(_leave, node_id, list(addresses), config, security)


async def _leave(node_id: int, addresses: list[str], config: Config, security: PeerSecurity | None = None) -> int:
    if security is None:
        security = peer_security(config)
    rc = config.raft_config
    identity = Identity(0, rc.cluster_name, None, None)
    payload = rpc.encode(rpc.LeaveRequest(node_id))
    errors = []
    for address in addresses:
        try:
            body = await call(
                address, identity, rpc.LEAVE, payload, timeout=rc.wait_leader_timeout / 1000, security=security
            )
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
