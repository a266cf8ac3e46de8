"""AMQP <-> Kafka <-> MQTT on one gateway. An AMQP queue `interop.q` is the
broker topic `interop.q` (see mapping::amqp): Kafka consumers of that topic
read what AMQP routes to the queue, and what Kafka producers append to it is
delivered to the queue's AMQP consumers. MQTT sees the same topic as
`interop/q` (see mapping::mqtt)."""

import threading
import time
import uuid

import pika
import pytest

from conftest import params


@pytest.fixture
def multi(gateway_factory):
    try:
        return gateway_factory(["amqp", "kafka", "mqtt"])
    except RuntimeError as e:
        pytest.skip(f"the binary under test does not serve kafka+mqtt+amqp: {str(e)[:200]}")


def amqp_get(ch, q, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m, p, b = ch.basic_get(q, auto_ack=True)
        if m is not None:
            return m, p, b
        ch.connection.sleep(0.05)
    raise AssertionError(f"nothing on {q} after {timeout}s")


def test_amqp_to_kafka_and_back(multi):
    kafka = pytest.importorskip("kafka")
    c = pika.BlockingConnection(params(multi.port("amqp")))
    ch = c.channel()
    ch.confirm_delivery()
    ch.exchange_declare("interop-x", "topic", durable=True)
    ch.queue_declare("interop.q", durable=True)
    ch.queue_bind("interop.q", "interop-x", "orders.#")
    ch.basic_publish("interop-x", "orders.eu", b"from-amqp",
                     pika.BasicProperties(content_type="text/plain", headers={"tenant": "acme"},
                                          delivery_mode=2, message_id="m-1"))
    bootstrap = f"127.0.0.1:{multi.port('kafka')}"
    kc = kafka.KafkaConsumer("interop.q", bootstrap_servers=bootstrap, group_id="g-" + uuid.uuid4().hex,
                             auto_offset_reset="earliest", consumer_timeout_ms=15000)
    recs = []
    for r in kc:
        recs.append(r)
        break
    kc.close()
    assert recs, "the Kafka consumer saw nothing"
    r = recs[0]
    h = dict(r.headers)
    assert r.value == b"from-amqp" and r.key == b"orders.eu"
    assert h["tenant"] == b"acme"
    assert h["amqp.exchange"] == b"interop-x"
    assert h["amqp.content-type"] == b"text/plain"
    assert h["amqp.message-id"] == b"m-1"
    # Kafka -> AMQP: a record produced to the queue's topic is delivered.
    kp = kafka.KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    kp.send("interop.q", key=b"k1", value=b"from-kafka", headers=[("trace", b"t-1")]).get(10)
    kp.close()
    got = [amqp_get(ch, "interop.q") for _ in range(2)]
    assert got[0][2] == b"from-amqp" and got[0][1].headers == {"tenant": "acme"}
    m, p, b = got[1]
    assert b == b"from-kafka"
    assert m.routing_key == "k1" and m.exchange == ""
    assert p.headers == {"trace": "t-1"}
    c.close()


def test_mqtt_to_amqp_and_back(multi):
    mqtt = pytest.importorskip("paho.mqtt.client")
    c = pika.BlockingConnection(params(multi.port("amqp")))
    ch = c.channel()
    ch.confirm_delivery()
    ch.queue_declare("interop.m", durable=True)
    got = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="amqp-interop-sub")
    sub.on_message = lambda cl, u, msg: got.append((msg.topic, msg.payload))
    sub.connect("127.0.0.1", multi.port("mqtt"))
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.loop_start()
    sub.subscribe("interop/m", qos=1)
    assert subscribed.wait(10), "no SUBACK"
    ch.basic_publish("", "interop.m", b"amqp-to-mqtt")
    deadline = time.time() + 10
    while not got and time.time() < deadline:
        time.sleep(0.05)
    assert got == [("interop/m", b"amqp-to-mqtt")]
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="amqp-interop-pub")
    pub.connect("127.0.0.1", multi.port("mqtt"))
    pub.loop_start()
    pub.publish("interop/m", b"mqtt-to-amqp", qos=1).wait_for_publish(10)
    pub.loop_stop()
    sub.loop_stop()
    bodies = [amqp_get(ch, "interop.m")[2] for _ in range(2)]
    assert bodies == [b"amqp-to-mqtt", b"mqtt-to-amqp"]
    c.close()


# ---- AMQP properties <-> MQTT 5 properties (mapping::interop) ----

