"""kafka-python (pure Python client) against the real gateway."""

import importlib.util
import time
import uuid

import pytest

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic


def test_produce_consume_gzip_and_plain(bootstrap, topic_name):
    for codec in (None, "gzip"):
        p = KafkaProducer(bootstrap_servers=bootstrap, compression_type=codec, acks="all")
        futs = [
            p.send(topic_name, key=b"k%d" % i, value=b"v%d" % i, headers=[("codec", str(codec).encode())])
            for i in range(100)
        ]
        p.flush(30)
        offsets = [f.get(10).offset for f in futs]
        assert offsets == sorted(offsets)
        p.close()
    c = KafkaConsumer(
        topic_name,
        bootstrap_servers=bootstrap,
        group_id="kp-" + topic_name,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=10000,
    )
    got = []
    for m in c:
        got.append(m)
        if len(got) == 200:
            break
    c.commit()
    c.close()
    assert [m.offset for m in got] == list(range(200))
    assert got[0].key == b"k0" and got[0].value == b"v0" and got[0].headers == [("codec", b"None")]
    assert got[150].headers == [("codec", b"gzip")]


def test_group_commit_and_resume(bootstrap, topic_name):
    p = KafkaProducer(bootstrap_servers=bootstrap)
    for i in range(50):
        p.send(topic_name, value=b"m%d" % i)
    p.flush(30)
    p.close()
    group = "resume-" + topic_name
    c = KafkaConsumer(topic_name, bootstrap_servers=bootstrap, group_id=group,
                      auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=10000)
    got = []
    for m in c:
        got.append(m)
        if len(got) == 20:
            break
    c.commit()
    c.close()
    c = KafkaConsumer(topic_name, bootstrap_servers=bootstrap, group_id=group,
                      auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=10000)
    m = next(iter(c))
    c.close()
    assert m.offset == 20 and m.value == b"m20"


def test_admin_client(bootstrap):
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    name = "kpa-" + uuid.uuid4().hex[:8]
    admin.create_topics([NewTopic(name, num_partitions=2, replication_factor=1,
                                  topic_configs={"retention.ms": "60000"})])
    assert name in admin.list_topics()
    desc = admin.describe_topics([name])
    assert len(desc[0]["partitions"]) == 2
    res = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
    text = repr(res)
    assert "retention.ms" in text and "60000" in text
    admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name, configs={"retention.ms": "120000"})])
    res = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
    assert "120000" in repr(res)
    admin.delete_topics([name])
    deadline = time.time() + 10
    while name in admin.list_topics() and time.time() < deadline:
        time.sleep(0.2)
    assert name not in admin.list_topics()
    admin.close()


def test_offsets_for_times_and_end_offsets(bootstrap, topic_name):
    p = KafkaProducer(bootstrap_servers=bootstrap)
    base = 1_700_000_000_000
    for i in range(10):
        p.send(topic_name, value=b"t%d" % i, timestamp_ms=base + i * 1000)
    p.flush(30)
    p.close()
    c = KafkaConsumer(bootstrap_servers=bootstrap)
    tp = TopicPartition(topic_name, 0)
    assert c.end_offsets([tp])[tp] == 10
    assert c.beginning_offsets([tp])[tp] == 0
    r = c.offsets_for_times({tp: base + 4500})[tp]
    assert r.offset == 5 and r.timestamp == base + 5000
    c.close()


def test_acks_zero_fire_and_forget(bootstrap, topic_name):
    p = KafkaProducer(bootstrap_servers=bootstrap, acks=0)
    for i in range(100):
        p.send(topic_name, value=b"f%d" % i)
    p.flush(30)
    p.close()
    c = KafkaConsumer(topic_name, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                      consumer_timeout_ms=10000)
    got = [m.value for m in c]
    c.close()
    assert got == [b"f%d" % i for i in range(100)]


CODEC_MODULES = {"snappy": "snappy", "lz4": "lz4", "zstd": "zstandard"}


@pytest.mark.parametrize("codec", ["snappy", "lz4", "zstd"])
def test_python_codecs(bootstrap, topic_name, codec):
    """kafka-python writes snappy in the xerial framing (librdkafka writes
    raw snappy): both must be accepted and read back."""
    if importlib.util.find_spec(CODEC_MODULES[codec]) is None:
        pytest.skip(f"python module {CODEC_MODULES[codec]} (kafka-python's {codec} codec) is not installed")
    p = KafkaProducer(bootstrap_servers=bootstrap, compression_type=codec, acks="all", linger_ms=5)
    for i in range(300):
        p.send(topic_name, key=b"k%d" % i, value=(b"payload-%d-" % i) * 20, headers=[("i", b"%d" % i)])
    p.flush(30)
    p.close()
    c = KafkaConsumer(topic_name, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                      consumer_timeout_ms=5000)
    got = []
    for m in c:
        got.append(m)
        if len(got) == 300:
            break
    c.close()
    assert [m.offset for m in got] == list(range(300))
    assert all(m.value == (b"payload-%d-" % i) * 20 and m.headers == [("i", b"%d" % i)] for i, m in enumerate(got))
