"""The wire codec and framing (design §5, contract §7): round trips, strict decoding, frames."""

from __future__ import annotations

import enum
import types
import typing
from typing import Any, ClassVar, Union

import attrs
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metanode.errors import MetanodeError
from metanode.raft.messages import (
    MESSAGE_TYPES,
    AppendRequest,
    AppendResponse,
    Heartbeat,
    HeartbeatResponse,
    SnapshotRequest,
    SnapshotResponse,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from metanode.raft.types import (
    Entry,
    EntryKind,
    HardState,
    LogId,
    Membership,
    PersistedState,
    Snapshot,
    SnapshotMeta,
    bootstrap_state,
)
from metanode.wire import (
    MESSAGE_TAGS,
    TAG_KEY,
    DecodeError,
    EncodeError,
    FrameDecoder,
    FrameTooLarge,
    decode,
    decode_message,
    encode,
    encode_frame,
    encode_message,
    register_class,
    register_tagged_union,
    unpack,
)

JOINT = Membership(((1, 2, 3), (2, 3, 4)), (7, 8))
ENTRIES = (
    Entry(3, 10, EntryKind.NOOP),
    Entry(3, 11, EntryKind.NORMAL, b"\x82\xa3key\xa1k\xa5value\xc4\x03\x00\xff\x01"),
    Entry(3, 12, EntryKind.MEMBERSHIP, b"", JOINT),
    Entry(3, 13, EntryKind.MEMBERSHIP, b"", JOINT.finalized()),
    Entry(4, 14, EntryKind.NORMAL, bytes(range(256))),
)
META = SnapshotMeta(LogId(3, 12), JOINT)

#: One realistic instance per tag, every field away from its default where possible.
SAMPLES: dict[str, Any] = {
    "vote": VoteRequest(5, 1, 2, LogId(4, 20), pre_vote=True, transfer=True),
    "vote_resp": VoteResponse(5, 2, 1, granted=True, pre_vote=True),
    "append": AppendRequest(4, 1, 3, LogId(3, 9), ENTRIES, commit=12),
    "append_resp": AppendResponse(4, 3, 1, success=False, index=9, hint_term=2, hint_index=7),
    "hb": Heartbeat(4, 1, 2, commit=14, ctx=99),
    "hb_resp": HeartbeatResponse(4, 2, 1, ctx=99),
    "snap": SnapshotRequest(4, 1, 5, META, offset=4 << 20, data=b"\x00\x01chunk" * 100, done=True),
    "snap_resp": SnapshotResponse(4, 5, 1, LogId(3, 12), next_offset=5 << 20, done=True),
    "timeout_now": TimeoutNow(6, 1, 2),
}


def _value_for(tp: Any, seed: int) -> Any:
    """A non-default value of a field type, for message fields added later."""
    origin = typing.get_origin(tp)
    if tp is bool:
        return seed % 2 == 0
    if tp is int:
        return 1000 + seed
    if tp is bytes:
        return bytes([seed % 256]) * 3
    if tp is str:
        return f"s{seed}"
    if tp is LogId:
        return LogId(seed, seed + 1)
    if tp is SnapshotMeta:
        return META
    if origin is tuple and typing.get_args(tp)[0] is Entry:
        return ENTRIES
    if origin in (Union, types.UnionType):
        return _value_for(next(a for a in typing.get_args(tp) if a is not type(None)), seed)
    raise AssertionError(f"no sample value for {tp!r}: extend _value_for")


def _all_fields_set(cls: type) -> Any:
    attrs.resolve_types(cls)
    return cls(**{a.name: _value_for(a.type, i) for i, a in enumerate(attrs.fields(cls))})


# ----------------------------------------------------------------------- round trips


def test_every_message_type_has_a_sample() -> None:
    assert set(MESSAGE_TAGS) == {cls.TAG for cls in MESSAGE_TYPES} == set(SAMPLES)
    for tag, msg in SAMPLES.items():
        assert type(msg).TAG == tag


@pytest.mark.parametrize("tag", sorted(SAMPLES))
def test_round_trip_sample(tag: str) -> None:
    msg = SAMPLES[tag]
    body = encode_message(msg)
    decoded = decode_message(body)
    assert decoded == msg
    assert type(decoded) is type(msg)
    raw = unpack(body)
    assert next(iter(raw)) == TAG_KEY and raw[TAG_KEY] == tag  # the tag comes first


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.TAG)
def test_round_trip_all_fields_set(cls: type) -> None:
    msg = _all_fields_set(cls)
    assert decode_message(encode_message(msg)) == msg


