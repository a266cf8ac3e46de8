"""Core publish/consume paths with pika's BlockingConnection."""

import time

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker, UnroutableError

from conftest import params


def test_declare_publish_get(ch):
    r = ch.queue_declare("q1")
    assert r.method.queue == "q1" and r.method.message_count == 0
    ch.basic_publish("", "q1", b"hello", pika.BasicProperties(content_type="text/plain"))
    deadline = time.time() + 5
    m = None
    while m is None or m[0] is None:
        m = ch.basic_get("q1", auto_ack=True)
        assert time.time() < deadline
    method, props, body = m
    assert body == b"hello"
    assert props.content_type == "text/plain"
    assert method.redelivered is False
    assert method.exchange == "" and method.routing_key == "q1"
    assert ch.basic_get("q1")[0] is None


def test_consume_with_manual_ack_and_confirms(ch):
    ch.confirm_delivery()
    ch.queue_declare("q2", durable=True)
    for i in range(50):
        ch.basic_publish("", "q2", str(i).encode(), pika.BasicProperties(delivery_mode=2), mandatory=True)
    got = []
    for method, props, body in ch.consume("q2", inactivity_timeout=5):
        assert method is not None, "timed out"
        got.append(int(body))
        ch.basic_ack(method.delivery_tag)
        if len(got) == 50:
            break
    ch.cancel()
    assert got == list(range(50))
    assert ch.queue_declare("q2", passive=True).method.message_count == 0


def test_every_basic_property_round_trips(ch):
    import datetime
    import decimal

    headers = {
        "str": "text ünïcode",
        "int": 42,
        "neg": -7,
        "big": 2**40,
        "bool_t": True,
        "bool_f": False,
        "decimal": decimal.Decimal("3.14"),
        "time": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc),
        "none": None,
        "bytes": b"\x00\x01\xff",
        "array": [1, "two", [3, {"four": 4}], True, None],
        "table": {"nested": {"deeper": {"x": "y", "n": [1, 2]}}, "empty": {}},
        "empty_array": [],
    }
    props = pika.BasicProperties(
        content_type="application/json",
        content_encoding="gzip",
        headers=headers,
        delivery_mode=2,
        priority=5,
        correlation_id="corr-1",
        reply_to="reply.queue",
        expiration="600000",
        message_id="msg-1",
        timestamp=1700000000,
        type="order.created",
        user_id="guest",
        app_id="conformance",
    )
    ch.confirm_delivery()
    ch.queue_declare("props-q", durable=True)
    ch.basic_publish("", "props-q", b"{}", props)
    for method, got, body in ch.consume("props-q", inactivity_timeout=5):
        assert method is not None, "timed out"
        ch.basic_ack(method.delivery_tag)
        break
    ch.cancel()
    assert body == b"{}"
    for name in ("content_type", "content_encoding", "delivery_mode", "priority",
                 "correlation_id", "reply_to", "expiration", "message_id", "timestamp",
                 "type", "user_id", "app_id"):
        assert getattr(got, name) == getattr(props, name), name
    assert got.headers == headers
    # Types survive, not only values (pika decodes each field type apart).
    assert type(got.headers["bool_t"]) is bool and type(got.headers["int"]) is int
    assert isinstance(got.headers["decimal"], decimal.Decimal)
    assert isinstance(got.headers["time"], datetime.datetime)
    assert isinstance(got.headers["bytes"], bytes)
    # basic.get sees the same.
    ch.basic_publish("", "props-q", b"again", props)
    m, got2, _ = ch.basic_get("props-q", auto_ack=True)
    assert got2.headers == headers and got2.app_id == "conformance"
    assert got2.timestamp == 1700000000 and got2.priority == 5
