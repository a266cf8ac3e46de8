"""Small helpers over paho-mqtt 2.x (the real client) and a raw-socket
packet writer for the malformed-input tests."""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

V31, V311, V5 = mqtt.MQTTv31, mqtt.MQTTv311, mqtt.MQTTv5
VERSIONS = {"v3.1": V31, "v3.1.1": V311, "v5": V5}


class Client:
    """A paho client running its network loop in a thread, with blocking
    helpers and a queue of received messages."""

    def __init__(self, port, client_id="", version=V311, clean=True, session_expiry=None,
                 transport="tcp", will=None, receive_maximum=None, max_packet_size=None,
                 keepalive=30):
        self.version = version
        self.port = port
        self.clean = clean
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        self.receive_maximum = receive_maximum
        self.max_packet_size = max_packet_size
        kw = {}
        if version != V5:
            kw["clean_session"] = clean
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=version, transport=transport, **kw)
        if transport == "websockets":
            self.c.ws_set_options(path="/mqtt")
        if will is not None:
            topic, payload, qos, retain, props = (list(will) + [None] * 5)[:5]
            self.c.will_set(topic, payload, qos=qos or 0, retain=bool(retain), properties=props)
        self.messages: queue.Queue = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connack = None
        self.disconnect_reason = None
        self.subacks: queue.Queue = queue.Queue()
        self.unsubacks: queue.Queue = queue.Queue()
        self.c.on_connect = self._on_connect
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_disconnect = self._on_disconnect
        self.c.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put(rcs)
        self.c.on_unsubscribe = lambda c, u, mid, rcs, props: self.unsubacks.put(rcs)

    def _on_connect(self, c, u, flags, rc, props):
        self.connack = (flags, rc, props)
        self.connected.set()

    def _on_disconnect(self, c, u, flags, rc, props):
        self.disconnect_reason = rc
        self.disconnected.set()

    def connect(self, timeout=10) -> "Client":
        props = None
        if self.version == V5:
            props = Properties(PacketTypes.CONNECT)
            if self.session_expiry is not None:
                props.SessionExpiryInterval = self.session_expiry
            if self.receive_maximum is not None:
                props.ReceiveMaximum = self.receive_maximum
            if self.max_packet_size is not None:
                props.MaximumPacketSize = self.max_packet_size
            self.c.connect("127.0.0.1", self.port, keepalive=self.keepalive,
                           clean_start=self.clean, properties=props)
        else:
            self.c.connect("127.0.0.1", self.port, keepalive=self.keepalive)
        self.c.loop_start()
        assert self.connected.wait(timeout), "no CONNACK"
        flags, rc, _ = self.connack
        assert not rc.is_failure, f"CONNACK refused: {rc}"
        return self

    @property
    def session_present(self) -> bool:
        return bool(self.connack[0].session_present)

    def sub(self, topic, qos=1, no_local=False, rap=False, rh=0, sub_id=None, timeout=5):
        if self.version == V5:
            props = None
            if sub_id is not None:
                props = Properties(PacketTypes.SUBSCRIBE)
                props.SubscriptionIdentifier = sub_id
            opts = SubscribeOptions(qos=qos, noLocal=no_local, retainAsPublished=rap,
                                    retainHandling=rh)
            self.c.subscribe(topic, options=opts, properties=props)
        else:
            self.c.subscribe(topic, qos)
        rcs = self.subacks.get(timeout=timeout)
        return [r.value if hasattr(r, "value") else r for r in rcs]

    def unsub(self, topic, timeout=5):
        self.c.unsubscribe(topic)
        return self.unsubacks.get(timeout=timeout)

    def pub(self, topic, payload, qos=0, retain=False, props=None, timeout=10):
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=props)
        info.wait_for_publish(timeout)
        assert info.is_published(), f"publish to {topic} not acknowledged"
        return info

    def get(self, timeout=5.0):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no message received within %.1fs" % timeout) from None

    def get_n(self, n, timeout=10.0):
        deadline = time.monotonic() + timeout
        out = []
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"received {len(out)} of {n} messages: {[m.payload for m in out]}")
            try:
                out.append(self.messages.get(timeout=left))
            except queue.Empty:
                pass
        return out

    def nothing(self, wait=0.7):
        try:
            m = self.messages.get(timeout=wait)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message {m.topic}: {m.payload!r}")

    def close(self):
        try:
            self.c.disconnect()
        finally:
            self.c.loop_stop()

    def drop(self):
        """Abrupt close: no DISCONNECT packet."""
        self.c.loop_stop()
        s = self.c.socket()
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


# ---- raw packets ----

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            b |= 0x80
        out.append(b)
        if not n:
            return bytes(out)


def s(x) -> bytes:
    b = x.encode() if isinstance(x, str) else x
    return struct.pack(">H", len(b)) + b


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def connect_packet(client_id="raw", level=4, name="MQTT", keepalive=30, clean=True,
                   will=None, props=b"") -> bytes:
    flags = 0x02 if clean else 0
    payload = s(client_id)
    if will is not None:
        topic, msg, qos = will
        flags |= 0x04 | (qos << 3)
        if level == 5:
            payload += b"\x00"
        payload += s(topic) + s(msg)
    body = s(name) + bytes([level, flags]) + struct.pack(">H", keepalive)
    if level == 5:
        body += varint(len(props)) + props
    return packet(0x10, body + payload)


class Raw:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)

    def send(self, b: bytes):
        self.sock.sendall(b)

    def recv_some(self, timeout=5.0) -> bytes:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return b""

    def closed_within(self, timeout=5.0) -> bool:
        """True if the server closes the connection (reading whatever it sends first)."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                b = self.sock.recv(65536)
            except socket.timeout:
                continue
            except (ConnectionResetError, BrokenPipeError):
                return True
            if not b:
                return True
        return False

    def close(self):
        self.sock.close()


class PacketReader:
    """Splits what a raw MQTT connection receives into packets."""

    def __init__(self, raw):
        self.raw, self.buf = raw, b""

    def next(self, timeout=5.0):
        """(type, flags, body) of the next packet, or None on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 2:
                n, mul, i = 0, 1, 1
                while i < len(self.buf):
                    b = self.buf[i]
                    n += (b & 0x7F) * mul
                    mul *= 128
                    i += 1
                    if not b & 0x80:
                        break
                else:
                    i = None
                if i is not None and len(self.buf) >= i + n:
                    first, body = self.buf[0], self.buf[i:i + n]
                    self.buf = self.buf[i + n:]
                    return first >> 4, first & 0x0F, body
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                got = self.raw.recv_some(timeout=left)
            except TimeoutError:
                return None
            if not got:
                return None
            self.buf += got
