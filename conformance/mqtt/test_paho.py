"""paho-mqtt against the real binary: every protocol version, QoS flows,
wildcards, retained messages, sessions, wills, takeover, v5 features."""

import json
import struct
import time

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqttc import V5, V31, V311, VERSIONS, Client, PacketReader, Raw, connect_packet, packet
from mqttc import s as utf8

ALL = list(VERSIONS.items())


@pytest.mark.parametrize("name,ver", ALL, ids=[n for n, _ in ALL])
def test_publish_subscribe_every_qos(gw, uniq, name, ver):
    port = gw.port("mqtt")
    sub = Client(port, f"{uniq}-s", ver).connect()
    assert sub.sub(f"{uniq}/#", qos=2) == [2]
    pub = Client(port, f"{uniq}-p", ver).connect()
    for q in (0, 1, 2):
        pub.pub(f"{uniq}/q{q}", f"m{q}".encode(), qos=q)
    got = sub.get_n(3)
    assert [(m.topic, m.payload, m.qos) for m in got] == [
        (f"{uniq}/q0", b"m0", 0), (f"{uniq}/q1", b"m1", 1), (f"{uniq}/q2", b"m2", 2)]
    assert all(not m.retain for m in got)
    sub.nothing()
    sub.close(); pub.close()


@pytest.mark.parametrize("name,ver", [("v3.1.1", V311), ("v5", V5)])
def test_granted_qos_downgrades_delivery(gw, uniq, name, ver):
    port = gw.port("mqtt")
    sub = Client(port, f"{uniq}-s", ver).connect()
    sub.sub(f"{uniq}/x", qos=1)
    pub = Client(port, f"{uniq}-p", ver).connect()
    pub.pub(f"{uniq}/x", b"two", qos=2)
    assert sub.get().qos == 1
    sub.close(); pub.close()


def test_ordering_per_topic(gw, uniq):
    port = gw.port("mqtt")
    sub = Client(port, f"{uniq}-s", V311).connect()
    sub.sub(f"{uniq}/o", qos=1)
    pub = Client(port, f"{uniq}-p", V311).connect()
    infos = [pub.c.publish(f"{uniq}/o", str(i).encode(), qos=1) for i in range(200)]
    for i in infos:
        i.wait_for_publish(10)
    got = sub.get_n(200, timeout=20)
    assert [int(m.payload) for m in got] == list(range(200))
    sub.close(); pub.close()


def test_wildcards_overlap_and_sys(gw, uniq):
    port = gw.port("mqtt")
    sub = Client(port, f"{uniq}-s", V311).connect()
    sub.sub(f"{uniq}/+/temp", qos=0)
    sub.sub(f"{uniq}/#", qos=1)
    sub.sub("#", qos=0)
    pub = Client(port, f"{uniq}-p", V311).connect()
    pub.pub(f"{uniq}/room1/temp", b"21", qos=1)
    pub.pub("$SYS/" + uniq, b"sys", qos=1)
    m = sub.get()
    # Overlapping subscriptions: one copy, at the highest granted QoS.
    assert (m.topic, m.payload, m.qos) == (f"{uniq}/room1/temp", b"21", 1)
    sub.nothing()
    dollar = Client(port, f"{uniq}-d", V311).connect()
    dollar.sub("$SYS/#", qos=1)
    pub.pub("$SYS/" + uniq, b"sys2", qos=1)
    assert dollar.get().payload == b"sys2"
    for c in (sub, pub, dollar):
        c.close()


def test_topic_with_special_characters(gw, uniq):
    port = gw.port("mqtt")
    sub = Client(port, f"{uniq}-s", V5).connect()
    topics = [f"{uniq}/a.b", f"{uniq}/a_b", f"{uniq}/a b/é", f"{uniq}//x", f"{uniq}/a_2E"]
    sub.sub(f"{uniq}/#", qos=1)
    pub = Client(port, f"{uniq}-p", V5).connect()
    for t in topics:
        pub.pub(t, t.encode(), qos=1)
    got = sub.get_n(len(topics))
    assert [m.topic for m in got] == topics
    assert [m.payload.decode() for m in got] == topics
    sub.close(); pub.close()


