#!/usr/bin/env bash
# Print each run's last progress line and the GPU's load every $1 seconds until $2 seconds have passed or
# no run is left.
every=${1:-60} until=${2:-540}
start=$(date +%s)
while :; do
  sleep "$every"
  echo "== $(date +%T): $(pgrep -fc 'sb3_baselines.py --tasks') runs alive; GPU $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"
  for f in /tmp/s16/logs/*.log; do echo "$(basename $f .log): $(grep -v '^$' $f | tail -n 1 | cut -c1-150)"; done
  [ "$(pgrep -fc 'sb3_baselines.py --tasks')" = 0 ] && break
  [ $(( $(date +%s) - start + every )) -gt "$until" ] && break
done
