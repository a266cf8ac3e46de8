"""Bad input on a raw socket: a wrong protocol header, unknown methods,
unknown frame types, frames over frame-max, content bodies longer than announced, methods on a
channel that is not open, missed heartbeats. Each gets the right AMQP
exception with its reply code (or the header back), and the server keeps
serving other connections."""

import socket
import struct

import pika

from conftest import params

HEADER = b"AMQP\x00\x00\x09\x01"


def frame(kind, channel, payload):
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


def shortstr(s):
    b = s.encode()
    return bytes([len(b)]) + b


def longstr(b):
    return struct.pack(">I", len(b)) + b


def method(cls, mid, args=b""):
    return struct.pack(">HH", cls, mid) + args


class Raw:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = b""

    def send(self, b):
        self.s.sendall(b)

    def read_frame(self):
        while True:
            if len(self.buf) >= 7:
                kind, ch, size = struct.unpack(">BHI", self.buf[:7])
                if len(self.buf) >= size + 8:
                    payload = self.buf[7:7 + size]
                    assert self.buf[7 + size] == 0xCE
                    self.buf = self.buf[size + 8:]
                    return kind, ch, payload
            d = self.s.recv(65536)
            if not d:
                return None
            self.buf += d

    def read_method(self):
        while True:
            f = self.read_frame()
            if f is None:
                return None
            kind, ch, p = f
            if kind == 1:
                cls, mid = struct.unpack(">HH", p[:4])
                return ch, cls, mid, p[4:]

    def handshake(self, frame_max=4096):
        self.send(HEADER)
        assert self.read_method()[1:3] == (10, 10)
        table = b""
        self.send(frame(1, 0, method(10, 11, longstr(table) + shortstr("PLAIN")
                                     + longstr(b"\x00guest\x00guest") + shortstr("en_US"))))
        assert self.read_method()[1:3] == (10, 30)
        self.send(frame(1, 0, method(10, 31, struct.pack(">HIH", 16, frame_max, 0))))
        self.send(frame(1, 0, method(10, 40, shortstr("/") + shortstr("") + b"\x00")))
        assert self.read_method()[1:3] == (10, 41)

    def open_channel(self, n=1):
        self.send(frame(1, n, method(20, 10, shortstr(""))))
        assert self.read_method()[:3] == (n, 20, 11)

    def expect_close(self, cls, mid):
        m = self.read_method()
        assert m is not None, "connection dropped without a close method"
        ch, c, mm, args = m
        assert (c, mm) == (cls, mid), m
        code = struct.unpack(">H", args[:2])[0]
        return ch, code, args[3:3 + args[2]].decode()

    def close(self):
        self.s.close()


def server_still_works(gw):
    c = pika.BlockingConnection(params(gw.port("amqp")))
    c.channel().queue_declare("still-alive")
    c.close()


def test_wrong_protocol_header_gets_ours_back(gw):
    r = Raw(gw.port("amqp"))
    r.send(b"AMQP\x01\x01\x00\x0a")
    got = b""
    while len(got) < 8:
        d = r.s.recv(8)
        if not d:
            break
        got += d
    assert got == HEADER
    assert r.s.recv(1) == b""
    server_still_works(gw)


def test_unknown_method_is_540(gw):
    r = Raw(gw.port("amqp"))
    r.handshake()
    r.open_channel()
    r.send(frame(1, 1, method(60, 999)))
    _, code, text = r.expect_close(10, 50)
    assert code == 540, text
    server_still_works(gw)


def test_frame_over_frame_max_is_501(gw):
    r = Raw(gw.port("amqp"))
    r.handshake(frame_max=4096)
    r.open_channel()
    r.send(frame(3, 1, b"x" * 5000))
    _, code, _ = r.expect_close(10, 50)
    assert code == 501
    server_still_works(gw)


def test_body_longer_than_header_size_is_501(gw):
    r = Raw(gw.port("amqp"))
    r.handshake()
    r.open_channel()
    r.send(frame(1, 1, method(60, 40, struct.pack(">H", 0) + shortstr("") + shortstr("q") + b"\x00")))
    r.send(frame(2, 1, struct.pack(">HHQH", 60, 0, 3, 0)))
    r.send(frame(3, 1, b"four"))
    _, code, _ = r.expect_close(10, 50)
    assert code == 501
    server_still_works(gw)


def test_method_instead_of_body_is_505(gw):
    r = Raw(gw.port("amqp"))
    r.handshake()
    r.open_channel()
    r.send(frame(1, 1, method(60, 40, struct.pack(">H", 0) + shortstr("") + shortstr("q") + b"\x00")))
    r.send(frame(1, 1, method(60, 40, struct.pack(">H", 0) + shortstr("") + shortstr("q") + b"\x00")))
    _, code, _ = r.expect_close(10, 50)
    assert code == 505


def test_method_on_unopened_channel_is_504(gw):
    r = Raw(gw.port("amqp"))
    r.handshake()
    r.send(frame(1, 7, method(50, 10, struct.pack(">H", 0) + shortstr("q") + b"\x00" + longstr(b""))))
    _, code, _ = r.expect_close(10, 50)
    assert code == 504


def test_truncated_method_arguments_are_502(gw):
    r = Raw(gw.port("amqp"))
    r.handshake()
    r.open_channel()
    r.send(frame(1, 1, method(50, 10, b"\x00")))
    _, code, _ = r.expect_close(10, 50)
    assert code == 502


def test_channel_error_keeps_connection(gw):
    r = Raw(gw.port("amqp"))
    r.handshake()
    r.open_channel()
    # queue.declare passive on a missing queue: channel.close 404.
    r.send(frame(1, 1, method(50, 10, struct.pack(">H", 0) + shortstr("missing") + b"\x01" + longstr(b""))))
    ch, code, text = r.expect_close(20, 40)
    assert (ch, code) == (1, 404) and "no queue 'missing'" in text
    # Methods after the close are ignored until close-ok.
    r.send(frame(1, 1, method(50, 10, struct.pack(">H", 0) + shortstr("x") + b"\x00" + longstr(b""))))
    r.send(frame(1, 1, method(20, 41)))
    r.open_channel(1)


def test_missed_client_heartbeats_close_the_connection(gw):
    r = Raw(gw.port("amqp"))
    r.send(HEADER)
    r.read_method()
    r.send(frame(1, 0, method(10, 11, longstr(b"") + shortstr("PLAIN")
                              + longstr(b"\x00guest\x00guest") + shortstr("en_US"))))
    r.read_method()
    r.send(frame(1, 0, method(10, 31, struct.pack(">HIH", 16, 4096, 1))))
    r.send(frame(1, 0, method(10, 40, shortstr("/") + shortstr("") + b"\x00")))
    assert r.read_method()[1:3] == (10, 41)
    r.s.settimeout(10)
    kinds = []
    while True:
        f = r.read_frame()
        if f is None:
            break
        kinds.append(f[0])
    # The server sent heartbeats while idle, then gave up on us.
    assert 8 in kinds


def test_unknown_frame_type_is_501(gw):
    for channel in (0, 1):
        r = Raw(gw.port("amqp"))
        r.handshake()
        r.open_channel()
        r.send(frame(9, channel, b"what is this"))
        _, code, text = r.expect_close(10, 50)
        assert code == 501, text
        # After connection.close the server waits for close-ok, then goes.
        r.send(frame(1, 0, method(10, 51)))
        assert r.read_frame() is None
        r.close()
    server_still_works(gw)
