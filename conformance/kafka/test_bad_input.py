"""Bad input never takes more than its own connection down, and never damages
stored data; the protocol's own errors are answered where Kafka answers them."""

import struct

from kraw import Raw, batch, metadata_v1, parse_produce_v3, produce_v3

PRODUCE, METADATA, API_VERSIONS = 0, 3, 18


def ensure_topic(port, topic):
    r = Raw(port)
    r.request(METADATA, 1, metadata_v1([topic]))
    r.response()
    r.close()


def test_api_versions_too_new_gets_a_v0_answer(kafka_gw):
    r = Raw(kafka_gw.port("kafka"))
    corr = r.request(API_VERSIONS, 99, b"")
    c, data = r.response()
    assert c == corr
    (err,) = struct.unpack_from(">h", data, 0)
    assert err == 35  # UNSUPPORTED_VERSION, then the supported list
    (n,) = struct.unpack_from(">i", data, 2)
    entries = [struct.unpack_from(">hhh", data, 6 + 6 * i) for i in range(n)]
    # As Apache Kafka (KIP-511): the error answer lists only ApiVersions
    # itself, so that the client can retry at a version the broker has.
    assert [k for k, _, _ in entries] == [18]
    assert entries[0][1] == 0 and entries[0][2] >= 3
    # The connection stays usable: v0 works.
    corr = r.request(API_VERSIONS, 0, b"")
    c, data = r.response()
    assert c == corr and struct.unpack_from(">h", data, 0)[0] == 0


def test_oversized_frame_closes_only_that_connection(kafka_gw):
    port = kafka_gw.port("kafka")
    good = Raw(port)
    bad = Raw(port)
    bad.send_raw(struct.pack(">i", 0x7FFFFFF0) + b"\x00" * 16)
    assert bad.is_closed()
    corr = good.request(API_VERSIONS, 0, b"")
    assert good.response()[0] == corr


def test_garbage_and_unknown_api_close_the_connection(kafka_gw):
    port = kafka_gw.port("kafka")
    witness = Raw(port)
    r = Raw(port)
    r.send_raw(struct.pack(">i", 3) + b"abc")
    assert r.is_closed()
    r = Raw(port)
    r.request(9999, 0, b"")
    assert r.is_closed()
    r = Raw(port)
    r.request(METADATA, 1, b"\x7f\xff\xff\xff")  # a topic array that lies
    assert r.is_closed()
    r = Raw(port)
    r.request(METADATA, 9, b"\xff\xff\xff\xff\x0f")  # a compact array that lies
    assert r.is_closed()
    # The gateway itself is unharmed: an older connection still works.
    corr = witness.request(API_VERSIONS, 0, b"")
    assert witness.response()[0] == corr


def test_crc_mismatch_and_corrupt_batches_are_rejected(kafka_gw, topic_name):
    port = kafka_gw.port("kafka")
    ensure_topic(port, topic_name)
    r = Raw(port)
    good = batch([(b"k", b"v", [])])
    bad_crc = bytearray(good)
    bad_crc[-1] ^= 0xFF
    r.request(PRODUCE, 3, produce_v3(topic_name, 0, bytes(bad_crc)))
    [(_, _, err, _)] = parse_produce_v3(r.response()[1])
    assert err == 2  # CORRUPT_MESSAGE
    r.request(PRODUCE, 3, produce_v3(topic_name, 0, good[:30]))
    [(_, _, err, _)] = parse_produce_v3(r.response()[1])
    assert err == 2
    r.request(PRODUCE, 3, produce_v3(topic_name, 0, good))
    [(_, _, err, base)] = parse_produce_v3(r.response()[1])
    assert err == 0 and base == 0  # nothing corrupt was stored before it


def test_idempotent_retry_is_deduplicated(kafka_gw, topic_name):
    port = kafka_gw.port("kafka")
    ensure_topic(port, topic_name)
    r = Raw(port)
    b0 = batch([(b"a", b"1", []), (b"b", b"2", [])], producer_id=4242, epoch=0, base_sequence=0)
    b1 = batch([(b"c", b"3", [])], producer_id=4242, epoch=0, base_sequence=2)
    gap = batch([(b"d", b"4", [])], producer_id=4242, epoch=0, base_sequence=7)
    results = []
    for b in (b0, b0, b1, b1, gap):
        r.request(PRODUCE, 3, produce_v3(topic_name, 0, b))
        [(_, _, err, base)] = parse_produce_v3(r.response()[1])
        results.append((err, base))
    assert results[:4] == [(0, 0), (0, 0), (0, 2), (0, 2)]
    assert results[4][0] == 45  # OUT_OF_ORDER_SEQUENCE_NUMBER
    # Across a SIGKILL restart the retry is still recognised.
    kafka_gw.kill()
    kafka_gw.restart()
    r = Raw(port)
    r.request(PRODUCE, 3, produce_v3(topic_name, 0, b1))
    [(_, _, err, base)] = parse_produce_v3(r.response()[1])
    assert (err, base) == (0, 2)


