"""Duplicate passage ids across splits, found by a hash-partitioned shuffle on the workers.

Each split drops duplicates inside itself while it is read; an id in two different splits is only
visible once every split is written. Map tasks read the id column of a group of shards and
partition (id, split) pairs by id; reduce tasks each sort one partition and report the ids seen in
more than one split. Partitions travel between workers as object refs: the driver holds refs and
the (usually empty) list of duplicates, never the ids themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from storage.fs import Store
from storage.shards import read_rows


@dataclass
class Duplicates:
    count: int = 0                     # ids that appear in more than one split
    examples: list[int] = field(default_factory=list)
    losers: dict[int, np.ndarray] = field(default_factory=dict)  # split -> ids to drop (a later split's copy)

    @property
    def dropped(self) -> int:
        return int(sum(v.size for v in self.losers.values()))


def _map_task(store_url: str, storage_options: dict, shards: list[tuple[int, str | None, list[int]]],
              partitions: int):
    store = Store(store_url, storage_options)
    ids, splits = [], []
    for split, path, unstored in shards:
        col = read_rows(store, path, columns=["id"]).column("id").to_numpy() if path else np.empty(0, np.int64)
        col = np.concatenate([col, np.asarray(unstored, dtype=np.int64)])
        ids.append(col)
        splits.append(np.full(col.size, split, np.int64))
    ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
    splits = np.concatenate(splits) if splits else np.empty(0, np.int64)
    part = (ids % partitions).astype(np.int64)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    out = [np.stack([ids[order[a:b]], splits[order[a:b]]]) for a, b in zip(bounds, bounds[1:])]
    return out if partitions > 1 else out[0]


def _reduce_task(*parts: np.ndarray) -> tuple[int, list[int], np.ndarray]:
    pairs = np.concatenate(parts, axis=1) if parts else np.empty((2, 0), np.int64)
    if pairs.shape[1] == 0:
        return 0, [], np.empty((2, 0), np.int64)
    order = np.lexsort((pairs[1], pairs[0]))  # by id, then split: the first of each id is the keeper
    ids, splits = pairs[0][order], pairs[1][order]
    repeat = np.zeros(ids.size, dtype=bool)
    repeat[1:] = ids[1:] == ids[:-1]
    dup_ids = np.unique(ids[repeat])
    return int(dup_ids.size), dup_ids[:5].tolist(), np.stack([ids[repeat], splits[repeat]])


def find_duplicates(store_url: str, storage_options: dict, shards: list[tuple[int, str | None, list[int]]],
                    task_cpus: float, group: int = 64, partitions: int | None = None) -> Duplicates:
    """Ids present in more than one split. `shards`: (split, state shard path or None, ids the split
    accepted but did not store, i.e. passages skipped for length)."""
    import ray

    if len(shards) < 2:
        return Duplicates()
    groups = [shards[i:i + group] for i in range(0, len(shards), group)]
    p = partitions or max(1, min(32, len(groups)))
    mapper = ray.remote(num_cpus=task_cpus, num_returns=p)(_map_task)
    reducer = ray.remote(num_cpus=task_cpus)(_reduce_task)
    mapped = [mapper.remote(store_url, storage_options, g, p) for g in groups]
    if p == 1:
        mapped = [[ref] for ref in mapped]
    results = ray.get([reducer.remote(*[m[j] for m in mapped]) for j in range(p)])
    dup = Duplicates()
    losers: list[np.ndarray] = []
    for count, examples, pairs in results:
        dup.count += count
        dup.examples.extend(examples)
        if pairs.shape[1]:
            losers.append(pairs)
    dup.examples = sorted(dup.examples)[:5]
    if losers:
        allp = np.concatenate(losers, axis=1)
        for split in np.unique(allp[1]):
            dup.losers[int(split)] = np.sort(allp[0][allp[1] == split])
    return dup