@pytest.mark.parametrize("name,ver", [("v3.1.1", V311), ("v5", V5)])
def test_retained_set_replace_clear(gw, uniq, name, ver):
    port = gw.port("mqtt")
    pub = Client(port, f"{uniq}-p", ver).connect()
    pub.pub(f"{uniq}/r", b"first", qos=1, retain=True)
    pub.pub(f"{uniq}/r", b"second", qos=1, retain=True)
    s1 = Client(port, f"{uniq}-s1", ver).connect()
    s1.sub(f"{uniq}/#", qos=1)
    m = s1.get()
    assert (m.payload, m.retain) == (b"second", True)
    s1.nothing()
    # A live message on an existing subscription is not flagged retained.
    pub.pub(f"{uniq}/r", b"third", qos=1, retain=True)
    m = s1.get()
    assert (m.payload, m.retain) == (b"third", False)
    pub.pub(f"{uniq}/r", b"", qos=1, retain=True)
    assert s1.get().payload == b""
    s2 = Client(port, f"{uniq}-s2", ver).connect()
    s2.sub(f"{uniq}/#", qos=1)
    s2.nothing()
    for c in (pub, s1, s2):
        c.close()


def test_v5_retain_handling_and_retain_as_published(gw, uniq):
    port = gw.port("mqtt")
    pub = Client(port, f"{uniq}-p", V5).connect()
    pub.pub(f"{uniq}/r", b"kept", qos=1, retain=True)
    c = Client(port, f"{uniq}-s", V5).connect()
    c.sub(f"{uniq}/r", qos=1, rh=2)  # never send retained
    c.nothing()
    c.sub(f"{uniq}/r", qos=1, rh=1)  # only if new: it is not
    c.nothing()
    d = Client(port, f"{uniq}-d", V5).connect()
    d.sub(f"{uniq}/r", qos=1, rh=1, rap=True)
    assert d.get().retain is True
    pub.pub(f"{uniq}/r", b"live", qos=1, retain=True)
    m = d.get()
    assert (m.payload, m.retain) == (b"live", True)  # retain as published
    for x in (pub, c, d):
        x.close()


def test_no_local(gw, uniq):
    port = gw.port("mqtt")
    c = Client(port, f"{uniq}-c", V5).connect()
    c.sub(f"{uniq}/n", qos=1, no_local=True)
    c.pub(f"{uniq}/n", b"mine", qos=1)
    c.nothing()
    other = Client(port, f"{uniq}-o", V5).connect()
    other.pub(f"{uniq}/n", b"theirs", qos=1)
    assert c.get().payload == b"theirs"
    c.close(); other.close()


def test_v5_properties_round_trip(gw, uniq):
    port = gw.port("mqtt")
    sub = Client(port, f"{uniq}-s", V5).connect()
    sub.sub(f"{uniq}/p", qos=1, sub_id=42)
    pub = Client(port, f"{uniq}-p", V5).connect()
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("k1", "v1"), ("k2", "v2"), ("k1", "again")]
    props.ContentType = "application/json"
    props.ResponseTopic = f"{uniq}/reply"
    props.CorrelationData = b"\x00\x01corr"
    props.PayloadFormatIndicator = 1
    props.MessageExpiryInterval = 3600
    pub.pub(f"{uniq}/p", b'{"a":1}', qos=1, props=props)
    m = sub.get()
    p = m.properties
    assert p.UserProperty == [("k1", "v1"), ("k2", "v2"), ("k1", "again")]
    assert p.ContentType == "application/json"
    assert p.ResponseTopic == f"{uniq}/reply"
    assert p.CorrelationData == b"\x00\x01corr"
    assert p.PayloadFormatIndicator == 1
    assert 3590 <= p.MessageExpiryInterval <= 3600
    assert p.SubscriptionIdentifier == [42]
    sub.close(); pub.close()


