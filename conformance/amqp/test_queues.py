"""Queue semantics: declare variants, exclusive and auto-delete queues,
ack/nack/reject with requeue, prefetch, purge, delete, TTL, max-length,
dead-lettering with x-death, transactions, server-sent cancel."""

import time

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from conftest import params


def wait_count(ch, q, n, timeout=5.0):
    deadline = time.time() + timeout
    while True:
        c = ch.queue_declare(q, passive=True).method.message_count
        if c == n or time.time() > deadline:
            return c
        ch.connection.sleep(0.05)


def test_server_named_exclusive_queue(gw, conn):
    ch = conn.channel()
    name = ch.queue_declare("", exclusive=True).method.queue
    assert name.startswith("amq.gen-")
    other = pika.BlockingConnection(params(gw.port("amqp")))
    och = other.channel()
    with pytest.raises(ChannelClosedByBroker) as e:
        och.basic_consume(name, lambda *a: None)
    assert e.value.reply_code == 405
    conn.close()
    och = other.channel()
    # The exclusive queue went with its connection.
    with pytest.raises(ChannelClosedByBroker) as e:
        och.queue_declare(name, passive=True)
    assert e.value.reply_code == 404
    other.close()


def test_redeclare_must_be_equivalent(conn):
    ch = conn.channel()
    ch.queue_declare("eq", durable=True, arguments={"x-message-ttl": 60000})
    ch.queue_declare("eq", durable=True, arguments={"x-message-ttl": 60000})
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.queue_declare("eq", durable=False)
    assert e.value.reply_code == 406
    assert "inequivalent arg 'durable' for queue 'eq' in vhost '/'" in e.value.reply_text
    ch = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.queue_declare("eq", durable=True, arguments={"x-message-ttl": 5})
    assert e.value.reply_code == 406
    ch = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.queue_declare("nope", passive=True)
    assert e.value.reply_code == 404
    ch = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.queue_declare("amq.mine")
    assert e.value.reply_code == 403


def test_auto_delete_queue_goes_with_last_consumer(conn):
    ch = conn.channel()
    ch.queue_declare("adq", auto_delete=True)
    tag = ch.basic_consume("adq", lambda *a: None)
    ch.basic_cancel(tag)
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.queue_declare("adq", passive=True)
    assert e.value.reply_code == 404


def test_reject_and_nack_requeue_set_redelivered(ch):
    ch.confirm_delivery()
    ch.queue_declare("rq")
    for b in (b"a", b"b"):
        ch.basic_publish("", "rq", b)
    m1, _, b1 = ch.basic_get("rq")
    assert (b1, m1.redelivered) == (b"a", False)
    ch.basic_reject(m1.delivery_tag, requeue=True)
    m2, _, b2 = ch.basic_get("rq")
    assert (b2, m2.redelivered) == (b"a", True)
    m3, _, b3 = ch.basic_get("rq")
    assert (b3, m3.redelivered) == (b"b", False)
    ch.basic_nack(m3.delivery_tag, multiple=True, requeue=True)
    got = [ch.basic_get("rq") for _ in range(2)]
    assert [(g[2], g[0].redelivered) for g in got] == [(b"a", True), (b"b", True)]
    ch.basic_ack(got[1][0].delivery_tag, multiple=True)
    assert ch.basic_get("rq")[0] is None


def test_unknown_delivery_tag_is_406(conn):
    ch = conn.channel()
    ch.basic_ack(999)
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.queue_declare("after-bad-ack")
    assert e.value.reply_code == 406 and "unknown delivery tag 999" in e.value.reply_text


def test_channel_close_requeues_unacked(gw, conn):
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare("cq")
    ch.basic_publish("", "cq", b"x")
    m, _, _ = ch.basic_get("cq")
    assert m is not None
    ch.close()
    ch = conn.channel()
    assert wait_count(ch, "cq", 1) == 1
    m, _, b = ch.basic_get("cq", auto_ack=True)
    assert b == b"x" and m.redelivered


def pump(conn, got, want, quiet=0.7, timeout=5.0):
    """Processes events until `got` has `want` items (or the timeout), then
    for `quiet` seconds more, so that an over-delivery would show.
    (pika's process_data_events(time_limit) returns after the first event.)"""
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.1)
    end = time.monotonic() + quiet
    while time.monotonic() < end:
        conn.process_data_events(time_limit=0.1)


