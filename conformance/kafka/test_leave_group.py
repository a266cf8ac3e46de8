"""LeaveGroup as Kafka's group coordinator answers it, including v3+'s
batch of members (KIP-345): dynamic members by member id, static members
by group.instance.id, one error code per member; the group rebalances and
the members left get the partitions. No client library sends a batch (the
Java admin's removeMembersFromConsumerGroup does; confluent-kafka has no
such call), so the batches are raw frames; the static-member test drives
librdkafka consumers around one."""

import struct
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from kraw import TAGS, Raw, array, str_

JOIN_GROUP, HEARTBEAT, LEAVE_GROUP, SYNC_GROUP = 11, 12, 13, 14
NONE, INVALID_GROUP_ID, UNKNOWN_MEMBER_ID = 0, 24, 25
REBALANCE_IN_PROGRESS, MEMBER_ID_REQUIRED, FENCED_INSTANCE_ID = 27, 79, 82


def join_v5(raw, group, member_id, instance=None, session_ms=30000):
    """-> (error, generation, leader, member_id, [(member, instance)])"""
    body = str_(group) + struct.pack(">ii", session_ms, 10000)
    body += str_(member_id) + str_(instance) + str_("consumer")
    body += array([str_("range") + struct.pack(">i", 4) + b"meta"])
    r = raw.call(JOIN_GROUP, 5, body)
    r.i32()
    err, gen = r.i16(), r.i32()
    r.string()  # protocol name
    leader, me = r.string(), r.string()
    members = []
    for _ in range(r.array_len()):
        mid, inst = r.string(), r.string()
        n = r.i32()
        r.pos += n  # metadata bytes
        members.append((mid, inst))
    assert r.done()
    return err, gen, leader, me, members


def sync_v3(raw, group, gen, member_id, instance=None, assignments=()):
    body = str_(group) + struct.pack(">i", gen) + str_(member_id) + str_(instance)
    body += array([str_(m) + struct.pack(">i", len(a)) + a for m, a in assignments])
    r = raw.call(SYNC_GROUP, 3, body)
    r.i32()
    err = r.i16()
    n = r.i32()
    return err, r.data[r.pos:r.pos + max(n, 0)]


def heartbeat_v3(raw, group, gen, member_id, instance=None):
    body = str_(group) + struct.pack(">i", gen) + str_(member_id) + str_(instance)
    r = raw.call(HEARTBEAT, 3, body)
    r.i32()
    return r.i16()


def leave(raw, version, group, members):
    """members: [(member_id, instance)] (one, before v3) ->
    (top-level error, [(member_id, instance, error)])"""
    flex = version >= 4
    if version < 3:
        [(mid, _)] = members
        r = raw.call(LEAVE_GROUP, version, str_(group) + str_(mid))
        if version >= 1:
            r.i32()
        err = r.i16()
        assert r.done()
        return err, []
    tags = TAGS if flex else b""
    items = []
    for mid, inst in members:
        item = str_(mid, flex) + str_(inst, flex)
        if version >= 5:
            item += str_("test", flex)  # reason
        items.append(item + tags)
    r = raw.call(LEAVE_GROUP, version, str_(group, flex) + array(items, flex) + tags,
                 flexible=flex)
    r.i32()
    err = r.i16()
    out = []
    for _ in range(r.array_len(flex)):
        out.append((r.string(flex), r.string(flex), r.i16()))
        if flex:
            r.tags()
    if flex:
        r.tags()
    assert r.done()
    return err, out


def new_member_id(port, group):
    raw = Raw(port)
    err, _, _, mid, _ = join_v5(raw, group, "")
    raw.close()
    assert err == MEMBER_ID_REQUIRED
    return mid


