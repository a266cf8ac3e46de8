"""Transactions (tx.select / tx.commit / tx.rollback) with pika and py-amqp:
a commit whose publishes could not all be stored is a channel exception
(406 "partial tx completion", as RabbitMQ), a commit-ok means the messages
are durable (they survive SIGKILL right after it), and basic.recover inside
a transaction acts at once, like RabbitMQ's."""

import amqp
import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from conftest import params


def count(ch, q):
    return ch.queue_declare(q, passive=True).method.message_count


def test_commit_with_a_refused_publish_is_406(conn):
    setup = conn.channel()
    setup.confirm_delivery()
    setup.queue_declare("tx-full", arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    setup.queue_declare("tx-ok")
    setup.basic_publish("", "tx-full", b"already there")

    ch = conn.channel()
    ch.tx_select()
    ch.basic_publish("", "tx-ok", b"stored")
    ch.basic_publish("", "tx-full", b"refused: the queue is full")
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.tx_commit()
    assert e.value.reply_code == 406
    assert e.value.reply_text == "PRECONDITION_FAILED - partial tx completion"
    # The connection is fine; as in RabbitMQ the commit was partial: what
    # could be stored was, the refused message was not.
    assert count(setup, "tx-full") == 1
    assert count(setup, "tx-ok") == 1
    assert setup.basic_get("tx-full", auto_ack=True)[2] == b"already there"


def test_failed_commit_does_not_apply_its_acks(conn):
    setup = conn.channel()
    setup.confirm_delivery()
    setup.queue_declare("tx-src")
    setup.queue_declare("tx-full2", arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    setup.basic_publish("", "tx-src", b"input")

    ch = conn.channel()
    ch.tx_select()
    m, _, body = ch.basic_get("tx-src")
    assert body == b"input"
    ch.basic_publish("", "tx-full2", b"output")
    ch.basic_ack(m.delivery_tag)
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.tx_commit()
    assert e.value.reply_code == 406
    # The input was not acknowledged (see FINDINGS.md: RabbitMQ applies the
    # acks of a partial commit): it is back in its queue, redelivered.
    m, _, body = setup.basic_get("tx-src", auto_ack=True)
    assert body == b"input" and m.redelivered is True


def test_commit_ok_means_durable_across_sigkill(gateway_factory):
    gw = gateway_factory(["amqp"])
    c = pika.BlockingConnection(params(gw.port("amqp")))
    ch = c.channel()
    ch.queue_declare("tx-dur", durable=True)
    ch.tx_select()
    n = 300
    for i in range(n):
        ch.basic_publish("", "tx-dur", f"t{i}".encode(), pika.BasicProperties(delivery_mode=2))
    ch.tx_commit()
    # No confirms, no wait: commit-ok alone promises durability.
    gw.kill()
    gw.start()
    c = pika.BlockingConnection(params(gw.port("amqp")))
    ch = c.channel()
    assert count(ch, "tx-dur") == n
    got = [ch.basic_get("tx-dur", auto_ack=True)[2] for _ in range(n)]
    assert got == [f"t{i}".encode() for i in range(n)]
    c.close()


def test_recover_inside_a_transaction_is_immediate(conn):
    setup = conn.channel()
    setup.confirm_delivery()
    setup.queue_declare("tx-rec")
    for b in (b"1", b"2", b"3"):
        setup.basic_publish("", "tx-rec", b)

    ch = conn.channel()
    ch.tx_select()
    tags = [ch.basic_get("tx-rec")[0].delivery_tag for _ in range(3)]
    assert count(setup, "tx-rec") == 0
    ch.basic_ack(tags[0])
    # basic.recover is not transactional (RabbitMQ): it requeues at once
    # what is unacknowledged, which no longer includes the message acked
    # in the open transaction.
    ch.basic_recover(requeue=True)
    assert count(setup, "tx-rec") == 2
    got = [ch.basic_get("tx-rec") for _ in range(2)]
    assert [(g[2], g[0].redelivered) for g in got] == [(b"2", True), (b"3", True)]
    ch.tx_commit()
    ch.basic_ack(got[1][0].delivery_tag, multiple=True)
    ch.tx_commit()
    assert count(setup, "tx-rec") == 0
    ch.close()
    # Nothing was left unacked to come back.
    assert setup.basic_get("tx-rec")[0] is None


def test_ack_twice_in_a_transaction_is_406(conn):
    setup = conn.channel()
    setup.confirm_delivery()
    setup.queue_declare("tx-twice")
    setup.basic_publish("", "tx-twice", b"x")
    ch = conn.channel()
    ch.tx_select()
    m, _, _ = ch.basic_get("tx-twice")
    ch.basic_ack(m.delivery_tag)
    ch.basic_ack(m.delivery_tag)
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.tx_commit()
    assert e.value.reply_code == 406
    assert f"unknown delivery tag {m.delivery_tag}" in e.value.reply_text
    # The channel went away with an uncommitted ack: the message is back.
    m, _, b = setup.basic_get("tx-twice", auto_ack=True)
    assert b == b"x" and m.redelivered is True


def test_py_amqp_transaction(gw):
    with amqp.Connection(f"127.0.0.1:{gw.port('amqp')}", userid="guest", password="guest") as c:
        ch = c.channel()
        ch.queue_declare("pyamqp-tx", auto_delete=False)
        ch.tx_select()
        ch.basic_publish(amqp.Message("one"), exchange="", routing_key="pyamqp-tx")
        ch.tx_rollback()
        ch.basic_publish(amqp.Message("two"), exchange="", routing_key="pyamqp-tx")
        ch.tx_commit()
        m = ch.basic_get("pyamqp-tx", no_ack=True)
        assert m.body == "two"
        assert ch.basic_get("pyamqp-tx") is None
        ch2 = c.channel()
        ch2.queue_declare("pyamqp-tx-full", auto_delete=False,
                          arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
        ch2.tx_select()
        ch2.basic_publish(amqp.Message("no room"), exchange="", routing_key="pyamqp-tx-full")
        with pytest.raises(amqp.exceptions.PreconditionFailed) as e:
            ch2.tx_commit()
        assert "partial tx completion" in str(e.value)
