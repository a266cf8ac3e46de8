"""Group protocol details no client library lets a test steer: KIP-394's
MEMBER_ID_REQUIRED, checked on the wire (librdkafka and kafka-python go
through it in every group test, since both join with v4+)."""

import struct

from kraw import Raw, string

JOIN_GROUP = 11


def join_v4(group, member_id):
    body = string(group) + struct.pack(">ii", 10000, 10000) + string(member_id)
    body += string("consumer") + struct.pack(">i", 1) + string("range")
    body += struct.pack(">i", 0)  # empty metadata bytes
    return body


def parse_join_v4(data):
    """-> (error, generation, leader, member_id) of a v2..v5 JoinGroup body."""
    pos = 4  # throttle_time_ms
    err, gen = struct.unpack_from(">hi", data, pos)
    pos += 6
    out = []
    for _ in range(3):  # protocol_name, leader, member_id
        (n,) = struct.unpack_from(">h", data, pos)
        pos += 2
        out.append(data[pos:pos + max(n, 0)].decode())
        pos += max(n, 0)
    return err, gen, out[1], out[2]


def test_member_id_required_then_join_with_it(kafka_gw):
    r = Raw(kafka_gw.port("kafka"), timeout=30)
    r.request(JOIN_GROUP, 4, join_v4("kip394", ""))
    err, gen, _, member = parse_join_v4(r.response()[1])
    assert err == 79 and gen == -1 and member.startswith("raw-")
    # An id the coordinator never gave out is refused.
    r.request(JOIN_GROUP, 4, join_v4("kip394", "raw-made-up"))
    assert parse_join_v4(r.response()[1])[0] == 25  # UNKNOWN_MEMBER_ID
    # Back with the given id: joined under it, and leader of generation 1.
    r.request(JOIN_GROUP, 4, join_v4("kip394", member))
    err, gen, leader, me = parse_join_v4(r.response()[1])
    assert (err, gen, leader, me) == (0, 1, member, member)


def test_join_before_v4_needs_no_member_id_round_trip(kafka_gw):
    r = Raw(kafka_gw.port("kafka"), timeout=30)
    r.request(JOIN_GROUP, 3, join_v4("pre-kip394", ""))
    err, gen, leader, me = parse_join_v4(r.response()[1])
    assert err == 0 and gen == 1 and me.startswith("raw-") and leader == me