def test_v5_message_expiry_drops_stale_messages(gw, uniq):
    port = gw.port("mqtt")
    s = Client(port, f"{uniq}-s", V5, clean=True, session_expiry=300).connect()
    s.sub(f"{uniq}/e", qos=1)
    s.close()
    pub = Client(port, f"{uniq}-p", V5).connect()
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = 1
    pub.pub(f"{uniq}/e", b"short", qos=1, props=props)
    pub.pub(f"{uniq}/e", b"long", qos=1)
    time.sleep(2.2)
    s = Client(port, f"{uniq}-s", V5, clean=False, session_expiry=300).connect()
    assert s.get().payload == b"long"
    s.nothing()
    s.close(); pub.close()


def test_v5_topic_alias_from_client(gw, uniq):
    port = gw.port("mqtt")
    sub = Client(port, f"{uniq}-s", V5).connect()
    sub.sub(f"{uniq}/alias", qos=1)
    pub = Client(port, f"{uniq}-p", V5).connect()
    props = Properties(PacketTypes.PUBLISH)
    props.TopicAlias = 3
    pub.pub(f"{uniq}/alias", b"one", qos=1, props=props)
    props2 = Properties(PacketTypes.PUBLISH)
    props2.TopicAlias = 3
    pub.pub("", b"two", qos=1, props=props2)
    got = sub.get_n(2)
    assert [(m.topic, m.payload) for m in got] == [(f"{uniq}/alias", b"one"), (f"{uniq}/alias", b"two")]
    sub.close(); pub.close()


def v5_publish_topic_and_alias(body: bytes, qos: int):
    """(topic, topic alias or None, payload) of a v5 PUBLISH body."""
    n = struct.unpack(">H", body[:2])[0]
    topic, i = body[2:2 + n].decode(), 2 + n
    if qos:
        i += 2
    plen, mul = 0, 1
    while True:
        b = body[i]
        i += 1
        plen += (b & 0x7F) * mul
        mul *= 128
        if not b & 0x80:
            break
    props, payload = body[i:i + plen], body[i + plen:]
    alias, j = None, 0
    sizes = {0x01: 1, 0x02: 4, 0x23: 2}
    while j < len(props):
        pid = props[j]
        j += 1
        if pid == 0x23:
            alias = struct.unpack(">H", props[j:j + 2])[0]
        if pid in (0x03, 0x08, 0x09):
            j += 2 + struct.unpack(">H", props[j:j + 2])[0]
        elif pid == 0x26:
            for _ in range(2):
                j += 2 + struct.unpack(">H", props[j:j + 2])[0]
        elif pid == 0x0B:
            while props[j] & 0x80:
                j += 1
            j += 1
        else:
            j += sizes[pid]
    return topic, alias, payload


def test_v5_topic_aliases_to_a_client_that_accepts_them(gw, uniq):
    """A client whose CONNECT says Topic Alias Maximum 2 gets the first two
    topics with aliases 1 and 2 (the first PUBLISH of each carries the
    topic, later ones an empty topic and the alias); a third topic goes
    without one. A client that did not ask gets full topics only."""
    port = gw.port("mqtt")
    raws = []
    for cid, props in ((f"{uniq}-a", b"\x22\x00\x02"), (f"{uniq}-n", b"")):
        r = Raw(port)
        r.send(connect_packet(cid, level=5, props=props))
        reader = PacketReader(r)
        kind, _, _ = reader.next()
        assert kind == 2
        r.send(packet(0x82, b"\x00\x01" + b"\x00" + utf8(f"{uniq}/#") + b"\x00"))
        kind, _, body = reader.next()
        assert kind == 9 and body[-1] == 0, "SUBACK, QoS 0 granted"
        raws.append((r, reader))
    pub = Client(port, f"{uniq}-p", V5).connect()
    topics = ["t1", "t2", "t1", "t3", "t2", "t3", "t1"]
    for i, t in enumerate(topics):
        pub.pub(f"{uniq}/{t}", f"m{i}".encode(), qos=1)
    seen = []
    for r, reader in raws:
        got = []
        for _ in topics:
            kind, flags, body = reader.next()
            assert kind == 3
            got.append(v5_publish_topic_and_alias(body, (flags >> 1) & 3))
        seen.append(got)
        r.close()
    a, n = (f"{uniq}/t1", f"{uniq}/t2", f"{uniq}/t3"), None
    assert seen[0] == [
        (a[0], 1, b"m0"), (a[1], 2, b"m1"), ("", 1, b"m2"), (a[2], n, b"m3"),
        ("", 2, b"m4"), (a[2], n, b"m5"), ("", 1, b"m6")]
    assert seen[1] == [(f"{uniq}/{t}", None, f"m{i}".encode()) for i, t in enumerate(topics)]
    pub.close()