def test_round_trip_keeps_types() -> None:
    msg = decode_message(encode_message(SAMPLES["append"]))
    assert isinstance(msg, AppendRequest)
    assert type(msg.entries) is tuple
    assert [type(e.kind) for e in msg.entries] == [EntryKind] * len(ENTRIES)
    assert all(type(e.data) is bytes for e in msg.entries)
    assert msg.entries[2].membership == JOINT and msg.entries[2].membership.is_joint
    assert type(msg.entries[2].membership.configs) is tuple


def test_encoding_is_a_readable_map() -> None:
    raw = unpack(encode_message(SAMPLES["append"]))
    assert raw["t"] == "append"
    assert raw["prev_log_id"] == [3, 9]  # LogId is a compact [term, index]
    assert raw["entries"][0] == {"term": 3, "index": 10, "kind": 0, "data": b""}  # no membership
    assert raw["entries"][2]["membership"] == {
        "configs": [[1, 2, 3], [2, 3, 4]],
        "learners": [7, 8],
    }
    vote = unpack(encode_message(SAMPLES["vote"]))
    assert vote == {
        "t": "vote",
        "term": 5,
        "src": 1,
        "dst": 2,
        "last_log_id": [4, 20],
        "pre_vote": True,
        "transfer": True,
    }


@pytest.mark.parametrize(
    ("obj", "cls"),
    [
        (LogId(2**63 - 1, 0), LogId),
        (HardState(7, 3, 40), HardState),
        (HardState(7, None, 40), HardState),
        (Snapshot(META, b"state" * 10), Snapshot),
        (bootstrap_state([1, 2, 3], [4]), PersistedState),
        (PersistedState(HardState(2, 1, 3), Snapshot(META, b"s"), ENTRIES), PersistedState),
        (Membership.of([]), Membership),
    ],
)
def test_generic_round_trip_of_raft_types(obj: Any, cls: type) -> None:
    assert decode(encode(obj), cls) == obj
    assert decode(encode(obj, cls), cls) == obj


uints = st.integers(min_value=0, max_value=2**63 - 1)
small = st.integers(min_value=0, max_value=50)
node_sets = st.lists(st.integers(1, 9), max_size=5)


@st.composite
def memberships(draw: st.DrawFn) -> Membership:
    configs = draw(st.lists(node_sets, min_size=1, max_size=2))
    voters = {i for c in configs for i in c}
    learners = draw(st.lists(st.integers(1, 12).filter(lambda i: i not in voters), max_size=3))
    return Membership(tuple(tuple(c) for c in configs), tuple(learners))


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    kind = draw(st.sampled_from(EntryKind))
    membership = draw(memberships()) if kind == EntryKind.MEMBERSHIP else None
    data = draw(st.binary(max_size=300)) if kind == EntryKind.NORMAL else b""
    return Entry(draw(uints), draw(uints), kind, data, membership)


append_requests = st.builds(
    AppendRequest,
    term=uints,
    src=uints,
    dst=uints,
    prev_log_id=st.builds(LogId, uints, uints),
    entries=st.lists(entries(), max_size=8).map(tuple),
    commit=uints,
)


@settings(max_examples=200, deadline=None)
@given(append_requests)
def test_append_request_round_trip(msg: AppendRequest) -> None:
    assert decode_message(encode_message(msg)) == msg


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_decode_error(body: bytes) -> None:
    try:
        decode_message(body)
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.text(max_size=5)
        | st.binary(max_size=5)
        | st.floats(),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(
                st.sampled_from(["t", "term", "src", "dst", "entries", "x"]), children
            )
        ),
        max_leaves=20,
    )
)
def test_arbitrary_structures_decode_or_raise_decode_error(doc: Any) -> None:
    try:
        decode_message(msgpack.packb(doc, use_bin_type=True))
    except DecodeError:
        pass


# ----------------------------------------------------------------------- bad input


def _good(tag: str = "append") -> dict[str, Any]:
    return unpack(encode_message(SAMPLES[tag]))


def _bad(doc: Any) -> bytes:
    return msgpack.packb(doc, use_bin_type=True)


def _entry(**fields: Any) -> dict[str, Any]:
    return _good() | {"entries": [{"term": 1, "index": 2} | fields]}


