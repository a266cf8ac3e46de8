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