@pytest.mark.parametrize("level", [4, 5])
def test_packets_sent_with_connect_in_one_write_are_answered(gw, uniq, level):
    """A client may send SUBSCRIBE (and more) right behind CONNECT without
    waiting for the CONNACK; when they arrive in one read, the SUBSCRIBE
    is answered at once (it used to wait for the next packet)."""
    r = Raw(gw.port("mqtt"))
    props = b"\x00" if level == 5 else b""
    sub = packet(0x82, b"\x00\x07" + props + utf8(f"{uniq}/x") + b"\x01")
    r.send(connect_packet(f"{uniq}-c", level=level) + sub + packet(0xC0, b""))
    reader = PacketReader(r)
    kinds = []
    for _ in range(3):
        got = reader.next(timeout=5)
        assert got is not None, f"only {kinds} answered"
        kinds.append(got[0])
    assert kinds == [2, 9, 13], "CONNACK, SUBACK, PINGRESP"
    r.close()


def test_v5_connack_properties_and_assigned_client_id(gw):
    c = Client(gw.port("mqtt"), "", V5).connect()
    p = c.connack[2]
    assert p.AssignedClientIdentifier
    assert p.ReceiveMaximum >= 1
    assert p.MaximumPacketSize > 0
    c.close()


def test_v311_empty_client_id(gw):
    from mqttc import Raw, connect_packet
    ok = Client(gw.port("mqtt"), "", V311, clean=True).connect()
    ok.close()
    # paho refuses to send this one itself: a persistent session needs an id.
    r = Raw(gw.port("mqtt"))
    r.send(connect_packet("", clean=False))
    assert r.recv_some() == b"\x20\x02\x00\x02"  # identifier rejected
    assert r.closed_within(3)


@pytest.mark.parametrize("name,ver,kw", [
    ("v3.1.1", V311, {"clean": False}),
    ("v5", V5, {"clean": False, "session_expiry": 600}),
])
def test_persistent_session_queues_while_offline(gw, uniq, name, ver, kw):
    port = gw.port("mqtt")
    s = Client(port, f"{uniq}-s", ver, **kw).connect()
    s.sub(f"{uniq}/q/#", qos=1)
    s.sub(f"{uniq}/two", qos=2)
    s.close()
    pub = Client(port, f"{uniq}-p", ver).connect()
    for i in range(5):
        pub.pub(f"{uniq}/q/{i % 2}", f"m{i}".encode(), qos=1)
    pub.pub(f"{uniq}/two", b"exactly-once", qos=2)
    s = Client(port, f"{uniq}-s", ver, **kw).connect()
    assert s.session_present
    got = s.get_n(6)
    assert sorted(m.payload for m in got) == sorted([f"m{i}".encode() for i in range(5)] + [b"exactly-once"])
    for t in (0, 1):  # in order per topic
        assert [m.payload for m in got if m.topic == f"{uniq}/q/{t}"] == [
            f"m{i}".encode() for i in range(5) if i % 2 == t]
    s.nothing()
    s.close()
    # A clean start discards the session.
    c = Client(port, f"{uniq}-s", ver, clean=True).connect()
    assert not c.session_present
    c.close()
    pub.pub(f"{uniq}/q/1", b"after-clean", qos=1)
    s = Client(port, f"{uniq}-s", ver, **kw).connect()
    assert not s.session_present
    s.nothing()
    s.close(); pub.close()


