#!/usr/bin/env python3
"""Many partitions on a small cluster: what an idle partition costs, and how fast a dead or
frozen node's leaderships move. For each N (default 100, 1000, 3000, 10000 partitions; RF3 on
three local eddy-node processes, release build) it starts a fresh cluster and prints one row:

- create_s: seconds from `topic create` to `cluster health` healthy;
- idle_cores: CPU cores used by the three nodes together over --idle-seconds (default 30) of idleness;
- rss_mb: resident memory per node (mean), and rss_kb_per_replica: its growth per replica held;
- produce_eps: events/s with one 256 B event in flight on each of min(N, 1000) partitions;
- kill_*: SIGKILL of the node leading the most partitions -> when each of its partitions
  accepted a write again (median, max seconds), then restart_s: its restart -> healthy;
- stop_*: the same for SIGSTOP (frozen for --freeze-seconds, then SIGCONT), and
  stop_foreign_elections: how many partitions the frozen node did not lead changed term
  (0 means it came back as a follower without disturbing anyone);
- rebalanced_after_restart_s: seconds until the killed node led its preferred partitions again
  (the freeze starts only then, so a move still under way is not counted as a foreign election);
- audit_*: after the killed node is back, and again at the end, every partition is read from
  every replica (`eddyctl bench audit`): each event acknowledged so far must be served by every
  replica at its offset, and replicas must agree (audit_problems must be 0; the problems are
  printed to stderr).

Usage: bench/partitions.py [--sizes 100,1000] [--node-dir target/release] [--ctl-dir target/release]
                           [--idle-seconds 30] [--output json]
--node-dir selects the eddy-node build (e.g. one built from an older commit, for a before/after
comparison); eddyctl comes from --ctl-dir. Everything runs on 127.0.0.1 in a temporary directory,
and every process is stopped at the end of each row.
"""
import argparse, json, os, re, signal, statistics, subprocess, sys, threading, time, urllib.request

from eddy_cluster import Cluster, cpu_seconds

def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0

