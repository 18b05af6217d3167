"""Rewrite a version's live rows into fewer, full-size shards as a new version with identical content.

Deltas from incremental updates leave many small shards plus tombstones; compacting copies the live
rows (no re-encoding), keeps the FAISS index (its ids are passage ids, not shard positions) and
drops the tombstones. The old shards stay until gc retires the versions that reference them.
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
    extra = {**parent.extra, "compacted_from": parent.version}
    return mf.commit(store, parent.version, run_id=run_dir.removeprefix("runs/"), fingerprint=parent.fingerprint,
                     shards=shards, artifacts=artifacts, counts=parent.counts, extra=extra)