def test_unacknowledged_qos1_is_redelivered_with_dup(gw, uniq):
    """A client that receives a QoS 1 message but drops the connection
    before PUBACK gets it again, flagged DUP, on reconnect."""
    import socket
    from mqttc import Raw, connect_packet, packet, s as mstr
    port = gw.port("mqtt")
    r = Raw(port)
    r.send(connect_packet(f"{uniq}-raw", clean=False))
    assert r.recv_some()[:2] == b"\x20\x02"
    r.send(packet(0x82, b"\x00\x01" + mstr(f"{uniq}/d") + b"\x01"))
    assert r.recv_some()[0] == 0x90
    pub = Client(port, f"{uniq}-p", V311).connect()
    pub.pub(f"{uniq}/d", b"hello", qos=1)
    first = r.recv_some()
    assert first[0] & 0xF0 == 0x30 and first[0] & 0x08 == 0
    r.close()  # no PUBACK
    time.sleep(0.3)
    r = Raw(port)
    r.send(connect_packet(f"{uniq}-raw", clean=False))
    data = b""
    deadline = time.monotonic() + 5
    while len(data) < 4 + len(first) and time.monotonic() < deadline:
        data += r.recv_some()
    assert data[:4] == b"\x20\x02\x01\x00"  # session present
    again = data[4:]
    assert again[0] & 0x08, "DUP flag must be set on redelivery"
    assert again[1:] == first[1:], "same packet id, topic and payload"
    r.close(); pub.close()


def test_will_on_abnormal_disconnect_only(gw, uniq):
    port = gw.port("mqtt")
    watcher = Client(port, f"{uniq}-w", V311).connect()
    watcher.sub(f"{uniq}/will", qos=1)
    c = Client(port, f"{uniq}-c", V311, will=(f"{uniq}/will", b"gone", 1)).connect()
    c.close()  # normal DISCONNECT: no will
    watcher.nothing(1.0)
    c = Client(port, f"{uniq}-c2", V311, will=(f"{uniq}/will", b"gone2", 1)).connect()
    c.drop()
    m = watcher.get()
    assert (m.topic, m.payload) == (f"{uniq}/will", b"gone2")
    watcher.close()


def test_v5_will_delay_cancelled_by_reconnect(gw, uniq):
    port = gw.port("mqtt")
    watcher = Client(port, f"{uniq}-w", V5).connect()
    watcher.sub(f"{uniq}/will", qos=1)
    wp = Properties(PacketTypes.WILLMESSAGE)
    wp.WillDelayInterval = 2
    c = Client(port, f"{uniq}-c", V5, clean=False, session_expiry=60,
               will=(f"{uniq}/will", b"delayed", 1, False, wp)).connect()
    c.drop()
    watcher.nothing(0.8)
    c = Client(port, f"{uniq}-c", V5, clean=False, session_expiry=60).connect()
    watcher.nothing(2.5)  # reconnected within the delay: no will
    # Now drop with a delayed will and stay away: published after the delay.
    wp2 = Properties(PacketTypes.WILLMESSAGE)
    wp2.WillDelayInterval = 1
    c.close()
    c = Client(port, f"{uniq}-c", V5, clean=False, session_expiry=60,
               will=(f"{uniq}/will", b"late", 1, False, wp2)).connect()
    c.drop()
    t0 = time.monotonic()
    m = watcher.get(timeout=5)
    assert m.payload == b"late"
    assert time.monotonic() - t0 >= 0.7
    watcher.close()


def watched_delayed_will(port, uniq, delay, payload):
    """A watcher subscribed to `<uniq>/will`, and a persistent MQTT 5
    client `<uniq>-c` (session expiry 300 s, no automatic reconnects) whose
    will on that topic has a delay of `delay` seconds."""
    watcher = Client(port, f"{uniq}-w", V5).connect()
    watcher.sub(f"{uniq}/will", qos=1)
    wp = Properties(PacketTypes.WILLMESSAGE)
    wp.WillDelayInterval = delay
    c = Client(port, f"{uniq}-c", V5, clean=False, session_expiry=300,
               will=(f"{uniq}/will", payload, 1, False, wp)).connect()
    c.c.reconnect_delay_set(60, 120)
    return watcher, c


