"""A tiny raw Kafka wire client for the bad-input, idempotence and protocol
edge-case tests: hand-encoded requests (classic and flexible, KIP-482),
framed responses, and a small reader to parse response bodies."""

import socket
import struct

from kafka.record.default_records import DefaultRecordBatchBuilder


def string(s):
    if s is None:
        return struct.pack(">h", -1)
    b = s.encode()
    return struct.pack(">h", len(b)) + b


class Raw:
    def __init__(self, port, timeout=10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.corr = 0

    def send_raw(self, data: bytes):
        self.sock.sendall(data)

    def request(self, api_key, version, body: bytes, client_id="raw", flexible=False):
        """Sends a request; `flexible` uses request header v2 (a flexible
        version's header: the client id stays a classic string, then
        tagged fields). Returns the correlation id."""
        self.corr += 1
        header = struct.pack(">hhi", api_key, version, self.corr) + string(client_id)
        if flexible:
            header += uvarint(0)
        msg = header + body
        self.sock.sendall(struct.pack(">i", len(msg)) + msg)
        return self.corr

    def recv_exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def response(self):
        (n,) = struct.unpack(">i", self.recv_exact(4))
        data = self.recv_exact(n)
        (corr,) = struct.unpack(">i", data[:4])
        return corr, data[4:]

    def call(self, api_key, version, body: bytes, flexible=False):
        """One request and its response body as a Reader (for a flexible
        version the response header's tagged fields are skipped)."""
        corr = self.request(api_key, version, body, flexible=flexible)
        got, data = self.response()
        assert got == corr, (got, corr)
        r = Reader(data)
        if flexible:
            r.tags()
        return r

    def is_closed(self, timeout=5):
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self):
        self.sock.close()


def uvarint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def compact_string(s):
    """A COMPACT_NULLABLE_STRING (None is null)."""
    if s is None:
        return uvarint(0)
    b = s.encode()
    return uvarint(len(b) + 1) + b


def array(items, flexible=False):
    """An ARRAY (or COMPACT_ARRAY) of already encoded items."""
    head = uvarint(len(items) + 1) if flexible else struct.pack(">i", len(items))
    return head + b"".join(items)


def str_(s, flexible=False):
    return compact_string(s) if flexible else string(s)


TAGS = uvarint(0)  # an empty tagged-field section


class Reader:
    """Reads a response body field by field."""

    def __init__(self, data):
        self.data = data
        self.pos = 0

    def _unpack(self, fmt):
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def i16(self):
        return self._unpack(">h")

    def i32(self):
        return self._unpack(">i")

    def i64(self):
        return self._unpack(">q")

    def uvarint(self):
        n = shift = 0
        while True:
            b = self.data[self.pos]
            self.pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    def string(self, flexible=False):
        n = self.uvarint() - 1 if flexible else self.i16()
        if n < 0:
            return None
        s = self.data[self.pos:self.pos + n].decode()
        self.pos += n
        return s

    def array_len(self, flexible=False):
        return self.uvarint() - 1 if flexible else self.i32()

    def tags(self):
        for _ in range(self.uvarint()):
            self.uvarint()
            self.pos += self.uvarint()

    def done(self):
        return self.pos == len(self.data)


def batch(records, producer_id=-1, epoch=-1, base_sequence=-1):
    """records: [(key, value, headers)] -> a v2 record batch (bytes)."""
    b = DefaultRecordBatchBuilder(2, 0, False, producer_id, epoch, base_sequence, 1 << 20)
    for i, (k, v, h) in enumerate(records):
        b.append(i, 1_700_000_000_000 + i, k, v, h or [])
    return bytes(b.build())


def produce_v3(topic, partition, records_bytes, acks=-1):
    body = string(None) + struct.pack(">hi", acks, 10000)
    body += struct.pack(">i", 1) + string(topic)
    body += struct.pack(">i", 1) + struct.pack(">i", partition)
    body += struct.pack(">i", len(records_bytes)) + records_bytes
    return body


def parse_produce_v3(data):
    """-> [(topic, partition, error_code, base_offset)]"""
    pos = 0
    out = []
    (nt,) = struct.unpack_from(">i", data, pos)
    pos += 4
    for _ in range(nt):
        (ln,) = struct.unpack_from(">h", data, pos)
        pos += 2
        name = data[pos:pos + ln].decode()
        pos += ln
        (np_,) = struct.unpack_from(">i", data, pos)
        pos += 4
        for _ in range(np_):
            p, err, base, _ts = struct.unpack_from(">ihqq", data, pos)
            pos += 22
            out.append((name, p, err, base))
    return out


def metadata_v1(topics):
    body = struct.pack(">i", len(topics))
    for t in topics:
        body += string(t)
    return body
