"""Durability: a durable queue, persistent messages published with confirms,
SIGKILL, restart: every confirmed message is delivered, and messages that
were delivered but not acknowledged come back with redelivered=True."""

import pika

from conftest import params


def drain(ch, queue, n, ack=True, timeout=10):
    got = []
    for method, props, body in ch.consume(queue, inactivity_timeout=timeout):
        assert method is not None, f"timed out after {len(got)} of {n}"
        got.append((method, props, body))
        if ack:
            ch.basic_ack(method.delivery_tag)
        if len(got) == n:
            break
    return got


def test_sigkill_keeps_confirmed_and_redelivers_unacked(gateway_factory):
    gw = gateway_factory(["amqp"])
    c = pika.BlockingConnection(params(gw.port("amqp")))
    ch = c.channel()
    ch.confirm_delivery()
    ch.exchange_declare("dur-x", "direct", durable=True)
    ch.queue_declare("dur-q", durable=True)
    ch.queue_bind("dur-q", "dur-x", "k")
    n = 200
    for i in range(n):
        # With confirms on, BlockingChannel.basic_publish returns only after
        # the broker's basic.ack: every message here is confirmed.
        ch.basic_publish("dur-x", "k", f"m{i}".encode(),
                         pika.BasicProperties(delivery_mode=2, message_id=str(i),
                                              headers={"i": i}))
    # Take the first 30 without acknowledging them, ack the next 20.
    ch.basic_qos(prefetch_count=50)
    got = drain(ch, "dur-q", 50, ack=False)
    for method, _, _ in got[30:]:
        ch.basic_ack(method.delivery_tag)
    ch.cancel()
    # Give the acks time to reach the broker (they are asynchronous).
    c.process_data_events(time_limit=0.2)
    c.sleep(1.5)  # acks are flushed by the broker within a second
    gw.kill()
    gw.start()

    c = pika.BlockingConnection(params(gw.port("amqp")))
    ch = c.channel()
    q = ch.queue_declare("dur-q", durable=True, passive=True)
    assert q.method.message_count == n - 20
    got = drain(ch, "dur-q", n - 20)
    bodies = [b.decode() for _, _, b in got]
    assert bodies == [f"m{i}" for i in range(30)] + [f"m{i}" for i in range(50, n)]
    for method, props, body in got:
        i = int(body[1:])
        assert props.delivery_mode == 2
        assert props.message_id == str(i)
        assert props.headers == {"i": i}
        if i < 30:
            assert method.redelivered is True, f"unacked m{i} must be redelivered"
    # Bindings and the exchange survived too.
    ch.confirm_delivery()
    ch.basic_publish("dur-x", "k", b"after", mandatory=True)
    assert drain(ch, "dur-q", 1)[0][2] == b"after"
    c.close()


def test_clean_restart_keeps_durable_drops_transient(gateway_factory):
    gw = gateway_factory(["amqp"])
    c = pika.BlockingConnection(params(gw.port("amqp")))
    ch = c.channel()
    ch.confirm_delivery()
    ch.queue_declare("keep", durable=True)
    ch.queue_declare("gone", durable=False)
    ch.exchange_declare("tx-x", "fanout", durable=False)
    ch.basic_publish("", "keep", b"1", pika.BasicProperties(delivery_mode=2))
    c.close()
    gw.stop()
    gw.start()
    c = pika.BlockingConnection(params(gw.port("amqp")))
    ch = c.channel()
    assert ch.queue_declare("keep", passive=True).method.message_count == 1
    try:
        ch.queue_declare("gone", passive=True)
        raise AssertionError("transient queue survived a restart")
    except pika.exceptions.ChannelClosedByBroker as e:
        assert e.reply_code == 404
    ch = c.channel()
    try:
        ch.exchange_declare("tx-x", passive=True)
        raise AssertionError("transient exchange survived a restart")
    except pika.exceptions.ChannelClosedByBroker as e:
        assert e.reply_code == 404
    c.close()
