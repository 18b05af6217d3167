"""Where encoded splits become shards: a Ray Data `Datasink`, and the markers that make resume cheap.

Write tasks pack and write each split's state (and DPR) shard, then its marker, and return the
marker: a few hundred bytes of paths, counts and checksums, never data. `on_write_complete` runs
once on the driver with every marker and hands them to the commit (lance-ray's datasink pattern).
A marker is written after its shard, so a marker whose sizes match the listing proves a finished
split (datatrove's completion markers).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data.datasource import Datasink

from pipeline.codec.zstd_frames import Packer
from pipeline.workers.steps import StageContext, dpr_schema, shard_metadata, split_meta
from storage.fs import Store
from storage.layout import dpr_path, marker_path, shard_of, state_path
from storage.shard_marker import ShardMarker, read_finished
from storage.shards import state_schema, write_shard

log = logging.getLogger(__name__)


class ShardSink(Datasink):
    """Writes one state shard (and DPR shard) per split; commits once through `on_complete`."""

    def __init__(self, ctx: StageContext, on_complete: Callable[[list[ShardMarker]], Any] | None = None):
        self.ctx = ctx
        self._on_complete = on_complete
        self.result: Any = None
        self.markers: list[ShardMarker] = []

    def __getstate__(self):  # the commit callback lives on the driver; write tasks never need it
        state = dict(self.__dict__)
        state["_on_complete"] = None
        return state

    def get_name(self) -> str:
        return "ShardSink"

    def write(self, blocks: Iterable[pa.Table], ctx) -> list[ShardMarker]:
        store = self.ctx.store()
        packer = Packer(self.ctx.compression.zstd_level)
        out = []
        for block in blocks:
            if block.num_rows == 0 or "split_meta" not in block.column_names:
                continue
            splits = block.column("split").to_numpy()
            for k in np.unique(splits):
                part = block.filter(pc.equal(block.column("split"), pa.scalar(int(k), pa.int32())))
                out.append(self._write_split(store, packer, int(k), part))
        return out

    def _write_split(self, store: Store, packer: Packer, shard: int, table: pa.Table) -> ShardMarker:
        meta = split_meta(table)
        if table.num_rows != meta["passages_in"]:
            raise RuntimeError(f"split {shard} reached the writer with {table.num_rows} of its "
                               f"{meta['passages_in']} passages; blocks must not be split between stages")
        t0 = time.perf_counter()
        keep = table.column("keep")
        too_long_ids = table.filter(pc.invert(keep)).column("id").to_pylist()  # rare: kept for the duplicate check
        table = table.filter(keep)
        raw = table.column("raw_codes").to_pylist()
        packed = [packer.pack(r) for r in raw]
        schema = state_schema(meta["vocab_size"], self.ctx.scaled_codes)
        states = pa.Table.from_arrays([
            table.column("id"), table.column("content_hash"), table.column("n_tokens"),
            table.column("token_ids").cast(schema.field("token_ids").type),
            table.column("scales"), pa.array(packed, pa.binary()),
        ], schema=schema)
        shard_file = write_shard(store, state_path(self.ctx.run_dir, shard), states, shard_metadata(self.ctx),
                                 self.ctx.execution.row_group_size)
        dpr_file = None
        if "dpr_embedding" in table.column_names:
            dpr_file = self._write_dpr(store, shard, table, meta["dpr_dim"])
        marker = ShardMarker(
            shard=shard, file=shard_file, dpr=dpr_file, passages_in=meta["passages_in"], truncated=meta["truncated"],
            skipped_too_long=meta["skipped_too_long"], too_long_ids=tuple(too_long_ids), tokens=meta["tokens"],
            padded_tokens=meta["padded_tokens"], encode_seconds=meta["encode_seconds"],
            attention=meta.get("attention"), raw_code_bytes=int(sum(len(r) for r in raw)), read=meta.get("read"),
            digest=meta.get("digest", ""), write_seconds=time.perf_counter() - t0, finished_at=time.time())
        marker.write(store, self.ctx.run_dir)
        return marker

    def _write_dpr(self, store: Store, shard: int, table: pa.Table, dim: int):
        schema = dpr_schema(dim, self.ctx.dpr.dtype)
        emb = table.column("dpr_embedding").combine_chunks().cast(schema.field("embedding").type)
        out = pa.Table.from_arrays([table.column("id"), table.column("title"), emb], schema=schema)
        md = {"dpr_model": self.ctx.fingerprint["dpr"]["model"], "pooling": self.ctx.fingerprint["dpr"]["pooling"],
              "dim": dim, "dtype": self.ctx.dpr.dtype, "schema_version": shard_metadata(self.ctx)["schema_version"]}
        return write_shard(store, dpr_path(self.ctx.run_dir, shard), out, md, self.ctx.execution.row_group_size)

    def on_write_complete(self, write_result) -> None:
        self.markers = [m for task in write_result.write_returns for m in (task or [])]
        if self._on_complete is not None:
            self.result = self._on_complete(self.markers)


# ---------------------------------------------------------------- resume

def finished_markers(store: Store, storage_options: dict, run_dir: str, n_splits: int | None, task_cpus: float,
                     only: list[int] | None = None, group: int = 256) -> dict[int, ShardMarker]:
    """One listing of the run directory finds the finished splits; Ray tasks read their markers.

    `n_splits` None: every marker the listing shows (an earlier attempt whose plan is not known here)."""
    import ray

    listing = {f.path: f.size for f in store.walk_files(run_dir)}
    if n_splits is None and only is None:
        prefix = f"{run_dir}/states/part-"  # not the index build's own .done.json files
        wanted = [p for p in listing if p.startswith(prefix) and p.endswith(".done.json")
                  and p[len(prefix):-len(".done.json")].isdigit() and p == marker_path(run_dir, shard_of(p))]
    else:
        splits = range(n_splits or 0) if only is None else only
        wanted = [marker_path(run_dir, k) for k in splits if marker_path(run_dir, k) in listing]
    if not wanted:
        return {}
    task = ray.remote(num_cpus=task_cpus)(read_finished)
    refs = []
    for i in range(0, len(wanted), group):
        paths = wanted[i:i + group]
        ks = [shard_of(p) for p in paths]
        sizes = {p: s for k in ks for p in (state_path(run_dir, k), dpr_path(run_dir, k)) if (s := listing.get(p))
                 is not None}
        refs.append(task.remote(store.url, storage_options, paths, sizes))
    done: dict[int, ShardMarker] = {}
    for part in ray.get(refs):
        for m in part:
            done[m.shard] = m
    return done
