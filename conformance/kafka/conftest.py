"""Fixtures of the Kafka suite: a gateway serving Kafka, and helpers."""

import uuid

import pytest

# Groups form quickly in tests; production keeps Kafka's 3 s default.
KAFKA_OPTIONS = {"group_initial_rebalance_delay_ms": 300}


@pytest.fixture
def kafka_gw(gateway_factory):
    return gateway_factory(["kafka"], options={"kafka": dict(KAFKA_OPTIONS)})


@pytest.fixture
def bootstrap(kafka_gw):
    return f"127.0.0.1:{kafka_gw.port('kafka')}"


@pytest.fixture
def topic_name():
    return "t-" + uuid.uuid4().hex[:10]
