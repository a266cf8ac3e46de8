"""Consumer group protocol details with librdkafka: the cooperative-sticky
assignor (incremental rebalances), static membership, and session expiry
of a member that crashed."""

import sys
import threading
import time
import uuid

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic


def make_topic(bootstrap, partitions):
    name = "grp-" + uuid.uuid4().hex[:8]
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, partitions, 1)])[name].result(15)
    return name


def fill(bootstrap, topic, n, start=0):
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i in range(start, start + n):
        p.produce(topic, key=f"k{i}".encode(), value=f"v{i}".encode())
    assert p.flush(30) == 0


def test_cooperative_sticky_rebalance_keeps_everything(bootstrap):
    topic = make_topic(bootstrap, 4)
    group = "coop-" + uuid.uuid4().hex[:6]
    seen, lock, stop, assigned = [], threading.Lock(), {}, {}
    failed_commits = set()

    def run(name):
        c = Consumer({
            "bootstrap.servers": bootstrap, "group.id": group, "client.id": name,
            "auto.offset.reset": "earliest", "enable.auto.commit": False,
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": 10000, "heartbeat.interval.ms": 500,
        })

        def on_assign(cons, parts):
            assigned.setdefault(name, set()).update(p.partition for p in parts)

        def on_revoke(cons, parts):
            assigned.setdefault(name, set()).difference_update(p.partition for p in parts)

        c.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke)
        try:
            while not stop.get(name) and not stop.get("all"):
                m = c.poll(0.2)
                if m is None or m.error():
                    continue
                with lock:
                    seen.append(m.value())
                try:
                    c.commit(message=m, asynchronous=False)
                except KafkaException:
                    # A commit racing a rebalance may be refused; the
                    # record may then be delivered again (uncommitted tail).
                    failed_commits.add(m.value())
        finally:
            c.close()

    t1 = threading.Thread(target=run, args=("a",))
    t1.start()
    deadline = time.time() + 30
    while len(assigned.get("a", ())) < 4 and time.time() < deadline:
        time.sleep(0.2)
    assert assigned.get("a") == {0, 1, 2, 3}
    fill(bootstrap, topic, 200)
    t2 = threading.Thread(target=run, args=("b",))
    t2.start()
    # Incremental: b gets a share, a keeps the rest.
    deadline = time.time() + 30
    while not (assigned.get("b") and len(assigned.get("a", ())) + len(assigned["b"]) == 4) and time.time() < deadline:
        time.sleep(0.2)
    assert assigned.get("b") and assigned["a"] | assigned["b"] == {0, 1, 2, 3}
    assert not (assigned["a"] & assigned["b"])
    fill(bootstrap, topic, 200, start=200)
    deadline = time.time() + 40
    while time.time() < deadline:
        with lock:
            if len(seen) >= 400:
                break
        time.sleep(0.2)
    stop["all"] = True
    t1.join(20)
    t2.join(20)
    assert set(seen) == {f"v{i}".encode() for i in range(400)}
    dups = {v for v in seen if seen.count(v) > 1}
    # Only records whose commit failed may come twice, never committed ones.
    assert dups <= failed_commits, (dups, failed_commits)


def test_static_member_rejoins_and_keeps_its_partitions(kafka_gw, bootstrap):
    topic = make_topic(bootstrap, 2)
    group = "static-" + uuid.uuid4().hex[:6]

    def member(instance):
        return Consumer({
            "bootstrap.servers": bootstrap, "group.id": group,
            "group.instance.id": instance, "auto.offset.reset": "earliest",
            "session.timeout.ms": 30000, "heartbeat.interval.ms": 500,
        })

    def wait_assigned(c, timeout=30):
        deadline = time.time() + timeout
        while not c.assignment() and time.time() < deadline:
            c.poll(0.2)
        return {p.partition for p in c.assignment()}

    a, b = member("inst-a"), member("inst-b")
    a.subscribe([topic])
    b.subscribe([topic])
    deadline = time.time() + 30
    pa = pb = set()
    while time.time() < deadline:
        a.poll(0.1)
        b.poll(0.1)
        pa, pb = {p.partition for p in a.assignment()}, {p.partition for p in b.assignment()}
        if pa and pb:
            break
    assert pa | pb == {0, 1} and not (pa & pb)
    # b goes away without leaving (a static member's close does not send
    # LeaveGroup) and comes back with the same instance id.
    gen_before = describe_generation(bootstrap, group)
    b.close()
    b2 = member("inst-b")
    b2.subscribe([topic])
    deadline = time.time() + 30
    while not b2.assignment() and time.time() < deadline:
        a.poll(0.1)
        b2.poll(0.1)
    assert {p.partition for p in b2.assignment()} == pb
    a.poll(0.5)
    assert {p.partition for p in a.assignment()} == pa
    assert describe_generation(bootstrap, group) == gen_before
    a.close()
    b2.close()


def describe_generation(bootstrap, group):
    """The group's member ids (their set changes only through a rebalance
    for dynamic members; static members keep their partitions)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    d = admin.describe_consumer_groups([group])[group].result(15)
    return sorted(m.group_instance_id for m in d.members)


CRASHER = r"""
import sys, time
from confluent_kafka import Consumer
c = Consumer({"bootstrap.servers": sys.argv[1], "group.id": sys.argv[2],
              "session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
c.subscribe([sys.argv[3]])
while True:
    c.poll(0.2)
    if c.assignment():
        print("assigned", flush=True)
"""


def test_crashed_member_expires_and_its_partitions_move(bootstrap):
    import subprocess

    topic = make_topic(bootstrap, 2)
    group = "crash-" + uuid.uuid4().hex[:6]
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, bootstrap, group, topic],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "assigned"
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                      "session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
        c.subscribe([topic])
        deadline = time.time() + 20
        while len(c.assignment()) != 1 and time.time() < deadline:
            c.poll(0.2)
        assert len(c.assignment()) == 1
        proc.kill()  # no LeaveGroup: only the session timeout can tell
        t0 = time.time()
        deadline = time.time() + 30
        while len(c.assignment()) != 2 and time.time() < deadline:
            c.poll(0.2)
        assert {p.partition for p in c.assignment()} == {0, 1}
        assert time.time() - t0 < 6 + 10
        c.close()
    finally:
        proc.kill()
        proc.wait()
