"""A tiny raw Kafka wire client for the bad-input and idempotence tests:
hand-encoded requests (non-flexible versions only), framed responses."""

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

    def request(self, api_key, version, body: bytes, client_id="raw"):
        self.corr += 1
        header = struct.pack(">hhi", api_key, version, self.corr) + string(client_id)
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

    def is_closed(self, timeout=5):
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self):
        self.sock.close()


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
