"""Shared subscriptions `$share/<group>/<filter>` (MQTT 5 and 3.1.1 clients
use the same syntax): each message goes to exactly one member, members
that leave lose nothing, normal subscribers still get everything."""

import queue
import struct
import time

import pytest

from mqttc import V5, V311, Client, Raw, connect_packet, packet, s

VERS = [("v3.1.1", V311), ("v5", V5)]


def drain(clients, want, timeout=20.0):
    """Collects payloads per client until `want` distinct payloads arrived."""
    got = [[] for _ in clients]
    deadline = time.monotonic() + timeout
    while len({p for g in got for p in g}) < want and time.monotonic() < deadline:
        for i, c in enumerate(clients):
            try:
                while True:
                    got[i].append(c.messages.get_nowait().payload)
            except queue.Empty:
                pass
        time.sleep(0.02)
    return got


@pytest.mark.parametrize("name,ver", VERS, ids=[n for n, _ in VERS])
def test_members_get_disjoint_subsets_covering_everything(gw, uniq, name, ver):
    port = gw.port("mqtt")
    a = Client(port, f"{uniq}-a", ver).connect()
    b = Client(port, f"{uniq}-b", ver).connect()
    assert a.sub(f"$share/g1/{uniq}/+", qos=1) == [1]
    assert b.sub(f"$share/g1/{uniq}/+", qos=1) == [1]
    pub = Client(port, f"{uniq}-p", ver).connect()
    n = 100
    for i in range(n):
        pub.pub(f"{uniq}/t{i % 3}", str(i).encode(), qos=1)
    got = drain([a, b], n)
    time.sleep(0.5)
    got = [g + [m.payload for m in list(c.messages.queue)] for g, c in zip(got, [a, b])]
    union = got[0] + got[1]
    assert sorted(int(p) for p in union) == list(range(n)), "each message exactly once"
    assert not set(got[0]) & set(got[1])
    assert got[0] and got[1], f"one member got nothing: {len(got[0])}/{len(got[1])}"
    a.close(); b.close(); pub.close()


def test_connack_advertises_shared_subscriptions(gw, uniq):
    c = Client(gw.port("mqtt"), f"{uniq}-c", V5).connect()
    props = c.connack[2]
    assert props.SharedSubscriptionAvailable == 1
    c.close()


def _raw_member(port, client_id, filt):
    """A 3.1.1 member that never acknowledges what it receives."""
    r = Raw(port)
    r.send(connect_packet(client_id))
    assert r.recv_some()[:1] == b"\x20"
    r.send(packet(0x82, struct.pack(">H", 1) + s(filt) + b"\x01"))
    return r


def _count_publishes(buf: bytes) -> int:
    n, i = 0, 0
    while i < len(buf):
        first = buf[i]
        mult, length, j = 1, 0, i + 1
        while j < len(buf):
            b = buf[j]
            length += (b & 0x7F) * mult
            mult *= 128
            j += 1
            if not b & 0x80:
                break
        if j + length > len(buf):
            break
        if first & 0xF0 == 0x30:
            n += 1
        i = j + length
    return n


@pytest.mark.parametrize("name,ver", VERS, ids=[n for n, _ in VERS])
def test_member_leaving_mid_stream_loses_nothing(gw, uniq, name, ver):
    port = gw.port("mqtt")
    filt = f"$share/g2/{uniq}/x"
    raw = _raw_member(port, f"{uniq}-raw", filt)
    b = Client(port, f"{uniq}-b", ver).connect()
    assert b.sub(filt, qos=1) == [1]
    pub = Client(port, f"{uniq}-p", ver).connect()
    for i in range(20):
        pub.pub(f"{uniq}/x", str(i).encode(), qos=1)
    # The raw member received some of them and acknowledged none.
    buf = b""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            chunk = raw.recv_some(timeout=0.3)
        except OSError:
            break
        if not chunk:
            break
        buf += chunk
    assert _count_publishes(buf) > 0, "the raw member got no message"
    raw.close()  # abrupt: no DISCONNECT, no PUBACK
    for i in range(20, 40):
        pub.pub(f"{uniq}/x", str(i).encode(), qos=1)
    got = b.get_n(40, timeout=20)
    assert sorted({int(m.payload) for m in got}) == list(range(40))
    b.close(); pub.close()


