#!/usr/bin/env bash
# Usage: cargo build --release --bins && bench/security_compare.sh > out.txt  (dev clusters on ports 29091+, data in /tmp/sb)
# Produce throughput and ack latency: plaintext dev cluster vs TLS + authentication + ACLs, same hour.
set -u
cd "$(dirname "$0")/.." && E=$PWD/target/release/eddyctl && N=$PWD/target/release/eddy-node
run_dev() { rm -rf /tmp/sb; ($N dev --data-dir /tmp/sb --base-port 29091 $1 > /tmp/sb.out 2>&1 &); sleep 4; }
stop_dev() { pkill -INT -f 'eddy-node dev --data-dir /tmp/sb'; sleep 6; pkill -KILL -f '/tmp/sb/node-' ; sleep 1; }
bench() { # $1 label, rest: credentials
  local label=$1; shift
  for wl in "--inflight 1 --size 256 --events 3000" "--inflight 64 --size 256 --events 60000"; do
    for rep in 1 2 3; do
      out=$($E --brokers 127.0.0.1:29091,127.0.0.1:29092,127.0.0.1:29093 "$@" --output json bench produce --topic bench.p --partitions 3 $wl 2>/dev/null | tail -1)
      echo "$label | $wl | rep $rep | $out"
    done
  done
}
run_dev --insecure
$E --brokers 127.0.0.1:29091 cluster health --exit-when-healthy --timeout 40s >/dev/null
bench plaintext
stop_dev
run_dev ""
eval "$(grep export /tmp/sb.out)"
$E cluster health --exit-when-healthy --timeout 40s >/dev/null
T=$($E user create bencher)
for op in create delete write describe; do $E acl add --principal User:bencher --allow --operation $op --topic bench. --pattern prefixed >/dev/null; done
unset EDDY_CERT EDDY_KEY
bench tls+token+acl --token "$T"
stop_dev
