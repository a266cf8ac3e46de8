"""AMQP <-> Kafka <-> MQTT on one gateway. An AMQP queue `interop.q` is the
broker topic `interop.q` (see mapping::amqp): Kafka consumers of that topic
read what AMQP routes to the queue, and what Kafka producers append to it is
delivered to the queue's AMQP consumers. MQTT sees the same topic as
`interop/q` (see mapping::mqtt)."""

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
    sub.loop_start()
    sub.subscribe("interop/m", qos=1)
    time.sleep(0.5)
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
