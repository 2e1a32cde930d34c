"""Requests that must run on the leader (docs/architecture/node.md): run locally when
this node leads, else forwarded over the raft port, following NotLeader hints until
`wait_leader_timeout`; the raft port's call handlers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from metanode.errors import BadRequest, NotLeader, Timeout, TransportError, Unavailable
from metanode.node import rpc
from metanode.sm import ApplyError, Change, Command, TxnReply
from metanode.sm.codec import DecodeError
from metanode.transport import ConnectFailed

log = logging.getLogger("metanode.node")

if TYPE_CHECKING:
    from metanode.node.node import Node  # noqa: F401



class Forwarding:
    """A part of `Node` (metanode/node/node.py), by concern."""

    def leader_address(self) -> str | None:
        leader = self.core.leader
        if leader is None:
            return None
        return self.advertise_address if leader == self.id else self.address_of(leader)

    async def call_leader(self, method: str, payload: bytes, local: Callable[[], Any]) -> bytes:
        """Run a request on the leader: `local()` if we lead, else forward `payload`;
        follow NotLeader hints and wait for an election, up to `wait_leader_timeout`."""
        deadline = trio.current_time() + self.wait_s()
        last: Exception | None = None
        while trio.current_time() < deadline:
            if self.core.is_leader:
                try:
                    return await local()
                except (NotLeader, Unavailable) as e:
                    last = e  # not proposed (e.g. a leadership transfer) or overwritten
            else:
                address = self.leader_address()
                if address is not None:
                    try:
                        return await self.calls_to_leader.call(
                            address, method, payload, timeout=max(0.1, deadline - trio.current_time())
                        )
                    except (NotLeader, Unavailable, ConnectFailed) as e:
                        last = e  # not applied there: safe to try again
                    except TransportError as e:
                        if method == rpc.WRITE:  # it may have been applied: never resend
                            raise Timeout(f"write forwarded to {address}: outcome unknown ({e})") from None
                        last = e
            await trio.sleep(self.tick_s * 2)
        raise Unavailable(f"no leader answered {method} within {self.wait_s():.0f} s: {last}")

    # ------------------------------------------------------------------ join / leave (leader side)
    async def on_call(self, method: str, payload: bytes, hello: Any) -> bytes:
        handlers: dict[str, tuple[type, Callable[[Any], Any] | None]] = {
            rpc.JOIN: (rpc.JoinRequest, self._join_local),
            rpc.LEAVE: (rpc.LeaveRequest, self._leave_local),
            rpc.WRITE: (rpc.WriteRequest, self._write_local),
            rpc.READ: (rpc.ReadRequest, self._read_local),
            rpc.MEMBERS: (rpc.MembersRequest, None),
        }
        if method not in handlers:
            raise BadRequest(f"unknown method {method!r}")
        cls, handler = handlers[method]
        try:
            req = rpc.decode(payload, cls)
        except DecodeError as e:
            raise BadRequest(f"bad {method} request: {e}") from None
        if isinstance(req, rpc.MembersRequest):
            return rpc.encode(rpc.MembersReply(tuple(sorted(self.driver.member_ids()))))
        if isinstance(req, rpc.JoinRequest):
            self.driver.refuse_join(req.node_id, req.record, fresh=req.cluster_id is None, promote=req.promote)
        assert handler is not None
        with self.calls:
            return await self.call_leader(method, payload, lambda: handler(req))

    async def _write_local(self, req: rpc.WriteRequest) -> bytes:
        result = await self.propose(req.cmd)
        if isinstance(result, ApplyError):
            return rpc.encode(rpc.WriteReply(False, result.message))
        return rpc.encode(
            rpc.WriteReply(
                True,
                change=result if isinstance(result, Change) else None,
                txn=result if isinstance(result, TxnReply) else None,
            )
        )

    async def _read_local(self, req: rpc.ReadRequest) -> bytes:
        await self._expire_due()  # a read after a key's expiry must not see it
        return rpc.encode(rpc.ReadReply(await self.read_barrier()))

    # ------------------------------------------------------------------ client requests
    async def client_write(self, cmd: Command) -> Any:
        """A client's write: proposed here when leading, else forwarded to the leader.
        Returns the apply result; a command the state machine refuses is BadRequest."""
        request = rpc.WriteRequest(cmd)
        with self.calls:
            body = await self.call_leader(rpc.WRITE, rpc.encode(request), lambda: self._write_local(request))
        reply = rpc.decode(body, rpc.WriteReply)
        if not reply.ok:
            raise BadRequest(reply.message)
        return reply.txn if reply.txn is not None else reply.change

    async def client_read_barrier(self) -> None:
        """Make a following local read linearizable (§6.4): get a read index from the
        leader (ourselves, or over the raft port) and wait until we applied it."""
        request = rpc.ReadRequest()
        with self.calls:
            body = await self.call_leader(rpc.READ, rpc.encode(request), lambda: self._read_local(request))
        index = rpc.decode(body, rpc.ReadReply).index
        await self.wait_for(lambda: self.applied.index >= index, self.wait_s(), "catching up for a read")

    def client_addresses(self) -> list[str]:
        """The client API addresses the members publish (SPEC §5 `member_list`)."""
        members = self.applied_membership.node_ids
        return [
            r.grpc_api_advertise_address
            for i, r in self.sm.nodes()
            if i in members and r.grpc_api_advertise_address
        ]
