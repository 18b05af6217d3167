"""The FAISS index over a version's DPR shards: trained on the driver, parts added as Ray tasks.

(Issue: at 32M this still gathers parts into the driver; see the index issue for the on-disk merge.)
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np

from pipeline.config import RunConfig, digest
from storage.fs import Store, sha256_bytes

log = logging.getLogger(__name__)


def read_embeddings(store_url: str, storage_options: dict, path: str,
                     dead: frozenset[int] = frozenset()) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 vectors) of one DPR shard, without the rows tombstoned in it."""
    from storage.shards import read_rows

    t = read_rows(Store(store_url, storage_options), path, columns=["id", "embedding"])
    emb = t.column("embedding").combine_chunks()
    dim = emb.type.list_size
    vecs = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    ids = t.column("id").to_numpy()
    if dead:
        keep = ~np.isin(ids, np.fromiter(dead, dtype=np.int64))
        ids, vecs = ids[keep], vecs[keep]
    return ids, vecs


def _index_part_task(store_url: str, storage_options: dict, path: str, trained: bytes,
                     dead: frozenset[int]) -> tuple[bytes, int]:
    from pipeline import index as fx

    ids, vecs = read_embeddings(store_url, storage_options, path, dead)
    return fx.add_part(trained, ids, vecs), len(ids)


@dataclass(frozen=True)
class IndexSpec:
    """What to build and where the embeddings are; the same for a run, an update rebuild or a reindex."""
    store_url: str
    storage_options: dict
    factory: str
    train_sample: int
    nprobe: int
    task_cpus: float = 0.5


def build_index(cfg: RunConfig, store: Store, run_dir: str, dpr_shards: list[dict],
                dead: dict[str, set[int]] | None = None) -> dict:
    spec = IndexSpec(cfg.store, cfg.storage_options, cfg.dpr.index_factory, cfg.dpr.train_sample, cfg.dpr.nprobe,
                     cfg.execution.task_cpus)
    return build_index_from(spec, store, run_dir, dpr_shards, dead)


def build_index_from(spec: IndexSpec, store: Store, run_dir: str, dpr_shards: list[dict],
                     dead: dict[str, set[int]] | None = None) -> dict:
    """Train on a sample, add shard by shard as Ray tasks, merge; reuse a verified earlier build."""
    import ray

    from pipeline import index as fx

    dead = dead or {}
    rel = f"{run_dir}/index/dpr-{digest(spec.factory, 8)}.faiss"
    marker_rel = rel + ".done.json"
    if store.exists(marker_rel):
        entry = json.loads(store.read_bytes(marker_rel))
        if store.exists(rel) and store.size(rel) == entry["bytes"] and store.sha256(rel) == entry["sha256"]:
            log.info("reusing the FAISS index built by an earlier attempt: %s", rel)
            return entry
    t0 = time.perf_counter()
    sample = []
    have = 0
    for shard in dpr_shards:
        _, vecs = read_embeddings(spec.store_url, spec.storage_options, shard["path"],
                                   frozenset(dead.get(shard["path"], ())))
        sample.append(vecs)
        have += len(vecs)
        if have >= spec.train_sample:
            break
    train_x = np.concatenate(sample)[: spec.train_sample]
    dim = train_x.shape[1]
    log.info("training FAISS %s on %d vectors; adding %d shards as Ray tasks", spec.factory, len(train_x),
             len(dpr_shards))
    index = fx.train(fx.new_index(spec.factory, dim), train_x)
    trained = fx.to_bytes(index)
    task = ray.remote(num_cpus=spec.task_cpus)(_index_part_task)
    results = ray.get([task.remote(spec.store_url, spec.storage_options, s["path"], trained,
                                   frozenset(dead.get(s["path"], ()))) for s in dpr_shards])
    merged = fx.merge(trained, [part for part, _ in results])
    expected = sum(n for _, n in results)
    if merged.ntotal != expected:
        raise RuntimeError(f"index holds {merged.ntotal} vectors, DPR shards hold {expected} live rows; "
                           f"not committing")
    data = fx.to_bytes(merged)
    store.write_bytes(rel, data)
    entry = {"path": rel, "sha256": sha256_bytes(data), "bytes": len(data), "factory": spec.factory, "dim": dim,
             "ntotal": int(merged.ntotal), "metric": "inner_product", "nprobe": spec.nprobe,
             "faiss_gpu": bool(fx.gpu_count())}
    store.write_bytes(marker_rel, json.dumps(entry).encode())
    log.info("built FAISS %s over %d vectors (%d dims) in %.1f s: %.1f MB", spec.factory, merged.ntotal, dim,
             time.perf_counter() - t0, len(data) / 1e6)
    return entry
