"""Other real clients: Debian's mosquitto_pub/mosquitto_sub (3.1, 3.1.1, 5)
and paho over WebSocket."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mqttc import V5, V311, Client

pytestmark = pytest.mark.skipif(shutil.which("mosquitto_sub") is None,
                                reason="mosquitto-clients not installed")


@pytest.mark.parametrize("ver", ["mqttv31", "mqttv311", "mqttv5"])
def test_mosquitto_pub_sub(gw, uniq, ver):
    port = str(gw.port("mqtt"))
    sub = subprocess.Popen(
        ["mosquitto_sub", "-p", port, "-V", ver, "-i", f"{uniq}-s", "-t", f"{uniq}/#",
         "-q", "2", "-v", "-C", "3", "-W", "15"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.7)
    for q in (0, 1, 2):
        subprocess.run(["mosquitto_pub", "-p", port, "-V", ver, "-t", f"{uniq}/q{q}",
                        "-m", f"hello {q}", "-q", str(q)], check=True, timeout=10)
    out, err = sub.communicate(timeout=20)
    assert sub.returncode == 0, err
    assert out.splitlines() == [f"{uniq}/q{q} hello {q}" for q in (0, 1, 2)]


def test_mosquitto_retained_and_v5_properties(gw, uniq):
    port = str(gw.port("mqtt"))
    subprocess.run(["mosquitto_pub", "-p", port, "-V", "mqttv5", "-t", f"{uniq}/r", "-m", "kept",
                    "-r", "-q", "1", "-D", "publish", "user-property", "k", "v",
                    "-D", "publish", "content-type", "text/plain"], check=True, timeout=10)
    out = subprocess.run(["mosquitto_sub", "-p", port, "-V", "mqttv5", "-t", f"{uniq}/#", "-C", "1",
                          "-W", "10", "-F", "%t|%p|%r|%P|%C"],
                         capture_output=True, text=True, timeout=15)
    assert out.returncode == 0, out.stderr
    topic, payload, retained, userprops, ctype = out.stdout.strip().split("|")
    assert (topic, payload, retained) == (f"{uniq}/r", "kept", "1")
    assert "k:v" in userprops
    assert ctype == "text/plain"


def test_paho_over_websocket(gw, uniq):
    ws = gw.port("mqtt-ws")
    sub = Client(ws, f"{uniq}-s", V5, transport="websockets").connect()
    sub.sub(f"{uniq}/ws", qos=2)
    pub = Client(ws, f"{uniq}-p", V311, transport="websockets").connect()
    big = bytes(range(256)) * 400  # > 64 KiB: several frames
    for q in (0, 1, 2):
        pub.pub(f"{uniq}/ws", bytes([q]) + big, qos=q)
    got = sub.get_n(3)
    assert [m.payload for m in got] == [bytes([q]) + big for q in (0, 1, 2)]
    # TCP and WebSocket clients see each other.
    tcp = Client(gw.port("mqtt"), f"{uniq}-t", V311).connect()
    tcp.pub(f"{uniq}/ws", b"from tcp", qos=1)
    assert sub.get().payload == b"from tcp"
    sub.close(); pub.close(); tcp.close()


def test_websocket_rejects_other_paths(gw):
    import socket
    s = socket.create_connection(("127.0.0.1", gw.port("mqtt-ws")), timeout=5)
    s.sendall(b"GET /other HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 404")
    s.close()


def test_mqttjs_decodes_the_topic_aliases_the_gateway_sets(gw, uniq):
    """MQTT.js says it accepts 2 topic aliases; the gateway then sends the
    first two topics as aliases after their first message (what goes on
    the wire is checked in test_paho.py), and MQTT.js still reports every
    message's full topic. (Debian's mosquitto_sub cannot take part: its
    library refuses a PUBLISH with an empty topic.)"""
    node_modules = Path(__file__).resolve().parent.parent / ".node" / "node_modules"
    assert (node_modules / "mqtt").is_dir(), "conformance/run.sh installs MQTT.js"
    port = gw.port("mqtt")
    sub = subprocess.Popen(
        ["node", str(Path(__file__).resolve().parent / "alias-sub.js"), str(port), f"{uniq}/#",
         "6", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "NODE_PATH": str(node_modules)})
    assert sub.stdout.readline().strip() == "subscribed", sub.stderr.read()
    topics = ["a", "b", "a", "c", "b", "a"]
    pub = Client(port, f"{uniq}-p", V5).connect()
    for i, t in enumerate(topics):
        pub.pub(f"{uniq}/{t}", f"m{i}".encode(), qos=1)
    pub.close()
    out, err = sub.communicate(timeout=20)
    assert sub.returncode == 0, err
    assert out.splitlines() == [f"{uniq}/{t} m{i}" for i, t in enumerate(topics)]
