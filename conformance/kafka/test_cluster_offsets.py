"""DescribeCluster and committed offsets outside the log, with librdkafka."""

import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def test_describe_cluster(bootstrap):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    d = admin.describe_cluster(request_timeout=15).result(15)
    assert d.cluster_id == "manifold"
    assert [n.id for n in d.nodes] == [0]
    assert d.controller.id == 0
    host, port = bootstrap.rsplit(":", 1)
    assert (d.nodes[0].host, d.nodes[0].port) == (host, int(port))


def test_commits_below_log_start_and_past_end_are_kept_as_sent(bootstrap):
    # Kafka stores a committed offset exactly as given; a consumer resuming
    # there gets OFFSET_OUT_OF_RANGE and applies auto.offset.reset.
    topic = "off-" + uuid.uuid4().hex[:8]
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(15)
    p = Producer({"bootstrap.servers": bootstrap})
    for i in range(10):
        p.produce(topic, value=b"v%d" % i)
    assert p.flush(30) == 0
    for f in admin.delete_records([TopicPartition(topic, 0, 5)]).values():
        assert f.result(15).low_watermark == 5
    group = "g-" + uuid.uuid4().hex[:6]
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                  "enable.auto.commit": False, "auto.offset.reset": "latest"})
    try:
        for committed in (2, 1000, 7):
            c.commit(offsets=[TopicPartition(topic, 0, committed)], asynchronous=False)
            [tp] = c.committed([TopicPartition(topic, 0)], timeout=15)
            assert tp.offset == committed
        c.commit(offsets=[TopicPartition(topic, 0, 2)], asynchronous=False)
    finally:
        c.close()
    # Resuming at 2 (below the log start of 5): reset to latest, so the
    # consumer sees only what is produced after it started.
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                  "enable.auto.commit": False, "auto.offset.reset": "latest"})
    try:
        c.assign([TopicPartition(topic, 0)])
        # The reset happens at the first fetch: wait for the position to land.
        for _ in range(60):
            c.poll(0.5)
            if c.position([TopicPartition(topic, 0)])[0].offset == 10:
                break
        p.produce(topic, value=b"after")
        assert p.flush(10) == 0
        got = None
        for _ in range(60):
            m = c.poll(0.5)
            if m is not None and not m.error():
                got = m
                break
        assert got is not None and got.value() == b"after" and got.offset() == 10
    finally:
        c.close()
