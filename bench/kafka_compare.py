#!/usr/bin/env python3
"""The Kafka path against the gRPC path on the same local 3-node cluster (release build), in the
same run, rep-major so that a disturbance hits one rep of each row.

    target/kafka-venv/bin/python bench/kafka_compare.py [--target-dir target] [--reps 3]
                                                         [--events 200000] [--window 4096] [--out FILE]

Needs confluent-kafka in the running Python (`cargo test -p eddy-tests --test all kafka_clients::`
makes `target/kafka-venv` with it). Rows, for 256-byte events on a one-partition topic:

- produce: gRPC `eddyctl bench produce --inflight WINDOW --linger-ms 5` against a
  confluent-kafka producer (librdkafka) with acks=all and linger.ms=5 kept to the same WINDOW of
  unacknowledged events, each writing EVENTS events as fast as they are acknowledged; events/s, ack latency p50/p99 (Kafka: from produce() to the delivery report),
  and CPU µs per event (the three nodes and the client).
- consume from a follower: `eddyctl bench consume` against a confluent-kafka consumer with
  client.rack set to a follower's rack (KIP-392), reading the EVENTS events from the start.

Medians over the reps, and Kafka / gRPC ratios of the medians.
"""
import argparse, json, os, resource, statistics, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eddy_cluster import Cluster, cpu_seconds, free_port

from confluent_kafka import Consumer, Producer, TopicPartition


class KafkaCluster(Cluster):
    """A cluster whose nodes also listen for Kafka clients, in racks a, b, c."""

    def __init__(self, bin_dir, n=3):
        self.kafka = {i: f"127.0.0.1:{free_port()}" for i in range(1, n + 1)}
        super().__init__(bin_dir, n)

    def start(self, i):
        with open(self.nodes[i]["config"]) as f:
            text = f.read()
        if "kafka_addr" not in text:
            with open(self.nodes[i]["config"], "w") as f:
                f.write(f'kafka_addr = "{self.kafka[i]}"\nrack = "{"abc"[(i - 1) % 3]}"\n' + text)
        super().start(i)

    def bootstrap(self):
        return ",".join(self.kafka.values())


def nodes_cpu(c):
    return sum(cpu_seconds(n["proc"].pid) for n in c.nodes.values())


