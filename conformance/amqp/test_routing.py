"""Exchanges and routing: direct, fanout, topic, headers, the default
exchange, amq.* built-ins, exchange-to-exchange bindings, alternate
exchanges, mandatory + basic.return, declare/delete semantics."""

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker, UnroutableError


def get_all(ch, q, timeout=3.0):
    import time
    out, deadline = [], time.time() + timeout
    while time.time() < deadline:
        m, p, b = ch.basic_get(q, auto_ack=True)
        if m is None:
            if out and ch.queue_declare(q, passive=True).method.message_count == 0:
                break
            ch.connection.sleep(0.05)
            continue
        out.append(b)
    return out


@pytest.fixture
def cch(ch):
    ch.confirm_delivery()
    return ch


def test_direct_fanout_topic(cch):
    ch = cch
    for q in ("a", "b", "c"):
        ch.queue_declare(q)
    ch.exchange_declare("d", "direct")
    ch.queue_bind("a", "d", "red")
    ch.queue_bind("b", "d", "blue")
    ch.exchange_declare("f", "fanout")
    ch.queue_bind("a", "f")
    ch.queue_bind("c", "f")
    ch.exchange_declare("t", "topic")
    ch.queue_bind("b", "t", "log.*.error")
    ch.queue_bind("c", "t", "log.#")
    ch.basic_publish("d", "red", b"d-red")
    ch.basic_publish("d", "blue", b"d-blue")
    ch.basic_publish("f", "ignored", b"f")
    ch.basic_publish("t", "log.db.error", b"t1")
    ch.basic_publish("t", "log", b"t2")
    ch.basic_publish("amq.fanout", "", b"nothing-bound")
    assert get_all(ch, "a") == [b"d-red", b"f"]
    assert get_all(ch, "b") == [b"d-blue", b"t1"]
    assert get_all(ch, "c") == [b"f", b"t1", b"t2"]


def test_headers_exchange(cch):
    ch = cch
    ch.queue_declare("h-all")
    ch.queue_declare("h-any")
    ch.queue_bind("h-all", "amq.headers", arguments={"x-match": "all", "k": "v", "n": 1})
    ch.queue_bind("h-any", "amq.headers", arguments={"x-match": "any", "k": "v", "z": "z"})
    ch.basic_publish("amq.headers", "", b"both", pika.BasicProperties(headers={"k": "v", "n": 1}))
    ch.basic_publish("amq.headers", "", b"any-only", pika.BasicProperties(headers={"k": "v"}))
    ch.basic_publish("amq.headers", "", b"none", pika.BasicProperties(headers={"q": "r"}))
    assert get_all(ch, "h-all") == [b"both"]
    assert get_all(ch, "h-any") == [b"both", b"any-only"]


def test_exchange_to_exchange_and_alternate(cch):
    ch = cch
    ch.queue_declare("e2e-q")
    ch.queue_declare("ae-q")
    ch.exchange_declare("ae", "fanout")
    ch.queue_bind("ae-q", "ae")
    ch.exchange_declare("src", "direct", arguments={"alternate-exchange": "ae"})
    ch.exchange_declare("dst", "topic")
    ch.exchange_bind("dst", "src", "k.1")
    ch.queue_bind("e2e-q", "dst", "k.*")
    ch.basic_publish("src", "k.1", b"via-e2e", mandatory=True)
    ch.basic_publish("src", "other", b"to-ae", mandatory=True)
    assert get_all(ch, "e2e-q") == [b"via-e2e"]
    assert get_all(ch, "ae-q") == [b"to-ae"]
    ch.exchange_unbind("dst", "src", "k.1")
    ch.basic_publish("src", "k.1", b"now-ae")
    assert get_all(ch, "ae-q") == [b"now-ae"]


def test_mandatory_unroutable_is_returned(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    with pytest.raises(UnroutableError) as e:
        ch.basic_publish("amq.direct", "nobody", b"x", mandatory=True)
    ret = e.value.messages[0]
    assert ret.method.reply_code == 312 and ret.method.reply_text == "NO_ROUTE"
    assert ret.body == b"x"
    # Without mandatory the message is dropped and confirmed.
    ch.basic_publish("amq.direct", "nobody", b"x")


def test_publish_to_missing_exchange_closes_channel(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.basic_publish("no-such-x", "k", b"x")
    assert e.value.reply_code == 404
    assert "no exchange 'no-such-x' in vhost '/'" in e.value.reply_text


def test_exchange_declare_rules(conn):
    ch = conn.channel()
    ch.exchange_declare("ex1", "direct", durable=True)
    ch.exchange_declare("ex1", "direct", durable=True)
    ch.exchange_declare("ex1", passive=True)
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.exchange_declare("ex1", "fanout", durable=True)
    assert e.value.reply_code == 406 and "inequivalent arg 'type'" in e.value.reply_text
    ch = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.exchange_declare("missing", passive=True)
    assert e.value.reply_code == 404
    ch = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.exchange_declare("amq.custom", "direct")
    assert e.value.reply_code == 403
    ch = conn.channel()
    ch.exchange_declare("busy", "fanout")
    ch.queue_declare("busy-q")
    ch.queue_bind("busy-q", "busy")
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.exchange_delete("busy", if_unused=True)
    assert e.value.reply_code == 406
    ch = conn.channel()
    ch.exchange_delete("busy")
    ch.exchange_delete("busy")  # idempotent, as in RabbitMQ
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.exchange_declare("busy", passive=True)
    assert e.value.reply_code == 404


def test_auto_delete_exchange_goes_with_last_binding(conn):
    ch = conn.channel()
    ch.exchange_declare("ad-x", "fanout", auto_delete=True)
    ch.queue_declare("ad-q")
    ch.queue_bind("ad-q", "ad-x")
    ch.queue_unbind("ad-q", "ad-x")
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.exchange_declare("ad-x", passive=True)
    assert e.value.reply_code == 404


def test_default_exchange_cannot_be_bound(conn):
    ch = conn.channel()
    ch.queue_declare("dq")
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.queue_bind("dq", "", "dq")
    assert e.value.reply_code == 403
