"""Other clients: pika's asynchronous SelectConnection, py-amqp, kombu,
and Debian's amqp-tools (librabbitmq-c); virtual hosts and logins."""

import subprocess
import threading

import amqp
import kombu
import pika
import pytest

from conftest import params


def run_ioloop(conn, timeout=20):
    """Runs a SelectConnection's ioloop until the test's callbacks stop it,
    or for at most `timeout` seconds."""
    timer = threading.Timer(timeout, lambda: conn.ioloop.add_callback_threadsafe(conn.ioloop.stop))
    timer.start()
    try:
        conn.ioloop.start()
    finally:
        timer.cancel()


def test_select_connection_publish_confirm_consume(gw):
    state = {"acked": 0, "got": [], "error": None}
    n = 100

    def on_open(conn):
        conn.channel(on_open_callback=on_channel)

    def on_channel(ch):
        state["ch"] = ch
        ch.confirm_delivery(on_confirm)
        ch.queue_declare("sel-q", durable=True, callback=on_declared)

    def on_declared(_):
        ch = state["ch"]
        for i in range(n):
            ch.basic_publish("", "sel-q", str(i).encode(), pika.BasicProperties(delivery_mode=2))

    def on_confirm(frame):
        m = frame.method
        if isinstance(m, pika.spec.Basic.Nack):
            state["error"] = "nack"
        state["acked"] = max(state["acked"], m.delivery_tag)
        if state["acked"] == n and "consuming" not in state:
            state["consuming"] = True
            state["ch"].basic_consume("sel-q", on_message)

    def on_message(ch, method, props, body):
        state["got"].append(int(body))
        ch.basic_ack(method.delivery_tag)
        if len(state["got"]) == n:
            conn.close()

    conn = pika.SelectConnection(params(gw.port("amqp")), on_open_callback=on_open,
                                 on_open_error_callback=lambda c, e: state.update(error=e),
                                 on_close_callback=lambda c, e: c.ioloop.stop())
    run_ioloop(conn)
    assert state["error"] is None
    assert state["acked"] == n
    assert state["got"] == list(range(n))


def test_select_connection_confirms_nacks_and_acks(gw):
    """The async API end to end: publisher confirms with some nacks (a
    reject-publish queue at its limit), then a consumer with prefetch,
    manual acks (single and multiple) and one nack(requeue) that comes back
    redelivered; at the end the queue is empty."""
    limit, n = 10, 15
    st = {"acked": set(), "nacked": set(), "got": [], "redelivered": [], "nacked_once": False,
          "final_count": None, "error": None}

    def on_open(conn):
        conn.channel(on_open_callback=on_channel)

    def on_channel(ch):
        st["ch"] = ch
        ch.add_on_close_callback(on_channel_closed)
        ch.confirm_delivery(on_confirm, callback=lambda _: ch.queue_declare(
            "sel-limited", durable=True,
            arguments={"x-max-length": limit, "x-overflow": "reject-publish"},
            callback=on_declared))

    def on_declared(_):
        for i in range(n):
            st["ch"].basic_publish("", "sel-limited", str(i).encode(),
                                   pika.BasicProperties(delivery_mode=2))

    def on_confirm(frame):
        m = frame.method
        into = st["acked"] if isinstance(m, pika.spec.Basic.Ack) else st["nacked"]
        done = st["acked"] | st["nacked"]
        tags = ([t for t in range(1, m.delivery_tag + 1) if t not in done]
                if m.multiple else [m.delivery_tag])
        into.update(tags)
        if len(st["acked"]) + len(st["nacked"]) == n:
            ch = st["ch"]
            ch.basic_qos(prefetch_count=4, callback=lambda _: ch.basic_consume(
                "sel-limited", on_message))

    def on_message(ch, method, props, body):
        i = int(body)
        if method.redelivered:
            st["redelivered"].append(i)
        if i == 0 and not st["nacked_once"]:
            st["nacked_once"] = True
            ch.basic_nack(method.delivery_tag, requeue=True)
            return
        st["got"].append(i)
        if len(st["got"]) % 2 == 0:
            ch.basic_ack(method.delivery_tag, multiple=True)
        if len(st["got"]) == limit:
            # Closing the channel would requeue anything left unacked.
            ch.close()

    def on_channel_closed(ch, reason):
        if not isinstance(reason, pika.exceptions.ChannelClosedByClient):
            st["error"] = f"channel closed: {reason}"
            conn.close()
            return
        conn.channel(on_open_callback=lambda c2: c2.queue_declare(
            "sel-limited", passive=True, callback=on_count))

    def on_count(frame):
        st["final_count"] = frame.method.message_count
        conn.close()

    conn = pika.SelectConnection(params(gw.port("amqp")), on_open_callback=on_open,
                                 on_open_error_callback=lambda c, e: st.update(error=e),
                                 on_close_callback=lambda c, e: c.ioloop.stop())
    run_ioloop(conn)
    assert st["error"] is None
    # The first `limit` publishes were stored, the rest refused.
    assert st["acked"] == set(range(1, limit + 1))
    assert st["nacked"] == set(range(limit + 1, n + 1))
    assert sorted(st["got"]) == list(range(limit))
    assert st["redelivered"] == [0]
    assert st["final_count"] == 0


