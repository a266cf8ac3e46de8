"""Durability: every record acknowledged with acks=all survives a SIGKILL of
the gateway with the same offset, key, value and headers."""

import time

from confluent_kafka import Consumer, Producer, TopicPartition


def test_sigkill_keeps_every_acked_record(kafka_gw, bootstrap, topic_name):
    acked = {}
    errors = []

    def cb(err, m):
        if err is None:
            # The delivery report carries no headers: rebuild what was sent.
            i = int(m.key().split(b"-")[1])
            acked[m.offset()] = (m.key(), m.value(), [("n", str(i).encode())])
        else:
            errors.append(err)

    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 2, "enable.idempotence": True})
    for i in range(2000):
        p.produce(topic_name, key=b"key-%d" % i, value=b"value-%d" % i * 3, headers=[("n", str(i).encode())], on_delivery=cb)
        if i % 100 == 0:
            p.poll(0)
    assert p.flush(30) == 0
    assert not errors
    assert sorted(acked) == list(range(2000))

    kafka_gw.kill()
    kafka_gw.restart()

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "after-kill", "enable.auto.commit": False})
    c.assign([TopicPartition(topic_name, 0, 0)])
    got = {}
    deadline = time.time() + 30
    while len(got) < len(acked) and time.time() < deadline:
        m = c.poll(0.5)
        if m is None or m.error():
            continue
        got[m.offset()] = (m.key(), m.value(), m.headers())
    c.close()
    assert got == acked