@pytest.mark.parametrize("online", [False, True], ids=["offline", "online"])
def test_v5_clean_start_ends_the_session_and_sends_a_delayed_will(gw, uniq, online):
    """MQTT 5 3.1.2.5: a delayed will is published when its delay passes or
    the session ends, whichever is first. A clean-start connection with the
    same client id ends the session: the will (delay 30 s) arrives at once,
    whether the first connection had already dropped or was still online
    (taken over)."""
    port = gw.port("mqtt")
    watcher, c = watched_delayed_will(port, uniq, 30, b"ended")
    if not online:
        c.drop()
        watcher.nothing(0.8)  # delay 30 s: not yet
    t0 = time.monotonic()
    c2 = Client(port, f"{uniq}-c", V5, clean=True).connect()
    m = watcher.get(timeout=5)
    assert m.payload == b"ended"
    assert time.monotonic() - t0 < 5
    watcher.nothing(0.5)  # once
    c2.close(); watcher.close()


def test_v5_resuming_the_session_cancels_a_delayed_will_of_a_taken_over_connection(gw, uniq):
    """Taken over by a connection that resumes the session (clean start 0):
    the session goes on, so the old connection's delayed will is not sent."""
    port = gw.port("mqtt")
    watcher, c = watched_delayed_will(port, uniq, 2, b"not-sent")
    c2 = Client(port, f"{uniq}-c", V5, clean=False, session_expiry=300).connect()
    assert c.disconnected.wait(5)
    watcher.nothing(3.0)
    c2.close(); watcher.close()


@pytest.mark.parametrize("name,ver", [("v3.1.1", V311), ("v5", V5)])
def test_session_takeover(gw, uniq, name, ver):
    port = gw.port("mqtt")
    a = Client(port, f"{uniq}-same", ver).connect()
    a.c.reconnect_delay_set(60, 120)  # keep paho from reconnecting in a loop
    b = Client(port, f"{uniq}-same", ver).connect()
    assert a.disconnected.wait(5), "the first connection must be closed"
    if ver == V5:
        assert a.disconnect_reason.value == 0x8E
    b.sub(f"{uniq}/t", qos=1)
    b.pub(f"{uniq}/t", b"still works", qos=1)
    assert b.get().payload == b"still works"
    a.c.loop_stop(); b.close()


def test_unsubscribe(gw, uniq):
    port = gw.port("mqtt")
    c = Client(port, f"{uniq}-c", V5).connect()
    c.sub(f"{uniq}/u", qos=1)
    rc = c.unsub(f"{uniq}/u")
    assert [r.value for r in rc] == [0]
    rc = c.unsub(f"{uniq}/never")
    assert [r.value for r in rc] == [0x11]
    c.pub(f"{uniq}/u", b"x", qos=1)
    c.nothing()
    c.close()


def test_v5_maximum_packet_size_of_client(gw, uniq):
    port = gw.port("mqtt")
    small = Client(port, f"{uniq}-s", V5, max_packet_size=200).connect()
    small.sub(f"{uniq}/m", qos=1)
    pub = Client(port, f"{uniq}-p", V5).connect()
    pub.pub(f"{uniq}/m", b"x" * 1000, qos=1)
    pub.pub(f"{uniq}/m", b"small", qos=1)
    assert small.get().payload == b"small"
    small.nothing()
    small.close(); pub.close()


def test_receive_maximum_flow_control(gw, uniq):
    """With Receive Maximum 2 and a slow consumer, all messages still arrive in order."""
    port = gw.port("mqtt")
    s = Client(port, f"{uniq}-s", V5, receive_maximum=2).connect()
    s.sub(f"{uniq}/f", qos=2)
    pub = Client(port, f"{uniq}-p", V5).connect()
    for i in range(30):
        pub.c.publish(f"{uniq}/f", str(i).encode(), qos=1)
    got = s.get_n(30, timeout=20)
    assert [int(m.payload) for m in got] == list(range(30))
    s.close(); pub.close()


