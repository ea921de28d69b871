"""A local Eddy cluster of real eddy-node processes for the benchmark scripts in this folder.

Everything runs on 127.0.0.1 in a temporary directory; `stop()` kills every process it started.
"""
import json, os, signal, socket, subprocess, tempfile, time

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

