"""The update's reads, on the workers: ids and content hashes of the new corpus and of the parent
version, the parent's rows that a change supersedes, and the passages to encode staged as input slices.

The driver holds what the diff needs as numpy arrays: 8 B id + 16 B hash + 4 B split per passage of
the new corpus, 24 B per live passage of the parent (at 32M: ~0.9 GB + 0.8 GB). Everything else
(corpus text, states) stays on the workers; tasks return arrays of ids and hashes, counts and paths.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import CorpusConfig
from pipeline.corpus import Corpus, CorpusCounts, CorpusError, CorpusPlan
from pipeline.splits import Split
from storage.fs import Store
from storage.shards import read_rows, write_shard

log = logging.getLogger(__name__)

SPLITS_PER_TASK = 4
SHARDS_PER_TASK = 32


def hash_array(hashes) -> np.ndarray:
    """Content hashes as one fixed-width numpy bytes array (from a list of bytes or an Arrow column)."""
    if isinstance(hashes, np.ndarray):
        return hashes
    if isinstance(hashes, (pa.Array, pa.ChunkedArray)):
        col = hashes.combine_chunks() if isinstance(hashes, pa.ChunkedArray) else hashes
        if pa.types.is_fixed_size_binary(col.type) and col.null_count == 0:
            raw = np.frombuffer(col.buffers()[1], dtype=f"S{col.type.byte_width}")
            return raw[col.offset:col.offset + len(col)]
        hashes = col.to_pylist()
    return np.array(hashes, dtype=f"S{max((len(h) for h in hashes), default=1)}")


@dataclass
class CorpusIds:
    """The new corpus as the diff sees it: one row per accepted passage, in plan order."""
    ids: np.ndarray        # int64
    hashes: np.ndarray     # S16
    split: np.ndarray      # int32: the split each row came from
    counts: CorpusCounts
    digest: str
    plan: CorpusPlan
    drop: dict[int, np.ndarray]  # split -> ids whose copy in that split is a later duplicate (keep-first)


def _hash_task(corpus_cfg: CorpusConfig, options: dict, splits: list[dict]) -> list[tuple]:
    corpus = Corpus(corpus_cfg, options)
    out = []
    for s in splits:
        read = corpus.read_split(Split(**s))
        out.append((s["index"], read.table.column("id").to_numpy(), hash_array(read.table.column("content_hash")),
                    read.counts.to_dict(), read.digest))
    return out


def scan_corpus(corpus: Corpus, rows_per_split: int | None, task_cpus: float = 0.5) -> CorpusIds:
    """Read and check every split in Ray tasks; duplicates across splits follow --on-duplicate."""
    import ray

    plan = corpus.plan(rows_per_split)
    splits = [s.to_dict() for s in plan.splits]
    task = ray.remote(num_cpus=task_cpus)(_hash_task)
    refs = [task.remote(corpus.cfg, corpus.storage_options, splits[i:i + SPLITS_PER_TASK])
            for i in range(0, len(splits), SPLITS_PER_TASK)]
    parts = sorted((p for r in ray.get(refs) for p in r), key=lambda p: p[0])
    counts = CorpusCounts()
    digest = hashlib.sha256()
    for _, _, _, c, d in parts:
        for k, v in c.items():
            setattr(counts, k, getattr(counts, k) + v)
        digest.update(d.encode())
    ids = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.int64)
    hashes = np.concatenate([p[2] for p in parts]) if parts else np.empty(0, "S16")
    split = np.concatenate([np.full(p[1].size, p[0], np.int32) for p in parts]) if parts else np.empty(0, np.int32)
    drop: dict[int, np.ndarray] = {}
    uniq, first, cnt = np.unique(ids, return_index=True, return_counts=True)
    if (cnt > 1).any():
        dupes = uniq[cnt > 1]
        if corpus.cfg.on_duplicate == "error":
            raise CorpusError(f"{corpus.display_url}: {dupes.size} duplicate passage id(s), e.g. "
                              f"{dupes[:5].tolist()}; ids must be unique (or pass --on-duplicate keep-first)")
        keep = np.zeros(ids.size, bool)
        keep[first] = True
        for k in np.unique(split[~keep]):
            drop[int(k)] = ids[(split == k) & ~keep]
        counts.skipped_duplicate += int((~keep).sum())
        counts.accepted -= int((~keep).sum())
        ids, hashes, split = ids[keep], hashes[keep], split[keep]
    if ids.size == 0:
        raise CorpusError(f"{corpus.display_url}: no usable passages ({counts.to_dict()})")
    log.info("corpus %s: %d rows read, %d accepted in %d splits (read on the workers)", corpus.display_url,
             counts.rows_read, counts.accepted, len(splits))
    return CorpusIds(ids, hashes, split, counts, digest.hexdigest()[:32], plan, drop)


def _live_task(store_url: str, options: dict, shards: list[tuple[str, np.ndarray]]) -> tuple:
    store = Store(store_url, options)
    ids, hashes = [], []
    for path, dead in shards:
        t = read_rows(store, path, columns=["id", "content_hash"])
        i = t.column("id").to_numpy()
        keep = ~np.isin(i, dead) if dead.size else slice(None)
        ids.append(i[keep])
        hashes.append(hash_array(t.column("content_hash"))[keep])
    return np.concatenate(ids), np.concatenate(hashes)


def parent_rows(store: Store, shards: list[dict], dead: dict[str, np.ndarray],
                task_cpus: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(ids, content hashes) of the live states rows of a version, read in Ray tasks."""
    import ray

    if not shards:
        return np.empty(0, np.int64), np.empty(0, "S16")
    none = np.empty(0, np.int64)
    task = ray.remote(num_cpus=task_cpus)(_live_task)
    refs = [task.remote(store.url, store.storage_options,
                        [(s["path"], dead.get(s["path"], none)) for s in shards[i:i + SHARDS_PER_TASK]])
            for i in range(0, len(shards), SHARDS_PER_TASK)]
    got = ray.get(refs)
    return np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])


