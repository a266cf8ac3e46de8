"""The gateway hosts a handler over real TCP: the test kit's line-based echo
handler on the ledger, started from the real binary, plus the admin API,
restart durability, SIGKILL durability, connection limits and config errors."""

import json
import os
import socket
import subprocess
import threading
import time

import pytest

from harness import Gateway, binary


class Line:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.f = self.sock.makefile("rwb")

    def cmd(self, line: str) -> str:
        self.f.write(line.encode() + b"\n")
        self.f.flush()
        return self.f.readline().decode().rstrip("\n")

    def close(self):
        self.f.close()  # the socket stays open while its file object is
        self.sock.close()


def test_publish_and_read_back(gateway_factory):
    gw = gateway_factory(["echo"])
    c = Line(gw.port("echo"))
    assert c.cmd("PUB orders first") == "OK 0"
    assert c.cmd("PUB orders second one") == "OK 1"
    assert c.cmd("GET orders 0") == "MSG 0 first"
    assert c.cmd("GET orders 1") == "MSG 1 second one"
    assert c.cmd("NOPE x") == "ERR unknown command"
    status, body = gw.admin("GET", "/admin/v1/topics/public/default/orders/stats")
    assert status == 200
    stats = json.loads(body)
    assert stats["partitions"][0]["end_offset"] == 2
    c.close()


def test_tailing_reader_is_woken_by_append(gateway_factory):
    gw = gateway_factory(["echo"])
    reader, writer = Line(gw.port("echo")), Line(gw.port("echo"))
    assert writer.cmd("PUB tail x") == "OK 0"
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("r", reader.cmd("GET tail 1")))
    t.start()
    assert writer.cmd("PUB tail woken") == "OK 1"
    t.join(timeout=5)
    assert got.get("r") == "MSG 1 woken"


def test_data_survives_graceful_restart_and_sigkill(gateway_factory):
    gw = gateway_factory(["echo"])
    c = Line(gw.port("echo"))
    acked = [c.cmd(f"PUB durable m{i}") for i in range(50)]
    assert acked == [f"OK {i}" for i in range(50)]
    c.close()
    gw.kill()  # SIGKILL: every acknowledged append must survive
    gw.start()
    c = Line(gw.port("echo"))
    for i in range(50):
        assert c.cmd(f"GET durable {i}") == f"MSG {i} m{i}"
    assert c.cmd("PUB durable after") == "OK 50"
    c.close()
    assert gw.stop() == 0
    gw.start()
    c = Line(gw.port("echo"))
    assert c.cmd("GET durable 50") == "MSG 50 after"


def test_admin_rest_api(gateway_factory):
    gw = gateway_factory(["echo"])
    assert gw.admin("GET", "/healthz")[0] == 200
    assert gw.admin("GET", "/readyz")[0] == 200
    assert gw.admin("PUT", "/admin/v1/tenants/acme")[0] == 201
    assert gw.admin("PUT", "/admin/v1/tenants/acme")[0] == 409
    st, _ = gw.admin("PUT", "/admin/v1/namespaces/acme/prod", b'{"fsync": "always", "retention_ms": 1000}')
    assert st == 201
    st, body = gw.admin("GET", "/admin/v1/namespaces/acme/prod")
    assert st == 200 and json.loads(body)["fsync"] == "always"
    st, body = gw.admin("PUT", "/admin/v1/topics/acme/prod/events", b'{"partitions": 3}')
    assert st == 201 and json.loads(body)["partitions"] == 3
    st, body = gw.admin("GET", "/admin/v1/topics/acme/prod")
    assert [t["name"]["topic"] for t in json.loads(body)] == ["events"]
    st, body = gw.admin("GET", "/admin/v1/topics/acme/prod/events/stats")
    assert st == 200 and len(json.loads(body)["partitions"]) == 3
    assert gw.admin("DELETE", "/admin/v1/namespaces/acme/prod")[0] == 409  # not empty
    assert gw.admin("DELETE", "/admin/v1/topics/acme/prod/events")[0] == 204
    assert gw.admin("GET", "/admin/v1/topics/acme/prod/events")[0] == 404
    assert gw.admin("DELETE", "/admin/v1/namespaces/acme/prod")[0] == 204
    assert gw.admin("DELETE", "/admin/v1/tenants/acme")[0] == 204
    assert gw.admin("PUT", "/admin/v1/namespaces/acme/x")[0] == 404  # tenant gone
    st, body = gw.admin("PUT", "/admin/v1/topics/public/default/bad", b"{not json")
    assert st == 400 and b"error" in body
    # Metadata survives a restart.
    gw.admin("PUT", "/admin/v1/topics/public/default/kept", b'{"partitions": 2}')
    gw.restart()
    st, body = gw.admin("GET", "/admin/v1/topics/public/default/kept")
    assert st == 200 and json.loads(body)["partitions"] == 2
    st, body = gw.admin("GET", "/metrics")
    assert st == 200


