"""Duplicate passage ids across splits, found by a hash-partitioned shuffle on the workers.

Two passes use it. Before encoding (`find_corpus_duplicates`), map tasks read only the ids each
split accepts, so a corpus whose ids repeat fails in seconds rather than after the GPU work. After
encoding (`find_duplicates`, for --on-duplicate keep-first), map tasks read the id and token-count
columns of the written shards and the reduce names the later copies to tombstone. Either way map
tasks partition (id, split, tokens) triples by id and reduce tasks each sort one partition; partitions
travel between workers as object refs: the driver holds refs and the (usually empty) list of
duplicates, never the ids themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.config import CorpusConfig
from pipeline.corpus.splits import Split
from storage.fs import Store
from storage.shards import read_rows


@dataclass
class Duplicates:
    count: int = 0                     # ids that appear more than once
    examples: list[int] = field(default_factory=list)
    losers: dict[int, np.ndarray] = field(default_factory=dict)  # split -> ids to drop (a later split's copy)
    loser_tokens: int = 0              # tokens the dropped copies hold in their shards

    @property
    def dropped(self) -> int:
        return int(sum(v.size for v in self.losers.values()))


def _partition(ids: list[np.ndarray], splits: list[int], tokens: list[np.ndarray], partitions: int):
    """(3, n) int64 stacks of (id, split, tokens), one per partition of id % partitions."""
    n = [a.size for a in ids]
    ids_ = np.concatenate(ids) if ids else np.empty(0, np.int64)
    split_ = np.repeat(np.asarray(splits, np.int64), n) if ids else np.empty(0, np.int64)
    tok = np.concatenate(tokens) if tokens else np.empty(0, np.int64)
    part = (ids_ % partitions).astype(np.int64)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    out = [np.stack([ids_[order[a:b]], split_[order[a:b]], tok[order[a:b]]]) for a, b in zip(bounds, bounds[1:])]
    return out if partitions > 1 else out[0]


def _shard_ids_task(store_url: str, storage_options: dict, shards: list[tuple[int, str | None, list[int]]],
                    partitions: int):
    store = Store(store_url, storage_options)
    ids, splits, tokens = [], [], []
    for split, path, unstored in shards:
        if path:
            t = read_rows(store, path, columns=["id", "n_tokens"])
            col, tok = t.column("id").to_numpy(), t.column("n_tokens").to_numpy().astype(np.int64)
        else:
            col, tok = np.empty(0, np.int64), np.empty(0, np.int64)
        extra = np.asarray(unstored, dtype=np.int64)  # accepted but not stored (too long): no tokens
        ids.append(np.concatenate([col, extra]))
        tokens.append(np.concatenate([tok, np.zeros(extra.size, np.int64)]))
        splits.append(split)
    return _partition(ids, splits, tokens, partitions)


def _corpus_ids_task(corpus_cfg: CorpusConfig, options: dict, splits: list[dict], partitions: int):
    from pipeline.corpus.source import Corpus

    corpus = Corpus(corpus_cfg, options)
    ids = [corpus.split_ids(Split(**s)) for s in splits]
    return _partition(ids, [s["index"] for s in splits], [np.zeros(a.size, np.int64) for a in ids], partitions)


def _reduce_task(*parts: np.ndarray) -> tuple[int, list[int], np.ndarray, int]:
    rows = np.concatenate(parts, axis=1) if parts else np.empty((3, 0), np.int64)
    if rows.shape[1] == 0:
        return 0, [], np.empty((2, 0), np.int64), 0
    order = np.lexsort((rows[1], rows[0]))  # by id, then split: the first of each id is the keeper
    ids, splits, tokens = rows[0][order], rows[1][order], rows[2][order]
    repeat = np.zeros(ids.size, dtype=bool)
    repeat[1:] = ids[1:] == ids[:-1]
    dup_ids = np.unique(ids[repeat])
    return int(dup_ids.size), dup_ids[:5].tolist(), np.stack([ids[repeat], splits[repeat]]), int(tokens[repeat].sum())


def _shuffle(mapper, groups: list, args: tuple, task_cpus: float) -> Duplicates:
    import ray

    p = max(1, min(32, len(groups)))
    remote_map = ray.remote(num_cpus=task_cpus, num_returns=p)(mapper)
    reducer = ray.remote(num_cpus=task_cpus)(_reduce_task)
    mapped = [remote_map.remote(*args, g, p) for g in groups]
    if p == 1:
        mapped = [[ref] for ref in mapped]
    results = ray.get([reducer.remote(*[m[j] for m in mapped]) for j in range(p)])
    dup = Duplicates()
    losers: list[np.ndarray] = []
    for count, examples, pairs, tokens in results:
        dup.count += count
        dup.examples.extend(examples)
        dup.loser_tokens += tokens
        if pairs.shape[1]:
            losers.append(pairs)
    dup.examples = sorted(dup.examples)[:5]
    if losers:
        allp = np.concatenate(losers, axis=1)
        for split in np.unique(allp[1]):
            dup.losers[int(split)] = np.sort(allp[0][allp[1] == split])
    return dup


def find_duplicates(store_url: str, storage_options: dict, shards: list[tuple[int, str | None, list[int]]],
                    task_cpus: float, group: int = 64) -> Duplicates:
    """Ids present in more than one written split. `shards`: (split, state shard path or None, ids the
    split accepted but did not store, i.e. passages skipped for length)."""
    if len(shards) < 2:
        return Duplicates()
    groups = [shards[i:i + group] for i in range(0, len(shards), group)]
    return _shuffle(_shard_ids_task, groups, (store_url, storage_options), task_cpus)


def find_corpus_duplicates(corpus_cfg: CorpusConfig, options: dict, splits: list[Split], task_cpus: float,
                           group: int = 16) -> Duplicates:
    """Ids that repeat anywhere in the planned splits (within one split too), read before any encoding:
    one pass over the id column on the workers. Only `count` and `examples` mean something here."""
    dicts = [s.to_dict() for s in splits]
    groups = [dicts[i:i + group] for i in range(0, len(dicts), group)]
    return _shuffle(_corpus_ids_task, groups, (corpus_cfg, options), task_cpus)
