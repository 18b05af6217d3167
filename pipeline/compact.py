"""Rewrite a version's live rows into fewer, full-size shards as a new version with identical content.

Deltas from incremental updates leave many small shards plus tombstones; compacting copies the live
rows (no re-encoding), drops the tombstones, and folds an index's delta and hidden ids into a new
on-disk base built on the workers with the same trained quantizer (an index without a delta is
kept: its ids are passage ids, not shard positions). The old shards stay until gc retires the versions that reference them.
"""
from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import digest
from pipeline.update import load_tombstones
from storage import manifest as mf
from storage.fs import Store
from storage.shards import read_metadata, read_rows, write_shard

log = logging.getLogger(__name__)


def compact(store: Store, shard_size: int = 10_000, row_group_size: int = 128) -> mf.Manifest:
    if shard_size < 1:
        raise ValueError("shard_size must be positive")
    parent = mf.load(store)
    dead = load_tombstones(store, parent)
    run_dir = f"runs/compact-{digest({'parent': parent.version, 'run': parent.run_id, 'size': shard_size})}"
    shards: list[dict] = []
    for kind in ("states", "dpr"):
        sources = parent.shards_of(kind)
        if not sources:
            continue
        metadata = read_metadata(store, sources[0]["path"])
        tables = []
        for s in sources:
            t = read_rows(store, s["path"])
            gone = dead.get(s["path"])
            if gone:
                t = t.filter(pc.invert(pc.is_in(t.column("id"), value_set=pa.array(sorted(gone), pa.int64()))))
            tables.append(t.replace_schema_metadata(None))
        live = pa.concat_tables(tables).sort_by("id")
        for k, start in enumerate(range(0, live.num_rows, shard_size)):
            part = live.slice(start, shard_size)
            f = write_shard(store, f"{run_dir}/{kind}/part-{k:05d}.parquet", part, metadata, row_group_size)
            shards.append({**f.to_dict(), "kind": kind})
        log.info("compacted %d %s shards into %d (%d live rows)", len(sources), kind,
                 sum(1 for s in shards if s["kind"] == kind), live.num_rows)
    artifacts = {k: v for k, v in parent.artifacts.items() if k != "tombstones"}
    index = parent.artifacts.get("dpr_index")
    if index is not None and ("delta" in index or "removed" in index):
        artifacts["dpr_index"] = _fold_index(store, index, run_dir, [s for s in shards if s["kind"] == "dpr"])
    extra = {**parent.extra, "compacted_from": parent.version}
    return mf.commit(store, parent.version, run_id=run_dir.removeprefix("runs/"), fingerprint=parent.fingerprint,
                     shards=shards, artifacts=artifacts, counts=parent.counts, extra=extra)


def _fold_index(store: Store, entry: dict, run_dir: str, dpr_shards: list[dict]) -> dict:
    """A new on-disk base over the compacted shards, with the parent's trained quantizer (no retraining)."""
    from pipeline.encode import init_ray
    from pipeline.index_build import IndexSpec, build_index_from

    init_ray(None)
    spec = IndexSpec(store.url, store.storage_options, entry["factory"], 0, entry.get("nprobe", 16))
    log.info("folding the index's delta (%d) and hidden ids (%d) into a new base", entry["delta"]["ntotal"],
             entry["removed"]["count"])
    return build_index_from(spec, store, run_dir, dpr_shards, trained=entry["trained"])