def test_connection_limit(gateway_factory):
    gw = gateway_factory(["echo"], options={"echo": {"max_connections": 2}})
    a, b = Line(gw.port("echo")), Line(gw.port("echo"))
    assert a.cmd("PUB lim a") == "OK 0"
    assert b.cmd("PUB lim b") == "OK 1"
    c = socket.create_connection(("127.0.0.1", gw.port("echo")), timeout=5)
    try:
        c.sendall(b"PUB lim c\n")
        answer = c.recv(100)
    except ConnectionResetError:
        answer = b""
    assert answer == b""  # refused: closed without an answer
    a.close()
    # Room again once a connection left (the host notices within a moment).
    for _ in range(50):
        d = Line(gw.port("echo"))
        try:
            if d.cmd("PUB lim d").startswith("OK"):
                break
        except (ConnectionError, OSError):
            pass
        d.close()
        time.sleep(0.1)
    else:
        pytest.fail("connection limit never freed a slot")


def test_bad_lines_close_only_their_connection(gateway_factory):
    gw = gateway_factory(["echo"])
    good = Line(gw.port("echo"))
    bad = socket.create_connection(("127.0.0.1", gw.port("echo")), timeout=10)
    bad.sendall(b"A" * (70 * 1024) + b"\n")
    data = b""
    while chunk := bad.recv(4096):
        data += chunk
    assert data == b"ERR line too long\n"
    assert good.cmd("PUB other fine") == "OK 0"


def run(*args):
    return subprocess.run([str(binary()), *args], capture_output=True, text=True, timeout=30)


def test_config_cli(tmp_path):
    r = run("config", "print-default")
    assert r.returncode == 0 and 'data_dir = "./data"' in r.stdout
    (tmp_path / "default.toml").write_text(r.stdout)
    assert run("config", "check", str(tmp_path / "default.toml")).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[admin]\nlisten = "127.0.0.1:1"\nlisen = 3\n')
    r = run("config", "check", str(bad))
    assert r.returncode == 2 and "bad.toml" in r.stderr and "lisen" in r.stderr
    bad.write_text('protocols = ["smtp"]\n')
    r = run("config", "check", str(bad))
    assert r.returncode == 2 and "smtp" in r.stderr and "echo" in r.stderr
    bad.write_text('[broker.default_policy]\nfsync = "sometimes"\n')
    r = run("config", "check", str(bad))
    assert r.returncode == 2 and "sometimes" in r.stderr


def test_the_bare_command_reads_its_config_from_the_environment(tmp_path):
    """`manifold` with no subcommand is `manifold serve`, MANIFOLD_CONFIG
    included: a bad file named there is refused, not replaced by the
    embedded default (which would start on the default ports)."""
    bad = tmp_path / "env-bad.toml"
    bad.write_text('[admin]\nlisten = "127.0.0.1:1"\nlisen = 3\n')
    env = dict(os.environ, MANIFOLD_CONFIG=str(bad), MANIFOLD_LOG="warn")
    r = subprocess.run([str(binary())], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 2 and "env-bad.toml" in r.stderr and "lisen" in r.stderr


def test_two_handlers_on_one_address_fail_at_start(tmp_path):
    gw = Gateway(["echo"])
    gw.options = {"echo": {}}
    text = gw.config_text().replace(
        f'[admin]\nlisten = "127.0.0.1:{gw.port("admin")}"',
        f'[admin]\nlisten = "127.0.0.1:{gw.port("echo")}"',
    )
    cfg = tmp_path / "clash.toml"
    cfg.write_text(text)
    r = subprocess.run([str(binary()), "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "both want" in r.stderr
    gw.cleanup()


def _environ(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read().split(b"\0")


def test_the_gateway_deepens_the_malloc_cache_once_and_keeps_its_pid(gateway_factory):
    """On glibc the gateway re-executes itself before starting, with a deeper
    per-thread cache of freed blocks (gateway/src/main.rs says why); the
    process it became is the one that was started, and it serves."""
    gw = gateway_factory(["echo"])
    assert b"GLIBC_TUNABLES=glibc.malloc.tcache_count=256" in _environ(gw.proc.pid)
    c = Line(gw.port("echo"))
    assert c.cmd("PUB cache ok") == "OK 0"
    c.close()


def test_a_malloc_cache_setting_of_the_user_is_left_alone(gateway_factory, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=7")
    gw = gateway_factory(["echo"])
    env = _environ(gw.proc.pid)
    assert b"GLIBC_TUNABLES=glibc.malloc.tcache_count=7" in env
    assert not any(e.startswith(b"GLIBC_TUNABLES=") and b"=256" in e for e in env)