def form_group(port, group, specs):
    """Joins every (member_id, instance) of `specs` at once and syncs them;
    the leader hands each member its own name as its assignment.
    -> {spec: (conn, member_id, generation, assignment)}, leader's view"""
    conns = {s: Raw(port, timeout=60) for s in specs}
    with ThreadPoolExecutor(len(specs)) as ex:
        joined = dict(zip(specs, ex.map(lambda s: join_v5(conns[s], group, *s), specs)))
    assert all(j[0] == NONE for j in joined.values()), joined
    gens = {j[1] for j in joined.values()}
    assert len(gens) == 1, joined
    gen = gens.pop()
    leader_view = next(j[4] for j in joined.values() if j[2] == j[3])

    def sync(s):
        _, _, leader, me, members = joined[s]
        assignments = [(m, m.encode()) for m, _ in members] if leader == me else ()
        return sync_v3(conns[s], group, gen, me, s[1], assignments)

    with ThreadPoolExecutor(len(specs)) as ex:
        synced = dict(zip(specs, ex.map(sync, specs)))
    out = {}
    for s in specs:
        err, assignment = synced[s]
        assert err == NONE, (s, err)
        me = joined[s][3]
        assert assignment == me.encode()
        out[s] = (conns[s], me, gen, assignment)
    return out, leader_view


def test_a_batch_of_members_leaves_in_one_request(kafka_gw):
    port = kafka_gw.port("kafka")
    group = "batch-" + uuid.uuid4().hex[:6]
    a_id, c_id = new_member_id(port, group), new_member_id(port, group)
    specs = [(a_id, None), ("", "inst-b"), (c_id, None), ("", "inst-d")]
    members, view = form_group(port, group, specs)
    assert sorted(i or m for m, i in view) == sorted([a_id, c_id, "inst-b", "inst-d"])
    (_, b_id, gen, _), (_, d_id, _, _) = members[specs[1]], members[specs[3]]

    admin = Raw(port)
    err, results = leave(admin, 3, group, [
        (a_id, None),          # dynamic, by member id
        ("", "inst-b"),        # static, by instance id alone (admin removal)
        ("ghost", None),       # nobody
        ("", "inst-ghost"),    # no such instance
        ("wrong", "inst-d"),   # a live instance, but not this member id
        (c_id, "inst-ghost"),  # a live member, under an instance it is not
        (a_id, None),          # already gone
    ])
    assert err == NONE
    assert results == [
        (a_id, None, NONE),
        ("", "inst-b", NONE),
        ("ghost", None, UNKNOWN_MEMBER_ID),
        ("", "inst-ghost", UNKNOWN_MEMBER_ID),
        ("wrong", "inst-d", FENCED_INSTANCE_ID),
        (c_id, "inst-ghost", UNKNOWN_MEMBER_ID),
        (a_id, None, UNKNOWN_MEMBER_ID),
    ]
    # The members who left are gone; those who stayed are told to rejoin.
    assert heartbeat_v3(members[specs[0]][0], group, gen, a_id) == UNKNOWN_MEMBER_ID
    assert heartbeat_v3(members[specs[1]][0], group, gen, b_id, "inst-b") == UNKNOWN_MEMBER_ID
    c_conn, d_conn = members[specs[2]][0], members[specs[3]][0]
    assert heartbeat_v3(c_conn, group, gen, c_id) == REBALANCE_IN_PROGRESS
    assert heartbeat_v3(d_conn, group, gen, d_id, "inst-d") == REBALANCE_IN_PROGRESS
    # They rejoin: a new generation of just the two, who get everything.
    started = time.monotonic()
    rest, view = form_group(port, group, [(c_id, None), (d_id, "inst-d")])
    assert time.monotonic() - started < 5
    assert sorted(view) == sorted([(c_id, None), (d_id, "inst-d")])
    gen2 = rest[(c_id, None)][2]
    assert gen2 == gen + 1
    assert heartbeat_v3(rest[(c_id, None)][0], group, gen2, c_id) == NONE
    assert heartbeat_v3(rest[(d_id, "inst-d")][0], group, gen2, d_id, "inst-d") == NONE


def test_leave_group_at_every_version(kafka_gw):
    port = kafka_gw.port("kafka")
    raw = Raw(port)
    unknown = "nogroup-" + uuid.uuid4().hex[:6]
    for version in (3, 4, 5):
        # A group the coordinator does not know: the request succeeds and
        # every member is unknown, as in Kafka.
        batch = [("m1", None), ("", "i1")]
        assert leave(raw, version, unknown, batch) == (
            NONE, [("m1", None, UNKNOWN_MEMBER_ID), ("", "i1", UNKNOWN_MEMBER_ID)])
        # An empty group id refuses the whole request.
        assert leave(raw, version, "", batch) == (INVALID_GROUP_ID, [])
    for version in (0, 1, 2):
        assert leave(raw, version, unknown, [("m1", None)]) == (UNKNOWN_MEMBER_ID, [])
        assert leave(raw, version, "", [("m1", None)]) == (INVALID_GROUP_ID, [])
    # A member really leaves at each version (one at a time before v3).
    for version in range(6):
        group = f"v{version}-" + uuid.uuid4().hex[:6]
        members, _ = form_group(port, group, [("", "solo")])
        (_, me, gen, _), = members.values()
        assert leave(raw, version, group, [(me, None)])[0] == NONE
        assert heartbeat_v3(Raw(port), group, gen, me) == UNKNOWN_MEMBER_ID


