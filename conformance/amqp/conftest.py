"""Fixtures of the AMQP suite: a gateway serving `amqp`, and pika helpers."""

import pika
import pytest


@pytest.fixture
def gw(gateway_factory):
    return gateway_factory(["amqp"])


def params(port, **kw):
    kw.setdefault("heartbeat", 30)
    kw.setdefault("blocked_connection_timeout", 30)
    return pika.ConnectionParameters(host="127.0.0.1", port=port, **kw)


@pytest.fixture
def conn(gw):
    c = pika.BlockingConnection(params(gw.port("amqp")))
    yield c
    if c.is_open:
        c.close()


@pytest.fixture
def ch(conn):
    return conn.channel()