def test_invalid_filters_get_failure_codes(gw, uniq):
    """paho validates filters itself, so these are sent raw."""
    from mqttc import Raw, connect_packet, packet, s as mstr
    port = gw.port("mqtt")
    r5 = Raw(port)
    r5.send(connect_packet(f"{uniq}-5", level=5))
    connack = r5.recv_some()
    assert connack[0] == 0x20 and connack[3] == 0  # v5 CONNACK, success
    # SUBSCRIBE id 7, no properties: one bad filter, one good one.
    r5.send(packet(0x82, b"\x00\x07\x00" + mstr(f"{uniq}/a#") + b"\x01" + mstr(f"{uniq}/ok") + b"\x01"))
    suback = r5.recv_some()
    assert suback == b"\x90\x05\x00\x07\x00\x8f\x01"
    r3 = Raw(port)
    r3.send(connect_packet(f"{uniq}-3"))
    assert r3.recv_some() == b"\x20\x02\x00\x00"
    r3.send(packet(0x82, b"\x00\x08" + mstr(f"{uniq}/+x") + b"\x00"))
    assert r3.recv_some() == b"\x90\x03\x00\x08\x80"
    r5.close(); r3.close()


def test_pipelined_publishes_are_acked_in_order_and_stored_in_order(gw, uniq):
    """A client that writes many PUBLISH packets at once (no waiting for
    each PUBACK) gets every PUBACK / PUBREC, in the order it sent the
    packets (MQTT 4.6), and a subscriber receives the messages in that
    order. A QoS 2 PUBLISH resent with DUP before its PUBREC is stored
    once."""
    from mqttc import Raw, connect_packet, packet, s as mstr
    port = gw.port("mqtt")
    sub = Client(port, f"{uniq}-s", V311).connect()
    sub.sub(f"{uniq}/pipe", qos=1)
    r = Raw(port)
    r.send(connect_packet(f"{uniq}-raw"))
    assert r.recv_some()[:4] == b"\x20\x02\x00\x00"
    n = 60  # below our Receive Maximum for QoS 2
    burst = b""
    expected = []
    for i in range(1, n + 1):
        qos = 1 if i % 3 else 2
        body = mstr(f"{uniq}/pipe") + struct.pack(">H", i) + f"p{i}".encode()
        burst += packet(0x30 | (qos << 1), body)
        if i == 30:  # the same QoS 2 packet again, DUP set, before any answer
            burst += packet(0x38 | (qos << 1), body)
        expected.append((0x40 if qos == 1 else 0x50, i))
    r.send(burst)
    got = []
    data = b""
    deadline = time.monotonic() + 10
    quiet_until = None
    while time.monotonic() < (quiet_until or deadline):
        try:
            data += r.recv_some(0.5)
        except TimeoutError:
            pass
        while len(data) >= 4:
            got.append((data[0], struct.unpack(">H", data[2:4])[0]))
            data = data[4:]
        if len(got) >= n and quiet_until is None:
            quiet_until = time.monotonic() + 0.5  # anything extra?
    # The resent packet may get a second PUBREC if its first copy was
    # already stored when it was read (the spec allows both).
    if got.count((0x50, 30)) == 2:
        got.reverse(); got.remove((0x50, 30)); got.reverse()
    assert got == expected, "one answer per packet id, in the order sent"
    msgs = sub.get_n(n)
    assert [m.payload for m in msgs] == [f"p{i}".encode() for i in range(1, n + 1)]
    sub.nothing()  # the resent QoS 2 PUBLISH is not stored twice
    r.close(); sub.close()


