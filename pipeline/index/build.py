"""The FAISS index over a version's DPR shards, built on the workers; the driver plans and commits.

IVF factories: Ray tasks draw a uniform sample of the vectors; one task trains (on a GPU when
faiss sees one) and writes the trained index; one task loads it into the object store once; tasks
add groups of shards into IVF parts and write them to the store; one task merges the parts'
inverted lists on its local disk (faiss' OnDiskInvertedLists, parts memory-mapped) and streams
the merged lists up while hashing them. Every task returns paths, counts and checksums.
Flat and HNSW have no lists to merge: one task builds them whole, up to WHOLE_INDEX_MAX_VECTORS.

An update adds a small delta index and a list of ids hidden from the base (cost follows the
change); `compact` and `precompute index` rebuild through the same build.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.index import plan as index_plan
from pipeline.config import RunConfig, digest
from storage.errors import OperationFailed
from storage.fs import IntegrityError, Store, sha256_bytes
from storage.manifest import artifact_files

log = logging.getLogger(__name__)


class IndexBuildError(OperationFailed, RuntimeError):
    """The index could not be built (disk, counts); nothing was committed."""


_NO_IDS = np.empty(0, np.int64)


def dead_ids(dead) -> np.ndarray:
    """Tombstoned ids as an int64 array: the manifest's sorted arrays pass as they are; a set is converted."""
    if isinstance(dead, (set, frozenset)):
        return np.fromiter(dead, dtype=np.int64, count=len(dead))
    return np.asarray(dead, dtype=np.int64)


def read_embeddings(store_url: str, storage_options: dict, path: str,
                    dead=_NO_IDS) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 vectors) of one DPR shard, without the rows tombstoned in it."""
    from storage.shards import read_rows

    t = read_rows(Store(store_url, storage_options), path, columns=["id", "embedding"])
    emb = t.column("embedding").combine_chunks()
    dim = emb.type.list_size
    vecs = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    ids = t.column("id").to_numpy()
    dead = dead_ids(dead)
    if dead.size:
        keep = ~np.isin(ids, dead)
        ids, vecs = ids[keep], vecs[keep]
    return ids, vecs


@dataclass(frozen=True)
class IndexSpec:
    """What to build and where the embeddings are; the same for a run, an update, a reindex or compact."""
    store_url: str
    storage_options: dict = field(repr=False)  # may hold credentials: never in a repr or a log
    factory: str
    train_sample: int
    nprobe: int
    task_cpus: float = 0.5
    part_rows: int = 1_000_000   # vectors per IVF part (one worker holds one part in memory)
    seed: int = 0                # of the training sample

    def store(self) -> Store:
        return Store(self.store_url, self.storage_options)


# ---------------------------------------------------------------- worker tasks

def _write_local_index(store: Store, index, rel: str) -> dict:
    """faiss writes to a local path only: write it to a temp file, then stream it up while hashing."""
    import faiss

    with tempfile.TemporaryDirectory(prefix="faiss-") as tmp:
        local = os.path.join(tmp, rel.rsplit("/", 1)[-1])
        faiss.write_index(index, local)
        return store.upload_file(local, rel)


def _sample_task(spec: IndexSpec, picks: list[tuple[str, list[int], np.ndarray]], rel: str) -> dict:
    """The sampled rows of a group of shards, written as one .npy (tombstoned rows dropped)."""
    pieces = []
    for path, positions, dead in picks:
        ids, vecs = read_embeddings(spec.store_url, spec.storage_options, path)
        pos = np.asarray(positions, dtype=np.int64)
        dead = dead_ids(dead)
        if dead.size:
            pos = pos[~np.isin(ids[pos], dead)]
        pieces.append(vecs[pos])
    x = np.concatenate(pieces)
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    spec.store().write_bytes(rel, buf.getvalue())
    return {"path": rel, "rows": int(len(x))}


def _train_task(spec: IndexSpec, sample_paths: list[str], dim: int, rel: str) -> dict:
    from pipeline.index import faiss_file as fx

    store = spec.store()
    x = np.concatenate([np.load(io.BytesIO(store.read_bytes(p)), allow_pickle=False) for p in sample_paths])
    index = fx.train(fx.new_index(spec.factory, dim), x)
    return {**_write_local_index(store, index, rel), "vectors": int(len(x)), "gpu": bool(fx.gpu_count())}


def _load_trained_task(spec: IndexSpec, trained: dict) -> bytes:
    """The trained index's bytes as this task's result: it lives in the object store, not the driver."""
    return spec.store().read_verified(trained)


def _add_task(spec: IndexSpec, trained: bytes, shards: list[tuple[str, np.ndarray]], rel: str) -> dict:
    """One IVF part: the trained index plus a group of shards' live vectors, written to the store."""
    from pipeline.index import faiss_file as fx

    index = fx.from_bytes(trained)
    for path, dead in shards:
        ids, vecs = read_embeddings(spec.store_url, spec.storage_options, path, dead)
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(vecs), np.ascontiguousarray(ids, dtype=np.int64))
    return {**_write_local_index(spec.store(), index, rel), "ntotal": int(index.ntotal)}


