#!/usr/bin/env python3
"""Runs the workload set of ../shared/bench/nats against a local 3-node Eddy cluster (release
build, fsync on every commit, which is Eddy's only mode) and prints it beside the NATS JetStream
figures of the same shapes, and beside the machine's floor.

    bench/nats_compare.py [--target-dir target] [--reps 3] [--out bench/results/eddy.jsonl]
                          [--nats ../shared/bench/nats/results/pypi-2.15.1-sync-always.jsonl
                                  ../shared/bench/nats/results/pypi-2.15.1-default.jsonl ...]

The set runs rep-major (set 1, set 2, set 3), as the NATS scripts do, so a disturbance hits one
rep of each row. Each run records eddyctl's JSON plus the CPU seconds of the three nodes and the
client over the run. Before each rep, `eddyctl bench probe` measures the floor in the cluster's
data directory: fsync of a 4 KiB append and a loopback round trip; the floor for an
acknowledgement is one fsync and two round trips. The probe also syncs from three writers at
once (the three replicas of this local cluster share one disk and sync together), and the
shared-disk floor uses that sync instead. Rows: median (min-max) over the reps; ratios
are of medians: Eddy / NATS per NATS label (a file's `label`), the one-in-flight ack p50 / the
floor, and the latency run's ack p99 / the fsync p99. CPU per event: nodes + client CPU seconds
over the run / events, for Eddy and for the NATS rows.
"""
import argparse, json, os, resource, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eddy_cluster import Cluster, cpu_seconds

# (row name, eddyctl bench arguments, NATS filter)
WORKLOADS = [
    ("produce 200k x 256 B, inflight 1", ["produce", "--events", "200000", "--size", "256", "--inflight", "1"],
     dict(bench="produce", size=256, inflight=1)),
    ("produce 200k x 256 B, inflight 16", ["produce", "--events", "200000", "--size", "256", "--inflight", "16"],
     dict(bench="produce", size=256, inflight=16)),
    ("produce 100k x 4 KiB, inflight 256", ["produce", "--events", "100000", "--size", "4096", "--inflight", "256"],
     dict(bench="produce", size=4096, inflight=256)),
    # Last of the produce runs, so that consume reads what it wrote (201k events with warm-up).
    ("produce 200k x 256 B, inflight 256", ["produce", "--events", "200000", "--size", "256", "--inflight", "256"],
     dict(bench="produce", size=256, inflight=256)),
    ("consume 200k x 256 B from a follower", ["consume", "--events", "200000"],
     dict(bench="consume", mode="fetch", consumer_ack="none")),
    ("latency 2000/s x 10 s, 256 B", ["latency", "--rate", "2000", "--seconds", "10", "--size", "256"],
     dict(bench="latency")),
]


def run(c, args):
    pids = [n["proc"].pid for n in c.nodes.values()]
    before = sum(cpu_seconds(p) for p in pids)
    child_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    code, out, err = c.ctl("bench", *args, timeout=900)
    wall = time.monotonic() - t0
    child_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        raise SystemExit(f"eddyctl bench {' '.join(args)} failed: {err}")
    v = json.loads(out.strip().splitlines()[-1])
    client = (child_after.ru_utime + child_after.ru_stime) - (child_before.ru_utime + child_before.ru_stime)
    v["cpu"] = dict(servers_cpu_s=round(sum(cpu_seconds(p) for p in pids) - before, 2),
                    client_cpu_s=round(client, 2), wall_s=round(wall, 2))
    return v


def rate(v):
    return v.get("events_per_sec") or v.get("events_per_s")


def ms(v, key, q):
    """A latency quantile in ms from an Eddy (`ack.p50_ms`) or NATS (`ack_latency.p50_us`) line."""
    if key in v and f"{q}_ms" in v[key]:
        return v[key][f"{q}_ms"]
    nats_key = {"ack": "ack_latency", "e2e": "e2e_latency"}[key]
    if nats_key in v:
        return v[nats_key][f"{q}_us"] / 1000.0
    return None


def fmt(xs, f="{:,.0f}"):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{f.format(statistics.median(xs))} ({f.format(min(xs))}-{f.format(max(xs))})"


