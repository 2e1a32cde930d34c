"""Wiring for the raft unit tests: build cores and move their messages by hand.

Nothing here is clever on purpose. A `Net` holds a few `RaftCore`s and one list of
messages in flight; a test decides what is delivered, dropped or reordered, and
asserts the exact `Ready` each step produces. The runtime contract is the core's
own (design §3): take a `Ready`, "persist" it (the core keeps its log in memory, so
only the applied entries are recorded here), queue its messages, then `advance`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from metanode.raft import (
    Entry,
    EntryKind,
    HardState,
    LogId,
    Membership,
    Message,
    PersistedState,
    RaftConfig,
    RaftCore,
    Ready,
    Role,
    bootstrap_state,
)
from metanode.raft.messages import VoteRequest, VoteResponse

ELECTION = 10  # election_ticks of every core built here
HEARTBEAT = 1


def new_core(
    node_id: int,
    voters: Iterable[int] = (1, 2, 3),
    learners: Iterable[int] = (),
    *,
    state: PersistedState | None = None,
    seed: int | None = None,
    **config: object,
) -> RaftCore:
    """A core of a freshly bootstrapped cluster (or of `state`), rng seeded by its id."""
    cfg = RaftConfig(node_id, heartbeat_ticks=HEARTBEAT, election_ticks=ELECTION, **config)  # type: ignore[arg-type]
    persisted = state if state is not None else bootstrap_state(voters, learners)
    return RaftCore(cfg, persisted, random.Random(node_id if seed is None else seed))


def strs(msgs: Iterable[object]) -> list[str]:
    return [str(m) for m in msgs]


def take(core: RaftCore) -> Ready:
    """Take exactly one Ready and advance it (persisted, sent and applied at once)."""
    assert core.has_ready(), "expected a Ready"
    ready = core.take_ready()
    core.advance(ready)
    return ready


def drain(core: RaftCore) -> list[Ready]:
    readies = []
    while core.has_ready():
        readies.append(take(core))
    return readies


def view(ready: Ready) -> dict[str, object]:
    """A Ready as a compact dict; empty fields are left out, so `==` checks it all."""
    out: dict[str, object] = {}
    if ready.hard_state is not None:
        hs = ready.hard_state
        out["hs"] = (hs.term, hs.vote, hs.commit)
    if ready.snapshot is not None:
        meta = ready.snapshot.meta
        out["snapshot"] = f"{meta.last_log_id} {meta.membership} {ready.snapshot.data!r}"
    if ready.entries:
        out["entries"] = strs(ready.entries)
    if ready.messages:
        out["msgs"] = strs(ready.messages)
    if ready.committed:
        out["committed"] = strs(ready.committed)
    if ready.read_states:
        out["reads"] = [(rs.ctx, rs.index) for rs in ready.read_states]
    if ready.dropped_reads:
        out["dropped"] = list(ready.dropped_reads)
    return out


def ticks(core: RaftCore, n: int) -> None:
    for _ in range(n):
        core.tick()


def entry(term: int, index: int, data: bytes = b"x") -> Entry:
    return Entry(term, index, EntryKind.NORMAL, data)


def noop(term: int, index: int) -> Entry:
    return Entry(term, index, EntryKind.NOOP)


def conf(term: int, index: int, *configs: Iterable[int], learners: Iterable[int] = ()) -> Entry:
    return Entry(term, index, EntryKind.MEMBERSHIP, b"", Membership(tuple(map(tuple, configs)), tuple(learners)))


def state_with(
    entries: Iterable[Entry],
    term: int,
    commit: int,
    vote: int | None = None,
    voters: Iterable[int] = (1, 2, 3),
) -> PersistedState:
    """A persisted log: the bootstrap entry 1-1 (membership `voters`), then `entries`."""
    first = bootstrap_state(voters).entries
    return PersistedState(HardState(term, vote, commit), None, first + tuple(entries))


class Net:
    """A few cores and the messages in flight between them, moved by the test."""

    def __init__(
        self,
        ids: Iterable[int] = (1, 2, 3),
        learners: Iterable[int] = (),
        *,
        states: dict[int, PersistedState] | None = None,
        **config: object,
    ) -> None:
        ids = tuple(ids)
        learners = tuple(learners)
        voters = [i for i in ids if i not in learners]
        states = states or {}
        self.cores = {
            i: new_core(i, voters, learners, state=states.get(i), **config) for i in ids
        }
        self.inflight: list[Message] = []
        self.transcript: list[str] = []  # every message delivered, in order
        self.applied: dict[int, list[Entry]] = {i: [] for i in ids}
        self.readies: dict[int, list[Ready]] = {i: [] for i in ids}
        for i in ids:
            self.flush(i)

    def __getitem__(self, node_id: int) -> RaftCore:
        return self.cores[node_id]

    def add(self, node_id: int, core: RaftCore) -> None:
        self.cores[node_id] = core
        self.applied[node_id] = []
        self.readies[node_id] = []

    # -- one node's Ready ---------------------------------------------------
    def ready(self, node_id: int) -> Ready:
        """Take one Ready of `node_id`: queue its messages, record what it applied."""
        ready = take(self.cores[node_id])
        self.inflight.extend(ready.messages)
        self.applied[node_id].extend(ready.committed)
        self.readies[node_id].append(ready)
        return ready

    def flush(self, *ids: int) -> list[str]:
        """Process every Ready of `ids` (all nodes when none); the messages they sent."""
        sent: list[Message] = []
        for i in ids or tuple(self.cores):
            while self.cores[i].has_ready():
                sent.extend(self.ready(i).messages)
        return strs(sent)

    # -- the network --------------------------------------------------------
    def take_msgs(self, pred: Callable[[Message], bool] = lambda m: True) -> list[Message]:
        picked = [m for m in self.inflight if pred(m)]
        self.inflight = [m for m in self.inflight if not pred(m)]
        return picked

    def deliver(self, pred: Callable[[Message], bool] = lambda m: True) -> list[str]:
        """Step every message in flight matching `pred` (in order); drop those for
        nodes that do not exist. Returns what was delivered."""
        msgs = self.take_msgs(pred)
        self.transcript.extend(strs(msgs))
        for m in msgs:
            if m.dst in self.cores:
                self.cores[m.dst].step(m)
        return strs(msgs)

    def round_trip(self, *peers: int) -> list[str]:
        """Deliver what is in flight to `peers`, let them answer, deliver the answers;
        what was delivered back."""
        self.deliver(lambda m: m.dst in peers)
        self.flush(*peers)
        return self.deliver(lambda m: m.src in peers)

    def drop(self, pred: Callable[[Message], bool] = lambda m: True) -> list[str]:
        return strs(self.take_msgs(pred))

    def stabilize(self, *, cut: Iterable[int] = (), rounds: int = 50) -> None:
        """Flush and deliver until quiet; messages from or to `cut` are dropped."""
        cut = set(cut)
        for _ in range(rounds):
            self.flush(*(i for i in self.cores if i not in cut))
            self.drop(lambda m: m.src in cut or m.dst in cut)
            if not self.inflight:
                return
            self.deliver()
        raise AssertionError(f"not quiet after {rounds} rounds: {strs(self.inflight)}")

    def campaign(self, node_id: int) -> RaftCore:
        """Let `node_id` time out and move only (pre)vote messages until it leads.

        The new leader's first Ready (its no-op and the appends) is left untaken."""
        core = self.cores[node_id]
        for _ in range(2 * ELECTION):
            core.tick()
            if core.role is not Role.FOLLOWER:
                break
        while core.role is not Role.LEADER:
            self.flush()
            if not self.deliver(is_a(VoteRequest, VoteResponse)):
                raise AssertionError(f"{node_id} lost the election: {core.status()}")
        return core

    def elect(self, node_id: int, *, cut: Iterable[int] = ()) -> RaftCore:
        """Let `node_id` win an election, then settle (dropping traffic of `cut`)."""
        core = self.campaign(node_id)
        self.stabilize(cut=cut)
        assert core.role is Role.LEADER, core.status()
        return core

    def heartbeat(self, leader: int, *, cut: Iterable[int] = ()) -> None:
        """One leader tick (a heartbeat round with heartbeat_ticks=1), settled."""
        self.cores[leader].tick()
        self.stabilize(cut=cut)

    def match(self, leader: int) -> dict[int, int]:
        return self.cores[leader].status().matched

    def logs(self) -> dict[int, LogId]:
        return {i: c.log.last_log_id for i, c in self.cores.items()}


def to(dst: int) -> Callable[[Message], bool]:
    return lambda m: m.dst == dst


def frm(src: int) -> Callable[[Message], bool]:
    return lambda m: m.src == src


def is_a(*types: type) -> Callable[[Message], bool]:
    return lambda m: isinstance(m, types)


def leader_net(ids: Iterable[int] = (1, 2, 3), leader: int = 1, **kw: object) -> Net:
    """A cluster where `leader` won term 2 and every node committed its no-op 2-2."""
    net = Net(ids, **kw)  # type: ignore[arg-type]
    net.elect(leader)
    net.heartbeat(leader)
    return net