def test_a_pending_member_leaving_stops_the_rebalance_waiting(kafka_gw):
    # KIP-394 and KIP-345 together, as in Kafka: an id MEMBER_ID_REQUIRED
    # gave out is pending until it joins; a rebalance waits for it. If it
    # leaves instead, the rebalance completes without it at once.
    port = kafka_gw.port("kafka")
    group = "pending-" + uuid.uuid4().hex[:6]
    pending = new_member_id(port, group)
    with ThreadPoolExecutor(1) as ex:
        joining = ex.submit(join_v5, Raw(port, timeout=60), group, "", "waiting")
        time.sleep(1.5)  # past the initial rebalance delay: still waiting
        assert not joining.done()
        started = time.monotonic()
        assert leave(Raw(port), 3, group, [(pending, None)]) == (
            NONE, [(pending, None, NONE)])
        err, gen, leader, me, members = joining.result(timeout=10)
    assert time.monotonic() - started < 3  # not the pending id's 30 s
    assert (err, gen, leader) == (NONE, 1, me) and members == [(me, "waiting")]


def _wait_assignment(consumers, want, timeout):
    """Polls every consumer until each has `want[i]` partitions assigned."""
    deadline = time.monotonic() + timeout
    while True:
        for c in consumers:
            c.poll(0.1)
        if [len(c.assignment()) for c in consumers] == want:
            return
        assert time.monotonic() < deadline, [len(c.assignment()) for c in consumers]


def test_librdkafka_static_member_removed_by_instance_id(kafka_gw, bootstrap):
    topic = "static-" + uuid.uuid4().hex[:8]
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 4, 1)])[topic].result(15)
    group = "g-" + uuid.uuid4().hex[:6]

    def consumer(instance):
        return Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "group.instance.id": instance,
                         "session.timeout.ms": 60000, "heartbeat.interval.ms": 500,
                         "partition.assignment.strategy": "range",
                         "auto.offset.reset": "earliest"})

    s1, s2 = consumer("s1"), consumer("s2")
    try:
        s1.subscribe([topic])
        s2.subscribe([topic])
        _wait_assignment([s1, s2], [2, 2], 60)
        # A static member that closes does not leave: the group keeps its
        # place (and partitions) until its session times out.
        s1.close()
        s1 = None
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            s2.poll(0.2)
        assert len(s2.assignment()) == 2
        desc = admin.describe_consumer_groups([group])[group].result(15)
        assert sorted(m.group_instance_id for m in desc.members) == ["s1", "s2"]
        # Removed by its instance id in a batch (with an unknown one): the
        # group rebalances now, far sooner than the 60 s session timeout.
        started = time.monotonic()
        err, results = leave(Raw(kafka_gw.port("kafka")), 3, group,
                             [("", "s1"), ("", "s-none")])
        assert (err, results) == (NONE, [("", "s1", NONE), ("", "s-none", UNKNOWN_MEMBER_ID)])
        _wait_assignment([s2], [4], 20)
        assert time.monotonic() - started < 15
        desc = admin.describe_consumer_groups([group])[group].result(15)
        assert [m.group_instance_id for m in desc.members] == ["s2"]
        # And s2 consumes every partition.
        p = Producer({"bootstrap.servers": bootstrap})
        for part in range(4):
            p.produce(topic, value=b"p%d" % part, partition=part)
        assert p.flush(10) == 0
        seen = set()
        deadline = time.monotonic() + 30
        while len(seen) < 4 and time.monotonic() < deadline:
            m = s2.poll(0.5)
            if m is not None and not m.error():
                seen.add(m.partition())
        assert seen == {0, 1, 2, 3}
    finally:
        if s1 is not None:
            s1.close()
        s2.close()