def merge_disk_needed(part_bytes: int, local_store: bool) -> int:
    """Local disk a merge needs: the merged lists (about the parts' size), plus the parts if downloaded."""
    return int(part_bytes * (1.1 if local_store else 2.2)) + (64 << 20)


def _merge_task(spec: IndexSpec, trained: dict, parts: list[dict], header_rel: str, lists_rel: str) -> dict:
    """Merge the parts' inverted lists on this worker's disk; each part is checked before faiss opens it."""
    import faiss

    from pipeline.index import faiss_file as fx

    store = spec.store()
    base = fx.from_bytes(store.read_verified(trained))
    with tempfile.TemporaryDirectory(prefix="faiss-merge-") as tmp:
        need = merge_disk_needed(sum(p["bytes"] for p in parts), store.is_local)
        free = shutil.disk_usage(tmp).free
        if free < need:
            raise IndexBuildError(f"merging the index needs ~{need / 1e9:.1f} GB of local disk under {tmp}, "
                                  f"{free / 1e9:.1f} GB is free; point TMPDIR at a larger disk on the workers")
        local_parts = []
        for k, part in enumerate(parts):
            local = store.local_path(part["path"])
            if local is None:
                local = os.path.join(tmp, f"part-{k:05d}.faiss")
                store.download_verified(part, local)
            else:
                store.check_file(part)
            local_parts.append(local)
        lists_local = os.path.join(tmp, lists_rel.rsplit("/", 1)[-1])
        header_local = os.path.join(tmp, header_rel.rsplit("/", 1)[-1])
        merged = fx.merge_ondisk(base, local_parts, lists_local)
        ntotal = int(merged.ntotal)
        faiss.write_index(merged, header_local)
        del merged, base
        lists = store.upload_file(lists_local, lists_rel)
        header = store.upload_file(header_local, header_rel)
    return {"header": header, "lists": lists, "ntotal": ntotal}


def _whole_task(spec: IndexSpec, shards: list[tuple[str, np.ndarray]], dim: int, rel: str) -> dict:
    """Flat/HNSW: every vector in this worker, trained on a uniform sample if the codec needs it."""
    from pipeline.index import faiss_file as fx

    got = [read_embeddings(spec.store_url, spec.storage_options, p, dead) for p, dead in shards]
    ids = np.concatenate([i for i, _ in got]).astype(np.int64)
    vecs = np.ascontiguousarray(np.concatenate([v for _, v in got]))
    del got
    index = fx.new_index(spec.factory, dim)
    if not index.is_trained:
        n = index_plan.train_size(None, len(ids), spec.train_sample)
        pick = np.sort(np.random.default_rng(spec.seed).choice(len(ids), size=n, replace=False))
        fx.train(index, vecs[pick])
    index.add_with_ids(vecs, ids)
    return {**_write_local_index(spec.store(), index, rel), "ntotal": int(index.ntotal)}


def _delta_task(spec: IndexSpec, start: dict, remove: np.ndarray, shards: list[str], rel: str) -> dict:
    """The new delta index: the previous delta (or the trained empty index), minus `remove`, plus the shards."""
    from pipeline.index import faiss_file as fx

    store = spec.store()
    index = fx.from_bytes(store.read_verified(start))
    before = int(index.ntotal)
    removed = int(index.remove_ids(np.ascontiguousarray(remove, dtype=np.int64))) if remove.size and before else 0
    added = 0
    for path in shards:
        ids, vecs = read_embeddings(spec.store_url, spec.storage_options, path)
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(vecs), np.ascontiguousarray(ids, dtype=np.int64))
            added += len(ids)
    if index.ntotal != before - removed + added:
        raise IndexBuildError(f"delta holds {index.ntotal} vectors, expected {before} - {removed} + {added}")
    return {**_write_local_index(store, index, rel), "ntotal": int(index.ntotal), "added": added}


# ---------------------------------------------------------------- driver: plan and commit

