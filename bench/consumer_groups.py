#!/usr/bin/env python3
"""Measures consumer groups on three local eddy-node processes (release build):

1. Consume throughput of a 3-member group (`eddyctl consume --group`) on a 6-partition RF3 topic
   holding EVENTS events of 256 B: events/s from the first record printed to the last, REPS
   times (median reported). This includes eddyctl's JSON printing, as an application would see.
2. Rebalance pause, for the cooperative (cooperative-sticky) and the eager (range) assignor:
   while one event per partition arrives every 30 ms, the time each partition goes without a
   delivered event when a third member joins, when a member leaves cleanly (SIGINT: it
   commits and leaves), and when a member is SIGKILLed (its partitions wait for its session
   timeout). Reported per event: the longest and the median pause over the 6 partitions.

Usage: bench/consumer_groups.py [--target-dir target] [--reps 3] [--events 300000]
                                [--session-timeout-ms 3000]
Everything runs on 127.0.0.1 in a temporary directory and is stopped at the end.
"""
import argparse, json, os, signal, statistics, subprocess, sys, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eddy_cluster import Cluster

PARTITIONS = 6
PRODUCE_EVERY = 0.005  # one event every 5 ms round-robin: each partition every 30 ms


class Member:
    """One `eddyctl consume --group` process; notes when each record arrives."""

    def __init__(self, c, topic, group, *extra):
        self.arrivals = []  # (monotonic time, partition, offset)
        self.p = subprocess.Popen([f"{c.bin_dir}/eddyctl", "--brokers", c.brokers(), "--output", "json",
                                   "consume", topic, "--group", group, *extra],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self):
        for line in self.p.stdout:
            now = time.monotonic()
            r = json.loads(line)
            self.arrivals.append((now, r["partition"], r["offset"]))

    def signal(self, sig):
        self.p.send_signal(sig)

    def wait(self, timeout=60):
        try:
            self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill(); self.p.wait()
        self.t.join(timeout=10)


def group_state(c, group):
    code, out, _ = c.ctl("group", "describe", group)
    return json.loads(out) if code == 0 else None


def balanced(c, group, members):
    d = group_state(c, group)
    return d and len(d["members"]) == members and d["state"] == "stable" and \
        sum(len(m["partitions"]) for m in d["members"]) == PARTITIONS


def throughput(c, a):
    lines = b"".join(b"%08d" % i + b"x" * 247 + b"\n" for i in range(a.events))
    code, _, err = c.ctl("produce", "jobs", stdin=lines, timeout=900)
    assert code == 0, err
    rates = []
    for rep in range(a.reps):
        ms = [Member(c, "jobs", f"tput{rep}", "--idle-exit-ms", "3000") for _ in range(3)]
        for m in ms: m.wait(timeout=900)
        arrivals = sorted(t for m in ms for (t, _, _) in m.arrivals)
        n = len(arrivals)
        assert n >= a.events, f"the group consumed {n} of {a.events} events"
        rate = n / (arrivals[-1] - arrivals[0])
        rates.append(rate)
        print(f"group consume rep {rep}: {n:,} events in {arrivals[-1] - arrivals[0]:.2f} s = {rate:,.0f} events/s",
              flush=True)
    print(f"group consume (3 members, 6 partitions): median {statistics.median(rates):,.0f} events/s "
          f"(min {min(rates):,.0f}, max {max(rates):,.0f})", flush=True)


def pauses(members, start, window):
    """Per partition, the longest time without a delivery in [start, start + window]; waits
    until the window has passed."""
    time.sleep(max(0.0, start + window + 0.2 - time.monotonic()))
    out = {}
    for p in range(PARTITIONS):
        times = sorted(t for m in members for (t, q, _) in m.arrivals if q == p and start <= t <= start + window)
        prev, longest = start, 0.0
        for t in times:
            longest = max(longest, t - prev); prev = t
        out[p] = max(longest, (start + window) - prev if times else window)
    return out


def report(label, ps):
    v = sorted(ps.values())
    print(f"  {label}: longest pause {v[-1] * 1000:,.0f} ms, median over partitions {statistics.median(v) * 1000:,.0f} ms "
          f"({', '.join(f'p{p} {x * 1000:,.0f}' for p, x in sorted(ps.items()))})", flush=True)


def rebalance(c, a, assignor):
    group = f"pause-{assignor}"
    session = a.session_timeout_ms / 1000
    stop = threading.Event()
    producer = subprocess.Popen([f"{c.bin_dir}/eddyctl", "--brokers", c.brokers(), "--output", "json", "produce", "jobs"],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def feed():
        i = 0
        while not stop.is_set():
            producer.stdin.write(b"p%08d\n" % i); producer.stdin.flush(); i += 1
            time.sleep(PRODUCE_EVERY)
        producer.stdin.close()

    feeder = threading.Thread(target=feed, daemon=True); feeder.start()
    flags = ("--assignor", assignor, "--session-timeout-ms", str(a.session_timeout_ms))
    ms = [Member(c, "jobs", group, *flags) for _ in range(2)]
    try:
        print(f"{assignor} ({'eager' if assignor != 'cooperative-sticky' else 'incremental'}), "
              f"session timeout {a.session_timeout_ms} ms:", flush=True)
        c.wait("two members balanced", lambda: balanced(c, group, 2))
        time.sleep(2)  # Steady state before the measured event (not a synchronisation).
        t = time.monotonic(); ms.append(Member(c, "jobs", group, *flags))
        c.wait("three members balanced", lambda: balanced(c, group, 3))
        report("member joins", pauses(ms, t, 5))
        t = time.monotonic(); ms[0].signal(signal.SIGINT); ms[0].wait()
        c.wait("two members balanced", lambda: balanced(c, group, 2))
        report("member leaves (SIGINT)", pauses(ms, t, 5))
        ms.append(Member(c, "jobs", group, *flags))
        c.wait("three members balanced", lambda: balanced(c, group, 3))
        time.sleep(2)
        t = time.monotonic(); ms[1].signal(signal.SIGKILL); ms[1].wait()
        c.wait("two members balanced", lambda: balanced(c, group, 2), timeout=session + 60)
        report("member SIGKILLed", pauses(ms, t, session + 5))
    finally:
        stop.set(); feeder.join()
        producer.wait(timeout=60)
        for m in ms:
            if m.p.poll() is None:
                m.signal(signal.SIGINT); m.wait(timeout=20)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target-dir", default="target")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--session-timeout-ms", type=int, default=3000)
    a = ap.parse_args()
    c = Cluster(os.path.join(a.target_dir, "release"))
    try:
        c.wait("cluster up", lambda: c.ctl("cluster", "status")[0] == 0 and
               all(n["up"] for n in json.loads(c.ctl("cluster", "status")[1])["nodes"]))
        assert c.ctl("topic", "create", "jobs", "--partitions", str(PARTITIONS), "--replication-factor", "3")[0] == 0
        c.wait("leaders", lambda: (d := c.describe("jobs")) and all(p["leader"] for p in d["partitions"]))
        throughput(c, a)
        for assignor in ("cooperative-sticky", "range"):
            rebalance(c, a, assignor)
    finally:
        c.stop()


if __name__ == "__main__":
    main()
