#!/bin/bash
# Driver peak RSS and time to the first encoded shard on a large corpus, without waiting for the whole
# run: starts `precompute run`, samples the driver's RSS every 0.5 s through the plan, the fit sample
# and one minute of encoding after the first shard lands, then stops the run (its process group).
# Uses the corpus and tiny model that `python -m benchmarks.scale --sizes N` caches under WORK.
#   bash benchmarks/probe_rss.sh [N=3200000] [WORK=/tmp/scale-bench]
set -u
N=${1:-3200000}; WORK=${2:-/tmp/scale-bench}; STORE=$(mktemp -d)
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
setsid python -m jobs.cli run --corpus "$WORK/corpus-v2-seed0-$N.tsv" --store "$STORE" \
  --model "$WORK/tiny-bert-2x32" --layers 1 --dims 16 --fit-sample 512 --shard-size 5000 \
  > "$STORE.out" 2> "$STORE.err" &
pid=$!
start=$(date +%s.%N); max=0; first=""
while kill -0 $pid 2>/dev/null; do
  rss=$(ps -o rss= -p $pid | tr -d ' '); [ -n "$rss" ] && [ "$rss" -gt "$max" ] && max=$rss
  if [ -z "$first" ] && grep -q "first encoded shard" "$STORE.err"; then first=$(echo "$(date +%s.%N) - $start" | bc); fi
  if [ -n "$first" ] && [ "$(echo "$(date +%s.%N) - $start > $first + 60" | bc)" = 1 ]; then break; fi
  sleep 0.5
done
kill -KILL -- -$pid 2>/dev/null
echo "N=$N: first shard seen after ${first}s from process start; driver peak RSS ${max} KiB"
grep -E "phase|first encoded|splits of" "$STORE.err" | cut -c1-160
rm -rf "$STORE" "$STORE.out" "$STORE.err"
