"""Leader epochs (KIP-320): OffsetForLeaderEpoch answers as a Kafka leader's
epoch cache does, at every advertised version, and every place that shows
a partition's leader epoch (Metadata, fetched batches, ListOffsets,
committed offsets) shows the same one. librdkafka (2.16) validates a
position that carries an epoch with OffsetForLeaderEpoch before fetching
from it when it is seek()ed to, and when it learns a partition's leader
epoch (first metadata, or a leader change) while fetching from one."""

import re
import struct
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from kraw import TAGS, Raw, array, str_

FETCH, LIST_OFFSETS, METADATA, OFFSET_FOR_LEADER_EPOCH = 1, 2, 3, 23
NONE, UNKNOWN_TOPIC_OR_PARTITION = 0, 3
FENCED_LEADER_EPOCH, UNKNOWN_LEADER_EPOCH = 74, 75
EPOCH = 0  # the one leader epoch of every partition


def ofle_request(version, topics, replica_id=-1):
    """topics: [(name, [(partition, current_leader_epoch, leader_epoch)])]"""
    flex = version >= 4
    tags = TAGS if flex else b""
    body = struct.pack(">i", replica_id) if version >= 3 else b""
    items = []
    for name, parts in topics:
        ps = [struct.pack(">iii", p, cur, ep) + tags for p, cur, ep in parts]
        items.append(str_(name, flex) + array(ps, flex) + tags)
    return body + array(items, flex) + tags


def ofle(raw, version, topics, replica_id=-1):
    """-> [(topic, partition, error, leader_epoch, end_offset)] in order."""
    flex = version >= 4
    r = raw.call(OFFSET_FOR_LEADER_EPOCH, version,
                 ofle_request(version, topics, replica_id), flexible=flex)
    r.i32()  # throttle_time_ms
    out = []
    for _ in range(r.array_len(flex)):
        topic = r.string(flex)
        for _ in range(r.array_len(flex)):
            err, p, epoch, end = r.i16(), r.i32(), r.i32(), r.i64()
            if flex:
                r.tags()
            out.append((topic, p, err, epoch, end))
        if flex:
            r.tags()
    if flex:
        r.tags()
    assert r.done()
    return out


def metadata_v7_epochs(raw, topic):
    """-> {partition: (error, leader, leader_epoch)} from Metadata v7."""
    r = raw.call(METADATA, 7, array([str_(topic)]) + b"\x00")  # no auto-create
    r.i32()  # throttle
    for _ in range(r.array_len()):  # brokers
        r.i32(), r.string(), r.i32(), r.string()
    r.string()  # cluster id
    r.i32()  # controller
    out = {}
    for _ in range(r.array_len()):
        r.i16(), r.string()  # error, name
        r.pos += 1  # is_internal
        for _ in range(r.array_len()):
            err, p, leader, epoch = r.i16(), r.i32(), r.i32(), r.i32()
            for _ in range(3):  # replicas, isr, offline
                n = r.array_len()
                r.pos += 4 * n
            out[p] = (err, leader, epoch)
    assert r.done()
    return out


def requests_served(gw, api):
    st, body = gw.admin("GET", "/metrics")
    assert st == 200
    m = re.search(r'^manifold_kafka_requests_total\{[^}]*api="%s"[^}]*\} (\d+)' % api,
                  body.decode(), re.M)
    return int(m.group(1)) if m else 0


def make_topic(bootstrap, partitions=1, records=10, trim_to=None):
    topic = "ep-" + uuid.uuid4().hex[:8]
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(15)
    p = Producer({"bootstrap.servers": bootstrap})
    for i in range(records):
        p.produce(topic, value=b"v%d" % i, partition=0)
    assert p.flush(30) == 0
    if trim_to is not None:
        for f in admin.delete_records([TopicPartition(topic, 0, trim_to)]).values():
            assert f.result(15).low_watermark == trim_to
    return topic, admin, p