def _api_versions_v0(data):
    """-> (error_code, {api_key: (min, max)}) of a v0 ApiVersions body."""
    (err, n) = struct.unpack_from(">hi", data, 0)
    keys = {}
    for i in range(n):
        k, lo, hi = struct.unpack_from(">hhh", data, 6 + 6 * i)
        keys[k] = (lo, hi)
    return err, keys


def test_api_versions_at_any_unsupported_version_gets_kafkas_v0_answer(kafka_gw):
    # KIP-511, as Kafka answers it: a v0 body with UNSUPPORTED_VERSION and
    # only the versions of ApiVersions itself, on a connection that stays open.
    r = Raw(kafka_gw.port("kafka"))
    for version in (5, 99, -1):
        corr = r.request(API_VERSIONS, version, b"")
        c, data = r.response()
        assert c == corr
        assert _api_versions_v0(data) == (35, {18: (0, 4)})
    # The client retries at the advertised maximum and gets the full table.
    corr = r.request(API_VERSIONS, 0, b"")
    c, data = r.response()
    err, keys = _api_versions_v0(data)
    assert c == corr and err == 0 and keys[18] == (0, 4) and 0 in keys and 3 in keys


def test_other_apis_at_unsupported_versions_close_after_earlier_answers(kafka_gw):
    # Kafka closes the connection for a version it does not serve (it
    # cannot answer in a format it does not know); requests before it are
    # still answered.
    port = kafka_gw.port("kafka")
    for api, version in ((METADATA, 13), (PRODUCE, 2)):
        r = Raw(port)
        first = r.request(API_VERSIONS, 0, b"")
        r.request(api, version, b"")
        assert r.response()[0] == first
        assert r.is_closed()


def test_acks0_produce_failure_closes_the_connection(kafka_gw, topic_name):
    port = kafka_gw.port("kafka")
    ensure_topic(port, topic_name)
    good = batch([(b"k", b"v", [])])
    # A good acks=0 produce: no response, the connection stays open.
    r = Raw(port)
    r.request(PRODUCE, 3, produce_v3(topic_name, 0, good, acks=0))
    corr = r.request(API_VERSIONS, 0, b"")
    assert r.response()[0] == corr
    # A corrupt batch with acks=0: Kafka closes so the client notices.
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    r.request(PRODUCE, 3, produce_v3(topic_name, 0, bytes(bad), acks=0))
    assert r.is_closed()
    # An unknown topic with acks=0 (Produce never creates topics).
    r = Raw(port)
    r.request(PRODUCE, 3, produce_v3("never-made-" + topic_name, 0, good, acks=0))
    assert r.is_closed()
    # Only the good batch was stored.
    w = Raw(port)
    w.request(PRODUCE, 3, produce_v3(topic_name, 0, good))
    [(_, _, err, base)] = parse_produce_v3(w.response()[1])
    assert (err, base) == (0, 1)


def test_two_batches_for_one_partition_are_invalid_record(kafka_gw, topic_name):
    port = kafka_gw.port("kafka")
    ensure_topic(port, topic_name)
    r = Raw(port)
    one = batch([(b"a", b"1", [])])
    two = batch([(b"b", b"2", [])])
    r.request(PRODUCE, 3, produce_v3(topic_name, 0, one + two))
    [(_, _, err, _)] = parse_produce_v3(r.response()[1])
    assert err == 87  # INVALID_RECORD, as Kafka: exactly one batch per partition
    r.request(PRODUCE, 3, produce_v3(topic_name, 0, b""))
    [(_, _, err, _)] = parse_produce_v3(r.response()[1])
    assert err == 87
    # Nothing of the refused request was stored.
    r.request(PRODUCE, 3, produce_v3(topic_name, 0, two))
    [(_, _, err, base)] = parse_produce_v3(r.response()[1])
    assert (err, base) == (0, 0)
