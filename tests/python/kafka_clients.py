#!/usr/bin/env python3
"""Real Kafka clients against Eddy, driven by tests/tests/kafka_clients.rs.

Each subcommand does one client's part and writes what it saw as JSON lines, flushed as it
goes, so the Rust test can check them while this process runs and after it is killed. Time
stamps are CLOCK_MONOTONIC seconds (the same clock in every process on the machine).
"""

import json
import signal
import sys
import time


def emit(out, **fields):
    fields["t"] = time.monotonic()
    out.write(json.dumps(fields) + "\n")
    out.flush()


def create_topic(bootstrap, topic, partitions, replication):
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, int(partitions), int(replication))], request_timeout=30)
    futures[topic].result(timeout=60)
    md = admin.list_topics(topic, timeout=30)
    t = md.topics[topic]
    assert t.error is None, t.error
    assert len(t.partitions) == int(partitions), len(t.partitions)
    for p in t.partitions.values():
        assert len(p.replicas) == int(replication), (p.id, p.replicas)
    print(json.dumps({"created": topic, "partitions": len(t.partitions)}))


def produce(bootstrap, topic, count, acked_path, start="0", rate="0"):
    """An idempotent producer (acks=all) writing `count` events with unique values (event-N
    from N = `start`), at most `rate` per second when not 0; every acknowledged event goes to
    `acked_path` as {"p","o","v"}."""
    from confluent_kafka import Producer

    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": 120000,
            "retries": 1000000,
        }
    )
    failed = []
    with open(acked_path, "w") as acked:

        def delivered(err, msg):
            if err is not None:
                failed.append(str(err))
            else:
                emit(acked, p=msg.partition(), o=msg.offset(), v=msg.value().decode())

        began = time.monotonic()
        for n, i in enumerate(range(int(start), int(start) + int(count))):
            if float(rate) > 0:
                while time.monotonic() < began + n / float(rate):
                    p.poll(0.001)
            while True:
                try:
                    p.produce(topic, key=str(i % 97).encode(), value=f"event-{i}".encode(), on_delivery=delivered)
                    break
                except BufferError:
                    p.poll(0.05)
            p.poll(0)
        left = p.flush(120)
    print(json.dumps({"produced": int(count), "unflushed": left, "failed": failed[:10], "failures": len(failed)}))
    sys.exit(0 if left == 0 and not failed else 1)


def read_all(bootstrap, topic, partitions, out_path, idle_s):
    """Reads every partition from the beginning (no group) until idle for `idle_s`."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "read-all", "enable.auto.commit": False})
    c.assign([TopicPartition(topic, i, 0) for i in range(int(partitions))])
    last = time.monotonic()
    n = 0
    with open(out_path, "w") as out:
        while time.monotonic() - last < float(idle_s):
            for m in c.consume(1000, 0.5):
                if m.error():
                    raise SystemExit(f"consume error: {m.error()}")
                emit(out, p=m.partition(), o=m.offset(), v=m.value().decode())
                n += 1
                last = time.monotonic()
    c.close()
    print(json.dumps({"read": n}))


def follow(bootstrap, topic, rack, count, out_path):
    """Reads partition 0 from offset 0 with `client.rack` (so from the replica in that rack,
    KIP-392) until `count` events; an offset reset is an error (auto.offset.reset=error)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "follow",
            "enable.auto.commit": False,
            "client.rack": rack,
            "auto.offset.reset": "error",
        }
    )
    c.assign([TopicPartition(topic, 0, 0)])
    n = 0
    deadline = time.monotonic() + 240
    with open(out_path, "w") as out:
        while n < int(count) and time.monotonic() < deadline:
            for m in c.consume(1000, 0.5):
                if m.error():
                    raise SystemExit(f"consume error: {m.error()}")
                emit(out, o=m.offset(), v=m.value().decode())
                n += 1
    c.close()
    print(json.dumps({"read": n}))
    sys.exit(0 if n == int(count) else 1)


def member(client, bootstrap, topic, group, assignor, out_path):
    """A consumer-group member that logs its assignments and every event it consumes, and
    commits synchronously after processing each batch. SIGTERM makes it leave the group."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    with open(out_path, "w") as out:
        if client == "confluent":
            from confluent_kafka import Consumer

            def on_assign(c, parts):
                emit(out, ev="assign", parts=[p.partition for p in parts])

            def on_revoke(c, parts):
                emit(out, ev="revoke", parts=[p.partition for p in parts])

            def on_lost(c, parts):
                emit(out, ev="lost", parts=[p.partition for p in parts])

            c = Consumer(
                {
                    "bootstrap.servers": bootstrap,
                    "group.id": group,
                    "partition.assignment.strategy": assignor,
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "session.timeout.ms": 6000,
                    "heartbeat.interval.ms": 500,
                }
            )
            c.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost)
            emit(out, ev="started")
            while not stopping:
                msgs = c.consume(500, 0.2)
                for m in msgs:
                    if m.error():
                        emit(out, ev="error", error=str(m.error()))
                        continue
                    emit(out, ev="msg", p=m.partition(), o=m.offset(), v=m.value().decode())
                if msgs:
                    try:
                        c.commit(asynchronous=False)
                    except Exception as e:  # a commit refused during a rebalance is retried next batch
                        emit(out, ev="commit-failed", error=str(e))
            c.close()
        else:
            from kafka import KafkaConsumer, ConsumerRebalanceListener

            class Listener(ConsumerRebalanceListener):
                def on_partitions_assigned(self, parts):
                    emit(out, ev="assign", parts=[p.partition for p in parts])

                def on_partitions_revoked(self, parts):
                    emit(out, ev="revoke", parts=[p.partition for p in parts])

            c = KafkaConsumer(
                bootstrap_servers=bootstrap.split(","),
                group_id=group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                session_timeout_ms=6000,
                heartbeat_interval_ms=500,
            )
            c.subscribe([topic], listener=Listener())
            emit(out, ev="started")
            while not stopping:
                batches = c.poll(timeout_ms=200, max_records=500)
                for tp, records in batches.items():
                    for m in records:
                        emit(out, ev="msg", p=m.partition, o=m.offset, v=m.value.decode())
                if batches:
                    try:
                        c.commit()
                    except Exception as e:
                        emit(out, ev="commit-failed", error=str(e))
            c.close()
        emit(out, ev="stopped")


def secure_produce(bootstrap, topic, ca, mechanism, user, password, count):
    """Produces `count` events over SASL_SSL with `mechanism` (PLAIN, SCRAM-SHA-256 or -512) and
    prints {"delivered": n, "errors": [...]}: what the broker let through and why not."""
    from confluent_kafka import Producer

    errors = []
    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "security.protocol": "SASL_SSL",
            "ssl.ca.location": ca,
            "sasl.mechanisms": mechanism,
            "sasl.username": user,
            "sasl.password": password,
            "enable.idempotence": True,
            "acks": "all",
            "message.timeout.ms": 15000,
            "error_cb": lambda e: errors.append(str(e)),
        }
    )
    delivered = []

    def done(err, msg):
        if err is not None:
            errors.append(err.name() if hasattr(err, "name") else str(err))
        else:
            delivered.append(msg.offset())

    for i in range(int(count)):
        p.produce(topic, value=f"{mechanism}-{i}".encode(), on_delivery=done)
    p.flush(30)
    print(json.dumps({"delivered": len(delivered), "errors": sorted(set(errors))}))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {
        "create-topic": create_topic,
        "produce": produce,
        "read-all": read_all,
        "follow": follow,
        "member": member,
        "secure-produce": secure_produce,
    }[cmd](*args)
