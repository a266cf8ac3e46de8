"""Durability: persistent sessions and retained messages survive SIGKILL."""

import struct
import time

from mqttc import V5, V311, Client, PacketReader, Raw, connect_packet, packet, s


def test_persistent_session_survives_sigkill(gateway_factory):
    gw = gateway_factory(["mqtt"])
    port = gw.port("mqtt")
    s = Client(port, "restart-sub", V311, clean=False).connect()
    assert s.sub("restart/orders/#", qos=1) == [1]
    s.close()
    pub = Client(port, "restart-pub", V311).connect()
    sent = [f"order-{i}".encode() for i in range(20)]
    for i, p in enumerate(sent):
        pub.pub(f"restart/orders/{i % 3}", p, qos=1)
    pub.pub("restart/kept", b"retained-value", qos=1, retain=True)
    pub.close()
    gw.kill()
    gw.restart()
    port = gw.port("mqtt")
    s = Client(port, "restart-sub", V311, clean=False).connect()
    assert s.session_present
    got = s.get_n(len(sent), timeout=15)
    assert sorted(m.payload for m in got) == sorted(sent), "each message exactly once"
    for t in range(3):
        assert [m.payload for m in got if m.topic == f"restart/orders/{t}"] == [
            p for i, p in enumerate(sent) if i % 3 == t]
    s.nothing(1.5)
    # Acknowledged messages are not delivered again after a graceful restart.
    s.close()
    gw.stop()
    gw.start()
    port = gw.port("mqtt")
    s = Client(port, "restart-sub", V311, clean=False).connect()
    assert s.session_present
    s.nothing(1.5)
    # Retained messages survived too.
    r = Client(port, "restart-r", V5).connect()
    r.sub("restart/kept", qos=1)
    m = r.get()
    assert (m.payload, m.retain) == (b"retained-value", True)
    s.close(); r.close()


def test_v5_session_expiry_ends_session(gateway_factory):
    gw = gateway_factory(["mqtt"])
    port = gw.port("mqtt")
    s = Client(port, "expiring", V5, clean=False, session_expiry=1).connect()
    s.sub("exp/t", qos=1)
    s.close()
    import time
    time.sleep(2.5)
    pub = Client(port, "exp-pub", V5).connect()
    pub.pub("exp/t", b"late", qos=1)
    s = Client(port, "expiring", V5, clean=False, session_expiry=1).connect()
    assert not s.session_present
    s.nothing()
    s.close(); pub.close()


def test_owed_pubrel_survives_sigkill(gateway_factory):
    """QoS 2 to a persistent 3.1.1 session: the client has PUBREC'd a
    message and the gateway has sent PUBREL, but the client's PUBCOMP never
    came. After SIGKILL and restart the session resumes with that PUBREL
    (MQTT-4.4.0-1), and the message itself is not sent again: paho, like
    many clients, hands a QoS 2 message to the application only at PUBREL,
    so a lost PUBREL would lose the message."""
    gw = gateway_factory(["mqtt"])
    port = gw.port("mqtt")
    sub = Raw(port)
    sub.send(connect_packet("rel-sub", clean=False))
    r = PacketReader(sub)
    assert r.next()[0] == 2  # CONNACK
    sub.send(packet(0x82, struct.pack(">H", 1) + s("rel/t") + b"\x02"))
    assert r.next()[0] == 9  # SUBACK
    pub = Client(port, "rel-pub", V311).connect()
    pub.pub("rel/t", b"exactly-once", qos=2)
    t, flags, body = r.next()
    assert t == 3 and (flags >> 1) & 3 == 2, (t, flags)
    tlen = struct.unpack(">H", body[:2])[0]
    pkid = struct.unpack(">H", body[2 + tlen:4 + tlen])[0]
    assert body[4 + tlen:] == b"exactly-once"
    sub.send(packet(0x50, struct.pack(">H", pkid)))  # PUBREC
    t, flags, body = r.next()
    assert (t, flags, body) == (6, 2, struct.pack(">H", pkid))  # PUBREL
    time.sleep(1.5)  # no PUBCOMP; background cursor flushes run
    pub.close()
    gw.kill()
    gw.restart()
    port = gw.port("mqtt")
    sub2 = Raw(port)
    sub2.send(connect_packet("rel-sub", clean=False))
    r2 = PacketReader(sub2)
    t, _, body = r2.next()
    assert t == 2 and body[0] & 1 == 1, "session present"
    seen = []
    while (p := r2.next(timeout=2.0)) is not None:
        seen.append(p)
    assert (6, 2, struct.pack(">H", pkid)) in seen, seen
    assert not [p for p in seen if p[0] == 3], f"the message was sent again: {seen}"
    sub2.send(packet(0x70, struct.pack(">H", pkid)))  # PUBCOMP
    sub2.close(); sub.close()


