"""Join, leave and membership changes, both sides (docs/operations/cluster.md): the
`NodeDriver` decides (`plan_join`, `plan_leave`, `change_possible`); this waits for
each step. Also: asking a member about senders our log does not know, publishing this
node's record, leadership transfer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from metanode.errors import BadRequest, ClientError, NotLeader, TransportError, Unavailable
from metanode.node import rpc
from metanode.node.events import (
    PeerConnected,
    ChangeMembership,
    TransferLeader,
    Trust,
)
from metanode.raft import Membership
from metanode.sm import ApplyError, RemoveNode, SetNode
from metanode.sm.codec import DecodeError
from metanode.transport import call

log = logging.getLogger("metanode.node")

JOIN_TRIES = 3
JOIN_RETRY_S = 1.0

if TYPE_CHECKING:
    from metanode.node.node import Node  # noqa: F401



class JoinFailed(Exception):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("could not join the cluster: " + "; ".join(errors) if errors else "no join address")
        self.errors = errors


class MembershipOps:
    """A part of `Node` (metanode/node/node.py), by concern."""

    async def _change_membership(
        self, update: Callable[[set[int], set[int]], tuple[set[int], set[int]]]
    ) -> None:
        """On this leader, wait until no change is in flight, apply `update(voters,
        learners)` to the current membership, propose it, and wait until it is
        committed and applied here (C_new, not joint). Callers hold the membership
        lock, so the update always starts from the latest membership."""
        if not self._membership_lock.locked():
            raise RuntimeError("_change_membership needs the membership lock")
        while True:
            await self.wait_for(
                lambda: not self.core.is_leader or self.driver.change_possible(), self.wait_s(), "membership change"
            )
            if not self.core.is_leader:
                raise NotLeader("lost leadership", leader=self.core.leader)
            m = self.core.membership
            voters, learners = update(set(m.final_voters), set(m.learners))
            target = Membership.of(voters, learners)
            try:
                await self.request(
                    lambda req_id: ChangeMembership(req_id, frozenset(voters), frozenset(learners)),
                    what="membership change",
                )
                break
            except Unavailable:
                continue  # a change of the previous leader is still finishing
        def done_or_lost() -> bool:
            # Done when applied here; lost when we no longer lead and the log no longer
            # heads to the target (a removed leader steps down once C_new commits: it
            # then waits for its own apply).
            m = self.core.membership
            heading = m.final_voters == target.final_voters and m.learners == target.learners
            return self.applied_membership == target or (not self.core.is_leader and not heading)

        await self.wait_for(done_or_lost, self.wait_s(), "membership change")
        if self.applied_membership != target:
            raise NotLeader("lost leadership during the membership change", leader=self.core.leader)

    async def _join_local(self, req: rpc.JoinRequest) -> bytes:
        """The leader's side of a join (docs/operations/cluster.md, "Joining"): the
        driver decides (a wiped voter is refused); this waits for each step."""
        nid = req.node_id
        assert self.meta is not None
        if req.cluster_id is not None and req.cluster_id != self.meta.cluster_id:
            raise BadRequest(f"node {nid} belongs to cluster {req.cluster_id}, not {self.meta.cluster_id}")
        plan = self.driver.plan_join(
            nid, req.record, fresh=req.cluster_id is None, learner=req.learner, promote=req.promote
        )
        log.info("%d handles join of node %d at %s: %s", self.id, nid, req.record.endpoint, plan)
        if req.cluster_id is None and nid in self.core.membership.node_ids:
            # An empty disk under a learner's id (a retry of our own first step, or a
            # wiped learner): count nothing it acknowledged before.
            await self.request(lambda req_id: PeerConnected(nid, req_id), what="join")
        if plan.set_record:
            await self._expect_applied(await self.propose(SetNode(nid, req.record)))
        async with self._membership_lock:  # one join or leave at a time
            if nid not in self.core.membership.node_ids:
                await self._change_membership(lambda v, learners: (v, learners | {nid}))
            if plan.promote and not self.core.membership.is_voter(nid):
                # Catch the learner up (log or snapshot) before it counts for a quorum.
                await self.wait_for(
                    lambda: not self.core.is_leader or self.driver.caught_up(nid),
                    self.wait_s(), f"catching up node {nid}",
                )
                await self._change_membership(lambda v, learners: (v | {nid}, learners - {nid}))
        members = tuple(
            rpc.NodeAddress(i, f"{r.endpoint.addr}:{r.endpoint.port}") for i, r in self.sm.nodes()
        )
        log.info("%d added node %d (membership %s)", self.id, nid, self.core.membership)
        return rpc.encode(rpc.JoinReply(
            self.meta.cluster_id, members, tuple(sorted(self.driver.member_ids())), self.core.membership_index
        ))

    async def _expect_applied(self, result: Any) -> None:
        if isinstance(result, ApplyError):
            raise BadRequest(result.message)

    async def _leave_local(self, req: rpc.LeaveRequest) -> bytes:
        nid = req.node_id
        async with self._membership_lock:
            nothing = self.driver.plan_leave(nid)
            if nothing is not None:
                return rpc.encode(rpc.LeaveReply(False, nothing))
            log.info("%d handles leave of node %d", self.id, nid)
            # Removing the leader works too: the core keeps leading without counting
            # itself, and hands leadership to an up-to-date voter once C_new commits.
            await self._change_membership(lambda v, learners: (v - {nid}, learners - {nid}))
            if self.core.is_leader and self.sm.node(nid) is not None:
                try:
                    await self.propose(RemoveNode(nid), timeout=5)
                except ClientError as e:
                    log.warning("%d could not remove the record of node %d: %s", self.id, nid, e)
        return rpc.encode(rpc.LeaveReply(True, f"node {nid} removed; membership is now {self.applied_membership}"))

    # ------------------------------------------------------------------ join (joiner side)
    async def join(self) -> None:
        """Join the cluster (docs/operations/cluster.md, "Joining"): skip when the
        committed membership already has us; otherwise ask each `join` address in
        order, 3 tries each 1 s apart. A node with an empty data dir first joins as
        a learner: the reply brings the cluster id (the only way a node adopts one)
        and the members it may accept raft messages from; then it asks again to be
        promoted, which the leader answers once it caught up."""
        rc = self.config.raft_config
        if self.driver.is_member(self.core.committed_membership):
            log.info("%d is already a member: join skipped", self.id)
            return
        errors: list[str] = []
        for address in rc.join:
            for attempt in range(JOIN_TRIES):
                try:
                    for promote in self.driver.join_steps(self.meta is not None):
                        await self._join_call(address, promote=promote)
                except (ClientError, TransportError, DecodeError) as e:
                    errors.append(f"{address} (try {attempt + 1}): {e}")
                    log.warning("%d join via %s failed: %s", self.id, address, e)
                    if isinstance(e, BadRequest):
                        raise JoinFailed(errors) from None  # refused: trying again changes nothing
                    await trio.sleep(JOIN_RETRY_S)
                    continue
                log.info("%d joined the cluster via %s", self.id, address)
                return
        raise JoinFailed(errors)

    async def _join_call(self, address: str, *, promote: bool) -> None:
        rc = self.config.raft_config
        cluster_id = self.meta.cluster_id if self.meta is not None else None
        payload = rpc.encode(rpc.JoinRequest(self.id, self.record, rc.learner, cluster_id, promote))
        reply = rpc.decode(
            await call(address, self.identity(), rpc.JOIN, payload, timeout=self.wait_s()), rpc.JoinReply
        )
        self._adopt_cluster_id(reply.cluster_id, reply.joined_at)
        for member in reply.members:
            self._learn_address(member.node_id, member.address)
        await self._inbox_send.send(Trust(frozenset(reply.member_ids)))

    async def publish_record(self) -> None:
        """(Re)publish this node's record when it is missing or stale (contract §3)."""
        while True:
            # Wait for a leader and for our state machine to have caught up with it.
            await self.wait_for(
                lambda: self.core.leader is not None and self.applied.index >= self.core.commit_index,
                math.inf,
                "leader",
            )
            if self.sm.node(self.id) == self.record or not self.driver.is_member(self.core.committed_membership):
                return
            request = rpc.WriteRequest(SetNode(self.id, self.record))
            try:
                reply = rpc.decode(
                    await self.call_leader(rpc.WRITE, rpc.encode(request), lambda: self._write_local(request)),
                    rpc.WriteReply,
                )
                if not reply.ok:
                    raise BadRequest(reply.message)
                log.info("%d published its record %s", self.id, self.record.endpoint)
                return
            except (ClientError, DecodeError) as e:
                log.warning("%d could not publish its record yet: %s", self.id, e)
                await trio.sleep(1)

    async def _run_ask_about_strangers(self) -> None:
        """Our log may predate the current leader (we were down while members
        changed): its messages are dropped as coming from a stranger. Once an election
        timeout, ask the members of our log which ids are members now, and trust what
        they name, until the strangers are known."""
        while True:
            await trio.sleep(self.tick_s * self.raft_config.election_ticks)
            strangers = set(self.core.strangers)
            if not strangers or self.meta is None:
                continue
            for peer in self.driver.vouchers():
                address = self.address_of(peer)
                if address is None:
                    continue
                try:
                    body = await self.calls_to_leader.call(
                        address, rpc.MEMBERS, rpc.encode(rpc.MembersRequest()), timeout=self.tick_s * 5
                    )
                    ids = frozenset(rpc.decode(body, rpc.MembersReply).member_ids)
                except (ClientError, TransportError, DecodeError) as e:
                    log.debug("%d could not ask %d about %s: %s", self.id, peer, sorted(strangers), e)
                    continue
                log.info("%d asked %d about senders %s: members are %s", self.id, peer, sorted(strangers), sorted(ids))
                await self._inbox_send.send(Trust(ids))
                strangers -= ids
                if not strangers:
                    break

    async def transfer_leader(self, to: int | None) -> dict:
        target = self.driver.transfer_target(to)
        voters = sorted(self.core.membership.voter_ids)
        await self.request(lambda req_id: TransferLeader(req_id, target), what="leadership transfer")
        return {"from": self.id, "to": target, "voter_ids": voters}
