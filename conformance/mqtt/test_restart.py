"""Durability: persistent sessions and retained messages survive SIGKILL."""

from mqttc import V5, V311, Client


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
