"""Index-scale benchmark: the worker-side FAISS build against today's in-memory build, at 1M+ vectors.

    python -m benchmarks.index_scale --sizes 1000000 3200000 --label cpu-2core
    python -m benchmarks.index_scale --report            # print the tables from reports/index_scale.json

What one size N does (vectors cached under --work-dir by N, dim and recipe):
  1. writes N synthetic unit vectors (a seeded mixture of 2,000 Gaussian clusters, --dim wide, float16
     as DPR shards store them) as DPR-schema Parquet shards of 10,000 rows, plus delta shards holding
     new vectors for a seeded 1% of the ids, and 1,000 queries (perturbed corpus vectors);
  2. runs each step in its own child process, which is the driver: it starts a local Ray and calls
     the product's code. Recorded: wall seconds and the driver's peak RSS (VmHWM);
       build     build_index_from: sample + train + add parts + merge on disk, on the workers;
       update    update_delta over the 1%: a delta index and the hidden ids;
       rebuild   build_index_from over the updated corpus (what an update without a delta costs);
       memory    today's in-memory build (the code this replaces): train on the first vectors in
                 corpus order, add every vector in one process (RSS grows with N);
  3. recall@10 against exact inner-product search (Flat over the same vectors) for the worker build,
     the in-memory build, the updated index (delta + hidden ids) and the rebuild, at --nprobe.

Nothing here is pickled: children write JSON. Random vectors time and size the build; recall on real
model vectors is checked by tests/test_pipeline_e2e.py on the sample (MiniLM).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.proc import load_results, measure_sizes

THIS_REPO = Path(__file__).resolve().parents[1]
RECIPE = "v1"
SHARD_ROWS = 10_000
CLUSTERS = 2_000


def _maxrss_mb() -> float:
    from benchmarks.proc import peak_rss_mb

    return peak_rss_mb()


# ---------------------------------------------------------------- data

def _vectors(rng: np.random.Generator, centers: np.ndarray, n: int) -> np.ndarray:
    x = centers[rng.integers(0, len(centers), n)] + 0.35 * rng.standard_normal((n, centers.shape[1]), np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _write(store, rel: str, ids: np.ndarray, vecs: np.ndarray) -> dict:
    import pyarrow as pa

    from storage.shards import write_shard

    emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float16()), vecs.shape[1])
    table = pa.table({"id": pa.array(ids, pa.int64()), "embedding": emb})
    return {**write_shard(store, rel, table).to_dict(), "kind": "dpr"}


def build_data(root: Path, n: int, dim: int) -> Path:
    """The corpus for N (cached): shards.json lists base and delta shards, changed ids and queries."""
    from storage.fs import Store

    out = root / f"vec-{RECIPE}-{n}-{dim}"
    if (out / "shards.json").exists():
        return out
    store = Store(str(out))
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((CLUSTERS, dim), np.float32)
    base = []
    for k, start in enumerate(range(0, n, SHARD_ROWS)):
        ids = np.arange(start + 1, min(n, start + SHARD_ROWS) + 1, dtype=np.int64)
        base.append(_write(store, f"dpr/part-{k:05d}.parquet", ids, _vectors(np.random.default_rng(k + 1), centers,
                                                                              len(ids))))
    changed = np.sort(rng.choice(np.arange(1, n + 1), size=n // 100, replace=False))
    delta = [_write(store, f"delta/part-{k:05d}.parquet", changed[s:s + SHARD_ROWS],
                    _vectors(np.random.default_rng(10_000_000 + k), centers, len(changed[s:s + SHARD_ROWS])))
             for k, s in enumerate(range(0, len(changed), SHARD_ROWS))]
    queries = _vectors(np.random.default_rng(7), centers, 1000).astype(np.float32)
    np.save(out / "changed.npy", changed)
    np.save(out / "queries.npy", queries)
    (out / "shards.json").write_text(json.dumps({"base": base, "delta": delta}))
    return out


# ---------------------------------------------------------------- children (each one is a driver)

def _spec(data: Path, a):
    from pipeline.index.build import IndexSpec

    return IndexSpec(str(data), {}, a.factory, a.train_sample, a.nprobe, task_cpus=1.0, part_rows=a.part_rows)


def _all_vectors(data: Path, shards: list[dict], dead: set[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.index.build import read_embeddings

    got = [read_embeddings(str(data), {}, s["path"]) for s in shards]
    ids, vecs = np.concatenate([i for i, _ in got]), np.concatenate([v for _, v in got])
    if dead is not None:
        keep = ~np.isin(ids, np.fromiter(dead, np.int64))
        ids, vecs = ids[keep], vecs[keep]
    return ids, vecs


def child(step: str, data: Path, a) -> dict:
    import ray

    from pipeline.index import faiss_file as fx
    from pipeline.index.build import build_index_from, update_delta
    from storage.fs import Store
    from storage.manifest import artifact_files

    layout = json.loads((data / "shards.json").read_text())
    base, delta = layout["base"], layout["delta"]
    changed = np.load(data / "changed.npy")
    store = Store(str(data))
    t0 = time.perf_counter()
    if step == "memory":  # today's build: the first vectors in corpus order train, one process adds all
        ids, vecs = _all_vectors(data, base)
        index = fx.train(fx.new_index(a.factory, vecs.shape[1]), vecs[: a.train_sample])
        index.add_with_ids(vecs, ids)
        import faiss
        faiss.write_index(index, str(data / "memory.faiss"))
        return {"wall_s": time.perf_counter() - t0, "driver_rss_mb": _maxrss_mb(), "ntotal": int(index.ntotal)}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    t0 = time.perf_counter()
    spec = _spec(data, a)
    if step == "build":
        entry = build_index_from(spec, store, "runs/build", base)
    elif step == "update":
        built = json.loads((data / "build.entry.json").read_text())
        live = sum(s["rows"] for s in base)
        entry = update_delta(spec, store, "runs/update", built, changed, delta, live)
    elif step == "rebuild":
        dead = {s["path"]: set(changed[(changed >= s["id_min"]) & (changed <= s["id_max"])].tolist()) for s in base}
        entry = build_index_from(spec, store, "runs/rebuild", base + delta, dead)
    else:
        raise SystemExit(f"unknown step {step}")
    wall = time.perf_counter() - t0
    (data / f"{step}.entry.json").write_text(json.dumps(entry))
    ray.shutdown()
    return {"wall_s": wall, "driver_rss_mb": _maxrss_mb(), "ntotal": entry["ntotal"],
            "index_mb": sum(f["bytes"] for f in artifact_files(entry)) / 1e6}


def recall(data: Path, a) -> dict:
    import faiss

    from pipeline.index import faiss_file as fx
    from storage.fs import Store

    layout = json.loads((data / "shards.json").read_text())
    changed = np.load(data / "changed.npy")
    q = np.load(data / "queries.npy")
    store = Store(str(data))
    out = {}

    def exact(ids, vecs):
        flat = faiss.IndexIDMap2(faiss.IndexFlatIP(vecs.shape[1]))
        flat.add_with_ids(vecs, ids)
        return flat

    ids, vecs = _all_vectors(data, layout["base"])
    truth = exact(ids, vecs)
    del ids, vecs
    memory = faiss.read_index(str(data / "memory.faiss"))
    for name, idx in (("build", fx.load_checked(store, json.loads((data / "build.entry.json").read_text()))),
                      ("memory", memory)):
        fx.set_nprobe(idx, a.nprobe)
        out[name] = fx.recall_at_k(truth, idx, q, 10).recall
    del truth, memory
    ids, vecs = _all_vectors(data, layout["base"], set(changed.tolist()))
    d_ids, d_vecs = _all_vectors(data, layout["delta"])
    truth = exact(np.concatenate([ids, d_ids]), np.concatenate([vecs, d_vecs]))
    del ids, vecs
    for name in ("update", "rebuild"):
        idx = fx.load_checked(store, json.loads((data / f"{name}.entry.json").read_text()))
        fx.set_nprobe(idx, a.nprobe)
        out[name] = fx.recall_at_k(truth, idx, q, 10).recall
    return out


# ---------------------------------------------------------------- parent

def run_child(step: str, data: Path, a) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.index_scale", "--child", step, "--data", str(data),
           "--factory", a.factory, "--train-sample", str(a.train_sample), "--nprobe", str(a.nprobe),
           "--part-rows", str(a.part_rows)]
    env = {**os.environ, "PYTHONPATH": str(THIS_REPO), "RAY_DEDUP_LOGS": "0"}
    out = subprocess.run(cmd, cwd=THIS_REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{step} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(a, n: int) -> dict:
    t0 = time.perf_counter()
    data = build_data(Path(a.work_dir), n, a.dim)
    print(f"[{n:,}] data ready in {time.perf_counter() - t0:.0f} s: {data}", flush=True)
    import shutil
    shutil.rmtree(data / "runs", ignore_errors=True)  # an earlier run's build would be reused (its marker matches)
    res = {"n": n, "dim": a.dim, "factory": a.factory, "nprobe": a.nprobe, "train_sample": a.train_sample,
           "part_rows": a.part_rows}
    for step in ("build", "update", "rebuild", "memory", "recall"):
        res[step] = run_child(step, data, a)
        print(f"[{n:,}] {step}: {res[step]}", flush=True)
    return res


def render(data: dict) -> str:
    from benchmarks.proc import render_tables

    def rows(n: int, r: dict):
        for step in ("build", "memory", "update", "rebuild"):
            s = r[step]
            yield [f"{n:,}", str(r["dim"]), r["factory"], step, f"{s['wall_s']:.1f}", f"{s['driver_rss_mb']:.0f}",
                   f"{s['index_mb']:.1f}" if "index_mb" in s else "", f"{r['recall'][step]:.4f}"]

    return render_tables(data, ["N:", "dim:", "factory", "step", "wall s:", "driver peak RSS MB:", "index MB:",
                                "recall@10:"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog="See the module docstring for what each step measures.")
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000], help="vectors per run (default 1,000,000)")
    p.add_argument("--dim", type=int, default=128, help="vector width (default 128)")
    p.add_argument("--factory", default="IVF4096,SQ8", help="FAISS factory (default IVF4096,SQ8: plan-index at 1M)")
    p.add_argument("--train-sample", type=int, default=100_000, help="requested training vectors (clamped to 39-256 x nlist)")
    p.add_argument("--nprobe", type=int, default=32, help="lists probed for recall (default 32)")
    p.add_argument("--part-rows", type=int, default=500_000, help="vectors per IVF part (default 500,000)")
    p.add_argument("--work-dir", default="/tmp/index-bench", help="cache for synthetic vectors and indexes")
    p.add_argument("--json", default=str(THIS_REPO / "reports" / "index_scale.json"), help="results file")
    p.add_argument("--label", default="run", help="key of this run in --json")
    p.add_argument("--report", action="store_true", help="print the tables from --json and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        result = recall(Path(a.data), a) if a.child == "recall" else child(a.child, Path(a.data), a)
        print(json.dumps(result))
        return 0
    if a.report:
        print(render(load_results(a.json)))
        return 0
    if any(n < 20_000 for n in a.sizes):
        p.error("--sizes: at least 20,000 vectors (the default factory has 4,096 lists)")
    measure_sizes(a.json, a.label, "benchmarks.index_scale", argv if argv is not None else sys.argv[1:],
                  a.sizes, lambda n: measure(a, n), render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