def nats_rows(paths):
    rows = []
    for p in paths:
        with open(p) as f:
            rows += [json.loads(l) for l in f if l.strip()]
    return rows


def matches(row, flt):
    return all(row.get(k) == v for k, v in flt.items())


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--target-dir", default="target")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(here, "results", "eddy.jsonl"))
    nats_results = os.path.join(here, "..", "..", "shared", "bench", "nats", "results")
    ap.add_argument("--nats", nargs="*",
                    default=[os.path.join(nats_results, "pypi-2.15.1-sync-always.jsonl"),
                             os.path.join(nats_results, "pypi-2.15.1-default.jsonl")])
    ap.add_argument("--summarize", metavar="JSONL", help="only print the tables for runs already recorded")
    a = ap.parse_args()
    results = {name: [] for name, _, _ in WORKLOADS}
    results["probe"] = []
    if a.summarize:
        for v in nats_rows([a.summarize]):
            results.setdefault(v["row"], []).append(v)
    else:
        measure(a, results)
    summarize(results, nats_rows([p for p in a.nats if os.path.exists(p)]))


def measure(a, results):
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    c = Cluster(os.path.join(a.target_dir, "release"))
    try:
        code, _, err = c.ctl("cluster", "health", "--exit-when-healthy", "--timeout", "60s", timeout=90)
        if code != 0:
            raise SystemExit(f"the cluster did not become healthy: {err}")
        with open(a.out, "a") as out:
            for rep in range(1, a.reps + 1):
                code, probe, err = c.ctl("bench", "probe", "--dir", c.dir, timeout=300)
                if code != 0:
                    raise SystemExit(f"eddyctl bench probe failed: {err}")
                v = json.loads(probe.strip().splitlines()[-1])
                v.update(rep=rep, row="probe", label="machine")
                out.write(json.dumps(v) + "\n")
                results.setdefault("probe", []).append(v)
                print(f"rep {rep}: floor: fsync p50 {v['fsync_p50_us']} µs, round trip p50 {v['rtt_p50_us']} µs, "
                      f"ack floor {v['floor_ack_us']} µs", flush=True)
                for name, args, _ in WORKLOADS:
                    v = run(c, args)
                    v.update(rep=rep, row=name, label="eddy")
                    out.write(json.dumps(v) + "\n")
                    out.flush()
                    results[name].append(v)
                    print(f"rep {rep}: {name}: {rate(v) or 0:,.0f} ev/s, ack p50 {ms(v, 'ack', 'p50')} ms, "
                          f"CPU {v['cpu']['servers_cpu_s'] + v['cpu']['client_cpu_s']:.1f} s", flush=True)
    finally:
        c.stop()