def test_prefetch_limits_unacked_deliveries(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare("pf")
    for i in range(10):
        ch.basic_publish("", "pf", str(i).encode())
    ch.basic_qos(prefetch_count=3)
    got = []
    ch.basic_consume("pf", lambda c, m, p, b: got.append(m))
    pump(conn, got, 3)
    assert len(got) == 3
    ch.basic_ack(got[-1].delivery_tag, multiple=True)
    pump(conn, got, 6)
    assert len(got) == 6


def test_global_and_size_prefetch(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare("pg")
    for i in range(10):
        ch.basic_publish("", "pg", b"x" * 1000)
    ch.basic_qos(prefetch_size=2500, prefetch_count=0, global_qos=True)
    got = []
    ch.basic_consume("pg", lambda c, m, p, b: got.append(m))
    pump(conn, got, 2)
    assert len(got) == 2  # 2 x 1000 bytes fit in 2500, a third would not
    ch.basic_ack(got[0].delivery_tag)
    pump(conn, got, 3)
    assert len(got) == 3


def test_purge_and_delete_conditions(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare("pq")
    for i in range(5):
        ch.basic_publish("", "pq", b"x")
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.queue_delete("pq", if_empty=True)
    assert e.value.reply_code == 406
    ch = conn.channel()
    assert ch.queue_purge("pq").method.message_count == 5
    assert ch.queue_declare("pq", passive=True).method.message_count == 0
    ch.basic_consume("pq", lambda *a: None)
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.queue_delete("pq", if_unused=True)
    assert e.value.reply_code == 406
    ch = conn.channel()
    assert ch.queue_delete("pq").method.message_count == 0


def test_queue_delete_cancels_consumers(gw, conn):
    ch = conn.channel()
    ch.queue_declare("cancel-me")
    cancelled = []
    ch.add_on_cancel_callback(lambda m: cancelled.append(m.method.consumer_tag))
    tag = ch.basic_consume("cancel-me", lambda *a: None)
    other = pika.BlockingConnection(params(gw.port("amqp")))
    other.channel().queue_delete("cancel-me")
    other.close()
    conn.process_data_events(time_limit=1.0)
    assert cancelled == [tag]


def test_message_ttl_and_dead_lettering(ch):
    ch.confirm_delivery()
    ch.exchange_declare("dlx", "direct")
    ch.queue_declare("dead")
    ch.queue_bind("dead", "dlx", "gone")
    ch.queue_declare("ttl-q", arguments={
        "x-message-ttl": 200,
        "x-dead-letter-exchange": "dlx",
        "x-dead-letter-routing-key": "gone",
    })
    ch.basic_publish("", "ttl-q", b"old", pika.BasicProperties(headers={"h": "v"}))
    assert wait_count(ch, "dead", 1) == 1
    assert ch.queue_declare("ttl-q", passive=True).method.message_count == 0
    m, p, b = ch.basic_get("dead", auto_ack=True)
    assert b == b"old" and m.routing_key == "gone"
    assert p.headers["h"] == "v"
    death = p.headers["x-death"][0]
    assert death["reason"] == "expired" and death["queue"] == "ttl-q" and death["count"] == 1
    assert death["exchange"] == "" and death["routing-keys"] == ["ttl-q"]
    assert p.headers["x-first-death-reason"] == "expired"


def test_per_message_expiration(ch):
    ch.confirm_delivery()
    ch.queue_declare("exp-q")
    ch.basic_publish("", "exp-q", b"short", pika.BasicProperties(expiration="100"))
    ch.basic_publish("", "exp-q", b"long", pika.BasicProperties(expiration="60000"))
    time.sleep(0.3)
    m, p, b = ch.basic_get("exp-q", auto_ack=True)
    assert b == b"long" and p.expiration == "60000"


def test_reject_without_requeue_dead_letters(ch):
    ch.confirm_delivery()
    ch.queue_declare("rej-dead")
    ch.queue_declare("rej-q", arguments={"x-dead-letter-exchange": ""
                                         , "x-dead-letter-routing-key": "rej-dead"})
    ch.basic_publish("", "rej-q", b"bad")
    m, _, _ = ch.basic_get("rej-q")
    ch.basic_reject(m.delivery_tag, requeue=False)
    assert wait_count(ch, "rej-dead", 1) == 1
    _, p, b = ch.basic_get("rej-dead", auto_ack=True)
    assert b == b"bad" and p.headers["x-death"][0]["reason"] == "rejected"


def test_max_length_drop_head_and_reject_publish(ch):
    ch.confirm_delivery()
    ch.queue_declare("ml-dead")
    ch.queue_declare("ml-q", arguments={"x-max-length": 2, "x-dead-letter-exchange": "",
                                        "x-dead-letter-routing-key": "ml-dead"})
    for b in (b"1", b"2", b"3"):
        ch.basic_publish("", "ml-q", b)
    assert wait_count(ch, "ml-q", 2) == 2
    assert wait_count(ch, "ml-dead", 1) == 1
    assert ch.basic_get("ml-dead", auto_ack=True)[1].headers["x-death"][0]["reason"] == "maxlen"
    assert [ch.basic_get("ml-q", auto_ack=True)[2] for _ in range(2)] == [b"2", b"3"]

    ch.queue_declare("rp-q", arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    ch.basic_publish("", "rp-q", b"in")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", "rp-q", b"out")


def test_queue_expires(ch):
    ch.queue_declare("short-lived", arguments={"x-expires": 300})
    time.sleep(1.0)
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.queue_declare("short-lived", passive=True)
    assert e.value.reply_code == 404


def test_transactions_commit_and_rollback(conn):
    ch = conn.channel()
    ch.queue_declare("txq")
    ch.tx_select()
    ch.basic_publish("", "txq", b"rolled-back")
    ch.tx_rollback()
    ch.basic_publish("", "txq", b"committed")
    assert ch.queue_declare("txq", passive=True).method.message_count == 0
    ch.tx_commit()
    assert ch.queue_declare("txq", passive=True).method.message_count == 1
    m, _, b = ch.basic_get("txq")
    assert b == b"committed"
    ch.basic_ack(m.delivery_tag)
    ch.tx_rollback()  # the ack is undone: the message stays unacked
    ch.basic_ack(m.delivery_tag)
    ch.tx_commit()
    ch.close()
    ch = conn.channel()
    assert ch.queue_declare("txq", passive=True).method.message_count == 0


def test_tx_and_confirm_are_exclusive(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    with pytest.raises(ChannelClosedByBroker) as e:
        ch.tx_select()
    assert e.value.reply_code == 406


def test_exclusive_consumer_refuses_other_consumers(gw, conn):
    ch = conn.channel()
    ch.queue_declare("exc-cons")
    ch.basic_consume("exc-cons", lambda *a: None, exclusive=True)
    other = pika.BlockingConnection(params(gw.port("amqp")))
    och = other.channel()
    with pytest.raises(ChannelClosedByBroker) as e:
        och.basic_consume("exc-cons", lambda *a: None)
    assert e.value.reply_code == 403
    assert e.value.reply_text == "ACCESS_REFUSED - queue 'exc-cons' in vhost '/' in exclusive use"
    # The same connection is refused too, on another channel.
    ch2 = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as e:
        ch2.basic_consume("exc-cons", lambda *a: None)
    assert e.value.reply_code == 403
    # An exclusive consumer cannot join a queue that has consumers.
    ch.queue_declare("shared-cons")
    ch.basic_consume("shared-cons", lambda *a: None)
    och = other.channel()
    with pytest.raises(ChannelClosedByBroker) as e:
        och.basic_consume("shared-cons", lambda *a: None, exclusive=True)
    assert e.value.reply_code == 403
    other.close()


def test_no_ack_consume_delivers_once_and_forgets(gw, conn):
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare("noack-q", durable=True)
    for i in range(20):
        ch.basic_publish("", "noack-q", str(i).encode(), pika.BasicProperties(delivery_mode=2))
    got = []
    ch.basic_consume("noack-q", lambda c, m, p, b: got.append((m.delivery_tag, m.redelivered, b)),
                     auto_ack=True)
    pump(conn, got, 20)
    assert [b for _, _, b in got] == [str(i).encode() for i in range(20)]
    assert all(r is False for _, r, _ in got)
    assert [t for t, _, _ in got] == list(range(1, 21))
    # Nothing is waiting for an ack: the queue is empty, and closing the
    # channel and connection brings nothing back.
    assert ch.queue_declare("noack-q", passive=True).method.message_count == 0
    conn.close()
    c = pika.BlockingConnection(params(gw.port("amqp")))
    ch = c.channel()
    time.sleep(0.3)
    assert ch.queue_declare("noack-q", passive=True).method.message_count == 0
    assert ch.basic_get("noack-q")[0] is None
    c.close()


def test_recover_requeue_redelivers_unacked(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare("recover-q")
    for b in (b"a", b"b", b"c"):
        ch.basic_publish("", "recover-q", b)
    got = []
    ch.basic_consume("recover-q", lambda c, m, p, b: got.append((m, b)))
    pump(conn, got, 3)
    assert [(b, m.redelivered) for m, b in got] == [(b"a", False), (b"b", False), (b"c", False)]
    ch.basic_ack(got[0][0].delivery_tag)
    ch.basic_recover(requeue=True)
    pump(conn, got, 5)
    again = got[3:]
    assert [(b, m.redelivered) for m, b in again] == [(b"b", True), (b"c", True)]
    # New delivery tags; the old ones are gone.
    assert {m.delivery_tag for m, _ in again}.isdisjoint({m.delivery_tag for m, _ in got[:3]})
    ch.basic_ack(again[-1][0].delivery_tag, multiple=True)
    conn.process_data_events(time_limit=0.2)
    ch2 = conn.channel()
    assert wait_count(ch2, "recover-q", 0) == 0


def test_global_prefetch_count_limits_the_channel(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    for q in ("gp-a", "gp-b"):
        ch.queue_declare(q)
        for i in range(5):
            ch.basic_publish("", q, f"{q}-{i}".encode())
    ch.basic_qos(prefetch_count=3, global_qos=True)
    got = []
    ch.basic_consume("gp-a", lambda c, m, p, b: got.append(m))
    ch.basic_consume("gp-b", lambda c, m, p, b: got.append(m))
    pump(conn, got, 3)
    assert len(got) == 3  # 3 for the channel, not 3 per consumer
    ch.basic_ack(got[0].delivery_tag)
    pump(conn, got, 4)
    assert len(got) == 4
    ch.basic_ack(0, multiple=True)
    pump(conn, got, 7)
    assert len(got) == 7
    ch.basic_ack(0, multiple=True)
    pump(conn, got, 10)
    assert len(got) == 10
    assert {m.consumer_tag for m in got} == set(ch.consumer_tags)


def test_global_and_per_consumer_prefetch_together(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    for q in ("gpc-a", "gpc-b"):
        ch.queue_declare(q)
        for i in range(5):
            ch.basic_publish("", q, b"x")
    ch.basic_qos(prefetch_count=3, global_qos=True)
    ch.basic_qos(prefetch_count=1)  # per consumer, for consumers made after
    got = {"a": [], "b": []}
    ch.basic_consume("gpc-a", lambda c, m, p, b: got["a"].append(m))
    ch.basic_consume("gpc-b", lambda c, m, p, b: got["b"].append(m))
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.1)
    flat = got["a"] + got["b"]
    # Each consumer is held at 1 before the channel's 3 is reached.
    assert (len(got["a"]), len(got["b"])) == (1, 1), flat


def test_nack_without_requeue_dead_letters_to_the_dlx(ch):
    ch.confirm_delivery()
    ch.exchange_declare("nack-dlx", "fanout")
    ch.queue_declare("nack-dead")
    ch.queue_bind("nack-dead", "nack-dlx")
    ch.exchange_declare("nack-src-x", "direct")
    ch.queue_declare("nack-q", arguments={"x-dead-letter-exchange": "nack-dlx"})
    ch.queue_bind("nack-q", "nack-src-x", "rk")
    for b in (b"n1", b"n2"):
        ch.basic_publish("nack-src-x", "rk", b, pika.BasicProperties(headers={"orig": b.decode()}))
    m1 = ch.basic_get("nack-q")[0]
    m2 = ch.basic_get("nack-q")[0]
    ch.basic_nack(m2.delivery_tag, multiple=True, requeue=False)
    assert wait_count(ch, "nack-dead", 2) == 2
    assert ch.queue_declare("nack-q", passive=True).method.message_count == 0
    for want in (b"n1", b"n2"):
        m, p, b = ch.basic_get("nack-dead", auto_ack=True)
        assert b == want
        # No x-dead-letter-routing-key: the original routing key is kept.
        assert m.exchange == "nack-dlx" and m.routing_key == "rk"
        assert p.headers["orig"] == want.decode()
        deaths = p.headers["x-death"]
        assert len(deaths) == 1
        d = deaths[0]
        assert d["reason"] == "rejected"
        assert d["queue"] == "nack-q"
        assert d["exchange"] == "nack-src-x"
        assert d["routing-keys"] == ["rk"]
        assert d["count"] == 1
        assert p.headers["x-first-death-reason"] == "rejected"
        assert p.headers["x-first-death-queue"] == "nack-q"
        assert p.headers["x-first-death-exchange"] == "nack-src-x"
    del m1