def test_py_amqp_client(gw):
    with amqp.Connection(f"127.0.0.1:{gw.port('amqp')}", userid="guest", password="guest",
                         login_method="AMQPLAIN") as c:
        ch = c.channel()
        ch.confirm_select()
        ch.queue_declare("pyamqp-q", durable=True, auto_delete=False)
        ch.basic_publish_confirm(amqp.Message("hi", content_type="text/plain",
                                              application_headers={"a": 1}),
                                 exchange="", routing_key="pyamqp-q")
        m = ch.basic_get("pyamqp-q")
        assert m.body == "hi" and m.properties["application_headers"] == {"a": 1}
        ch.basic_ack(m.delivery_tag)


def test_kombu_simple_queue(gw):
    with kombu.Connection(f"amqp://guest:guest@127.0.0.1:{gw.port('amqp')}//") as conn:
        q = conn.SimpleQueue("kombu-q")
        q.put({"hello": "world"})
        msg = q.get(block=True, timeout=5)
        assert msg.payload == {"hello": "world"}
        msg.ack()
        q.close()


def test_kombu_producer_consumer_topic(gw):
    ex = kombu.Exchange("kombu-topic", type="topic", durable=True)
    queue = kombu.Queue("kombu-tq", ex, routing_key="a.*")
    with kombu.Connection(f"amqp://guest:guest@127.0.0.1:{gw.port('amqp')}//") as conn:
        with conn.Producer() as p:
            p.publish({"n": 1}, exchange=ex, routing_key="a.b", declare=[queue],
                      serializer="json", retry=False)
        got = []
        with conn.Consumer(queue, callbacks=[lambda body, m: (got.append(body), m.ack())]):
            conn.drain_events(timeout=5)
        assert got == [{"n": 1}]


def run(*args, **kw):
    return subprocess.run(args, capture_output=True, timeout=20, **kw)


