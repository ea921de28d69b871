#!/usr/bin/env bash
# Replays the regression seeds of sim/REGRESSIONS.md, two at a time; exit 0 only when every one
# passes. Usage: sim/regressions.sh EDDY_SIM [--all]
#
# A line is "- seed N", optionally followed by "(with `ARGS`)" for a seed found with other
# options. A seed found before the classes disk-corrupt and move-back existed runs with the
# fourteen classes it was found with (the same run, fault for fault), unless its line names
# --faults. A line "- seed N (nightly ...)" is a further seed of a bug that an earlier seed
# already replays: `.ci/run` leaves it out (CI's time is its budget), and `--all` (the nightly
# long swarm, bench/long_swarm.sh) runs it too.
set -euo pipefail
cd "$(dirname "$0")/.."
sim=$1 all=${2:-}
[ -x "$sim" ] || { echo "usage: $0 EDDY_SIM [--all]" >&2; exit 2; }
classic=partition,one-way,isolate-leader,loss,latency,crash,silent-death,bounce,freeze,disk-full,move,join,decommission,fsync-fail
regression() {
  local seed=$1; shift
  local faults=(--faults "$classic")
  case " $* " in *" --faults "*) faults=() ;; esac
  "$sim" run --seed "$seed" --duration 30s "${faults[@]}" "$@" --output json | grep -q '"verdict":"pass"' \
    || { echo "regression seed $seed${*:+ ($*)} fails again"; return 1; }
}
export -f regression; export sim classic
lines=$(grep '^- seed [0-9]' sim/REGRESSIONS.md)
[ "$all" = --all ] || lines=$(grep -v '^- seed [0-9]* (nightly' <<< "$lines")
echo "$(wc -l <<< "$lines") seeds${all:+ (all)}"
sed 's/^- seed \([0-9][0-9]*\) \{0,1\}(\{0,1\}\(nightly\)\{0,1\}[, ]*\(with `\([^`]*\)`\)\{0,1\}.*/\1 \4/' <<< "$lines" \
  | sed 's/ *$//' | xargs -P 2 -L 1 bash -c 'regression "$@"' regression