@pytest.mark.parametrize("name,ver", [("v3.1.1", V311), ("v5", V5)], ids=["v3.1.1", "v5"])
def test_publishing_goes_on_after_the_topic_is_deleted(gw, uniq, name, ver):
    """A connection publishes to a topic, the topic is deleted through the
    admin API, and the same connection publishes to it again: the publish
    is acknowledged and stored in the topic created anew (the gateway keeps
    the ledger of the last topic a connection published to, and must not
    hold on to the deleted one)."""
    port = gw.port("mqtt")
    path = f"/admin/v1/topics/public/default/{uniq}.d"

    def end_offset():
        status, body = gw.admin("GET", path + "/stats")
        assert status == 200, body
        return json.loads(body)["partitions"][0]["end_offset"]

    pub = Client(port, f"{uniq}-p", ver).connect()
    pub.pub(f"{uniq}/d", b"before", qos=1)
    assert end_offset() == 1
    status, body = gw.admin("DELETE", path)
    assert status in (200, 204), body
    assert gw.admin("GET", path + "/stats")[0] == 404
    for i in range(3):
        pub.pub(f"{uniq}/d", f"after-{i}".encode(), qos=1)
    assert end_offset() == 3
    # A subscriber of the new topic gets what is published from now on.
    sub = Client(port, f"{uniq}-s", ver).connect()
    sub.sub(f"{uniq}/d", qos=1)
    pub.pub(f"{uniq}/d", b"later", qos=1)
    assert sub.get().payload == b"later"
    sub.close(); pub.close()


@pytest.mark.parametrize("name,ver,opts,share", [
    ("v3.1.1-clean", V311, {"clean": True}, ""),
    ("v5-persistent", V5, {"clean": False, "session_expiry": 300}, ""),
    ("v5-shared", V5, {"clean": True}, "$share/g/"),
], ids=["v3.1.1-clean", "v5-persistent", "v5-shared"])
def test_a_subscriber_goes_on_receiving_after_its_topic_is_deleted(gw, uniq, name, ver, opts, share):
    """A subscriber stays connected while its topic is deleted through the
    admin API and created again by the next publish: it receives what is
    published to the new topic, without subscribing again (it must not
    keep reading the deleted ledger). Also for a shared subscription,
    whose group reads the topic."""
    port = gw.port("mqtt")
    path = f"/admin/v1/topics/public/default/{uniq}.r"
    sub = Client(port, f"{uniq}-s", ver, **opts).connect()
    sub.sub(f"{share}{uniq}/r", qos=1)
    pub = Client(port, f"{uniq}-p", ver).connect()
    pub.pub(f"{uniq}/r", b"before", qos=1)
    assert sub.get().payload == b"before"
    status, body = gw.admin("DELETE", path)
    assert status in (200, 204), body
    for i in range(3):
        pub.pub(f"{uniq}/r", f"after-{i}".encode(), qos=1)
    assert [m.payload for m in sub.get_n(3)] == [b"after-0", b"after-1", b"after-2"]
    sub.nothing()
    sub.close(); pub.close()


def _metric(gw, line_prefix: str) -> float:
    status, body = gw.admin("GET", "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.split()[-1])
    return 0.0


def test_metrics_count_published_and_delivered_messages(gw, uniq):
    """/metrics counts what an operator watches: MQTT messages published and
    delivered by QoS, and the ledger appends behind them."""
    pub_q1 = 'manifold_mqtt_messages_published_total{qos="1"}'
    del_q1 = 'manifold_mqtt_messages_delivered_total{qos="1"}'
    appends = "manifold_ledger_appends_total"
    before = [_metric(gw, m) for m in (pub_q1, del_q1, appends)]
    port = gw.port("mqtt")
    sub = Client(port, f"{uniq}-s", V311).connect()
    sub.sub(f"{uniq}/m", qos=1)
    pub = Client(port, f"{uniq}-p", V311).connect()
    for i in range(3):
        pub.pub(f"{uniq}/m", str(i).encode(), qos=1)
    assert [m.payload for m in sub.get_n(3)] == [b"0", b"1", b"2"]
    after = [_metric(gw, m) for m in (pub_q1, del_q1, appends)]
    assert after[0] - before[0] >= 3, (before, after)
    assert after[1] - before[1] >= 3, (before, after)
    assert after[2] - before[2] >= 3, (before, after)
    sub.close(); pub.close()
