#!/usr/bin/env bash
# nginx requests/s with and without tailweave's ebpf receiver attached, and the BPF program's
# cost per syscall. Root only; needs nginx-light, wrk, bpftool and a release binary built with
#   cargo build --release -p tailweave-collector --bin tailweave --features tailweave-receivers/ebpf
#
# Usage: tests/ebpf/bench.sh [seconds per wrk run (10)] [rounds (2)]
#
# Runs are bounded (wrk -d), alternate without/with so background load hits both alike, and use
# one nginx worker, one wrk thread and 16 keep-alive connections on loopback.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-10}
rounds=${2:-2}
bin=${TAILWEAVE_BIN:-target/release/tailweave}
dir=$(mktemp -d)
trap 'kill $(cat $dir/nginx.pid 2>/dev/null) 2>/dev/null || true; kill $tw 2>/dev/null || true; sysctl -qw kernel.bpf_stats_enabled=0; rm -rf $dir' EXIT
port=18080
metrics=18889
cat > $dir/nginx.conf <<EOF
user root;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $dir/body; proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi; uwsgi_temp_path $dir/uwsgi; scgi_temp_path $dir/scgi;
  server { listen 127.0.0.1:$port; location / { return 200 "ok"; } }
}
EOF
nginx -c $dir/nginx.conf -p $dir
cat > $dir/tw.yaml <<EOF
receivers:
  ebpf:
    comm: [nginx]
exporters:
  file:
    path: /dev/null
service:
  telemetry:
    metrics:
      address: 127.0.0.1:$metrics
  pipelines:
    traces:
      receivers: [ebpf]
      exporters: [file]
EOF
rps() { wrk -t1 -c16 -d${secs}s http://127.0.0.1:$port/ | awk '/Requests\/sec/ {print $2}'; }
metric() { curl -s 127.0.0.1:$metrics/metrics | awk -v n="$1" '$1 ~ "^"n {s+=$2} END {printf "%d", s}'; }
cpu() { awk '{printf "%.2f", ($14+$15)/100}' /proc/$tw/stat; }
prog_stats() { bpftool prog show name tw_sys_exit 2>/dev/null | grep -o 'run_time_ns [0-9]* run_cnt [0-9]*' || echo "run_time_ns 0 run_cnt 0"; }

for r in $(seq $rounds); do
  echo "round $r: without receiver: $(rps) req/s"
  $bin --config $dir/tw.yaml > $dir/tw.log 2>&1 & tw=$!
  for i in $(seq 100); do curl -sf 127.0.0.1:$metrics/metrics > /dev/null && break; sleep 0.1; done
  sysctl -qw kernel.bpf_stats_enabled=1
  sleep 2
  idle=$(prog_stats)
  cpu0=$(cpu)
  with=$(rps)
  busy=$(prog_stats)
  cpu1=$(cpu)
  sleep 1
  echo "round $r: with receiver:    $with req/s"
  echo "  tailweave CPU during the run: $(echo "$cpu1 - $cpu0" | bc) s"
  echo "  idle 2s:  $idle"
  echo "  wrk run:  $busy (cumulative)"
  # The program's cost during the wrk run alone: every syscall on the machine runs it.
  echo "$idle $busy" | awk '{t=$6-$2; n=$8-$4; if (n>0) printf "  BPF during the run: %d runs, %.0f ns/run, %.2f s total\n", n, t/n, t/1e9}'
  echo "  events: $(metric tailweave_ebpf_receiver_events_total) dropped: $(metric tailweave_ebpf_receiver_dropped_events_total) spans: $(metric tailweave_receiver_accepted_spans_total) refused: $(metric tailweave_receiver_refused_spans_total)"
  sysctl -qw kernel.bpf_stats_enabled=0
  kill $tw; wait $tw 2>/dev/null || true
done
