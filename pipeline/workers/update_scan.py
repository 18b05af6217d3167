"""The update's reads, on the workers, in one pass over the corpus.

Ray tasks read the parent's id and hash columns; the sorted arrays go into the object store once.
Each corpus split is then read, checked and hashed once, on a worker that compares it with the
parent's arrays, stages the rows to encode (new or changed) and returns only ids. The driver holds
the ids of both sides (8 B each per passage: ~0.5 GB at 32M) plus the parent's hashes until they
are put in the object store (16 B per passage), and small arrays of new and changed ids.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import CorpusConfig
from pipeline.corpus.rows import CorpusCounts, CorpusError
from pipeline.corpus.source import Corpus, CorpusPlan
from pipeline.corpus.splits import Split
from storage.fs import Store
from storage.layout import input_path
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


def in_sorted(haystack: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mask of `values` found in the sorted `haystack`: a binary search each (np.setdiff1d on two
    unsorted 3.2M arrays takes seconds; this takes tens of milliseconds)."""
    if haystack.size == 0:
        return np.zeros(values.size, bool)
    pos = np.minimum(np.searchsorted(haystack, values), haystack.size - 1)
    return haystack[pos] == values


@dataclass
class CorpusIds:
    """The new corpus as the diff sees it."""
    ids: np.ndarray        # int64, sorted, unique: every accepted passage
    counts: CorpusCounts
    digest: str
    plan: CorpusPlan
    drop: dict[int, np.ndarray]  # split -> ids whose copy in that split is a later duplicate (keep-first)


@dataclass
class SplitDiff:
    """What one split's task found: its accepted ids, which of them are new or changed, what it staged."""
    index: int
    ids: np.ndarray
    new: np.ndarray
    changed: np.ndarray
    counts: dict
    digest: str
    staged: str | None
    staged_rows: int
    encode_hashes: np.ndarray | None = None  # content hashes of new + changed, in the order of `encode_ids`
    encode_ids: np.ndarray | None = None     # what this split would have encoded (its ids, file order)


def _diff_task(corpus_cfg: CorpusConfig, options: dict, store_url: str, store_options: dict, splits: list[dict],
               parent_ids: np.ndarray, parent_hashes: np.ndarray, stage_dir: str | None,
               row_group_size: int) -> list[SplitDiff]:
    """Read, check and hash splits, compare with the parent's sorted arrays, stage the rows to encode."""
    corpus = Corpus(corpus_cfg, options)
    store = Store(store_url, store_options) if stage_dir else None
    out = []
    for s in splits:
        read = corpus.read_split(Split(**s))
        t = read.table
        ids, hashes = t.column("id").to_numpy(), hash_array(t.column("content_hash"))
        if parent_ids.size:
            pos = np.minimum(np.searchsorted(parent_ids, ids), parent_ids.size - 1)
            known = parent_ids[pos] == ids
            changed = known & (parent_hashes[pos] != hashes)
        else:  # a parent with no live rows: everything is new
            known = changed = np.zeros(ids.size, bool)
        encode = changed | ~known
        staged = None
        if store is not None and encode.any():
            # named by content: a concurrent update of another corpus never overwrites what this one staged
            staged = f"{stage_dir}/split-{s['index']:06d}-{read.digest[:16]}.parquet"
            write_shard(store, staged, t.filter(pa.array(encode)).drop_columns(["split"]), None, row_group_size)
        out.append(SplitDiff(s["index"], ids, ids[~known], ids[changed], read.counts.to_dict(), read.digest,
                             staged, int(encode.sum()), hashes[encode], ids[encode]))
    return out