def raft_messages_sent(http_addr):
    """Node heartbeats sent by one node (all peers), from its /metrics; None on an older build."""
    try:
        text = urllib.request.urlopen(f"http://{http_addr}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    vals = [float(m.group(1)) for m in re.finditer(r'^eddy_liveness_heartbeats_sent_total\{[^}]*\} (\S+)$', text, re.M)]
    return sum(vals) if vals else None

class Bench:
    def __init__(self, a, n):
        self.a, self.n = a, n
        self.c = Cluster(a.node_dir)
        self.acked = []  # files of acknowledged events, for the audits

    def ctl(self, *args, brokers=None, timeout=300):
        r = subprocess.run([f"{self.a.ctl_dir}/eddyctl", "--brokers", brokers or self.c.brokers(only_running=True),
                            "--output", "json", *args], capture_output=True, timeout=timeout)
        return r.returncode, r.stdout.decode(), r.stderr.decode()

    def healthy(self):
        code, out, _ = self.ctl("cluster", "health", timeout=60)
        try:
            return code == 0 and json.loads(out)["healthy"]
        except (ValueError, KeyError):
            return False

    def wait_healthy(self, timeout):
        t0 = time.monotonic()
        self.c.wait("healthy", self.healthy, timeout=timeout)
        return time.monotonic() - t0

    def wait_balanced(self, timeout):
        """Seconds until every partition is led by its preferred replica again (automatic
        balancing after a node returns), or None at the timeout."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            code, out, _ = self.ctl("cluster", "health", timeout=60)
            try:
                if code == 0 and json.loads(out).get("leaders_not_preferred") == 0:
                    return round(time.monotonic() - t0, 1)
            except ValueError:
                pass
            time.sleep(1)
        return None

    def describe(self):
        code, out, err = self.ctl("topic", "describe", "many", timeout=120)
        return json.loads(out) if code == 0 else None

    def leaders(self):
        d = self.describe()
        by = {}
        for p in d["partitions"]:
            if p["leader"] is not None:
                by.setdefault(p["leader"], []).append(p["partition"])
        return d, by

    def failover(self, how):
        d, by = self.leaders()
        victim = max(by, key=lambda k: len(by[k]))
        led = sorted(by[victim])
        terms = {p["partition"]: p.get("term", 0) for p in d["partitions"]}
        pid = self.c.nodes[victim]["proc"].pid
        t_fault = time.time()
        thaw = None
        if how == "kill":
            self.c.kill(victim)
        else:
            os.kill(pid, signal.SIGSTOP)
            # The freeze lasts --freeze-seconds whatever the probe takes.
            thaw = threading.Timer(self.a.freeze_seconds, os.kill, (pid, signal.SIGCONT))
            thaw.start()
        others = ",".join(n["client"] for i, n in self.c.nodes.items() if i != victim and n["proc"])
        r = self.probe_on(others, led)
        times = sorted((ms / 1000.0 - t_fault) for ms in r["first_ack_unix_ms"].values())
        q = lambda f: round(times[min(len(times) - 1, int(f * len(times)))], 3) if times else None
        out = {"victim": victim, "led": len(led), "never": len(r["failed"]),
               "median_s": round(statistics.median(times), 3) if times else None,
               "max_s": round(max(times), 3) if times else None,
               "quantiles_s": {"min": q(0), "p10": q(0.1), "p25": q(0.25), "p75": q(0.75), "p90": q(0.9)}}
        if how == "kill":
            t0 = time.monotonic()
            self.c.start(victim)
            out["restart_s"] = time.monotonic() - t0 + self.wait_healthy(600)
        else:
            thaw.join()
            out["thaw_healthy_s"] = round(self.wait_healthy(300), 2)
            after = {p["partition"]: p.get("term", 0) for p in self.describe()["partitions"]}
            out["foreign_elections"] = sum(1 for p, t in terms.items() if p not in set(led) and after.get(p, t) != t)
        return out

    def acked_file(self):
        self.acked.append(os.path.join(self.c.dir, f"acked-{len(self.acked)}.json"))
        return self.acked[-1]

    def audit(self, deadline_s=60):
        """Reads every replica of every partition until nothing is missing (a follower may still be
        catching up right after healthy) or the deadline; returns the last audit's report."""
        t0 = time.monotonic()
        while True:
            args = ["bench", "audit", "--topic", "many"] + [x for f in self.acked for x in ("--acked", f)]
            code, out, err = self.ctl(*args, timeout=600)
            try:
                r = json.loads(out)
            except ValueError:
                r = {"problems": [f"eddyctl bench audit failed: {err.strip()}"]}
            if code == 0 or time.monotonic() - t0 > deadline_s:
                r["seconds"] = round(time.monotonic() - t0, 1)
                for p in r["problems"][:20]:
                    print(f"audit: {p}", file=sys.stderr)
                return r
            time.sleep(2)

    def probe_on(self, brokers, partitions):
        spec = ",".join(str(p) for p in partitions)
        code, out, err = self.ctl("--request-timeout", "1s", "bench", "partitions", "--topic", "many",
                                  "--partitions", spec, "--events-per-partition", "1", "--deadline", "60s",
                                  "--acked-out", self.acked_file(), brokers=brokers, timeout=180)
        if not out.strip():
            raise SystemExit(f"bench partitions failed: {err}")
        return json.loads(out)

    def run(self):
        c, n, row = self.c, self.n, {"partitions": self.n}
        c.wait("cluster up", lambda: self.ctl("cluster", "status")[0] == 0 and
               all(x["up"] for x in json.loads(self.ctl("cluster", "status")[1])["nodes"]), timeout=60)
        pids = lambda: [x["proc"].pid for x in c.nodes.values() if x["proc"]]
        rss0 = [rss_kb(p) for p in pids()]
        t0 = time.monotonic()
        code, _, err = self.ctl("topic", "create", "many", "--partitions", str(n), "--replication-factor", "3",
                                timeout=600)
        assert code == 0, err
        row["create_s"] = round(time.monotonic() - t0 + self.wait_healthy(900), 2)
        time.sleep(3)  # let the last elections and replication settle before measuring idleness
        hb0 = [raft_messages_sent(x["http"]) for x in c.nodes.values()]
        cpu0 = sum(cpu_seconds(p) for p in pids())
        time.sleep(self.a.idle_seconds)
        row["idle_cores"] = round((sum(cpu_seconds(p) for p in pids()) - cpu0) / self.a.idle_seconds, 3)
        hb1 = [raft_messages_sent(x["http"]) for x in c.nodes.values()]
        if None not in hb0 + hb1:
            row["node_heartbeats_per_s"] = round(statistics.mean(b - a for a, b in zip(hb0, hb1)) / self.a.idle_seconds, 1)
        code, out, _ = self.ctl("cluster", "status")
        if code == 0:
            nodes = json.loads(out)["nodes"]
            if all(x.get("replicas") is not None for x in nodes):
                row["quiescent_share"] = round(sum(x["quiescent_replicas"] for x in nodes) /
                                               max(1, sum(x["replicas"] for x in nodes)), 3)
        rss = [rss_kb(p) for p in pids()]
        row["rss_mb"] = round(statistics.mean(rss) / 1024, 1)
        row["rss_kb_per_replica"] = round((statistics.mean(rss) - statistics.mean(rss0)) / n, 1)
        row["fds_per_node"] = round(statistics.mean(len(os.listdir(f"/proc/{p}/fd")) for p in pids()))
        width = min(n, 1000)
        code, out, err = self.ctl("bench", "partitions", "--topic", "many", "--partitions", f"0-{width - 1}",
                                  "--events-per-partition", str(self.a.events_per_partition),
                                  "--acked-out", self.acked_file(), timeout=600)
        r = json.loads(out) if out.strip() else {}
        row["produce_eps"] = round(r.get("events_per_sec", 0))
        row["produce_ack_p50_ms"] = r.get("ack", {}).get("p50_ms")
        k = self.failover("kill")
        row.update({"kill_victim_led": k["led"], "kill_median_s": k["median_s"], "kill_max_s": k["max_s"],
                    "kill_quantiles_s": k["quantiles_s"], "stop_quantiles_s": None,
                    "kill_never": k["never"], "restart_s": round(k["restart_s"], 2)})
        au = self.audit()
        row.update({"audit_after_kill_problems": len(au["problems"]), "audit_acked_checked": au.get("acked_checked"),
                    "audit_replicas": au.get("replicas")})
        # The freeze starts once the killed node has its leaderships back: a move still under way
        # when the frozen node thaws would count as an election the thaw caused.
        row["rebalanced_after_restart_s"] = self.wait_balanced(180)
        s = self.failover("stop")
        row.update({"stop_victim_led": s["led"], "stop_median_s": s["median_s"], "stop_max_s": s["max_s"],
                    "stop_quantiles_s": s["quantiles_s"],
                    "stop_never": s["never"], "stop_foreign_elections": s["foreign_elections"]})
        au = self.audit()
        row.update({"audit_problems": len(au["problems"]), "audit_acked_checked_end": au.get("acked_checked")})
        return row

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,1000,3000,10000")
    ap.add_argument("--node-dir", default="target/release")
    ap.add_argument("--ctl-dir", default="target/release")
    ap.add_argument("--idle-seconds", type=int, default=30)
    ap.add_argument("--freeze-seconds", type=int, default=10)
    ap.add_argument("--events-per-partition", type=int, default=20)
    ap.add_argument("--output", choices=["table", "json"], default="table")
    a = ap.parse_args()
    cols = ["partitions", "create_s", "idle_cores", "quiescent_share", "rss_mb", "rss_kb_per_replica", "fds_per_node", "produce_eps",
            "kill_median_s", "kill_max_s", "restart_s", "stop_median_s", "stop_max_s", "stop_foreign_elections",
            "audit_problems"]
    if a.output == "table":
        print(" ".join(f"{c:>14}" for c in cols), flush=True)
    for n in (int(x) for x in a.sizes.split(",")):
        b = Bench(a, n)
        try:
            row = b.run()
        finally:
            for x in b.c.nodes.values():
                if x["proc"]:
                    try:
                        os.kill(x["proc"].pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
            b.c.stop()
        if a.output == "json":
            print(json.dumps(row), flush=True)
        else:
            print(" ".join(f"{str(row.get(c)):>14}" for c in cols), flush=True)

if __name__ == "__main__":
    main()