def bench(c, *args):
    """`eddyctl bench ARGS`: its JSON, and the CPU seconds of the nodes and of eddyctl."""
    before, child = nodes_cpu(c), resource.getrusage(resource.RUSAGE_CHILDREN)
    code, out, err = c.ctl("bench", *args, timeout=600)
    if code != 0:
        raise SystemExit(f"eddyctl bench {' '.join(args)}: {err}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = (after.ru_utime + after.ru_stime) - (child.ru_utime + child.ru_stime)
    nodes = nodes_cpu(c) - before
    return json.loads(out.strip().splitlines()[-1]), nodes + client, nodes


def grpc_produce(c, events, window):
    r, cpu, nodes = bench(c, "produce", "--events", str(events), "--size", "256", "--inflight", str(window),
                   "--linger-ms", "5", "--topic", "grpc")
    return dict(eps=r.get("events_per_sec") or r["events_per_s"], p50=r["ack"]["p50_ms"], p99=r["ack"]["p99_ms"],
                cpu_us=cpu / events * 1e6, node_cpu_us=nodes / events * 1e6)


def kafka_produce(c, events, topic, window):
    p = Producer({"bootstrap.servers": c.bootstrap(), "acks": "all", "linger.ms": 5,
                  "queue.buffering.max.messages": 1000000})
    payload = b"x" * 256
    lat = []
    failed = []

    def done(err, msg, sent):
        if err:
            failed.append(err)
        else:
            lat.append(time.monotonic() - sent)

    # Warm-up: metadata, connections, the first batches.
    for _ in range(1000):
        p.produce(topic, payload, partition=0)
    p.flush(60)
    cpu0, t0, c0 = nodes_cpu(c), time.monotonic(), time.process_time()
    for i in range(events):
        while i - len(lat) - len(failed) >= window:
            p.poll(0.001)
        sent = time.monotonic()
        while True:
            try:
                p.produce(topic, payload, partition=0, on_delivery=lambda e, m, s=sent: done(e, m, s))
                break
            except BufferError:
                p.poll(0.01)
        p.poll(0)
    p.flush(300)
    elapsed = time.monotonic() - t0
    nodes = nodes_cpu(c) - cpu0
    cpu = nodes + (time.process_time() - c0)
    if failed or len(lat) != events:
        raise SystemExit(f"kafka produce: {len(lat)} of {events} delivered, errors {failed[:3]}")
    lat.sort()
    return dict(eps=events / elapsed, p50=lat[len(lat) // 2] * 1e3, p99=lat[int(len(lat) * 0.99)] * 1e3,
                cpu_us=cpu / events * 1e6, node_cpu_us=nodes / events * 1e6)


def grpc_consume(c, events):
    r, cpu, nodes = bench(c, "consume", "--events", str(events), "--topic", "grpc")
    return dict(eps=r.get("events_per_sec") or r["events_per_s"], cpu_us=cpu / events * 1e6,
                node_cpu_us=nodes / events * 1e6)


def kafka_consume(c, events, topic, rack):
    cons = Consumer({"bootstrap.servers": c.bootstrap(), "group.id": f"bench-{time.monotonic()}",
                     "enable.auto.commit": False, "client.rack": rack, "fetch.max.bytes": 8 << 20})
    cons.assign([TopicPartition(topic, 0, 0)])
    cpu0, t0, c0 = nodes_cpu(c), time.monotonic(), time.process_time()
    n = 0
    while n < events:
        for m in cons.consume(min(10000, events - n), 5.0):
            if m.error():
                raise SystemExit(f"kafka consume: {m.error()}")
            n += 1
        if time.monotonic() - t0 > 300:
            raise SystemExit(f"kafka consume: {n} of {events} in 300 s")
    elapsed = time.monotonic() - t0
    nodes = nodes_cpu(c) - cpu0
    cpu = nodes + (time.process_time() - c0)
    cons.close()
    return dict(eps=n / elapsed, cpu_us=cpu / n * 1e6, node_cpu_us=nodes / n * 1e6)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target-dir", default="target")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--events", type=int, default=200000)
    ap.add_argument("--window", type=int, default=4096,
                    help="events sent and not yet acknowledged, for both producers")
    ap.add_argument("--out")
    a = ap.parse_args()
    rows = {k: [] for k in ["grpc produce", "kafka produce", "grpc consume", "kafka consume"]}
    for rep in range(a.reps):
        c = KafkaCluster(os.path.join(a.target_dir, "release"))
        try:
            c.wait("the cluster", lambda: c.ctl("cluster", "status")[0] == 0)
            code, _, err = c.ctl("topic", "create", "kafka", "--partitions", "1", "--replication-factor", "3")
            if code != 0:
                raise SystemExit(err)
            t = c.wait("a leader", lambda: (d := c.describe("kafka")) and d["partitions"][0].get("leader") and d)
            leader = t["partitions"][0]["leader"]
            follower_rack = "abc"[(leader % 3)]  # node leader+1's rack: a follower
            c.wait("Kafka registrations", lambda: all(n.get("kafka_addr") for n in json.loads(c.ctl("cluster", "status")[1])["nodes"]))
            rows["grpc produce"].append(grpc_produce(c, a.events, a.window))
            rows["kafka produce"].append(kafka_produce(c, a.events, "kafka", a.window))
            rows["grpc consume"].append(grpc_consume(c, a.events))
            rows["kafka consume"].append(kafka_consume(c, a.events, "kafka", follower_rack))
        finally:
            c.stop()
        print(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]['eps']:,.0f}/s" for k, v in rows.items()), file=sys.stderr)
    med = lambda k, f: statistics.median(r[f] for r in rows[k])

    def ratio(f, a, b):
        # CPU of a short read can be below the clock tick: no ratio then.
        return f"{med(a, f) / med(b, f):.2f}x" if med(b, f) > 0 else "n/a"
    print(f"{'workload':<16} {'events/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/ev':>10} {'nodes us/ev':>11}")
    for k in rows:
        p50 = f"{med(k, 'p50'):8.2f}" if "p50" in rows[k][0] else f"{'':>8}"
        p99 = f"{med(k, 'p99'):8.2f}" if "p99" in rows[k][0] else f"{'':>8}"
        print(f"{k:<16} {med(k, 'eps'):10,.0f} {p50} {p99} {med(k, 'cpu_us'):10.1f} {med(k, 'node_cpu_us'):11.1f}")
    kp, gp, kc, gc = "kafka produce", "grpc produce", "kafka consume", "grpc consume"
    print(f"kafka/grpc produce events/s {ratio('eps', kp, gp)}, p50 {ratio('p50', kp, gp)}, "
          f"CPU/ev {ratio('cpu_us', kp, gp)} (nodes only {ratio('node_cpu_us', kp, gp)}); "
          f"consume events/s {ratio('eps', kc, gc)}, nodes CPU/ev {ratio('node_cpu_us', kc, gc)}")
    if a.out:
        with open(a.out, "a") as f:
            for k, v in rows.items():
                for i, r in enumerate(v):
                    f.write(json.dumps(dict(workload=k, rep=i, events=a.events, window=a.window, **r)) + "\n")


if __name__ == "__main__":
    main()