def test_v5_qos2_session_survives_sigkill(gateway_factory):
    """MQTT 5, QoS 2: a persistent session (session expiry 300 s) is offline
    while 10 QoS 2 messages are published; after SIGKILL and restart it gets
    each exactly once, at QoS 2, in order; a graceful restart after that
    delivers nothing again."""
    gw = gateway_factory(["mqtt"])
    port = gw.port("mqtt")
    s5 = Client(port, "q2-sub", V5, clean=False, session_expiry=300).connect()
    assert s5.sub("q2/t", qos=2) == [2]
    s5.close()
    pub = Client(port, "q2-pub", V5).connect()
    sent = [f"m{i}".encode() for i in range(10)]
    for p in sent:
        pub.pub("q2/t", p, qos=2)
    pub.close()
    gw.kill()
    gw.restart()
    s5 = Client(gw.port("mqtt"), "q2-sub", V5, clean=False, session_expiry=300).connect()
    assert s5.session_present
    got = s5.get_n(len(sent), timeout=15)
    assert [m.payload for m in got] == sent
    assert {m.qos for m in got} == {2}
    s5.nothing(1.5)
    s5.close()
    gw.stop()
    gw.start()
    s5 = Client(gw.port("mqtt"), "q2-sub", V5, clean=False, session_expiry=300).connect()
    assert s5.session_present
    s5.nothing(1.5)
    s5.close()