def _dead_task(store_url: str, options: dict, shards: list[tuple[str, np.ndarray]], remove: np.ndarray) -> dict:
    store = Store(store_url, options)
    out = {}
    for path, dead in shards:
        hit = np.intersect1d(read_rows(store, path, columns=["id"]).column("id").to_numpy(), remove)
        hit = np.setdiff1d(hit, dead, assume_unique=True) if dead.size else hit
        if hit.size:
            out[path] = hit
    return out


def superseded(store: Store, shards: list[dict], dead: dict[str, np.ndarray], remove: np.ndarray,
               task_cpus: float = 0.5) -> dict[str, np.ndarray]:
    """{shard path: ids of `remove` still live in it}: what the update tombstones (results follow the change)."""
    import ray

    remove = np.unique(np.asarray(remove, np.int64))
    if remove.size == 0:
        return {}
    none = np.empty(0, np.int64)
    hit = [s for s in shards if s["id_max"] >= remove[0] and s["id_min"] <= remove[-1]]
    task = ray.remote(num_cpus=task_cpus)(_dead_task)
    removal = ray.put(remove)
    refs = [task.remote(store.url, store.storage_options,
                        [(s["path"], dead.get(s["path"], none)) for s in hit[i:i + SHARDS_PER_TASK]], removal)
            for i in range(0, len(hit), SHARDS_PER_TASK)]
    out: dict[str, np.ndarray] = {}
    for part in ray.get(refs):
        out.update(part)
    return out


def plan_slices(split_of_encode: np.ndarray, n_splits: int, slice_rows: int) -> list[list[int]]:
    """Pure: consecutive splits grouped so that each input slice holds about slice_rows passages to encode."""
    from pipeline.index_plan import group_shards

    per_split = np.bincount(split_of_encode, minlength=n_splits)
    busy = np.flatnonzero(per_split)
    return [[int(busy[i]) for i in g] for g in group_shards(per_split[busy].tolist(), slice_rows)] if busy.size else []


def _stage_task(corpus_cfg: CorpusConfig, options: dict, store_url: str, store_options: dict,
                splits: list[dict], encode: np.ndarray, drop: dict[int, np.ndarray], rel: str,
                row_group_size: int) -> int:
    """One input slice: the rows of a group of splits that are to be encoded, in corpus order."""
    corpus = Corpus(corpus_cfg, options)
    wanted = pa.array(encode, pa.int64())
    tables = []
    for s in splits:
        t = corpus.read_split(Split(**s)).table
        mask = pc.is_in(t.column("id"), value_set=wanted)
        if s["index"] in drop:
            mask = pc.and_(mask, pc.invert(pc.is_in(t.column("id"), value_set=pa.array(drop[s["index"]]))))
        tables.append(t.filter(mask).drop_columns(["split"]))
    table = pa.concat_tables(tables)
    write_shard(Store(store_url, store_options), rel, table, None, row_group_size)
    return table.num_rows


def stage_slices(corpus: Corpus, scan: CorpusIds, encode: np.ndarray, store: Store, run_dir: str,
                 slices: list[list[int]], todo: list[int], row_group_size: int, task_cpus: float = 0.5) -> int:
    """Write input slices `todo` (indexes into `slices`) in Ray tasks; returns the rows staged."""
    import ray

    from pipeline.stages import input_path

    by_index = {s.index: s.to_dict() for s in scan.plan.splits}
    task = ray.remote(num_cpus=task_cpus)(_stage_task)
    wanted = ray.put(np.asarray(encode, np.int64))
    refs = [task.remote(corpus.cfg, corpus.storage_options, store.url, store.storage_options,
                        [by_index[i] for i in slices[k]], wanted, {i: scan.drop[i] for i in slices[k] if i in scan.drop},
                        input_path(run_dir, k), row_group_size) for k in todo]
    rows = sum(ray.get(refs))
    log.info("staged %d passages to encode in %d input slices (read on the workers)", rows, len(todo))
    return rows
