"""Log entry payloads (`metanode.sm.codec`): every command round-trips through the one
wire codec with the leader's time stamp; anything else is a DecodeError."""

import msgpack
import pytest

from metanode.sm import Endpoint, MatchSeq, NodeRecord, RemoveNode, SetNode, Upsert
from metanode.sm.codec import DecodeError, LogCommand, decode_command, encode_command

COMMANDS = [
    Upsert("k", b"v"),
    Upsert("k", None, MatchSeq(exact=0)),
    Upsert("k", b"", MatchSeq(ge=3), ttl_ms=1000),
    Upsert("k", b"\xff", None, expire_at_ms=5),
    SetNode(7, NodeRecord("7", Endpoint("localhost", 28703), "127.0.0.1:28702")),
    SetNode(1, NodeRecord("1", Endpoint("localhost", 28004))),
    RemoveNode(3),
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=str)
def test_commands_round_trip_with_their_log_time(cmd):
    assert decode_command(encode_command(cmd, 1234)) == LogCommand(1234, cmd)


@pytest.mark.parametrize(
    "body, problem",
    [
        (b"\xc1", "msgpack"),
        (msgpack.packb({"time_ms": 1, "cmd": {"t": "nope"}}), "unknown state machine command tag"),
        (msgpack.packb({"time_ms": -1, "cmd": {"t": "remove_node", "node_id": 1}}), "time_ms"),
        (msgpack.packb({"time_ms": 1, "cmd": {"t": "upsert", "key": 1, "value": None}}), "key"),
        (msgpack.packb({"time_ms": 1, "cmd": {"t": "remove_node", "node_id": "1"}}), "node_id"),
    ],
)
def test_bad_payloads_are_decode_errors_naming_the_problem(body, problem):
    with pytest.raises(DecodeError, match=problem):
        decode_command(body)
