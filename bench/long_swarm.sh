#!/usr/bin/env bash
# A long simulator swarm for nightly use, not CI: seeds FROM..TO in chunks, each chunk a
# `eddy-sim swarm --output json`, with a summary file that grows as chunks finish (so a run
# stopped early still says what it found) and the replay command of every failing seed; it
# first replays every regression seed of sim/REGRESSIONS.md (the nightly ones too).
#
# Usage: bench/long_swarm.sh [--from 1] [--to 10000] [--chunk 200] [--duration 30s]
#                            [--hours H] [--out DIR] [-- EXTRA eddy-sim ARGS...]
#   nohup bench/long_swarm.sh --to 10000 > /dev/null 2>&1 &     # in the background
#   tail -f target/long-swarm/summary.txt
#
# Stops by itself after TO or after H hours (checked between chunks). Exit 0 only when every
# seed passed. Seeds per hour and the fault classes exercised are in the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
from=1 to=10000 chunk=200 duration=30s hours=0 out=target/long-swarm regressions_failed=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --from) from=$2; shift 2 ;;
    --to) to=$2; shift 2 ;;
    --chunk) chunk=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --hours) hours=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
cargo build --release -q -p eddy-sim
sim=target/release/eddy-sim
summary=$out/summary.txt
failures=$out/failures.txt
: > "$failures"
start=$(date +%s)
{
  echo "long swarm: seeds $from..$to, chunks of $chunk, $duration each, extra args: ${extra[*]:-none}"
  echo "started $(date -u +%FT%TZ) on $(nproc) CPUs at commit $(git rev-parse --short HEAD)"
} > "$summary"
# Every regression seed first, the nightly ones included (sim/REGRESSIONS.md).
if sim/regressions.sh "$sim" --all > "$out/regressions.txt" 2>&1; then
  echo "regression seeds (all, sim/REGRESSIONS.md): pass" >> "$summary"
else
  echo "regression seeds (all, sim/REGRESSIONS.md): FAILED, see $out/regressions.txt" >> "$summary"
  regressions_failed=1
fi
done_seeds=0 failed=0 acked=0
a=$from
while [ "$a" -le "$to" ]; do
  b=$(( a + chunk - 1 )); [ "$b" -gt "$to" ] && b=$to
  json=$out/chunk-$a-$b.json
  "$sim" swarm --seeds "$a..$b" --duration "$duration" --keep-going --output json "${extra[@]}" > "$json" || true
  n=$(sed -n 's/.*"seeds":\([0-9]*\).*/\1/p' "$json"); n=${n:-0}
  f=$(sed -n 's/.*"failed":\([0-9]*\).*/\1/p' "$json"); f=${f:-$(( b - a + 1 ))}
  k=$(sed -n 's/.*"acked_events":\([0-9]*\).*/\1/p' "$json"); k=${k:-0}
  done_seeds=$(( done_seeds + n )); failed=$(( failed + f )); acked=$(( acked + k ))
  grep -o '"command":"[^"]*"' "$json" | sort -u | sed 's/"command":"\(.*\)"/\1/' >> "$failures" || true
  elapsed=$(( $(date +%s) - start ))
  per_hour=$(( done_seeds * 3600 / (elapsed > 0 ? elapsed : 1) ))
  echo "$(date -u +%FT%TZ) seeds $a..$b: $f failed; total $done_seeds seeds, $failed failed, $acked events acknowledged, ${elapsed}s, $per_hour seeds/hour" >> "$summary"
  a=$(( b + 1 ))
  if [ "$hours" != 0 ] && [ "$elapsed" -ge $(( hours * 3600 )) ]; then
    echo "stopped after $hours h (--hours)" >> "$summary"; break
  fi
done
echo "finished $(date -u +%FT%TZ): $done_seeds seeds, $failed failed; replay commands in $failures" >> "$summary"
[ "$failed" -eq 0 ] && [ "$regressions_failed" -eq 0 ]