def dropped_with_delayed_will(port, uniq, delay, payload):
    """A persistent MQTT 5 watcher subscribed at QoS 1 to `<uniq>/will`, and
    a persistent client `<uniq>-c` that drops (no DISCONNECT) with a will
    on that topic delayed `delay` seconds; returns the watcher. Neither
    reconnects behind the test's back."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    w = Client(port, f"{uniq}-w", V5, clean=False, session_expiry=300).connect()
    w.c.reconnect_delay_set(60, 120)
    assert w.sub(f"{uniq}/will", qos=1) == [1]
    wp = Properties(PacketTypes.WILLMESSAGE)
    wp.WillDelayInterval = delay
    c = Client(port, f"{uniq}-c", V5, clean=False, session_expiry=300,
               will=(f"{uniq}/will", payload, 1, False, wp)).connect()
    c.c.reconnect_delay_set(60, 120)
    c.drop()
    return w


def nothing_after_graceful_restart(gw, watcher_id, wait):
    """Restarts the gateway gracefully; the persistent MQTT 5 watcher
    `watcher_id` then receives nothing for `wait` seconds (a will already
    published is not published again)."""
    gw.stop()
    gw.start()
    w = Client(gw.port("mqtt"), watcher_id, V5, clean=False, session_expiry=300).connect()
    w.nothing(wait)
    w.close()


def test_delayed_will_survives_sigkill(gateway_factory):
    """A persistent MQTT 5 client drops with a will delayed 3 s; the gateway
    is SIGKILLed within the delay. After the restart the will is published
    once, when its delay ends (counted from the drop, not from the restart),
    and a later graceful restart does not publish it again."""
    gw = gateway_factory(["mqtt"])
    uniq = "dwill"
    w = dropped_with_delayed_will(gw.port("mqtt"), uniq, 3, b"late-will")
    dropped = time.monotonic()
    w.nothing(0.7)
    w.drop()  # offline across the crash: its session queues the will
    gw.kill()
    gw.restart()
    w = Client(gw.port("mqtt"), f"{uniq}-w", V5, clean=False, session_expiry=300).connect()
    assert w.session_present
    m = w.get(timeout=10)
    assert (m.topic, m.payload) == (f"{uniq}/will", b"late-will")
    assert time.monotonic() - dropped >= 2.5, "published before its delay"
    w.nothing(1.0)
    w.close()
    nothing_after_graceful_restart(gw, f"{uniq}-w", 2.0)


def test_resumed_session_has_no_will_left_after_sigkill(gateway_factory):
    """A delayed will cancelled by resuming the session stays cancelled
    after SIGKILL and restart: the stored session no longer holds it."""
    gw = gateway_factory(["mqtt"])
    uniq = "rwill"
    port = gw.port("mqtt")
    w = dropped_with_delayed_will(port, uniq, 2, b"cancelled")
    w.nothing(0.5)
    c = Client(port, f"{uniq}-c", V5, clean=False, session_expiry=300).connect()
    assert c.session_present
    c.c.reconnect_delay_set(60, 120)
    w.nothing(0.5)
    w.drop()
    gw.kill()
    gw.restart()
    w = Client(gw.port("mqtt"), f"{uniq}-w", V5, clean=False, session_expiry=300).connect()
    assert w.session_present
    w.nothing(3.5)  # past the delay: nothing
    w.close()


def will_watcher(port, uniq):
    """A persistent MQTT 5 watcher subscribed at QoS 1 to `<uniq>/#`."""
    w = Client(port, f"{uniq}-w", V5, clean=False, session_expiry=300).connect()
    w.c.reconnect_delay_set(60, 120)
    assert w.sub(f"{uniq}/#", qos=1) == [1]
    return w


def online_with_will(port, client_id, topic, payload, clean=True):
    """A raw MQTT 3.1.1 connection with a QoS 1 will, CONNACKed."""
    r = Raw(port)
    r.send(connect_packet(client_id, clean=clean, will=(topic, payload, 1)))
    kind, _, body = PacketReader(r).next()
    assert (kind, body[1]) == (2, 0), "CONNACK accepted"
    return r


def test_wills_of_connections_online_at_sigkill_are_published_after_restart(gateway_factory):
    """SIGKILL ends every connection without a DISCONNECT, so the restarted
    gateway publishes the wills of the connections that were online: a
    clean MQTT 3.1.1 session's, a persistent 3.1.1 session's and a
    persistent MQTT 5 session's with a will delay of 2 s (counted from the
    restart). Each once: a later graceful restart publishes none again. A
    connection that said DISCONNECT before the crash has no will to send,
    and neither has one whose session was resumed after the restart before
    its will delay ended."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    gw = gateway_factory(["mqtt"])
    uniq = "owill"
    port = gw.port("mqtt")
    w = will_watcher(port, uniq)
    clean = online_with_will(port, f"{uniq}-clean", f"{uniq}/clean", b"clean-gone")
    kept = online_with_will(port, f"{uniq}-kept", f"{uniq}/kept", b"kept-gone", clean=False)
    polite = online_with_will(port, f"{uniq}-polite", f"{uniq}/polite", b"never")
    polite.send(b"\xe0\x00")  # DISCONNECT: the will is discarded
    assert polite.closed_within(5)
    wp = Properties(PacketTypes.WILLMESSAGE)
    wp.WillDelayInterval = 2
    v5 = Client(port, f"{uniq}-v5", V5, clean=False, session_expiry=300,
                will=(f"{uniq}/v5", b"v5-gone", 1, False, wp)).connect()
    v5.c.reconnect_delay_set(60, 120)
    back = Client(port, f"{uniq}-back", V5, clean=False, session_expiry=300,
                  will=(f"{uniq}/back", b"resumed", 1, False, wp)).connect()
    back.c.reconnect_delay_set(60, 120)
    w.nothing(0.5)  # nothing while they are online
    w.drop()
    gw.kill()
    for c in (clean, kept):
        c.close()
    v5.drop()
    back.drop()
    gw.restart()
    port = gw.port("mqtt")
    restarted = time.monotonic()
    back = Client(port, f"{uniq}-back", V5, clean=False, session_expiry=300).connect()
    assert back.session_present  # resumed within the delay: its will is cancelled
    w = Client(port, f"{uniq}-w", V5, clean=False, session_expiry=300).connect()
    assert w.session_present
    got = {m.topic: m.payload for m in w.get_n(3, timeout=10)}
    assert got == {f"{uniq}/clean": b"clean-gone", f"{uniq}/kept": b"kept-gone",
                   f"{uniq}/v5": b"v5-gone"}
    assert time.monotonic() - restarted >= 1.5, "the delayed will came before its delay"
    w.nothing(2.0)  # the DISCONNECTed one and the resumed one: nothing
    w.close()
    back.close()
    nothing_after_graceful_restart(gw, f"{uniq}-w", 2.5)


