#!/usr/bin/env python3
"""Consumer-group offset commits over many partitions: what the metadata layer pays per commit.

On three local eddy-node processes (release build) it creates a topic of --partitions (default
3000, RF3), then runs `eddyctl bench groups`: --groups x --members (default 10 x 10) members
join, spread the partitions, and each commits a new offset for every partition it owns once a
second for --seconds (default 60). Then one busy producer (`eddyctl bench produce`, 16 in
flight) runs on a one-partition topic, for comparison. One JSON row (or a table) with:

- idle_cores: the three nodes' CPU, idle, with the topic created;
- commits_per_sec, offsets_per_sec, commit_p50_ms / commit_p99_ms, commit_failures;
- groups_cores: the nodes' CPU while the members commit (join and rebalance excluded);
- meta_apply_p99_ms: p99 of the metadata state machine's batch apply time over the commit
  phase, all nodes together, and meta_apply_p99_ms_by_window: the same per --window seconds, to
  see whether it stays flat while offsets accumulate;
- producer_cores, producer_eps: the nodes' CPU and the events/s of the busy producer;
  groups_vs_producer: groups_cores / producer_cores.

Usage: bench/offsets.py [--partitions 3000] [--groups 10] [--members 10] [--seconds 60]
                        [--node-dir target/release] [--ctl-dir target/release] [--output json]
--node-dir selects the eddy-node build (e.g. one built from an older commit, for a before/after
comparison). Everything runs on 127.0.0.1 in a temporary directory and is stopped at the end.
"""
import argparse, json, os, re, subprocess, sys, threading, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eddy_cluster import Cluster, cpu_seconds

BUCKET = re.compile(r'^eddy_meta_apply_latency_seconds_bucket\{le="([^"]+)"\} (\S+)$', re.M)

def apply_buckets(http_addr):
    """Cumulative bucket counts of the metadata apply histogram of one node: {le: count}."""
    try:
        text = urllib.request.urlopen(f"http://{http_addr}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    return {float(le): float(v) for le, v in BUCKET.findall(text)}

def p99_ms(before, after):
    """p99 (upper bucket bound, ms) of the observations between two sums of bucket snapshots."""
    les = sorted(after)
    delta = [after[le] - before.get(le, 0.0) for le in les]
    total = delta[-1] if delta else 0
    if total <= 0:
        return None
    for le, cum in zip(les, delta):
        if cum >= 0.99 * total:
            return round(le * 1000, 3) if le != float("inf") else None
    return None

def summed(c):
    out = {}
    for n in c.nodes.values():
        for le, v in apply_buckets(n["http"]).items():
            out[le] = out.get(le, 0.0) + v
    return out

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--partitions", type=int, default=3000)
    ap.add_argument("--groups", type=int, default=10)
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--producer-events", type=int, default=100000)
    ap.add_argument("--node-dir", default="target/release")
    ap.add_argument("--ctl-dir", default="target/release")
    ap.add_argument("--output", choices=["table", "json"], default="table")
    a = ap.parse_args()
    c = Cluster(a.node_dir)
    row = {"partitions": a.partitions, "members": a.groups * a.members}
    try:
        def ctl(*args, timeout=600):
            r = subprocess.run([f"{a.ctl_dir}/eddyctl", "--brokers", c.brokers(), "--output", "json", *args],
                               capture_output=True, timeout=timeout)
            return r.returncode, r.stdout.decode(), r.stderr.decode()
        pids = lambda: [x["proc"].pid for x in c.nodes.values()]
        cpu = lambda: sum(cpu_seconds(p) for p in pids())
        c.wait("cluster up", lambda: ctl("cluster", "status")[0] == 0, timeout=60)
        code, _, err = ctl("topic", "create", "many", "--partitions", str(a.partitions), "--replication-factor", "3")
        assert code == 0, err
        def healthy():
            code, out, _ = ctl("cluster", "health", timeout=60)
            try:
                return code == 0 and json.loads(out)["healthy"]
            except (ValueError, KeyError):
                return False
        c.wait("healthy", healthy, timeout=900)
        time.sleep(3)  # let the last elections settle before measuring idleness
        cpu0 = cpu()
        time.sleep(10)
        row["idle_cores"] = round((cpu() - cpu0) / 10, 3)

        # The groups run; samples every second: (monotonic time, CPU seconds, apply buckets). The
        # nodes' /metrics (which lists every partition) is read only every --window seconds, so
        # that reading it does not weigh on the CPU measured.
        samples, done = [], threading.Event()
        def sample():
            k = 0
            while not done.is_set():
                samples.append((time.monotonic(), cpu(), summed(c) if k % a.window == 0 else None))
                k += 1
                done.wait(1.0)
        sampler = threading.Thread(target=sample, daemon=True)
        t_start = time.monotonic()
        sampler.start()
        code, out, err = ctl("bench", "groups", "--topic", "many", "--groups", str(a.groups), "--members",
                             str(a.members), "--duration", f"{a.seconds}s", timeout=a.seconds + 600)
        done.set()
        sampler.join()
        if not out.strip():
            raise SystemExit(f"bench groups failed: {err}")
        g = json.loads(out)
        row.update({"commits_per_sec": round(g["commits_per_sec"], 1), "offsets_per_sec": round(g["offsets_per_sec"]),
                    "commit_p50_ms": g["commit"]["p50_ms"], "commit_p99_ms": g["commit"]["p99_ms"],
                    "commit_failures": g["commit_failures"], "settle_s": round(g["join_s"] + g["settle_s"], 1)})
        # The commit phase: from the end of settling to the end of the duration.
        t0 = t_start + g["join_s"] + g["settle_s"] + 1
        t1 = t0 + a.seconds - 2
        phase = [s for s in samples if t0 <= s[0] <= t1]
        if len(phase) >= 2:
            row["groups_cores"] = round((phase[-1][1] - phase[0][1]) / (phase[-1][0] - phase[0][0]), 3)
            scraped = [s[2] for s in phase if s[2] is not None]
            if len(scraped) >= 2:
                row["meta_apply_p99_ms"] = p99_ms(scraped[0], scraped[-1])
                row["meta_apply_p99_ms_by_window"] = [p99_ms(x, y) for x, y in zip(scraped, scraped[1:])]

        # One busy producer, for comparison.
        cpu0, w0 = cpu(), time.monotonic()
        code, out, err = ctl("bench", "produce", "--events", str(a.producer_events), "--inflight", "16",
                             "--topic", "busy")
        assert code == 0, err
        p = json.loads(out)
        row["producer_cores"] = round((cpu() - cpu0) / (time.monotonic() - w0), 3)
        row["producer_eps"] = round(p["events_per_sec"])
        if row.get("groups_cores") and row["producer_cores"]:
            row["groups_vs_producer"] = round(row["groups_cores"] / row["producer_cores"], 3)
    finally:
        c.stop()
    if a.output == "json":
        print(json.dumps(row), flush=True)
    else:
        for k, v in row.items():
            print(f"{k:>28}: {v}")

if __name__ == "__main__":
    main()