BAD_INPUTS: list[tuple[str, bytes, str]] = [
    ("garbage msgpack", b"\xc1", "malformed msgpack"),
    ("truncated msgpack", _bad(_good())[:-3], "malformed msgpack"),
    ("empty body", b"", "malformed msgpack"),
    ("trailing bytes", _bad(_good("hb")) + b"\x00", "malformed msgpack: ExtraData"),
    ("invalid utf-8 str", b"\xa2\xff\xfe", "malformed msgpack: UnicodeDecodeError"),
    ("int map key", _bad({1: 2}), "int is not allowed for map key"),
    ("not a map", _bad([1, 2, 3]), "$: expected a message as a map, got list [1, 2, 3]"),
    ("nil", _bad(None), "expected a message as a map, got NoneType"),
    ("ext type", _bad(msgpack.ExtType(5, b"x")), "got ExtType"),
    ("no tag", _bad({"term": 1}), "no tag: a message needs a 't' key"),
    ("unknown tag", _bad(_good() | {"t": "nope"}), "unknown message tag 'nope' (known: append,"),
    ("non-str tag", _bad(_good() | {"t": 5}), "the tag 't' must be a str, got int 5"),
    (
        "missing field",
        _bad({k: v for k, v in _good().items() if k != "commit"}),
        "$.commit: required field missing",
    ),
    ("extra field", _bad(_good() | {"extra": 1}), "$: unexpected field(s) 'extra'"),
    ("bytes key", _bad(_good() | {b"term": 1}), "unexpected field(s) b'term'"),
    (
        "str for int",
        _bad(_good() | {"term": "1"}),
        "$.term: expected a non-negative int, got str '1'",
    ),
    (
        "bool for int",
        _bad(_good() | {"commit": True}),
        "$.commit: expected a non-negative int, got bool True",
    ),
    (
        "float for int",
        _bad(_good() | {"term": 1.0}),
        "$.term: expected a non-negative int, got float 1.0",
    ),
    (
        "nil for int",
        _bad(_good() | {"src": None}),
        "$.src: expected a non-negative int, got NoneType None",
    ),
    ("negative int", _bad(_good() | {"dst": -1}), "$.dst: expected a non-negative int, got -1"),
    (
        "int over 63 bits",
        _bad(_good() | {"term": 2**63}),
        "$.term: integer 9223372036854775808 does not fit",
    ),
    (
        "uint64 max",
        _bad(_good() | {"commit": 2**64 - 1}),
        "$.commit: integer 18446744073709551615 does not fit",
    ),
    (
        "int for bool",
        _bad(_good("vote") | {"pre_vote": 1}),
        "$.pre_vote: expected a bool, got int 1",
    ),
    (
        "str for bytes",
        _bad(_good("snap") | {"data": "chunk"}),
        "$.data: expected bytes (msgpack bin), got str",
    ),
    (
        "log id too short",
        _bad(_good() | {"prev_log_id": [1]}),
        "$.prev_log_id: expected LogId as an array of 2, got 1 items",
    ),
    (
        "log id as map",
        _bad(_good() | {"prev_log_id": {"term": 1, "index": 2}}),
        "$.prev_log_id: expected LogId as an array, got dict",
    ),
    (
        "log id bad item",
        _bad(_good() | {"prev_log_id": [1, "2"]}),
        "$.prev_log_id[1]: expected a non-negative int",
    ),
    (
        "bin for array",
        _bad(_good() | {"entries": b"\x01\x02"}),
        "$.entries: expected an array, got bytes",
    ),
    (
        "map for array",
        _bad(_good() | {"entries": {"term": 1}}),
        "$.entries: expected an array, got dict",
    ),
    (
        "entry not a map",
        _bad(_good() | {"entries": [[1, 2]]}),
        "$.entries[0]: expected Entry as a map, got list",
    ),
    (
        "entry missing index",
        _bad(_good() | {"entries": [{"term": 1}]}),
        "$.entries[0].index: required field missing",
    ),
    ("unknown entry kind", _bad(_entry(kind=7)), "$.entries[0].kind: 7 is not a valid EntryKind"),
    (
        "bool entry kind",
        _bad(_entry(kind=True)),
        "$.entries[0].kind: expected EntryKind (an int), got bool True",
    ),
    (
        "str entry kind",
        _bad(_entry(kind="NORMAL")),
        "$.entries[0].kind: expected EntryKind (an int), got str",
    ),
    (
        "membership entry without membership",
        _bad(_entry(kind=2)),
        "$.entries[0]: entry 1-2 of kind MEMBERSHIP has no membership",
    ),
    (
        "normal entry with membership",
        _bad(_entry(kind=1, membership={"configs": [[1]]})),
        "$.entries[0]: entry 1-2 of kind NORMAL carries a membership",
    ),
    (
        "learner also voter",
        _bad(_entry(kind=2, membership={"configs": [[1, 2]], "learners": [2]})),
        "$.entries[0].membership: nodes [2] are both learners and voters",
    ),
    (
        "three voter sets",
        _bad(_entry(kind=2, membership={"configs": [[1], [2], [3]]})),
        "$.entries[0].membership: a membership has 1 or 2 voter sets, got 3",
    ),
    (
        "bin as voter set",
        _bad(_entry(kind=2, membership={"configs": [b"\x01\x02"]})),
        "$.entries[0].membership.configs[0]: expected an array, got bytes",
    ),
    (
        "negative node id",
        _bad(_entry(kind=2, membership={"configs": [[1, -2]]})),
        "$.entries[0].membership.configs[0][1]: expected a non-negative int, got -2",
    ),
    (
        "snapshot meta not a map",
        _bad(_good("snap") | {"meta": None}),
        "$.meta: expected SnapshotMeta as a map",
    ),
]


