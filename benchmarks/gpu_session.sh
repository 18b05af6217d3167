#!/usr/bin/env bash
# Every GPU figure issue #19 asks for, in one command for a short GPU spell. Each step writes its JSON
# and log under $OUT (the folder the device tool brings back), in order of importance, each under its own
# time limit and all under one deadline, so a slow step costs only itself and what follows it.
#
#   here, once:        bash ../shared/gpu/make-carry.sh $(cat benchmarks/gpu_carry_extra.txt)   (.gpucarry/, ~46 MB)
#   device tool:       run  command="bash benchmarks/gpu_session.sh"  carry=[".gpucarry"]  timeout_s=600
#                      (the extra packages: Ray's own dependencies that the GPU machine's Python may lack; a
#                      rehearsal in a venv holding only what ../shared/gpu/README.md lists failed on msgpack)
#   rehearsal on CPU:  SMALL=1 OUT=/tmp/gpu-out bash benchmarks/gpu_session.sh   (plumbing only: no GPU figure)
#
# Steps (STEPS="smoke throughput runtime e2e compile" by default; DEADLINE_S=540 s for all of them), each
# with its own limit (90 + 150 + 120 + 180 s, compile gets what is left), so the cheap, decisive ones come first:
#   smoke       packed (varlen) vs masked states on the GPU, then the whole shard encoder; a mismatch drops
#               the packed variants below
#   throughput  BERT-base geometry, lower 5 layers, 768 -> 192 int8: naive vs pipeline variants, MFU of the
#               encoder alone against a bf16 matmul peak measured in the same run, the 32M projection
#   runtime     the decoupled reader's Table 6 GPU columns (BERT-base 5-7, short/long, K = 1/10)
#   e2e         the Ray pipeline on ~100k passages against encode-only measured in the same process
#   compile     torch.compile of the packed layers against the same without (its compile time reported)
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
start=$(date +%s)
deadline=$((start + ${DEADLINE_S:-540}))
steps=${STEPS:-smoke throughput runtime e2e compile}
small=${SMALL:-0}

step() {  # step NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, time left); its output also in $out/NAME.log
  local name=$1 limit=$2; shift 2
  case " $steps " in *" $name "*) ;; *) echo "== $name: not asked for"; return 0 ;; esac
  local left=$((deadline - $(date +%s)))
  if [ "$left" -lt 30 ]; then echo "== $name: skipped, ${left}s left before the deadline"; return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name: start (limit ${limit}s, $(( $(date +%s) - start ))s into the session)"
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  grep -v -e "Loading weights" -e "Writing model shards" "$out/$name.log" | tail -n 14
  echo "== $name: rc=$rc after $(( $(date +%s) - start ))s"
  if [ "$rc" -ne 0 ]; then  # a step cut short may leave Ray's processes (and GPU memory) behind
    python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1 || true
  fi
  return $rc
}

session() {
  if [ -f .gpucarry/setup.sh ]; then
    # shellcheck disable=SC1091
    source .gpucarry/setup.sh || { echo "gpu_session: .gpucarry/setup.sh failed"; return 1; }
  else
    echo "gpu_session: no .gpucarry/ (bash ../shared/gpu/make-carry.sh here, carry .gpucarry); this python as is"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  fi
  export RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=true
  { if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "no nvidia-smi"; fi
    echo "nproc $(nproc)"; free -g; df -h /dev/shm /tmp; } > "$out/machine.txt" 2>&1
  head -n 12 "$out/machine.txt"

  # Sizes: the real run, or a rehearsal small enough for a 2-core CPU.
  local tp_size rt_size e2e_size cp_size variants=packed,mask,packed@262144
  if [ "$small" = 1 ]; then
    tp_size=(--limit 120 --repeat 1 --rounds 1)
    rt_size=(--settings short --ks 1,10 --rounds 1)
    e2e_size=(--limit 120 --e2e-repeat 2 --shard-size 60)
    cp_size=(--limit 60 --repeat 1 --rounds 1)
  else
    tp_size=(--repeat 4 --rounds 3)
    rt_size=(--rounds 5)
    e2e_size=(--repeat 4 --e2e-repeat 43 --shard-size 2000)   # 43 x 2,333 = 100,319 passages end to end
    cp_size=(--repeat 4 --rounds 3)
  fi
  local bert=(python3 -m benchmarks.throughput --bert-base --layers 5 --dims 192)

  if ! step smoke 90 python3 -m benchmarks.gpu_smoke --json "$out/smoke.json"; then
    echo "gpu_session: the packed path failed or disagreed on this machine; timing the masked path only"
    variants=mask
  fi
  step throughput 150 "${bert[@]}" --variants "$variants" "${tp_size[@]}" --json "$out/throughput_gpu.json"
  step runtime 120 python3 -m benchmarks.runtime --device auto --geometries bert-base-5-7 "${rt_size[@]}" \
    --out "$out/runtime_gpu.json" --details "$out/runtime_gpu_details.json"
  step e2e 180 "${bert[@]}" --variants "${variants%%,*}" --rounds 1 "${e2e_size[@]}" --json "$out/e2e_gpu.json"
  if [ "$variants" != mask ]; then
    step compile 150 "${bert[@]}" --variants packed,packed+compile "${cp_size[@]}" \
      --json "$out/throughput_gpu_compile.json"
  fi
  echo "== summary ($(( $(date +%s) - start ))s)"
  python3 -m benchmarks.gpu_summary "$out"
}

session 2>&1 | tee -a "$out/session.log"
