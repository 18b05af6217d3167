"""Today's default codec against the residual codec (issue 28), whole stores, same run.

    python -m benchmarks.residual                      # linear PCA-96 int8 vs OPQ M=8 on the residual
    python -m benchmarks.residual --pq-m 16 --calls 300
    python -m benchmarks.residual --report             # the markdown table from reports/residual_cpu.json
    OPENBLAS_NUM_THREADS=1 python -m benchmarks.residual   # stable fetch latency on a small shared machine

Both stores are written by the real pipeline (`precompute run`'s code path: local Ray, MiniLM lower 3 of 6
layers, the bundled 2,333-passage sample, the codec fitted on the run's own 512-passage sample). Per store:
bytes per token as `validate` measures them and its estimate's error; what `lookup` returns against the
model's own `hidden_states[3]` (mean token cosine over random passages, `benchmarks.stored_vs_model`);
the encoder actors' tokens/s; `StateReader.get` latency for K random ids (calls alternating between the
stores, decode timed apart). Fidelity after the upper layers is `precompute report`'s (reports/residual/).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from benchmarks.codecs import compare_stores, fetch_args, speed_cells
from benchmarks.proc import start_benchmark
from pipeline.config import CompressionConfig

log = logging.getLogger("benchmark")

OUT = Path("reports/residual_cpu.json")


def lookup_fidelity(url: str, n: int, seed: int = 0) -> dict:
    """Mean token cosine (and relative error) of stored states vs the model's own hidden states."""
    from benchmarks.stored_vs_model import compare
    from pipeline.serve.state_reader import StateReader
    from storage.fs import Store

    ids = StateReader(Store(url)).ids()
    picks = sorted(np.random.default_rng(seed).choice(ids, min(n, ids.size), replace=False).tolist())
    out = compare(url, picks)
    return {"lookup_passages": len(picks), "lookup_token_cosine": out["mean_token_cosine"],
            "lookup_relative_error": float(np.mean([r["relative_error"] for r in out["passages"]]))}


def render(data: dict) -> str:
    base = data["rows"][0]
    lines = [f"{data['machine']}; {data['passages']} passages, {data['tokens']:,} tokens; lookup fidelity on "
             f"{base['lookup_passages']} random passages; fetch: K = {data['k']} random ids, {data['calls']} calls per "
             f"store, alternating", "",
             "| store | B/token (all columns) | code B/token | validate error | artifact | lookup cosine vs "
             "hidden_states[3] | rel. error | encoder tok/s | x default | get(K) median / p99 ms | x default | "
             "decode ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['codec']} | {r['bytes_per_token']:.2f} | {r['code_bytes_per_token']:.2f} | "
                     f"{r['estimate_relative_error']:+.2%} | {r['codebook_bytes'] / 1e6:.1f} MB | "
                     f"{r['lookup_token_cosine']:.4f} | {r['lookup_relative_error']:.4f} | {speed_cells(r, base)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, default=96, help="today's default: linear codec dims (default 96 = hidden/4)")
    p.add_argument("--bits", type=float, default=8, help="today's default: bits (default 8)")
    p.add_argument("--pq-m", type=int, default=8, help="residual codec: OPQ sub-quantisers = code bytes per token")
    p.add_argument("--lookup-passages", type=int, default=200)
    a = fetch_args(p, OUT).parse_args(argv)
    if a.report:
        print(render(json.loads(Path(a.out).read_text())))
        return 0
    start_benchmark()
    settings = {"default": CompressionConfig(dims=a.dims, bits=a.bits),
                "residual": CompressionConfig(codec="pq", pq_m=a.pq_m, opq=True, residual="embeddings")}
    data = compare_stores(settings, "bench-residual-", a.k, a.calls, "python -m benchmarks.residual", argv,
                          lambda url: lookup_fidelity(url, a.lookup_passages))
    # numpy's BLAS threads spin against torch's and other processes' on a small shared machine (get p99 in
    # seconds here with the default): OPENBLAS_NUM_THREADS=1 gives stable fetch figures; it is recorded
    data["openblas_num_threads"] = os.environ.get("OPENBLAS_NUM_THREADS")
    Path(a.out).write_text(json.dumps(data, indent=1))
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