class V5:
    """A paho MQTT 5 client with its loop in a thread and a queue of what it
    received."""

    def __init__(self, port, client_id, clean=True, session_expiry=None):
        import queue as _queue
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
        self.mqtt, self.PacketTypes, self.Properties = mqtt, PacketTypes, Properties
        self.port, self.clean, self.session_expiry = port, clean, session_expiry
        self.messages = _queue.Queue()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5)
        self.c.on_message = lambda cl, u, m: self.messages.put(m)
        self.subacks = _queue.Queue()
        self.c.on_subscribe = lambda cl, u, mid, rcs, props: self.subacks.put(rcs)
        self.connacks = _queue.Queue()
        self.c.on_connect = lambda cl, u, flags, rc, props: self.connacks.put(rc)

    def connect(self):
        props = None
        if self.session_expiry is not None:
            props = self.Properties(self.PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry
        self.c.connect("127.0.0.1", self.port, clean_start=self.clean, properties=props)
        self.c.loop_start()
        # Wait for the CONNACK: a packet queued while paho's loop thread is
        # still connecting can sit unsent (seen once: a SUBSCRIBE whose
        # SUBACK never came, with nothing in the gateway's log).
        rc = self.connacks.get(timeout=10)
        assert not rc.is_failure, rc
        return self

    def sub(self, topic):
        self.c.subscribe(topic, qos=1)
        rcs = self.subacks.get(timeout=10)
        assert [rc.value for rc in rcs] == [1], rcs

    def pub(self, topic, payload, **props):
        p = self.Properties(self.PacketTypes.PUBLISH)
        for k, v in props.items():
            setattr(p, k, v)
        self.c.publish(topic, payload, qos=1, properties=p).wait_for_publish(10)

    def get(self, timeout=10):
        return self.messages.get(timeout=timeout)

    def nothing(self, wait=1.0):
        import queue as _queue
        try:
            m = self.messages.get(timeout=wait)
        except _queue.Empty:
            return
        raise AssertionError(f"unexpected message {m.topic} {m.payload!r}")

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def confirming_channel(multi):
    """A pika connection to the gateway and a channel with publisher
    confirms on; skips without paho (these tests need an MQTT 5 client)."""
    pytest.importorskip("paho.mqtt.client")
    c = pika.BlockingConnection(params(multi.port("amqp")))
    ch = c.channel()
    ch.confirm_delivery()
    return c, ch


def props_of(m):
    """The v5 properties of a received message, as a dict of what is set."""
    p = m.properties
    return {k: getattr(p, k) for k in ("ContentType", "CorrelationData", "ResponseTopic",
                                       "MessageExpiryInterval", "UserProperty")
            if hasattr(p, k)}


def test_amqp_properties_reach_mqtt5_subscriber(multi):
    """content_type -> Content Type, correlation_id -> Correlation Data,
    reply_to `a.b` -> Response Topic `a/b`, expiration (ms) -> Message Expiry
    Interval (s, what is left)."""
    c, ch = confirming_channel(multi)
    ch.queue_declare("interop.props-a", durable=True)
    sub = V5(multi.port("mqtt"), "props-a-sub").connect()
    sub.sub("interop/props-a")
    ch.basic_publish("", "interop.props-a", b'{"q":1}',
                     pika.BasicProperties(content_type="application/json", correlation_id="corr-1",
                                          reply_to="rpc.replies.c1", expiration="60000",
                                          headers={"tenant": "acme"}))
    m = sub.get()
    assert (m.topic, m.payload) == ("interop/props-a", b'{"q":1}')
    assert props_of(m) == {
        "ContentType": "application/json",
        "CorrelationData": b"corr-1",
        "ResponseTopic": "rpc/replies/c1",
        "MessageExpiryInterval": 60,
        # The properties are not repeated as user properties.
        "UserProperty": [("amqp.exchange", ""), ("amqp.routing-key", "interop.props-a"),
                         ("tenant", "acme")],
    }
    sub.close()
    c.close()


def test_mqtt5_properties_reach_amqp_consumer(multi):
    """Content Type -> content_type, Correlation Data -> correlation_id (or
    the `x-correlation-id` header when it is not a short string), Response
    Topic `a/b` -> reply_to `a.b`, Message Expiry Interval (s) -> expiration
    (ms, as published)."""
    pytest.importorskip("paho.mqtt.client")
    c = pika.BlockingConnection(params(multi.port("amqp")))
    ch = c.channel()
    ch.queue_declare("interop.props-m", durable=True)
    pub = V5(multi.port("mqtt"), "props-m-pub").connect()
    pub.pub("interop/props-m", b"one", ContentType="text/plain", CorrelationData=b"corr-2",
            ResponseTopic="clients/c1/reply", MessageExpiryInterval=60)
    pub.pub("interop/props-m", b"two", CorrelationData=b"\x00\xffbin")
    pub.close()
    m, p, b = amqp_get(ch, "interop.props-m")
    assert b == b"one"
    assert (p.content_type, p.correlation_id, p.reply_to, p.expiration) == \
        ("text/plain", "corr-2", "clients.c1.reply", "60000")
    # The MQTT headers that became properties are not in the table.
    assert p.headers == {"mqtt.topic": "interop/props-m", "mqtt.qos": "1",
                         "mqtt.client-id": "props-m-pub"}
    m, p, b = amqp_get(ch, "interop.props-m")
    assert b == b"two"
    assert p.correlation_id is None and p.content_type is None and p.expiration is None
    assert p.headers["x-correlation-id"] == b"\x00\xffbin"
    assert "mqtt.correlation-data" not in p.headers
    c.close()


def test_expired_messages_are_delivered_by_neither_protocol(multi):
    """An AMQP expiration expires the message for an MQTT session, and an MQTT
    Message Expiry Interval expires it in an AMQP queue."""
    port = multi.port("mqtt")
    c, ch = confirming_channel(multi)
    # AMQP -> an offline persistent MQTT session.
    ch.queue_declare("interop.exp-a", durable=True)
    s = V5(port, "exp-a-sub", clean=True, session_expiry=300).connect()
    s.sub("interop/exp-a")
    s.close()
    ch.basic_publish("", "interop.exp-a", b"short", pika.BasicProperties(expiration="500"))
    ch.basic_publish("", "interop.exp-a", b"long", pika.BasicProperties(expiration="60000"))
    # MQTT -> an AMQP queue.
    ch.queue_declare("interop.exp-m", durable=True)
    pub = V5(port, "exp-m-pub").connect()
    pub.pub("interop/exp-m", b"short", MessageExpiryInterval=1)
    pub.pub("interop/exp-m", b"long", MessageExpiryInterval=60)
    pub.close()
    time.sleep(2.2)
    s = V5(port, "exp-a-sub", clean=False, session_expiry=300).connect()
    m = s.get()
    assert m.payload == b"long"
    # 60 s, published a little over 2.2 s ago: what is left, rounded up.
    assert m.properties.MessageExpiryInterval in (57, 58)
    s.nothing()
    s.close()
    m, p, b = amqp_get(ch, "interop.exp-m")
    assert b == b"long" and p.expiration == "60000"
    assert ch.basic_get("interop.exp-m", auto_ack=True)[0] is None
    c.close()


def test_request_reply_across_protocols(multi):
    """An AMQP requester and an MQTT responder, then an MQTT requester and an
    AMQP responder, each answering to the reply address and with the
    correlation it was given."""
    port = multi.port("mqtt")
    c, ch = confirming_channel(multi)
    # AMQP requester -> MQTT responder -> the AMQP reply queue.
    ch.queue_declare("interop.rpc-req", durable=True)
    ch.queue_declare("interop.rpc-replies", durable=True)
    responder = V5(port, "rpc-responder").connect()
    responder.sub("interop/rpc-req")
    ch.basic_publish("", "interop.rpc-req", b"ping",
                     pika.BasicProperties(reply_to="interop.rpc-replies", correlation_id="r-1"))
    req = responder.get()
    assert req.properties.ResponseTopic == "interop/rpc-replies"
    responder.pub(req.properties.ResponseTopic, b"pong",
                  CorrelationData=req.properties.CorrelationData)
    m, p, b = amqp_get(ch, "interop.rpc-replies")
    assert (b, p.correlation_id) == (b"pong", "r-1")
    responder.close()
    # MQTT requester (binary correlation data) -> AMQP responder -> the MQTT
    # response topic. The default exchange routes to queues only, so the
    # reply address needs a queue of its name for the AMQP reply.
    ch.queue_declare("interop.rpc-in", durable=True)
    ch.queue_declare("interop.rpc-out.c2", durable=True)
    requester = V5(port, "rpc-requester").connect()
    requester.sub("interop/rpc-out/c2")
    requester.pub("interop/rpc-in", b"ping", ResponseTopic="interop/rpc-out/c2",
                  CorrelationData=b"\x00\xffbin")
    m, p, b = amqp_get(ch, "interop.rpc-in")
    assert p.reply_to == "interop.rpc-out.c2"
    # Not UTF-8: not a correlation-id, a header (a byte array when pika
    # sends it back).
    assert p.correlation_id is None
    corr = p.headers["x-correlation-id"]
    assert corr == b"\x00\xffbin"
    ch.basic_publish("", p.reply_to, b"pong",
                     pika.BasicProperties(headers={"x-correlation-id": corr}))
    r = requester.get()
    assert (r.topic, r.payload) == ("interop/rpc-out/c2", b"pong")
    assert r.properties.CorrelationData == b"\x00\xffbin"
    requester.close()
    c.close()