def cpu_per_event_us(v):
    """Nodes + client CPU µs per event of an Eddy or a NATS line."""
    cpu = v.get("cpu") or {}
    servers = cpu.get("servers_cpu_s_total", cpu.get("servers_cpu_s"))
    if isinstance(servers, dict):
        servers = sum(servers.values())
    events = (v.get("ack") or {}).get("count") or v.get("events") or (v.get("ack_latency") or {}).get("count")
    if servers is None or not events:
        return None
    return (servers + (cpu.get("client_cpu_s") or 0)) * 1e6 / events


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(results, nats):
    labels = sorted({r.get("label", "nats") for r in nats})
    probes = results.get("probe", [])
    floor = med([p["floor_ack_us"] for p in probes])
    # Probes older than the shared-disk probe have no such field.
    floor_shared = med([p.get("floor_ack_shared_us") for p in probes])
    fsync_p99 = med([p["fsync_p99_us"] for p in probes])
    shared_p99 = med([p.get("fdatasync_shared_p99_us") for p in probes])
    print()
    if probes:
        print(f"Floor (median of {len(probes)} probes in the data directory): fsync 4 KiB p50 "
              f"{fmt([p['fsync_p50_us'] for p in probes])} µs, p99 {fmt([p['fsync_p99_us'] for p in probes])} µs; "
              f"loopback round trip p50 {fmt([p['rtt_p50_us'] for p in probes])} µs, "
              f"p99 {fmt([p['rtt_p99_us'] for p in probes])} µs; "
              f"an acknowledgement (fsync + 2 round trips): {floor:,.0f} µs")
        if floor_shared:
            writers = probes[0].get("shared_writers")
            print(f"Shared disk ({writers} writers syncing at once, as the local cluster's replicas do): "
                  f"fdatasync p50 {fmt([p.get('fdatasync_shared_p50_us') for p in probes])} µs, "
                  f"p99 {fmt([p.get('fdatasync_shared_p99_us') for p in probes])} µs; "
                  f"an acknowledgement: {floor_shared:,.0f} µs")
        print()
    head = "| workload | Eddy ev/s | Eddy ack p50 / p99 ms | Eddy CPU µs/ev |"
    rule = "|---|---|---|---|"
    for l in labels:
        head += f" {l} ev/s | ratio | {l} ack p50 / p99 ms | {l} CPU µs/ev |"
        rule += "---|---|---|---|"
    print(head)
    print(rule)
    for name, _, flt in WORKLOADS:
        ours = results.get(name, [])
        if not ours or flt["bench"] == "latency":
            continue
        e_rate = med([rate(v) for v in ours])
        row = (f"| {name} | {fmt([rate(v) for v in ours])} | "
               f"{fmt([ms(v, 'ack', 'p50') for v in ours], '{:.2f}')} / {fmt([ms(v, 'ack', 'p99') for v in ours], '{:.2f}')} | "
               f"{fmt([cpu_per_event_us(v) for v in ours])} |")
        for l in labels:
            theirs = [r for r in nats if r.get("label", "nats") == l and matches(r, flt)]
            n_rate = med([rate(r) for r in theirs])
            ratio = f"{e_rate / n_rate:.2f}x" if n_rate and e_rate else "-"
            row += (f" {fmt([rate(r) for r in theirs])} | {ratio} | "
                    f"{fmt([ms(r, 'ack', 'p50') for r in theirs], '{:.2f}')} / {fmt([ms(r, 'ack', 'p99') for r in theirs], '{:.2f}')} | "
                    f"{fmt([cpu_per_event_us(r) for r in theirs])} |")
        print(row)
    lat = results.get("latency 2000/s x 10 s, 256 B", [])
    for key, label in (("ack", "publish->ack"), ("e2e", "publish->consume (other node)")):
        row = (f"| latency {label} p50 / p99 / p99.9 ms | "
               f"{' / '.join(fmt([ms(v, key, q) for v in lat], '{:.2f}') for q in ('p50', 'p99', 'p999'))} | | "
               f"{fmt([cpu_per_event_us(v) for v in lat]) if key == 'ack' else ''} |")
        for l in labels:
            theirs = [r for r in nats if r.get("label", "nats") == l and r.get("bench") == "latency"]
            row += (f" {' / '.join(fmt([ms(r, key, q) for r in theirs], '{:.2f}') for q in ('p50', 'p99', 'p999'))} | | | "
                    f"{fmt([cpu_per_event_us(r) for r in theirs]) if key == 'ack' else ''} |")
        print(row)
    if floor:
        print()
        print("Against the floor (medians):")
        one = results.get("produce 200k x 256 B, inflight 1", [])
        p50 = med([ms(v, "ack", "p50") for v in one])
        if p50:
            print(f"  one in flight: ack p50 {p50 * 1000:,.0f} µs = {p50 * 1000 / floor:.2f}x the floor of {floor:,.0f} µs")
            if floor_shared:
                print(f"  one in flight: ack p50 = {p50 * 1000 / floor_shared:.2f}x the shared-disk floor of "
                      f"{floor_shared:,.0f} µs")
        p99 = med([ms(v, "ack", "p99") for v in lat])
        if p99 and fsync_p99:
            print(f"  2,000 ev/s: ack p99 {p99 * 1000:,.0f} µs = {p99 * 1000 / fsync_p99:.2f}x the fsync p99 of {fsync_p99:,.0f} µs")
            if shared_p99:
                print(f"  2,000 ev/s: ack p99 = {p99 * 1000 / shared_p99:.2f}x the shared-disk fdatasync p99 of "
                      f"{shared_p99:,.0f} µs")


if __name__ == "__main__":
    main()