def test_incoming_qos2_is_stored_once_across_sigkill(gateway_factory):
    """MQTT 4.3.3: a QoS 2 PUBLISH that got its PUBREC is stored once, even
    when the client resends it (DUP) after the gateway was SIGKILLed before
    the PUBREL: the packet id's state is stored with the persistent session
    before the PUBREC goes out. Its PUBREL then frees the id for good: a
    new message with the same id after another SIGKILL is stored."""
    gw = gateway_factory(["mqtt"])
    sub = Client(gw.port("mqtt"), "q2in-sub", V311, clean=False).connect()
    sub.c.reconnect_delay_set(60, 120)
    assert sub.sub("q2in/t", qos=2) == [2]
    sub.drop()

    def publisher():
        raw = Raw(gw.port("mqtt"))
        raw.send(connect_packet("q2in-pub", clean=False))
        r = PacketReader(raw)
        t, _, body = r.next()
        assert t == 2 and body[1] == 0, (t, body)
        return raw, r, body[0] & 1 == 1

    def publish(raw, r, payload, dup=False):
        raw.send(packet(0x34 | (0x08 if dup else 0), s("q2in/t") + struct.pack(">H", 7) + payload))
        assert r.next() == (5, 0, struct.pack(">H", 7)), "PUBREC"

    def release(raw, r):
        raw.send(packet(0x62, struct.pack(">H", 7)))
        assert r.next() == (7, 0, struct.pack(">H", 7)), "PUBCOMP"

    raw, r, _ = publisher()
    publish(raw, r, b"once")  # PUBREC'd; the client "lost" it and has no PUBREL
    gw.kill()
    gw.restart()
    raw, r, present = publisher()
    assert present
    publish(raw, r, b"once", dup=True)  # resent: not stored again
    release(raw, r)
    publish(raw, r, b"second")  # the id is free again
    release(raw, r)
    raw.close()
    time.sleep(0.3)
    gw.kill()
    gw.restart()
    raw, r, _ = publisher()
    publish(raw, r, b"third")  # a new message with id 7: stored
    release(raw, r)
    raw.close()
    sub = Client(gw.port("mqtt"), "q2in-sub", V311, clean=False).connect()
    got = sub.get_n(3, timeout=10)
    assert [m.payload for m in got] == [b"once", b"second", b"third"]
    sub.nothing(1.5)
    sub.close()
