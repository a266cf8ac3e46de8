"""Fetch long polling on the wire: min_bytes counts bytes over every
partition of the request, and data that arrives during the wait wakes it,
also on a partition that already returned some (raw Fetch v4, since clients
hide these knobs behind their own buffering)."""

import struct
import threading
import time

from kraw import Raw, batch, produce_v3, string
from test_bad_input import ensure_topic

PRODUCE, FETCH = 0, 1


def fetch_v4(topic, partition, offset, min_bytes, max_wait_ms, partition_max=1 << 20):
    return (
        struct.pack(">iiiib", -1, max_wait_ms, min_bytes, 1 << 24, 0)
        + struct.pack(">i", 1) + string(topic)
        + struct.pack(">i", 1) + struct.pack(">iqi", partition, offset, partition_max)
    )


def parse_fetch_v4(data):
    """-> (error_code, high_watermark, record bytes) of the only partition."""
    pos = 4  # throttle
    (ntopics,) = struct.unpack_from(">i", data, pos); pos += 4
    assert ntopics == 1
    (tlen,) = struct.unpack_from(">h", data, pos); pos += 2 + tlen
    (nparts,) = struct.unpack_from(">i", data, pos); pos += 4
    assert nparts == 1
    _p, err, hw, _lso = struct.unpack_from(">ihqq", data, pos); pos += 22
    (naborted,) = struct.unpack_from(">i", data, pos); pos += 4
    pos += max(naborted, 0) * 16
    (rlen,) = struct.unpack_from(">i", data, pos); pos += 4
    return err, hw, max(rlen, 0)


def produce(port, topic, records):
    r = Raw(port)
    r.request(PRODUCE, 3, produce_v3(topic, 0, batch(records)))
    r.response()
    r.close()


def start_fetch(port, topic, record, offset, min_bytes, max_wait_ms):
    """A topic holding `record`, and a Fetch of it sent (not answered):
    -> (connection, time sent)."""
    ensure_topic(port, topic)
    produce(port, topic, [record])
    r = Raw(port, timeout=max_wait_ms / 1000 + 10)
    t0 = time.monotonic()
    r.request(FETCH, 4, fetch_v4(topic, 0, offset, min_bytes=min_bytes, max_wait_ms=max_wait_ms))
    return r, t0


def test_min_bytes_waits_across_partial_data_and_wakes_on_produce(kafka_gw, topic_name):
    port = kafka_gw.port("kafka")
    # Some data but below min_bytes: the Fetch must wait, and a produce
    # during the wait must end it (long before max_wait).
    r, t0 = start_fetch(port, topic_name, (b"k", b"small", []), 0, min_bytes=4000, max_wait_ms=8000)
    later = threading.Timer(
        0.8, produce, (port, topic_name, [(b"k", b"x" * 1024, []) for _ in range(6)]))
    later.start()
    _corr, data = r.response()
    elapsed = time.monotonic() - t0
    later.join()
    err, hw, nbytes = parse_fetch_v4(data)
    assert err == 0
    assert elapsed >= 0.6, f"answered after {elapsed:.2f}s with {nbytes} bytes: min_bytes ignored"
    assert elapsed < 6, f"not woken by the produce ({elapsed:.2f}s)"
    assert nbytes >= 4000 and hw == 7

    # Enough data already: answered at once.
    t0 = time.monotonic()
    r.request(FETCH, 4, fetch_v4(topic_name, 0, 0, min_bytes=4000, max_wait_ms=8000))
    _corr, data = r.response()
    assert time.monotonic() - t0 < 3
    assert parse_fetch_v4(data)[2] >= 4000

    # Nothing more arrives: max_wait bounds the wait.
    t0 = time.monotonic()
    r.request(FETCH, 4, fetch_v4(topic_name, 0, 7, min_bytes=1, max_wait_ms=700))
    _corr, data = r.response()
    waited = time.monotonic() - t0
    assert 0.5 <= waited < 5
    assert parse_fetch_v4(data)[2] == 0
    r.close()


def test_a_waiting_fetch_ends_when_its_topic_is_deleted(kafka_gw, topic_name):
    from kafka.admin import KafkaAdminClient

    port = kafka_gw.port("kafka")
    # At the end of the partition with a long max_wait: the Fetch waits.
    r, t0 = start_fetch(port, topic_name, (b"k", b"v", []), 1, min_bytes=1, max_wait_ms=10000)
    time.sleep(0.5)
    admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
    admin.delete_topics([topic_name])
    admin.close()
    _corr, data = r.response()
    elapsed = time.monotonic() - t0
    # Answered when the topic went, not after the 10 s wait.
    assert elapsed < 5, f"the Fetch waited {elapsed:.2f}s on a deleted topic"
    _err, _hw, nbytes = parse_fetch_v4(data)
    assert nbytes == 0
    r.close()
