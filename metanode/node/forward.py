"""Requests that must run on the leader (docs/architecture/node.md): run locally when
this node leads, else forwarded over the raft port, following NotLeader hints until
`wait_leader_timeout`; the raft port's call handlers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from metanode.errors import BadRequest, ClientError, NotLeader, Timeout, TransportError, Unavailable
from metanode.node import rpc
from metanode.sm import ApplyError, Change, Command, TxnReply
from metanode.sm.codec import DecodeError
from metanode.transport import ConnectFailed, error_from_info

log = logging.getLogger("metanode.node")


def _write_reply(outcome: Any) -> rpc.WriteReply:
    if isinstance(outcome, ApplyError):
        return rpc.WriteReply(False, outcome.message, code=BadRequest.code)
    if isinstance(outcome, ClientError):
        return rpc.WriteReply(False, str(outcome), code=outcome.code)
    if isinstance(outcome, BaseException):
        return rpc.WriteReply(False, f"internal error: {type(outcome).__name__}", code="internal")
    return rpc.WriteReply(
        True,
        change=outcome if isinstance(outcome, Change) else None,
        txn=outcome if isinstance(outcome, TxnReply) else None,
    )

_RETRY = object()


def _settled(outcome: Any) -> Any:
    """A local proposal's outcome as a client write's outcome, or _RETRY when it was
    certainly not applied (not proposed, or overwritten by another term)."""
    if isinstance(outcome, (NotLeader, Unavailable)):
        return _RETRY
    if isinstance(outcome, ApplyError):
        return BadRequest(outcome.message)
    return outcome


def _settle_early(on_settled: Callable[[list[Any]], None] | None) -> Callable[[list[Any]], None] | None:
    """The `on_done` of a local proposal of a whole client batch: `on_settled` with
    the outcomes when none is to be tried again."""
    if on_settled is None:
        return None

    def settled(got: list[Any]) -> None:
        final = [_settled(o) for o in got]
        if not any(o is _RETRY for o in final):
            on_settled(final)

    return settled


@attrs.frozen
class BegunWrites:
    """Client writes proposed by `begin_client_writes`, for `client_write_batch`."""

    batch: Any  # raft_loop._Batch
    deadline: float


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
            rpc.WRITE_BATCH: (rpc.WriteBatchRequest, self._write_batch_local),
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

    async def _write_batch_local(self, req: rpc.WriteBatchRequest) -> bytes:
        """A follower's forwarded batch, proposed here as one batch; each reply says
        its outcome (a `code` for errors: not_leader and unavailable were not applied)."""
        outcomes = await self.propose_many(list(req.cmds))
        return rpc.encode(rpc.WriteBatchReply(tuple(_write_reply(o) for o in outcomes)))

    async def _read_local(self, req: rpc.ReadRequest) -> bytes:
        await self._expire_due()  # a read after a key's expiry must not see it
        return rpc.encode(rpc.ReadReply(await self.read_barrier()))

    # ------------------------------------------------------------------ client requests
    async def client_write(self, cmd: Command) -> Any:
        """A client's write: proposed here when leading, else forwarded to the leader.
        Returns the apply result; a command the state machine refuses is BadRequest."""
        [outcome] = await self.client_write_batch([cmd])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def begin_client_writes(
        self, cmds: list[Command], on_settled: Callable[[list[Any]], None] | None = None
    ) -> BegunWrites | None:
        """When this node leads: propose `cmds` as one batch now (in this task) and
        return them begun; `client_write_batch(cmds, on_settled, begun)` must follow,
        in this task or one started at once, to wait for them (and retry, as it
        does). None, having done nothing, when this node does not lead."""
        if not self.core.is_leader:
            return None
        batch = await self.submit_proposals(cmds, _settle_early(on_settled))
        return BegunWrites(batch, trio.current_time() + self.wait_s())  # (as long as a proposal from the serving task)

    def abandon_client_writes(self, begun: BegunWrites) -> None:
        """Begun writes nobody will wait for (their socket's session ended): forget
        them; they are applied or not, and nobody is told."""
        self._forget(begun.batch)

    async def client_write_batch(
        self, cmds: list[Command], on_settled: Callable[[list[Any]], None] | None = None,
        begun: BegunWrites | None = None,
    ) -> list[Any]:
        """Clients' writes as one batch: proposed here as one log append when leading,
        else forwarded to the leader as one call. Each outcome is the apply result or
        a ClientError (BadRequest for a command the state machine refuses; Timeout
        when the outcome is unknown). Writes that were certainly not applied (not
        proposed, or overwritten by another term) are tried again until
        `wait_leader_timeout`.

        `on_settled(outcomes)`: when a proposal here of all of them settles them all,
        it is called with the outcomes this will return, from the task that
        applied the last of them, before this one wakes (so the replies can leave a
        pass of the event loop earlier); not called otherwise. It must not raise.
        `begun`: these writes as `begin_client_writes` proposed them (their first try)."""
        outcomes: list[Any] = [None] * len(cmds)
        pending = list(range(len(cmds)))
        deadline = begun.deadline if begun is not None else trio.current_time() + self.wait_s()
        last: Exception | None = None
        with self.calls:
            # (a begun batch is waited for once even past the deadline: it is proposed)
            while pending and (begun is not None or trio.current_time() < deadline):
                retry: list[int] = []
                if begun is not None or self.core.is_leader:
                    left = max(0.1, deadline - trio.current_time())
                    if begun is not None:
                        got = await self.wait_many(begun.batch, left, "write")
                        begun = None
                    else:
                        early = _settle_early(on_settled) if len(pending) == len(cmds) else None
                        got = await self.propose_many([cmds[i] for i in pending], left, early)
                    for i, outcome in zip(pending, got):
                        final = _settled(outcome)
                        if final is _RETRY:
                            retry.append(i)
                            last = outcome
                        else:
                            outcomes[i] = final
                else:
                    address = self.leader_address()
                    if address is None:
                        retry = pending
                    else:
                        payload = rpc.encode(rpc.WriteBatchRequest(tuple(cmds[i] for i in pending)))
                        try:
                            body = await self.calls_to_leader.call(
                                address, rpc.WRITE_BATCH, payload, timeout=max(0.1, deadline - trio.current_time())
                            )
                        except (NotLeader, Unavailable, ConnectFailed) as e:
                            retry, last = pending, e  # not applied there: safe to try again
                        except TransportError as e:  # it may have been applied: never resend
                            for i in pending:
                                outcomes[i] = Timeout(f"write forwarded to {address}: outcome unknown ({e})")
                        except BadRequest as e:
                            if "unknown method" not in str(e):
                                raise
                            # A leader of an older version (a rolling upgrade): one
                            # write call per command.
                            got = await self._forward_one_by_one(address, [cmds[i] for i in pending], deadline)
                            for i, outcome in zip(pending, got):
                                if isinstance(outcome, (NotLeader, Unavailable, ConnectFailed)):
                                    retry.append(i)
                                    last = outcome
                                else:
                                    outcomes[i] = outcome
                        else:
                            replies = rpc.decode(body, rpc.WriteBatchReply).replies
                            if len(replies) != len(pending):  # a broken answer: outcomes unknown
                                for i in pending:
                                    outcomes[i] = Timeout(
                                        f"write forwarded to {address}: {len(replies)} answers to"
                                        f" {len(pending)} writes; the outcome is unknown"
                                    )
                                replies = ()
                            for i, reply in zip(pending, replies):
                                if reply.ok:
                                    outcomes[i] = reply.txn if reply.txn is not None else reply.change
                                elif reply.code in (NotLeader.code, Unavailable.code):
                                    retry.append(i)
                                    last = error_from_info(reply.code, reply.message)
                                else:
                                    outcomes[i] = error_from_info(reply.code or BadRequest.code, reply.message)
                pending = retry
                if pending:
                    await trio.sleep(self.tick_s * 2)
        for i in pending:
            outcomes[i] = Unavailable(f"no leader answered the write within {self.wait_s():.0f} s: {last}")
        return outcomes

    async def _forward_one_by_one(self, address: str, cmds: list[Command], deadline: float) -> list[Any]:
        out: list[Any] = []
        for cmd in cmds:
            try:
                body = await self.calls_to_leader.call(
                    address, rpc.WRITE, rpc.encode(rpc.WriteRequest(cmd)),
                    timeout=max(0.1, deadline - trio.current_time()),
                )
            except (NotLeader, Unavailable, ConnectFailed, BadRequest) as e:
                out.append(e)
                continue
            except TransportError as e:
                out.append(Timeout(f"write forwarded to {address}: outcome unknown ({e})"))
                continue
            reply = rpc.decode(body, rpc.WriteReply)
            out.append((reply.txn if reply.txn is not None else reply.change) if reply.ok else BadRequest(reply.message))
        return out

    async def client_read_barrier(self) -> None:
        """Make a following local read linearizable (§6.4): get a read index from the
        leader (ourselves, or over the raft port) and wait until we applied it."""
        request = rpc.ReadRequest()
        with self.calls:
            body = await self.call_leader(rpc.READ, rpc.encode(request), lambda: self._read_local(request))
        index = rpc.decode(body, rpc.ReadReply).index
        await self.wait_for(lambda: self.applied.index >= index, self.wait_s(), "catching up for a read")

    def client_addresses(self) -> list[str]:
        """The client API addresses the members publish (contract §5 `member_list`)."""
        members = self.applied_membership.node_ids
        return [
            r.grpc_api_advertise_address
            for i, r in self.sm.nodes()
            if i in members and r.grpc_api_advertise_address
        ]
