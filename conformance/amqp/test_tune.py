"""connection.tune negotiation: a client asking for a smaller frame_max,
channel_max or heartbeat than the server proposes gets it, and the server
keeps to it (frames it sends, channels it allows, heartbeats it sends)."""

import os
import struct
import time

import pika
import pytest
from pika.exceptions import ConnectionClosedByBroker

from conftest import params
from test_bad_input import Raw, frame, method, shortstr


def test_small_frame_max_still_delivers_large_bodies_whole(gw):
    c = pika.BlockingConnection(params(gw.port("amqp"), frame_max=4096))
    assert c._impl.params.frame_max == 4096  # what pika negotiated
    ch = c.channel()
    ch.confirm_delivery()
    ch.queue_declare("fm-q")
    body = os.urandom(50_000)
    ch.basic_publish("", "fm-q", body)
    got = []
    for m, _, b in ch.consume("fm-q", auto_ack=True, inactivity_timeout=5):
        assert m is not None, "timed out"
        got.append(b)
        break
    assert got == [body]
    c.close()


def test_server_splits_content_to_the_negotiated_frame_max(gw):
    """On a raw socket: every frame the server sends fits in frame_max."""
    r = Raw(gw.port("amqp"))
    r.handshake(frame_max=4096)
    r.open_channel()
    r.send(frame(1, 1, method(50, 10, struct.pack(">H", 0) + shortstr("fm-raw") + b"\x00"
                              + struct.pack(">I", 0))))
    assert r.read_method()[1:3] == (50, 11)
    body = bytes(range(256)) * 40  # 10240 bytes: three body frames at least
    r.send(frame(1, 1, method(60, 40, struct.pack(">H", 0) + shortstr("") + shortstr("fm-raw")
                              + b"\x00")))
    r.send(frame(2, 1, struct.pack(">HHQH", 60, 0, len(body), 0)))
    for i in range(0, len(body), 4000):
        r.send(frame(3, 1, body[i:i + 4000]))
    got = None
    deadline = time.time() + 5
    while got is None:
        assert time.time() < deadline, "message never arrived"
        # basic.get no-ack
        r.send(frame(1, 1, method(60, 70, struct.pack(">H", 0) + shortstr("fm-raw") + b"\x01")))
        ch, cls, mid, _ = r.read_method()
        if (cls, mid) == (60, 72):  # get-empty
            time.sleep(0.05)
            continue
        assert (cls, mid) == (60, 71)
        kind, _, payload = r.read_frame()
        assert kind == 2 and len(payload) + 8 <= 4096
        size = struct.unpack(">Q", payload[4:12])[0]
        assert size == len(body)
        got = b""
        frames = 0
        while len(got) < size:
            kind, _, payload = r.read_frame()
            assert kind == 3
            assert len(payload) + 8 <= 4096, f"body frame of {len(payload) + 8} bytes"
            got += payload
            frames += 1
        assert frames >= 3
    assert got == body
    r.close()


def test_small_channel_max_is_enforced(gw):
    c = pika.BlockingConnection(params(gw.port("amqp"), channel_max=3))
    assert c._impl.params.channel_max == 3
    chans = [c.channel() for _ in range(3)]
    for i, ch in enumerate(chans):
        ch.queue_declare(f"cm-{i}")
    # pika itself refuses a fourth automatic number; ask for one by hand.
    with pytest.raises(ConnectionClosedByBroker) as e:
        c.channel(channel_number=4)
    assert e.value.reply_code == 530
    assert e.value.reply_text == (
        "NOT_ALLOWED - number of channels opened (3) has reached the negotiated channel_max (3)")


def test_closed_channels_free_their_slot(gw):
    c = pika.BlockingConnection(params(gw.port("amqp"), channel_max=2))
    a = c.channel()
    b = c.channel()
    a.close()
    d = c.channel()
    d.queue_declare("cm-reuse")
    b.queue_declare("cm-reuse", passive=True)
    with pytest.raises(ConnectionClosedByBroker) as e:
        c.channel(channel_number=3)
    assert e.value.reply_code == 530


def test_small_heartbeat_is_honoured_by_the_server(gw):
    c = pika.BlockingConnection(params(gw.port("amqp"), heartbeat=2))
    assert c._impl.params.heartbeat == 2
    c.sleep(5.5)
    # The server proposes 60 s; it sends a heartbeat every 1 s once the
    # connection is idle only if it took the client's 2 s.
    hb = c._impl._heartbeat_checker
    assert hb._heartbeat_frames_received >= 3, hb._heartbeat_frames_received
    ch = c.channel()
    ch.queue_declare("hb-still-open")
    c.close()