def build_index(cfg: RunConfig, store: Store, run_dir: str, dpr_shards: list[dict],
                dead: dict[str, set[int]] | None = None) -> dict:
    spec = IndexSpec(cfg.store, cfg.storage_options, cfg.dpr.index_factory, cfg.dpr.train_sample, cfg.dpr.nprobe,
                     cfg.execution.task_cpus)
    return build_index_from(spec, store, run_dir, dpr_shards, dead)


def stored_embedding_width(store: Store, path: str) -> int:
    """The width of the vectors a DPR shard holds, from its footer, without reading rows (not the
    model's: `pipeline.model.spec.Checkpoint.embedding_width` is what a model will produce)."""
    import pyarrow.parquet as pq

    with store.open(path) as fh:
        return int(pq.ParquetFile(fh).schema_arrow.field("embedding").type.list_size)


def _reusable(store: Store, marker_rel: str) -> dict | None:
    """An earlier attempt's entry for the same inputs (the marker's name carries their digest), if intact."""
    if not store.exists(marker_rel):
        return None
    try:
        entry = json.loads(store.read_bytes(marker_rel))
        for f in artifact_files(entry):
            store.check_file(f)
    except (IntegrityError, ValueError, KeyError, TypeError) as exc:
        log.warning("not reusing the earlier index build at %s (%s); building again", marker_rel, exc)
        return None
    return entry


def build_index_from(spec: IndexSpec, store: Store, run_dir: str, dpr_shards: list[dict],
                     dead: dict[str, set[int]] | None = None, trained: dict | None = None) -> dict:
    """Build on the workers and return the manifest entry; reuse a verified build of an earlier attempt.

    `trained` (an entry) skips training: compact folds a delta into a new base with the same quantizer."""
    import ray

    from pipeline.index import faiss_file as fx

    if not dpr_shards:
        raise IndexBuildError("no DPR shards to index")
    dead = dead or {}
    live = sum(s["rows"] for s in dpr_shards) - sum(len(dead.get(s["path"], ())) for s in dpr_shards)
    inputs = {"spec": [spec.factory, spec.train_sample, spec.nprobe, spec.part_rows, spec.seed],
              "shards": [s["sha256"] for s in dpr_shards], "dead": [len(dead.get(s["path"], ())) for s in dpr_shards],
              "trained": trained["sha256"] if trained else None}
    tag = digest(inputs, 8)  # a marker is only ever reused for exactly these inputs
    marker_rel = f"{run_dir}/index/dpr-{tag}.done.json"
    reused = _reusable(store, marker_rel)
    if reused is not None and reused.get("ntotal") == live:
        log.info("reusing the FAISS index built by an earlier attempt: %s", reused["path"])
        return reused
    t0 = time.perf_counter()
    dim = stored_embedding_width(store, dpr_shards[0]["path"])
    fx.check_factory(spec.factory, dim, live, spec.train_sample)
    nlist = fx.factory_nlist(spec.factory, dim)
    staging = f"{run_dir}/index/staging-{tag}"
    per_shard = [(s["path"], dead_ids(dead.get(s["path"], _NO_IDS))) for s in dpr_shards]
    common = {"factory": spec.factory, "dim": dim, "metric": "inner_product", "nprobe": spec.nprobe}
    if nlist is None:
        log.info("building FAISS %s over %d vectors whole, in one task", spec.factory, live)
        task = ray.remote(num_cpus=1)(_whole_task)
        built = ray.get(task.remote(spec, per_shard, dim, f"{run_dir}/index/dpr-{tag}.faiss"))
        entry = {**{k: built[k] for k in ("path", "sha256", "bytes")}, **common, "ntotal": built["ntotal"],
                 "faiss_gpu": bool(fx.gpu_count())}
    else:
        if trained is None:
            trained = _train(spec, store, dpr_shards, dead, dim, nlist, live, staging, run_dir, tag)
        parts = _add_parts(spec, dpr_shards, per_shard, trained, staging)
        expected = sum(p["ntotal"] for p in parts)
        log.info("merging %d parts (%.1f MB) on a worker's disk", len(parts), sum(p["bytes"] for p in parts) / 1e6)
        # max_calls=1: faiss' merge_ondisk leaves the parts memory-mapped; the worker exits with them
        merge = ray.remote(num_cpus=1, max_calls=1)(_merge_task)
        merged = ray.get(merge.remote(spec, trained, parts, f"{run_dir}/index/dpr-{tag}.index",
                                      f"{run_dir}/index/dpr-{tag}.ivfdata"))
        if merged["ntotal"] != expected:
            raise IndexBuildError(f"merged index holds {merged['ntotal']} vectors, its parts {expected}; "
                                  f"not committing")
        entry = {"format": fx.ONDISK, **merged["header"], "lists": merged["lists"], "trained": trained, **common,
                 "ntotal": merged["ntotal"], "faiss_gpu": bool(trained.get("gpu"))}
        for p in parts:
            store.remove(p["path"])
    if entry["ntotal"] != live:
        raise IndexBuildError(f"index holds {entry['ntotal']} vectors, DPR shards hold {live} live rows; "
                              f"not committing")
    store.write_bytes(marker_rel, json.dumps(entry).encode())
    log.info("built FAISS %s over %d vectors (%d dims) in %.1f s: %.1f MB", spec.factory, entry["ntotal"], dim,
             time.perf_counter() - t0, sum(f["bytes"] for f in artifact_files(entry)) / 1e6)
    return entry