def test_amqp_tools(gw):
    url = f"amqp://guest:guest@127.0.0.1:{gw.port('amqp')}"
    r = run("amqp-declare-queue", "--url", url, "-d", "-q", "tools-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == b"tools-q"
    r = run("amqp-publish", "--url", url, "-r", "tools-q", "-p", "-C", "text/plain",
            "-b", "from amqp-tools")
    assert r.returncode == 0, r.stderr
    r = run("amqp-get", "--url", url, "-q", "tools-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"from amqp-tools"
    run("amqp-publish", "--url", url, "-r", "tools-q", "-b", "one more")
    r = run("amqp-consume", "--url", url, "-q", "tools-q", "-c", "1", "cat")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"one more"


def test_vhosts_are_isolated(gw):
    a = pika.BlockingConnection(params(gw.port("amqp"), virtual_host="team-a"))
    b = pika.BlockingConnection(params(gw.port("amqp"), virtual_host="team-b"))
    ca, cb = a.channel(), b.channel()
    ca.confirm_delivery()
    ca.queue_declare("same-name")
    cb.queue_declare("same-name")
    ca.basic_publish("", "same-name", b"for a")
    assert cb.queue_declare("same-name", passive=True).method.message_count == 0
    assert ca.queue_declare("same-name", passive=True).method.message_count == 1
    a.close()
    b.close()
    # Each vhost is a namespace of the broker (tenant `amqp` by default).
    status, body = gw.admin("GET", "/admin/v1/namespaces/amqp")
    assert status == 200, body
    assert b"team-a" in body and b"team-b" in body


def test_bad_password_is_refused(gw):
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(params(gw.port("amqp"),
                                       credentials=pika.PlainCredentials("guest", "nope")))


def test_many_channels_one_connection(conn):
    chans = [conn.channel() for _ in range(50)]
    for i, ch in enumerate(chans):
        ch.queue_declare(f"mc-{i}")
        ch.basic_publish("", f"mc-{i}", str(i).encode())
    for i, ch in enumerate(chans):
        for _ in range(50):
            m, _, b = ch.basic_get(f"mc-{i}", auto_ack=True)
            if m:
                break
            conn.sleep(0.05)
        assert b == str(i).encode()


def test_py_amqp_properties_round_trip(gw):
    """py-amqp encodes some field types pika does not (floats, 'L' for
    large integers); every property and header comes back equal."""
    import datetime
    import decimal

    headers = {
        "float": 2.5,
        "big": 2**50,
        "small": -3,
        "text": "é",
        "flag": True,
        "dec": decimal.Decimal("1.25"),
        "when": datetime.datetime(2023, 1, 2, 3, 4, 5),  # py-amqp decodes naive UTC
        "list": [1.5, "a", {"k": None}],
        "tbl": {"inner": {"n": 1}},
    }
    props = dict(content_type="text/plain", content_encoding="utf-8",
                 application_headers=headers, delivery_mode=2, priority=9,
                 correlation_id="c-9", reply_to="rq", expiration="120000",
                 message_id="m-9", timestamp=1690000000, type="t", user_id="guest",
                 app_id="py-amqp")
    with amqp.Connection(f"127.0.0.1:{gw.port('amqp')}", userid="guest", password="guest") as c:
        ch = c.channel()
        ch.confirm_select()
        ch.queue_declare("pyamqp-props", durable=True, auto_delete=False)
        ch.basic_publish_confirm(amqp.Message("body", **props), exchange="",
                                 routing_key="pyamqp-props")
        m = ch.basic_get("pyamqp-props", no_ack=True)
        assert m is not None and m.body == "body"
        for k, v in props.items():
            if k == "application_headers":
                continue
            assert m.properties[k] == v, k
        got = m.properties["application_headers"]
        assert got == headers
        assert isinstance(got["float"], float) and isinstance(got["dec"], decimal.Decimal)


def test_amqp_tools_properties_and_no_ack_consume(gw):
    url = f"amqp://guest:guest@127.0.0.1:{gw.port('amqp')}"
    assert run("amqp-declare-queue", "--url", url, "-d", "-q", "tools-props").returncode == 0
    r = run("amqp-publish", "--url", url, "-r", "tools-props", "-p", "-C", "application/json",
            "-E", "identity", "-t", "replies", "-H", "x-a: one", "-H", "x-b: two",
            "-b", '{"k": 1}')
    assert r.returncode == 0, r.stderr
    c = pika.BlockingConnection(params(gw.port("amqp")))
    ch = c.channel()
    m, p, body = ch.basic_get("tools-props", auto_ack=True)
    assert body == b'{"k": 1}'
    assert (p.content_type, p.content_encoding, p.reply_to, p.delivery_mode) == (
        "application/json", "identity", "replies", 2)
    assert p.headers == {"x-a": "one", "x-b": "two"}
    # amqp-consume in no-ack mode takes both messages; nothing is left.
    ch.confirm_delivery()
    ch.basic_publish("", "tools-props", b"1")
    ch.basic_publish("", "tools-props", b"2")
    r = run("amqp-consume", "--url", url, "-q", "tools-props", "-A", "-c", "2", "cat")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"12"
    assert ch.queue_declare("tools-props", passive=True).method.message_count == 0
    c.close()