def test_offset_for_leader_epoch_answers_as_kafkas_epoch_cache(kafka_gw, bootstrap):
    # Partition 0 holds [4, 10); partition 1 is empty.
    topic, _, _ = make_topic(bootstrap, partitions=2, trim_to=4)
    raw = Raw(kafka_gw.port("kafka"))
    asked = [
        (0, -1, EPOCH),         # no current epoch given: the log end offset
        (0, EPOCH, EPOCH),      # the current epoch: the log end offset
        (1, EPOCH, EPOCH),      # an empty partition ends at 0
        (0, -1, -1),            # undefined epoch: undefined, no error
        (0, EPOCH, EPOCH + 1),  # newer than any epoch: undefined, no error
        (0, -1, -2),            # older than any: itself, ending at the log start
        (0, EPOCH + 1, EPOCH),  # the client knows a newer leader than this broker
        (0, -3, EPOCH),         # the client's leader epoch is older: fenced
        (7, -1, EPOCH),         # no such partition
    ]
    want = [
        (topic, 0, NONE, EPOCH, 10),
        (topic, 0, NONE, EPOCH, 10),
        (topic, 1, NONE, EPOCH, 0),
        (topic, 0, NONE, -1, -1),
        (topic, 0, NONE, -1, -1),
        (topic, 0, NONE, -2, 4),
        (topic, 0, UNKNOWN_LEADER_EPOCH, -1, -1),
        (topic, 0, FENCED_LEADER_EPOCH, -1, -1),
        (topic, 7, UNKNOWN_TOPIC_OR_PARTITION, -1, -1),
    ]
    missing = "nope-" + uuid.uuid4().hex[:6]
    for version in (2, 3, 4):
        # replica_id (v3+) does not change the answer: a consumer (-1), a
        # debugging client (-2) and a follower id are answered alike.
        for replica_id in ((-1, -2, 0) if version >= 3 else (-1,)):
            got = ofle(raw, version, [(topic, asked), (missing, [(0, -1, EPOCH)]),
                                      ("bad name!", [(0, -1, EPOCH)])], replica_id)
            assert got == want + [(missing, 0, UNKNOWN_TOPIC_OR_PARTITION, -1, -1),
                                  ("bad name!", 0, UNKNOWN_TOPIC_OR_PARTITION, -1, -1)], \
                (version, replica_id)
    # The end offset of the current epoch follows appends.
    p = Producer({"bootstrap.servers": bootstrap})
    p.produce(topic, value=b"more", partition=0)
    assert p.flush(10) == 0
    assert ofle(raw, 4, [(topic, [(0, EPOCH, EPOCH)])]) == [(topic, 0, NONE, EPOCH, 11)]


def test_every_view_of_the_leader_epoch_agrees(kafka_gw, bootstrap):
    topic, admin, _ = make_topic(bootstrap, records=3)
    raw = Raw(kafka_gw.port("kafka"))
    assert metadata_v7_epochs(raw, topic) == {0: (NONE, 0, EPOCH)}
    latest = admin.list_offsets({TopicPartition(topic, 0): OffsetSpec.latest()})
    info = latest[TopicPartition(topic, 0)].result(15)
    assert (info.offset, info.leader_epoch) == (3, EPOCH)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "g-" + uuid.uuid4().hex[:6],
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        got = []
        deadline = time.time() + 30
        while len(got) < 3 and time.time() < deadline:
            m = c.poll(0.5)
            if m is not None and not m.error():
                got.append(m)
        assert [m.leader_epoch() for m in got] == [EPOCH] * 3
        # The commit carries the consumed records' epoch, and OffsetFetch
        # gives it back, as Kafka stores it.
        c.commit(asynchronous=False)
        [tp] = c.committed([TopicPartition(topic, 0)], timeout=15)
        assert (tp.offset, tp.leader_epoch) == (3, EPOCH)
    finally:
        c.close()


