#!/usr/bin/env bash
# Records a CPU profile of the three nodes of a local release cluster while one `eddyctl bench`
# workload runs, and renders it as a flame graph (SVG), so the next person sees where time goes.
#
#   bench/profile.sh [--out DIR] [--seconds S] [--freq HZ] [--target-dir target] -- BENCH ARGS...
#   e.g. bench/profile.sh -- produce --events 20000 --inflight 1
#        bench/profile.sh --seconds 10 -- latency --rate 2000 --seconds 10
#
# Writes DIR/perf.data (perf record -g --call-graph dwarf, all three node processes, from the
# workload's start for S seconds, default 8), DIR/stacks.folded, DIR/flamegraph.svg,
# DIR/threads.txt (share of samples per thread name) and DIR/bench.json (the workload's
# output). DIR defaults to target/profile/<date-time>. Needs `perf` (on this machine; `apt-get
# install linux-perf` otherwise) and installs `inferno` (the flame graph renderer) under
# target/tools with cargo when it is missing. Everything runs on 127.0.0.1 and is stopped at the
# end. Build first: cargo build --release --bin eddy-node --bin eddyctl.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
out="" seconds=8 freq=499 target="target"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --freq) freq="$2"; shift 2 ;;
    --target-dir) target="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (the workload's arguments go after --)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "usage: $0 [options] -- BENCH ARGS (e.g. -- produce --events 20000 --inflight 1)" >&2; exit 2; }
command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
[ -x "$target/release/eddy-node" ] && [ -x "$target/release/eddyctl" ] \
  || { echo "build first: cargo build --release --bin eddy-node --bin eddyctl" >&2; exit 1; }
tools="$target/tools"
if [ ! -x "$tools/bin/inferno-flamegraph" ]; then
  echo "installing inferno (flame graphs) into $tools ..." >&2
  cargo install --quiet --locked inferno --root "$tools" >&2
fi
out="${out:-$target/profile/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"

python3 - "$here" "$target/release" "$out" "$seconds" "$freq" "$@" <<'PY'
import json, os, subprocess, sys, time
here, bins, out, seconds, freq, *bench = sys.argv[1:]
sys.path.insert(0, here)
from eddy_cluster import Cluster
c = Cluster(bins)
try:
    code, _, err = c.ctl("cluster", "health", "--exit-when-healthy", "--timeout", "60s", timeout=90)
    if code != 0:
        raise SystemExit(f"the cluster did not become healthy: {err}")
    pids = ",".join(str(n["proc"].pid) for n in c.nodes.values())
    perf = subprocess.Popen(["perf", "record", "-F", freq, "-g", "--call-graph", "dwarf,16384",
                             "-o", os.path.join(out, "perf.data"), "-p", pids, "--", "sleep", seconds],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)  # perf attaches
    code, o, err = c.ctl("bench", *bench, timeout=900)
    with open(os.path.join(out, "bench.json"), "w") as f:
        f.write(o)
    if code != 0:
        raise SystemExit(f"eddyctl bench {' '.join(bench)} failed: {err}")
    perf.wait()
    print(o.strip().splitlines()[-1] if o.strip() else "")
finally:
    c.stop()
    import shutil; shutil.rmtree(c.dir, ignore_errors=True)
PY

perf script -i "$out/perf.data" 2>/dev/null | "$tools/bin/inferno-collapse-perf" > "$out/stacks.folded"
"$tools/bin/inferno-flamegraph" --title "eddy nodes: $*" < "$out/stacks.folded" > "$out/flamegraph.svg"
perf report -i "$out/perf.data" --no-children --sort comm --stdio -g none 2>/dev/null | grep '%' > "$out/threads.txt" || true
echo "profile: $out/flamegraph.svg (threads: $out/threads.txt)"
