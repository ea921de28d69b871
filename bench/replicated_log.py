#!/usr/bin/env python3
"""Measures the replicated log on three local eddy-node processes (release build):

1. `eddyctl produce` of 100,000 lines of 256 B into one RF3 partition: events/s and the CPU
   time of the three nodes, REPS times (median reported).
2. SIGKILL of a partition leader -> next acknowledged produce on that partition, FAILOVERS times.

Usage: bench/replicated_log.py [--target-dir target] [--reps 3] [--failovers 5]
Everything runs on 127.0.0.1 in a temporary directory and is stopped at the end.
"""
import argparse, json, os, signal, socket, statistics, subprocess, sys, tempfile, time

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

class Cluster:
    def __init__(self, bin_dir, n=3):
        self.bin_dir, self.dir = bin_dir, tempfile.mkdtemp(prefix="eddy-bench-")
        self.nodes = {i: dict(client=f"127.0.0.1:{free_port()}", raft=f"127.0.0.1:{free_port()}",
                              http=f"127.0.0.1:{free_port()}") for i in range(1, n + 1)}
        members = "".join(f'[[initial_members]]\nid = {i}\nclient_addr = "{n["client"]}"\nraft_addr = "{n["raft"]}"\n'
                          for i, n in self.nodes.items())
        for i, n in self.nodes.items():
            n["config"] = os.path.join(self.dir, f"node-{i}.toml")
            with open(n["config"], "w") as f:
                f.write(f'node_id = {i}\ndata_dir = "{self.dir}/data-{i}"\nclient_addr = "{n["client"]}"\n'
                        f'raft_addr = "{n["raft"]}"\nhttp_addr = "{n["http"]}"\n{members}')
            n["proc"] = None
        for i in self.nodes: self.start(i)

    def brokers(self, only_running=False):
        return ",".join(n["client"] for n in self.nodes.values() if not only_running or n["proc"])

    def start(self, i):
        log = open(os.path.join(self.dir, f"node-{i}.log"), "a")
        self.nodes[i]["proc"] = subprocess.Popen([f"{self.bin_dir}/eddy-node", "--config", self.nodes[i]["config"]],
                                                 stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def kill(self, i):
        p = self.nodes[i]["proc"]; p.send_signal(signal.SIGKILL); p.wait(); self.nodes[i]["proc"] = None

    def ctl(self, *args, stdin=None, brokers=None, timeout=120):
        r = subprocess.run([f"{self.bin_dir}/eddyctl", "--brokers", brokers or self.brokers(), "--output", "json", *args],
                           input=stdin, capture_output=True, timeout=timeout)
        return r.returncode, r.stdout.decode(), r.stderr.decode()

    def wait(self, what, f, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = f()
            if v: return v
            time.sleep(0.1)
        raise SystemExit(f"timed out waiting for {what}")

    def describe(self, topic):
        code, out, _ = self.ctl("topic", "describe", topic, brokers=self.brokers(only_running=True))
        return json.loads(out) if code == 0 else None

    def stop(self):
        for i, n in self.nodes.items():
            if n["proc"]: n["proc"].send_signal(signal.SIGKILL); n["proc"].wait()

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
