"""Rewrite a version's live rows into fewer, full-size shards as a new version with identical content.

Deltas from incremental updates leave many small shards plus tombstones; compacting copies the live
rows (no re-encoding), drops the tombstones, and folds an index's delta and hidden ids into a new
on-disk base built on the workers with the same trained quantizer (an index without a delta is
kept: its ids are passage ids, not shard positions). The old shards stay until gc retires the versions that reference them.
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import digest
from pipeline.flows.commit import Draft, commit_version
from storage import manifest as mf
from storage import tombstones
from storage.fs import Store
from storage.shards import read_metadata, write_shard

log = logging.getLogger(__name__)


def plan_ranges(id_min: np.ndarray, id_max: np.ndarray, live: np.ndarray, shard_size: int) -> list[tuple[int, int]]:
    """Pure: id intervals [lo, hi] holding about `shard_size` live rows each, from shard ranges and counts alone.

    Each source shard's live rows are taken as spread evenly over its id range (exact for the dense,
    id-sorted shards of a corpus like psgs_w100); the cumulative count is piecewise linear between
    range ends and is cut at multiples of shard_size. Tasks read by these intervals, so a poor
    estimate makes shards uneven, never wrong."""
    if shard_size < 1:
        raise ValueError("shard_size must be positive")
    keep = live > 0
    if not keep.any():
        return []
    first, last = int(id_min[keep].min()), int(id_max[keep].max()) + 1  # exact ends, as Python ints
    lo, hi, n = id_min[keep].astype(np.float64), id_max[keep].astype(np.float64) + 1, live[keep].astype(np.float64)
    points = np.unique(np.concatenate([lo, hi]))
    # cumulative live rows at each point: sum over shards of n * clip((x - lo) / (hi - lo), 0, 1)
    frac = np.clip((points[None, :] - lo[:, None]) / np.maximum(hi - lo, 1.0)[:, None], 0, 1)
    cum = (n[:, None] * frac).sum(axis=0)
    targets = np.arange(shard_size, cum[-1], shard_size, dtype=np.float64)
    # the cuts are estimates (floats lose precision past 2^53); the ends are exact, so every id is covered
    cuts = sorted({c for c in (int(x) for x in np.floor(np.interp(targets, cum, points))) if first < c < last})
    edges = [first, *cuts, last]
    return [(a, b - 1) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _rewrite_task(store_url: str, options: dict, sources: list[tuple[str, np.ndarray]], lo: int, hi: int,
                  rel: str, metadata: dict, row_group_size: int) -> dict:
    """One output shard: the live rows with lo <= id <= hi of its sources, sorted by id; and what it read."""
    store = Store(store_url, options)
    tables, read = [], 0
    for path, gone in sources:
        with store.open(path) as fh:
            t = pq.read_table(fh, filters=[("id", ">=", lo), ("id", "<=", hi)])  # row groups pruned by stats
        read += t.num_rows
        if gone.size:
            t = t.filter(pc.invert(pc.is_in(t.column("id"), value_set=pa.array(gone, pa.int64()))))
        tables.append(t.replace_schema_metadata(None))
    live = pa.concat_tables(tables).sort_by("id") if tables else None
    if live is None or live.num_rows == 0:
        return {"file": None, "read": read}
    return {"file": write_shard(store, rel, live, metadata, row_group_size).to_dict(), "read": read}


def compact(store: Store, shard_size: int = 10_000, row_group_size: int = 128) -> mf.Manifest:
    """The driver plans id intervals from the manifest alone; Ray tasks rewrite; the driver commits once."""
    import ray

    from pipeline.workers.dataflow import init_ray

    if shard_size < 1:
        raise ValueError("shard_size must be positive")
    parent = mf.load(store)
    dead = tombstones.of_version(store, parent)
    run_dir = f"runs/compact-{digest({'parent': parent.version, 'run': parent.run_id, 'size': shard_size})}"
    init_ray(None)
    task = ray.remote(num_cpus=0.5)(_rewrite_task)
    shards: list[dict] = []
    for kind in ("states", "dpr"):
        sources = parent.shards_of(kind)
        if not sources:
            continue
        metadata = read_metadata(store, sources[0]["path"])
        lo = np.array([s["id_min"] for s in sources], np.int64)
        hi = np.array([s["id_max"] for s in sources], np.int64)
        gone = [dead.get(s["path"], np.empty(0, np.int64)) for s in sources]
        rows = np.array([s["rows"] for s in sources], np.int64)
        # planned by stored rows (a tombstone may name a copy that was never stored); checked by rows read
        refs = []
        for k, (a, b) in enumerate(plan_ranges(lo, hi, rows, shard_size)):
            mine = np.flatnonzero((lo <= b) & (hi >= a))
            src = [(sources[i]["path"], gone[i][(gone[i] >= a) & (gone[i] <= b)]) for i in mine]
            refs.append(task.remote(store.url, store.storage_options, src, a, b,
                                    f"{run_dir}/{kind}/part-{k:05d}.parquet", metadata, row_group_size))
        results = ray.get(refs)
        written = [r["file"] for r in results if r["file"] is not None]
        shards += [{**f, "kind": kind} for f in written]
        log.info("compacted %d %s shards into %d (%d live rows) with %d Ray tasks", len(sources), kind,
                 len(written), sum(f["rows"] for f in written), len(refs))
        if sum(r["read"] for r in results) != int(rows.sum()):  # the intervals partition the ids: each row once
            raise RuntimeError(f"compaction read {sum(r['read'] for r in results)} {kind} rows of "
                               f"{int(rows.sum())} stored; not committing")
    artifacts = {k: v for k, v in parent.artifacts.items() if k != "tombstones"}
    index = parent.artifacts.get("dpr_index")
    if index is not None and ("delta" in index or "removed" in index):
        artifacts["dpr_index"] = _fold_index(store, index, run_dir, [s for s in shards if s["kind"] == "dpr"])
    draft = Draft.on_top_of(parent, run_dir.removeprefix("runs/"), {"compacted_from": parent.version},
                            shards=shards, artifacts=artifacts)
    return commit_version(store, draft).manifest


def _fold_index(store: Store, entry: dict, run_dir: str, dpr_shards: list[dict]) -> dict:
    """A new on-disk base over the compacted shards, with the parent's trained quantizer (no retraining)."""
    from pipeline.workers.dataflow import init_ray
    from pipeline.index.build import IndexSpec, build_index_from

    init_ray(None)
    spec = IndexSpec(store.url, store.storage_options, entry["factory"], 0, entry.get("nprobe", 16))
    log.info("folding the index's delta (%d) and hidden ids (%d) into a new base", entry["delta"]["ntotal"],
             entry["removed"]["count"])
    return build_index_from(spec, store, run_dir, dpr_shards, trained=entry["trained"])
