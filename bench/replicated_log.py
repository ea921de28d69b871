#!/usr/bin/env python3
"""Measures the replicated log on three local eddy-node processes (release build):

1. `eddyctl produce` of 100,000 lines of 256 B into one RF3 partition: events/s and the CPU
   time of the three nodes, REPS times (median reported).
2. SIGKILL of a partition leader -> next acknowledged produce on that partition, FAILOVERS times.

Usage: bench/replicated_log.py [--target-dir target] [--reps 3] [--failovers 5]
Everything runs on 127.0.0.1 in a temporary directory and is stopped at the end.
"""
import argparse, json, os, statistics, sys, time

from eddy_cluster import Cluster, cpu_seconds

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target-dir", default="target")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--failovers", type=int, default=5)
    a = ap.parse_args()
    bin_dir = os.path.join(a.target_dir, "release")
    c = Cluster(bin_dir)
    try:
        c.wait("cluster up", lambda: c.ctl("cluster", "status")[0] == 0 and
               all(n["up"] for n in json.loads(c.ctl("cluster", "status")[1])["nodes"]))
        lines = b"".join(b"%08d" % i + b"x" * 247 + b"\n" for i in range(100_000))  # 255 B + newline = 256 B
        rates, cpus = [], []
        for rep in range(a.reps):
            topic = f"bench{rep}"
            assert c.ctl("topic", "create", topic, "--partitions", "1", "--replication-factor", "3")[0] == 0
            c.wait("leader", lambda: (d := c.describe(topic)) and d["partitions"][0]["leader"])
            pids = [n["proc"].pid for n in c.nodes.values()]
            cpu0 = [cpu_seconds(p) for p in pids]
            t0 = time.monotonic()
            code, out, err = c.ctl("produce", topic, "--partition", "0", stdin=lines, timeout=600)
            dt = time.monotonic() - t0
            cpu = sum(cpu_seconds(p) for p in pids) - sum(cpu0)
            assert code == 0 and out.count("\n") == 100_000, err
            rates.append(100_000 / dt); cpus.append(cpu / dt)
            print(f"produce rep {rep}: {100_000/dt:,.0f} events/s, {dt:.2f} s, nodes used {cpu/dt:.2f} cores", flush=True)
        print(f"produce: median {statistics.median(rates):,.0f} events/s (min {min(rates):,.0f}, max {max(rates):,.0f}); "
              f"node CPU median {statistics.median(cpus):.2f} cores", flush=True)

        assert c.ctl("topic", "create", "failover", "--partitions", "1", "--replication-factor", "3")[0] == 0
        c.wait("leader", lambda: (d := c.describe("failover")) and d["partitions"][0]["leader"])
        times = []
        for k in range(a.failovers):
            assert c.ctl("produce", "failover", "--partition", "0", stdin=b"warm\n")[0] == 0
            leader = c.describe("failover")["partitions"][0]["leader"]
            c.kill(leader)
            t0 = time.monotonic()
            while True:
                code, _, _ = c.ctl("--request-timeout", "1s", "produce", "failover", "--partition", "0", stdin=b"probe\n",
                                   brokers=c.brokers(only_running=True))
                if code == 0: break
            dt = time.monotonic() - t0
            times.append(dt)
            print(f"failover {k}: leader node {leader} killed -> next ack after {dt:.2f} s", flush=True)
            c.start(leader)
            c.wait("all up", lambda: all(n["up"] for n in json.loads(c.ctl("cluster", "status")[1] or '{"nodes":[]}')["nodes"]))
        print(f"failover: median {statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f})", flush=True)
    finally:
        c.stop()

if __name__ == "__main__":
    main()