def diff_corpus(corpus: Corpus, rows_per_split: int | None, parent_ids: np.ndarray, parent_hashes: np.ndarray,
                store: Store | None = None, stage_dir: str | None = None, row_group_size: int = 128,
                task_cpus: float = 0.5, plan: CorpusPlan | None = None) -> tuple[CorpusIds, list[SplitDiff]]:
    """One pass over the corpus in Ray tasks; with `stage_dir`, the rows to encode are staged as it goes.

    `plan`: the corpus planned already (before Ray started, so a bad file fails first); else planned here."""
    import ray

    plan = plan or corpus.plan(rows_per_split)
    splits = [s.to_dict() for s in plan.splits]
    order = np.argsort(parent_ids, kind="stable")
    pid, phash = ray.put(parent_ids[order]), ray.put(parent_hashes[order])
    del order
    task = ray.remote(num_cpus=task_cpus)(_diff_task)
    refs = [task.remote(corpus.cfg, corpus.storage_options, store.url if store else "", store.storage_options
                        if store else {}, splits[i:i + SPLITS_PER_TASK], pid, phash, stage_dir, row_group_size)
            for i in range(0, len(splits), SPLITS_PER_TASK)]
    parts = sorted((p for r in ray.get(refs) for p in r), key=lambda p: p.index)
    counts = CorpusCounts()
    digest = hashlib.sha256()
    for p in parts:
        for k, v in p.counts.items():
            setattr(counts, k, getattr(counts, k) + v)
        digest.update(p.digest.encode())
    ids = np.concatenate([p.ids for p in parts]) if parts else np.empty(0, np.int64)
    drop: dict[int, np.ndarray] = {}
    if ids.size < 2 or bool((ids[1:] > ids[:-1]).all()):  # ids in ascending order (the usual dump): unique
        uniq, dupes = ids, ids[:0]
    else:
        uniq, first, cnt = np.unique(ids, return_index=True, return_counts=True)
        dupes = uniq[cnt > 1]
    if dupes.size:
        if corpus.cfg.on_duplicate == "error":
            raise CorpusError(f"{corpus.display_url}: {dupes.size} duplicate passage id(s), e.g. "
                              f"{dupes[:5].tolist()}; ids must be unique (or pass --on-duplicate keep-first)")
        keep = np.zeros(ids.size, bool)
        keep[first] = True
        split = np.concatenate([np.full(p.ids.size, p.index, np.int32) for p in parts])  # only with duplicates
        for k in np.unique(split[~keep]):
            drop[int(k)] = ids[(split == k) & ~keep]
        counts.skipped_duplicate += int((~keep).sum())
        counts.accepted -= int((~keep).sum())
        for p in parts:  # a later copy is neither new nor changed: the first one decides
            if p.index in drop:
                p.new = np.setdiff1d(p.new, drop[p.index])
                p.changed = np.setdiff1d(p.changed, drop[p.index])
    if uniq.size == 0:
        raise CorpusError(f"{corpus.display_url}: no usable passages ({counts.to_dict()})")
    log.info("corpus %s: %d rows read, %d accepted in %d splits (read and compared on the workers)",
             corpus.display_url, counts.rows_read, counts.accepted, len(splits))
    return CorpusIds(uniq, counts, digest.hexdigest()[:32], plan, drop), parts


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


def _rows_task(store_url: str, options: dict, paths: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    store = Store(store_url, options)
    out = []
    for path in paths:
        t = read_rows(store, path, columns=["id", "content_hash"])
        out.append((t.column("id").to_numpy(), hash_array(t.column("content_hash"))))
    return out


def shard_rows(store: Store, paths: list[str], task_cpus: float = 0.5) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, content hashes) of each states shard in `paths`, read in Ray tasks (results follow the shards)."""
    import ray

    task = ray.remote(num_cpus=task_cpus)(_rows_task)
    refs = [task.remote(store.url, store.storage_options, paths[i:i + SHARDS_PER_TASK])
            for i in range(0, len(paths), SHARDS_PER_TASK)]
    return [rows for part in ray.get(refs) for rows in part]


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


def plan_slices(staged_rows: list[int], slice_rows: int) -> list[list[int]]:
    """Pure: consecutive staged splits grouped so that each input slice holds about slice_rows passages."""
    from pipeline.index.plan import group_shards

    busy = [k for k, n in enumerate(staged_rows) if n]
    return [[busy[i] for i in g] for g in group_shards([staged_rows[k] for k in busy], slice_rows)] if busy else []


def _assemble_task(store_url: str, store_options: dict, staged: list[tuple[str, np.ndarray]], rel: str,
                   row_group_size: int) -> int:
    """One input slice from a group of staged splits (a later duplicate's copy left out)."""
    store = Store(store_url, store_options)
    tables = []
    for path, drop in staged:
        t = read_rows(store, path)
        if drop.size:
            t = t.filter(pc.invert(pc.is_in(t.column("id"), value_set=pa.array(drop, pa.int64()))))
        tables.append(t)
    table = pa.concat_tables(tables)
    write_shard(store, rel, table, None, row_group_size)
    return table.num_rows


def assemble_slices(store: Store, parts: list[SplitDiff], drop: dict[int, np.ndarray], run_dir: str,
                    slices: list[list[int]], todo: list[int], row_group_size: int, task_cpus: float = 0.5) -> int:
    """Write input slices `todo` from the staged splits, in Ray tasks; returns the rows staged."""
    import ray

    none = np.empty(0, np.int64)
    task = ray.remote(num_cpus=task_cpus)(_assemble_task)
    refs = [task.remote(store.url, store.storage_options,
                        [(parts[i].staged, drop.get(parts[i].index, none)) for i in slices[k]],
                        input_path(run_dir, k), row_group_size) for k in todo]
    rows = sum(ray.get(refs))
    log.info("assembled %d passages to encode into %d input slices", rows, len(todo))
    return rows
