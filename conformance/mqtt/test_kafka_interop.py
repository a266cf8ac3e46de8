"""MQTT <-> Kafka on one gateway: an MQTT topic `a/b` is the Kafka topic
`a.b` (mapping::mqtt), user properties are Kafka headers and back."""

import time
import uuid

import pytest

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqttc import V5, Client

kafka = pytest.importorskip("kafka")


@pytest.fixture
def both(gateway_factory):
    try:
        return gateway_factory(["mqtt", "kafka"])
    except RuntimeError as e:
        msg = str(e)
        if "unknown protocol `kafka`" in msg or "unknown key `kafka`" in msg:
            pytest.skip("this binary was built without the Kafka handler")
        raise


def test_mqtt_to_kafka_and_back(both):
    gw = both
    tag = uuid.uuid4().hex[:8]
    mqtt_topic = f"interop/{tag}/temp"
    kafka_topic = f"interop.{tag}.temp"
    pub = Client(gw.port("mqtt"), f"pub-{tag}", V5).connect()
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("unit", "celsius")]
    pub.pub(mqtt_topic, b"21.5", qos=1, props=props)

    consumer = kafka.KafkaConsumer(
        kafka_topic, bootstrap_servers=f"127.0.0.1:{gw.port('kafka')}",
        auto_offset_reset="earliest", consumer_timeout_ms=15000, group_id=None)
    records = []
    deadline = time.monotonic() + 20
    while not records and time.monotonic() < deadline:
        for r in consumer:
            records.append(r)
            break
    consumer.close()
    assert records, "Kafka consumer got nothing from the MQTT topic"
    r = records[0]
    assert r.value == b"21.5"
    headers = dict(r.headers)
    assert headers.get("unit") == b"celsius"
    assert headers.get("mqtt.topic") == mqtt_topic.encode()

    # Kafka -> MQTT: a record produced to a Kafka topic reaches a wildcard subscriber.
    sub = Client(gw.port("mqtt"), f"sub-{tag}", V5).connect()
    sub.sub(f"fromkafka/{tag}/#", qos=1)
    producer = kafka.KafkaProducer(bootstrap_servers=f"127.0.0.1:{gw.port('kafka')}")
    producer.send(f"fromkafka.{tag}.orders", b"order-1", headers=[("source", b"kafka")]).get(timeout=15)
    producer.flush(); producer.close()
    m = sub.get(timeout=15)
    assert (m.topic, m.payload) == (f"fromkafka/{tag}/orders", b"order-1")
    assert ("source", "kafka") in (m.properties.UserProperty or [])
    sub.close(); pub.close()