@pytest.mark.parametrize(
    ("body", "expected"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_is_a_decode_error_naming_the_problem(body: bytes, expected: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_message(body)
    assert expected in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, MetanodeError)
    assert not isinstance(info.value, BaseExceptionGroup)


def test_every_problem_is_reported_with_its_path() -> None:
    doc = _good() | {
        "term": "x",
        "entries": [{"term": 1, "index": 2, "data": "s"}, {"term": -1, "index": 3}],
    }
    with pytest.raises(DecodeError) as info:
        decode_message(_bad(doc))
    text = str(info.value)
    assert text.startswith("cannot decode message: ")
    for part in ("$.term:", "$.entries[0].data:", "$.entries[1].term:"):
        assert part in text


def test_many_problems_are_summarized() -> None:
    doc = _good() | {"entries": [{"term": "x", "index": "y"}] * 10}
    with pytest.raises(DecodeError, match=r"; and 15 more$"):
        decode_message(_bad(doc))


def test_decode_of_a_plain_class_is_strict_too() -> None:
    assert decode(_bad({"term": 1, "vote": None, "commit": 2}), HardState) == HardState(1, None, 2)
    assert decode(_bad({}), HardState) == HardState()
    with pytest.raises(
        DecodeError, match=r"cannot decode HardState: \$.vote: expected a non-negative int"
    ):
        decode(_bad({"vote": "1"}), HardState)
    with pytest.raises(DecodeError, match=r"\$: expected LogId as an array"):
        decode(_bad("1-2"), LogId)


def test_encode_refuses_ints_beyond_64_bits() -> None:
    with pytest.raises(EncodeError, match="cannot encode"):
        encode_message(Heartbeat(2**64, 1, 2, 0))
    with pytest.raises(EncodeError, match="is not a message"):
        encode_message(LogId(1, 2))  # type: ignore[arg-type]


# ------------------------------------------------------------- registering more types


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@attrs.frozen
class _Ping:
    TAG: ClassVar[str] = "ping"
    seq: int
    note: str = ""
    color: Color = Color.RED
    weights: dict[str, float] = attrs.field(factory=dict)
    pair: tuple[int, str] | None = None
    tags: frozenset[str] = frozenset()
    ids: list[int] = attrs.field(factory=list)


@attrs.frozen
class _Pong:
    TAG: ClassVar[str] = "pong"
    seq: int
    delta: int = -5  # not registered unsigned: negative ints are fine


@attrs.frozen
class _Envelope:
    body: _Ping | _Pong
    hops: int = 0


_Frame = Union[_Ping, _Pong]
_FRAME_TAGS = register_tagged_union(_Frame, name="test frame")


def test_another_tagged_union_round_trips() -> None:
    assert dict(_FRAME_TAGS) == {"ping": _Ping, "pong": _Pong}
    ping = _Ping(1, "hi", Color.BLUE, {"a": 0.5}, (3, "x"), frozenset({"a", "b"}), [1, 2])
    for obj in (ping, _Pong(2), _Pong(3, delta=-(2**63))):
        assert decode(encode(obj, _Frame), _Frame) == obj
    assert unpack(encode(_Pong(2), _Frame)) == {"t": "pong", "seq": 2, "delta": -5}
    env = _Envelope(_Pong(4), hops=2)
    assert unpack(encode(env)) == {"body": {"t": "pong", "seq": 4, "delta": -5}, "hops": 2}
    assert decode(encode(env), _Envelope) == env


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"t": "ping", "seq": 1, "color": "green"}, "$.color: 'green' is not a valid Color"),
        ({"t": "ping", "seq": 1, "color": 1}, "$.color: expected Color (a str), got int 1"),
        (
            {"t": "ping", "seq": 1, "weights": {"a": 1}},
            "$.weights['a']: expected a float, got int 1",
        ),
        ({"t": "ping", "seq": 1, "weights": [1]}, "$.weights: expected a map, got list"),
        ({"t": "ping", "seq": 1, "pair": [1]}, "$.pair: expected an array of 2, got 1 items"),
        ({"t": "ping", "seq": 1, "pair": [1, 2]}, "$.pair[1]: expected a str, got int 2"),
        ({"t": "ping", "seq": 1, "tags": "ab"}, "$.tags: expected an array, got str 'ab'"),
        ({"t": "ping", "seq": 1, "ids": [1, "2"]}, "$.ids[1]: expected an int, got str '2'"),
        ({"t": "pong", "seq": 2**63}, "$.seq: integer 9223372036854775808 does not fit in 64 bits"),
        ({"t": "vote"}, "$: unknown test frame tag 'vote' (known: ping, pong)"),
    ],
)
def test_another_tagged_union_is_strict(doc: dict[str, Any], expected: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(_bad(doc), _Frame)
    assert f"cannot decode test frame: {expected}" in str(info.value)


def test_registration_mistakes_are_refused() -> None:
    @attrs.frozen
    class A:
        TAG: ClassVar[str] = "same"
        x: int

    @attrs.frozen
    class B:
        TAG: ClassVar[str] = "same"
        y: int

    @attrs.frozen
    class HasT:
        TAG: ClassVar[str] = "t_field"
        t: int

    @attrs.frozen
    class NoTag:
        x: int

    with pytest.raises(ValueError, match="tag 'same' is used by A and B"):
        register_tagged_union(Union[A, B], name="x")
    with pytest.raises(ValueError, match="field named 't'"):
        register_tagged_union(Union[A, HasT], name="x")
    with pytest.raises(TypeError, match="no TAG"):
        register_tagged_union(Union[A, NoTag], name="x")
    with pytest.raises(RuntimeError, match="register it earlier"):
        register_class(LogId, as_list=False)
    with pytest.raises(TypeError, match="not an attrs class"):
        register_class(int)


# ----------------------------------------------------------------------- framing


def _frames(*bodies: bytes) -> bytes:
    return b"".join(encode_frame(b) for b in bodies)


BODIES = [
    b"a",
    b"hello",
    bytes(range(256)) * 3,
    b"\x00\x00\x00\x00",
    encode_message(SAMPLES["append"]),
]


def test_encode_frame() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    with pytest.raises(ValueError, match="cannot be empty"):
        encode_frame(b"")


def test_one_feed_with_many_frames() -> None:
    dec = FrameDecoder(max_frame_size=10_000)
    assert dec.feed(_frames(*BODIES) * 50) == BODIES * 50
    assert dec.pending == 0


def test_split_at_every_byte_boundary() -> None:
    stream = _frames(*BODIES)
    for cut in range(len(stream) + 1):
        dec = FrameDecoder(max_frame_size=10_000)
        got = dec.feed(stream[:cut])
        got += dec.feed(stream[cut:])
        assert got == BODIES, cut
        assert dec.pending == 0


def test_byte_by_byte() -> None:
    stream = _frames(*BODIES)
    dec = FrameDecoder(max_frame_size=10_000)
    got = []
    for i in range(len(stream)):
        got += dec.feed(stream[i : i + 1])
        assert dec.pending == i + 1 - sum(4 + len(b) for b in got)
    assert got == BODIES
    assert dec.pending == 0


def test_pending_counts_buffered_bytes() -> None:
    dec = FrameDecoder(max_frame_size=100)
    assert dec.feed(b"\x00\x00") == []
    assert dec.pending == 2
    assert dec.feed(b"\x00\x05ab") == []
    assert dec.pending == 6
    assert dec.feed(bytearray(b"cde\x00")) == [b"abcde"]
    assert dec.pending == 1
    assert dec.feed(memoryview(b"\x00\x00\x01z")) == [b"z"]
    assert dec.pending == 0
    assert dec.feed(b"") == []


def test_oversize_frame_refused_on_its_header_alone() -> None:
    dec = FrameDecoder(max_frame_size=1024)
    assert dec.feed(encode_frame(b"x" * 1024)) == [b"x" * 1024]  # the limit itself is fine
    with pytest.raises(
        FrameTooLarge, match="frame of 1025 bytes exceeds the limit of 1024"
    ) as info:
        dec.feed((1025).to_bytes(4, "big"))  # only the header: no body ever arrives
    assert isinstance(info.value, DecodeError)
    assert (info.value.size, info.value.limit) == (1025, 1024)
    with pytest.raises(FrameTooLarge):  # the stream is out of sync for good
        dec.feed(b"more")


def test_oversize_header_split_across_feeds() -> None:
    dec = FrameDecoder(max_frame_size=10)
    assert dec.feed(encode_frame(b"ok") + b"\xff\xff") == [b"ok"]
    with pytest.raises(FrameTooLarge, match="frame of 4294967295 bytes"):
        dec.feed(b"\xff\xff")


def test_huge_header_does_not_allocate() -> None:
    dec = FrameDecoder(max_frame_size=1 << 20)
    with pytest.raises(FrameTooLarge):
        dec.feed(b"\x7f\xff\xff\xff" + b"x" * 100)
    assert dec.pending == 0


def test_zero_length_frame_is_an_error() -> None:
    dec = FrameDecoder(max_frame_size=100)
    with pytest.raises(DecodeError, match="zero-length frame"):
        dec.feed(encode_frame(b"ab") + b"\x00\x00\x00\x00")
    with pytest.raises(DecodeError, match="zero-length frame"):
        dec.feed(b"\x00\x00\x00\x01a")


def test_bad_limit() -> None:
    for bad in (0, -1, 1 << 32, 1.5, "10"):
        with pytest.raises(ValueError, match="max_frame_size"):
            FrameDecoder(max_frame_size=bad)  # type: ignore[arg-type]


def test_many_small_frames_in_small_reads_stay_linear() -> None:
    """A big stream fed in odd-sized reads: every frame, and the buffer stays small."""
    body = b"x" * 37
    stream = _frames(*[body] * 20_000)
    dec = FrameDecoder(max_frame_size=100)
    got = 0
    for i in range(0, len(stream), 1000):
        got += len(dec.feed(stream[i : i + 1000]))
        assert dec.pending < 1000 + 41
    assert got == 20_000


def test_frames_carry_messages() -> None:
    stream = b"".join(encode_frame(encode_message(m)) for m in SAMPLES.values())
    dec = FrameDecoder()
    assert [decode_message(b) for b in dec.feed(stream)] == list(SAMPLES.values())


def test_feed_accepts_any_bytes_like() -> None:
    import array

    stream = encode_frame(b"abc") + encode_frame(b"defg")
    dec = FrameDecoder(max_frame_size=100)
    assert dec.feed(memoryview(stream)[:5]) == []
    assert dec.feed(bytearray(stream[5:])) == [b"abc", b"defg"]
    words = array.array("I")
    words.frombytes(encode_frame(b"wxyz"))  # a buffer of 4-byte items, counted in bytes
    assert dec.feed(memoryview(words)) == [b"wxyz"]
    assert dec.pending == 0


def test_the_append_fast_path_decodes_exactly_what_the_strict_path_does():
    """AppendEntries of plain entries skip the converter (the replication hot path);
    every other shape takes the strict path, so what is accepted, and the errors of
    what is not, are the same either way."""
    import msgpack

    from metanode.raft.messages import AppendRequest
    from metanode.raft.types import Entry, EntryKind, LogId, Membership
    from metanode.wire import DecodeError, decode_message, encode_message
    from metanode.wire.codec import _fast_append, converter

    plain = AppendRequest(7, 1, 2, LogId(7, 99), tuple(
        Entry(7, 100 + i, EntryKind.NORMAL if i else EntryKind.NOOP, b"d%d" % i) for i in range(5)
    ), 105, 3)
    assert decode_message(encode_message(plain)) == plain
    from metanode.wire.codec import _unstructure_message, pack

    assert encode_message(plain) == pack(_unstructure_message(plain))  # the fast encoder's bytes
    data = msgpack.unpackb(encode_message(plain), raw=False)
    assert _fast_append(data) == plain
    conf = AppendRequest(7, 1, 2, LogId(7, 99), (Entry(7, 100, EntryKind.MEMBERSHIP, b"", Membership.of([1, 2])),), 1)
    assert _fast_append(msgpack.unpackb(encode_message(conf), raw=False)) is None  # strict path
    assert decode_message(encode_message(conf)) == conf
    bad = [
        dict(data, term=-1), dict(data, term=True), dict(data, term=1 << 64), dict(data, extra=1),
        dict(data, prev_log_id=[1]), dict(data, entries=[dict(data["entries"][0], data="text")]),
        dict(data, entries=[dict(data["entries"][0], kind=9)]), dict(data, entries=[[1, 2]]),
        dict(data, entries=[dict(data["entries"][0], extra=1)]),  # 5 keys
        dict(data, entries=[{k: v for k, v in dict(data["entries"][0], other=1).items() if k != "data"}]),  # 4, one wrong
        dict(data, entries=[dict(data["entries"][0], term=True)]), dict(data, entries=[dict(data["entries"][0], index=-1)]),
        dict(data, entries=[dict(data["entries"][0], kind=True)]),
    ]
    for d in bad:
        assert _fast_append(d) is None, d
        if d["term"] == 1 << 64:
            continue  # msgpack cannot even carry it
        with pytest.raises(DecodeError):
            decode_message(msgpack.packb(d, use_bin_type=True))
    assert converter is not None


def test_the_append_answer_fast_paths_give_the_converters_bytes_and_objects():
    """An AppendEntries answer is encoded and decoded by hand (one per follower per
    AppendEntries): the converter's bytes, the converter's object, and anything the
    strict path refuses takes the strict path (and its error)."""
    import msgpack

    from metanode.raft.messages import AppendResponse
    from metanode.wire import DecodeError, decode_message, encode_message
    from metanode.wire.codec import _fast_append_resp, _unstructure_message, pack

    for msg in (AppendResponse(3, 2, 1, True, 105), AppendResponse(9, 3, 1, False, 40, 7, 33),
                AppendResponse(2**63 - 1, 0, 0, False, 0, 2**63 - 1, 2**63 - 1)):
        assert encode_message(msg) == pack(_unstructure_message(msg))
        data = msgpack.unpackb(encode_message(msg), raw=False)
        assert _fast_append_resp(data) == msg
        assert decode_message(encode_message(msg)) == msg
    good = msgpack.unpackb(encode_message(AppendResponse(3, 2, 1, True, 105)), raw=False)
    bad = [
        dict(good, term=-1), dict(good, term=True), dict(good, index=2**63), dict(good, extra=1),
        dict(good, success=1), dict(good, success=None), dict(good, src="2"),
        {k: v for k, v in dict(good, other=0).items() if k != "hint_index"},
    ]
    for d in bad:
        assert _fast_append_resp(d) is None, d
        with pytest.raises(DecodeError):
            decode_message(msgpack.packb(d, use_bin_type=True))
    short = {k: v for k, v in good.items() if k != "hint_index"}  # a default left out: the strict path's
    assert _fast_append_resp(short) is None
    assert decode_message(msgpack.packb(short, use_bin_type=True)) == AppendResponse(3, 2, 1, True, 105)


def test_the_append_fast_path_refuses_what_does_not_fit_a_signed_64_bit_int():
    import msgpack

    from metanode.raft.messages import AppendRequest
    from metanode.raft.types import Entry, EntryKind, LogId
    from metanode.wire import DecodeError, decode_message, encode_message
    from metanode.wire.codec import _fast_append

    data = msgpack.unpackb(encode_message(AppendRequest(7, 1, 2, LogId(7, 99), (Entry(7, 100, EntryKind.NORMAL, b"x"),), 99)), raw=False)
    for d in (dict(data, term=2**63), dict(data, entries=[dict(data["entries"][0], index=2**63)])):
        assert _fast_append(d) is None
        with pytest.raises(DecodeError):
            decode_message(msgpack.packb(d, use_bin_type=True))