@pytest.mark.parametrize("name,ver", VERS, ids=[n for n, _ in VERS])
def test_shared_and_normal_subscriber_on_the_same_topic(gw, uniq, name, ver):
    port = gw.port("mqtt")
    a = Client(port, f"{uniq}-a", ver).connect()
    b = Client(port, f"{uniq}-b", ver).connect()
    normal = Client(port, f"{uniq}-n", ver).connect()
    a.sub(f"$share/g3/{uniq}/y", qos=1)
    b.sub(f"$share/g3/{uniq}/y", qos=1)
    normal.sub(f"{uniq}/y", qos=1)
    pub = Client(port, f"{uniq}-p", ver).connect()
    for i in range(30):
        pub.pub(f"{uniq}/y", str(i).encode(), qos=1)
    assert [int(m.payload) for m in normal.get_n(30)] == list(range(30))
    got = drain([a, b], 30)
    time.sleep(0.5)
    got = [g + [m.payload for m in list(c.messages.queue)] for g, c in zip(got, [a, b])]
    assert sorted(int(p) for p in got[0] + got[1]) == list(range(30))
    normal.nothing()
    a.close(); b.close(); normal.close(); pub.close()


def test_two_groups_each_get_everything_and_unsubscribe_stops(gw, uniq):
    port = gw.port("mqtt")
    a = Client(port, f"{uniq}-a", V5).connect()
    b = Client(port, f"{uniq}-b", V5).connect()
    a.sub(f"$share/ga/{uniq}/z", qos=1)
    b.sub(f"$share/gb/{uniq}/z", qos=1)
    pub = Client(port, f"{uniq}-p", V5).connect()
    for i in range(10):
        pub.pub(f"{uniq}/z", str(i).encode(), qos=1)
    assert [int(m.payload) for m in a.get_n(10)] == list(range(10))
    assert [int(m.payload) for m in b.get_n(10)] == list(range(10))
    a.unsub(f"$share/ga/{uniq}/z")
    pub.pub(f"{uniq}/z", b"later", qos=1)
    assert b.get().payload == b"later"
    a.nothing()
    a.close(); b.close(); pub.close()


def test_group_position_is_durable(gw, uniq):
    """A persistent member leaves; messages published meanwhile wait on the
    group's cursor and go to the next member that joins the group."""
    port = gw.port("mqtt")
    filt = f"$share/g4/{uniq}/w"
    a = Client(port, f"{uniq}-a", V5, clean=False, session_expiry=300).connect()
    a.sub(filt, qos=1)
    pub = Client(port, f"{uniq}-p", V5).connect()
    pub.pub(f"{uniq}/w", b"0", qos=1)
    assert a.get().payload == b"0"
    a.close()
    time.sleep(0.3)
    for i in range(1, 6):
        pub.pub(f"{uniq}/w", str(i).encode(), qos=1)
    b = Client(port, f"{uniq}-b", V5).connect()
    b.sub(filt, qos=1)
    assert sorted(int(m.payload) for m in b.get_n(5)) == [1, 2, 3, 4, 5]
    b.nothing()
    b.close(); pub.close()


def test_v5_shared_subscription_identifiers_and_qos(gw, uniq):
    port = gw.port("mqtt")
    a = Client(port, f"{uniq}-a", V5).connect()
    assert a.sub(f"$share/g5/{uniq}/q", qos=0, sub_id=7) == [0]
    pub = Client(port, f"{uniq}-p", V5).connect()
    pub.pub(f"{uniq}/q", b"m", qos=1)
    m = a.get()
    assert m.qos == 0
    assert m.properties.SubscriptionIdentifier == [7]
    a.close(); pub.close()


def test_shared_subscription_ends_when_its_last_session_expires(gw, uniq):
    """The only session holding a shared subscription goes offline and its
    session expires: the subscription ends with it. The group's durable
    cursor is deleted (the admin API no longer lists it), and a member that
    subscribes later starts a new group: it gets only what is published
    after it subscribed, not what piled up for the expired session."""
    port = gw.port("mqtt")
    filt = f"$share/gx/{uniq}/x"
    cursor = f"mqtt-share.gx/{uniq}/x".encode()
    stats = f"/admin/v1/topics/public/default/{uniq}.x/stats"
    a = Client(port, f"{uniq}-a", V5, clean=False, session_expiry=1).connect()
    a.sub(filt, qos=1)
    pub = Client(port, f"{uniq}-p", V5).connect()
    pub.pub(f"{uniq}/x", b"0", qos=1)
    assert a.get().payload == b"0"
    status, body = gw.admin("GET", stats)
    assert status == 200 and cursor in body, body
    a.close()
    # Expiry is 1 s after the disconnect; the sweep runs every 0.5 s.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, body = gw.admin("GET", stats)
        if status == 200 and cursor not in body:
            break
        time.sleep(0.2)
    assert status == 200 and cursor not in body, body
    for i in range(1, 4):
        pub.pub(f"{uniq}/x", str(i).encode(), qos=1)
    b = Client(port, f"{uniq}-b", V5).connect()
    b.sub(filt, qos=1)
    b.nothing()
    pub.pub(f"{uniq}/x", b"4", qos=1)
    assert b.get().payload == b"4"
    b.nothing()
    b.close(); pub.close()