def _consume_one(c, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = c.poll(0.5)
        if m is not None and not m.error():
            return m
    return None


def _wait_validated(gw, before, timeout=30):
    deadline = time.time() + timeout
    while requests_served(gw, "offset_for_leader_epoch") <= before:
        assert time.time() < deadline, "librdkafka sent no OffsetForLeaderEpoch"
        time.sleep(0.2)


def test_librdkafka_validates_a_committed_position_with_its_epoch(kafka_gw, bootstrap):
    topic, _, _ = make_topic(bootstrap)
    group = "g-" + uuid.uuid4().hex[:6]
    conf = {"bootstrap.servers": bootstrap, "group.id": group,
            "enable.auto.commit": False, "auto.offset.reset": "earliest"}
    c = Consumer(conf)
    try:
        c.subscribe([topic])
        for want in range(5):
            m = _consume_one(c)
            assert m is not None and m.offset() == want
        c.commit(asynchronous=False)  # the stored position: 5, epoch 0
    finally:
        c.close()
    c = Consumer(conf)
    try:
        c.subscribe([topic])
        for want in range(5, 8):
            m = _consume_one(c)
            assert m is not None and (m.offset(), m.leader_epoch()) == (want, EPOCH)
        # Back to the committed position, which carries its leader epoch:
        # librdkafka checks it against the leader before fetching there.
        [committed] = c.committed([TopicPartition(topic, 0)], timeout=15)
        assert (committed.offset, committed.leader_epoch) == (5, EPOCH)
        before = requests_served(kafka_gw, "offset_for_leader_epoch")
        c.seek(committed)
        _wait_validated(kafka_gw, before)
        m = _consume_one(c)
        assert m is not None and (m.offset(), m.value()) == (5, b"v5")
    finally:
        c.close()


def test_librdkafka_assign_and_seek_with_a_leader_epoch(kafka_gw, bootstrap):
    topic, _, p = make_topic(bootstrap)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "g-" + uuid.uuid4().hex[:6],
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        # A position in the current epoch, inside the log: validated (when
        # the partition's leader epoch is first learned), and kept.
        before = requests_served(kafka_gw, "offset_for_leader_epoch")
        c.assign([TopicPartition(topic, 0, 3, leader_epoch=EPOCH)])
        m = _consume_one(c)
        assert m is not None and m.offset() == 3
        assert requests_served(kafka_gw, "offset_for_leader_epoch") > before

        # Past the end of the epoch: librdkafka sees a truncated log and
        # moves to the epoch's end offset (not auto.offset.reset's
        # earliest, which a plain OFFSET_OUT_OF_RANGE would give).
        before = requests_served(kafka_gw, "offset_for_leader_epoch")
        c.seek(TopicPartition(topic, 0, 100, leader_epoch=EPOCH))
        _wait_validated(kafka_gw, before)
        for _ in range(4):
            c.poll(0.25)
        p.produce(topic, value=b"after", partition=0)
        assert p.flush(10) == 0
        m = _consume_one(c)
        assert m is not None and (m.offset(), m.value()) == (10, b"after")

        # An epoch newer than the partition has ever had: Kafka knows no
        # end offset for it, so librdkafka applies auto.offset.reset.
        before = requests_served(kafka_gw, "offset_for_leader_epoch")
        c.seek(TopicPartition(topic, 0, 3, leader_epoch=EPOCH + 1))
        m = _consume_one(c)
        assert m is not None and m.offset() == 0
        assert requests_served(kafka_gw, "offset_for_leader_epoch") > before

        # Without an epoch there is nothing to validate.
        before = requests_served(kafka_gw, "offset_for_leader_epoch")
        c.seek(TopicPartition(topic, 0, 7))
        m = _consume_one(c)
        assert m is not None and m.offset() == 7
        assert requests_served(kafka_gw, "offset_for_leader_epoch") == before
    finally:
        c.close()


def list_offsets_v4(raw, topic, parts):
    """parts: [(partition, current_leader_epoch, timestamp)] ->
    [(partition, error, timestamp, offset, leader_epoch)]"""
    ps = [struct.pack(">iiq", p, cur, ts) for p, cur, ts in parts]
    r = raw.call(LIST_OFFSETS, 4, struct.pack(">ib", -1, 0) + array([str_(topic) + array(ps)]))
    r.i32()
    out = []
    for _ in range(r.array_len()):
        r.string()
        for _ in range(r.array_len()):
            out.append((r.i32(), r.i16(), r.i64(), r.i64(), r.i32()))
    assert r.done()
    return out


def fetch_v11(raw, topic, partition, current_leader_epoch, offset=0):
    """-> (error, high_watermark, record bytes) of the one partition."""
    body = struct.pack(">iiiibii", -1, 0, 1, 1 << 20, 0, 0, -1)
    body += array([str_(topic) + array([struct.pack(">iiqqi", partition, current_leader_epoch,
                                                      offset, -1, 1 << 20)])])
    body += array([]) + str_("")
    r = raw.call(FETCH, 11, body)
    r.i32()
    assert r.i16() == NONE
    r.i32()  # session id
    out = None
    for _ in range(r.array_len()):
        r.string()
        for _ in range(r.array_len()):
            r.i32()
            err, hw = r.i16(), r.i64()
            r.i64(), r.i64()
            n = r.array_len()
            r.pos += 16 * max(n, 0)
            r.i32()  # preferred read replica
            n = r.i32()
            records = r.data[r.pos:r.pos + max(n, 0)]
            r.pos += max(n, 0)
            out = (err, hw, records)
    assert r.done()
    return out


def test_fetch_and_list_offsets_check_the_current_leader_epoch(kafka_gw, bootstrap):
    # As a Kafka leader does: a client naming a newer epoch than the
    # leader's is told UNKNOWN_LEADER_EPOCH, an older one FENCED_LEADER_EPOCH;
    # -1 means it names none.
    topic, _, _ = make_topic(bootstrap, records=2)
    raw = Raw(kafka_gw.port("kafka"))
    assert list_offsets_v4(raw, topic, [(0, -1, -1), (0, EPOCH, -2), (0, EPOCH + 1, -1),
                                        (0, -3, -1), (0, EPOCH, 4_000_000_000_000)]) == [
        (0, NONE, -1, 2, EPOCH),
        (0, NONE, -1, 0, EPOCH),
        (0, UNKNOWN_LEADER_EPOCH, -1, -1, -1),
        (0, FENCED_LEADER_EPOCH, -1, -1, -1),
        (0, NONE, -1, -1, -1),  # no record at or after that time: no epoch either
    ]
    for current in (-1, EPOCH):
        err, hw, records = fetch_v11(raw, topic, 0, current)
        assert (err, hw) == (NONE, 2) and len(records) > 61
        # The batch's partitionLeaderEpoch (bytes 12..16) is the epoch.
        assert struct.unpack_from(">i", records, 12)[0] == EPOCH
    assert fetch_v11(raw, topic, 0, EPOCH + 1)[:2] == (UNKNOWN_LEADER_EPOCH, -1)
    assert fetch_v11(raw, topic, 0, -3)[:2] == (FENCED_LEADER_EPOCH, -1)