def _train(spec: IndexSpec, store: Store, dpr_shards: list[dict], dead: dict[str, set[int]], dim: int,
           nlist: int, live: int, staging: str, run_dir: str, tag: str) -> dict:
    """Sample on the workers (uniform over rows, fixed seed), train in one task; returns the trained entry."""
    import ray

    n_train = index_plan.train_size(nlist, live, spec.train_sample)
    positions = index_plan.sample_positions([s["rows"] for s in dpr_shards], n_train, spec.seed)
    picks = [(s["path"], pos, dead_ids(dead.get(s["path"], _NO_IDS))) for s, pos in zip(dpr_shards, positions) if pos]
    groups = [picks[i:i + 64] for i in range(0, len(picks), 64)]
    task = ray.remote(num_cpus=spec.task_cpus)(_sample_task)
    pieces = ray.get([task.remote(spec, g, f"{staging}/sample-{k:05d}.npy") for k, g in enumerate(groups)])
    log.info("training FAISS %s (%d lists) on a uniform sample of %d vectors (%.0f per list)", spec.factory, nlist,
             sum(p["rows"] for p in pieces), sum(p["rows"] for p in pieces) / nlist)
    # the cluster's GPUs, not the driver's: on a CPU head the k-means still lands on a GPU worker
    gpu = {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) >= 1 else {"num_cpus": 1}
    train = ray.remote(**gpu)(_train_task)
    trained = ray.get(train.remote(spec, [p["path"] for p in pieces], dim, f"{run_dir}/index/trained-{tag}.faiss"))
    for p in pieces:
        store.remove(p["path"])
    return trained


def _add_parts(spec: IndexSpec, dpr_shards: list[dict], per_shard: list[tuple[str, np.ndarray]], trained: dict,
               staging: str) -> list[dict]:
    """Groups of consecutive shards (<= part_rows vectors) added on the workers; returns part entries."""
    import ray

    groups = index_plan.group_shards([s["rows"] for s in dpr_shards], spec.part_rows)
    trained_ref = ray.remote(num_cpus=0)(_load_trained_task).remote(spec, trained)  # in the object store, once
    add = ray.remote(num_cpus=spec.task_cpus)(_add_task)
    log.info("adding %d shards as %d IVF parts on the workers", len(dpr_shards), len(groups))
    return ray.get([add.remote(spec, trained_ref, [per_shard[i] for i in g], f"{staging}/part-{k:05d}.faiss")
                    for k, g in enumerate(groups)])


def update_delta(spec: IndexSpec, store: Store, run_dir: str, parent: dict, remove: np.ndarray,
                 delta_shards: list[dict], live: int) -> dict:
    """The parent's on-disk base untouched; a new delta index and a longer list of ids hidden from the base.

    Work and memory follow the change since the last compact: the delta's shards and the removed ids."""
    import ray

    from pipeline.index import faiss_file as fx

    prior = fx.removed_ids(store, parent.get("removed"))
    hidden = np.union1d(prior, np.asarray(remove, dtype=np.int64))
    buf = io.BytesIO()
    np.save(buf, hidden, allow_pickle=False)
    removed_rel = f"{run_dir}/index/removed.npy"
    store.write_bytes(removed_rel, buf.getvalue())
    removed = {"path": removed_rel, "sha256": sha256_bytes(buf.getvalue()), "bytes": len(buf.getvalue()),
               "count": int(hidden.size)}
    task = ray.remote(num_cpus=1)(_delta_task)
    delta = ray.get(task.remote(spec, parent.get("delta") or parent["trained"], np.asarray(remove, np.int64),
                                [s["path"] for s in delta_shards], f"{run_dir}/index/delta.faiss"))
    if delta.pop("added") != sum(s["rows"] for s in delta_shards):
        raise IndexBuildError("the delta index did not take every row of the delta shards; not committing")
    return {**parent, "delta": delta, "removed": removed, "ntotal": int(live)}
