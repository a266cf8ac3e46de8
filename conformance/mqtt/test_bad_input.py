"""Malformed and hostile input gets the version's reason code or a close,
and never affects other connections."""

import pytest

from mqttc import V311, Client, Raw, connect_packet, packet, s, varint


@pytest.fixture
def healthy(gw):
    """A subscriber that must keep working through every bad connection."""
    c = Client(gw.port("mqtt"), "healthy-watcher", V311).connect()
    c.sub("healthy/#", qos=1)
    yield c
    p = Client(gw.port("mqtt"), "healthy-pub", V311).connect()
    p.pub("healthy/x", b"still alive", qos=1)
    assert c.get().payload == b"still alive"
    p.close(); c.close()


def connected(gw, level=4, cid="bad"):
    r = Raw(gw.port("mqtt"))
    r.send(connect_packet(cid, level=level))
    ack = r.recv_some()
    assert ack[0] == 0x20 and ack[3] == 0
    return r


def test_packet_before_connect(gw, healthy):
    r = Raw(gw.port("mqtt"))
    r.send(packet(0x30, s("a/b") + b"x"))
    assert r.closed_within(3)


def test_wrong_protocol_name(gw, healthy):
    r = Raw(gw.port("mqtt"))
    r.send(connect_packet(name="HTTP", level=4))
    assert r.closed_within(3)


def test_unsupported_protocol_level(gw, healthy):
    r = Raw(gw.port("mqtt"))
    r.send(connect_packet(level=9))
    assert r.recv_some() == b"\x20\x02\x00\x01"
    assert r.closed_within(3)


def test_remaining_length_beyond_maximum(gw, healthy):
    r = connected(gw)
    # Announces ~200 MB; the server must not wait for (or allocate) it.
    r.send(b"\x30" + varint(200_000_000))
    assert r.closed_within(3)


def test_v5_packet_too_large_reason(gw, healthy):
    r = connected(gw, level=5, cid="bad5")
    r.send(b"\x30" + varint(200_000_000))
    data = r.recv_some()
    assert data[:3] == b"\xe0\x02\x95"  # DISCONNECT, Packet too large
    assert r.closed_within(3)


def test_remaining_length_of_five_bytes(gw, healthy):
    r = connected(gw)
    r.send(b"\x30\xff\xff\xff\xff\x01")
    assert r.closed_within(3)


def test_invalid_utf8_topic(gw, healthy):
    r = connected(gw)
    r.send(packet(0x30, b"\x00\x02\xc3\x28payload"))
    assert r.closed_within(3)


def test_wildcard_in_publish_topic_v5(gw, healthy):
    r = connected(gw, level=5, cid="bad5w")
    r.send(packet(0x30, s("a/+") + b"\x00" + b"x"))
    data = r.recv_some()
    assert data[0] == 0xE0 and data[2] == 0x90  # DISCONNECT, Topic Name invalid
    assert r.closed_within(3)


def test_wildcard_in_publish_topic_v311(gw, healthy):
    r = connected(gw)
    r.send(packet(0x30, s("a/#") + b"x"))
    assert r.closed_within(3)


def test_qos3_and_reserved_flags(gw, healthy):
    r = connected(gw)
    r.send(packet(0x36, s("a") + b"\x00\x01x"))
    assert r.closed_within(3)
    r = connected(gw, cid="bad2")
    r.send(packet(0x80, b"\x00\x01" + s("a") + b"\x00"))  # SUBSCRIBE flags must be 0010
    assert r.closed_within(3)


def test_second_connect_is_a_protocol_violation(gw, healthy):
    r = connected(gw)
    r.send(connect_packet("again"))
    assert r.closed_within(3)


def test_garbage_never_crashes(gw, healthy):
    import random
    rnd = random.Random(7)
    for i in range(40):
        r = Raw(gw.port("mqtt"))
        if i % 2:
            r.send(connect_packet(f"fz{i}", level=4 + (i % 4 == 1)))
        r.send(bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 300))))
        r.closed_within(0.3)
        r.close()


def test_keep_alive_enforced(gw, healthy):
    import time
    r = Raw(gw.port("mqtt"))
    r.send(connect_packet("ka", keepalive=1))
    assert r.recv_some()[:2] == b"\x20\x02"
    t0 = time.monotonic()
    assert r.closed_within(5)
    assert 1.2 <= time.monotonic() - t0 <= 3.0  # 1.5 x keep-alive


def test_keep_alive_is_kept_by_packets_and_enforced_after_the_last(gw, healthy):
    """A client that sends PINGREQ within its keep-alive stays connected past
    several keep-alive periods; once it goes silent it is closed 1.5 x the
    keep-alive after its last packet, not after its CONNECT."""
    import time
    r = Raw(gw.port("mqtt"))
    r.send(connect_packet("ka-live", keepalive=1))
    assert r.recv_some()[:2] == b"\x20\x02"
    for _ in range(8):  # 4 s: well past 1.5 s after the CONNECT
        time.sleep(0.5)
        r.send(b"\xc0\x00")  # PINGREQ
        assert r.recv_some() == b"\xd0\x00"  # PINGRESP
    t0 = time.monotonic()
    assert r.closed_within(5)
    assert 1.2 <= time.monotonic() - t0 <= 3.0
