"""The compressor's fit sample, drawn on the workers from a bounded set of splits.

Kept apart from the encode stages so a sampling task imports no model code.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.corpus.source import Corpus
from pipeline.corpus.splits import Split, sample_key


def fit_sample_task(corpus_cfg, storage_options: dict, split: dict, k: int) -> dict:
    """The `k` rows of one split with the smallest sampling key: a split's share of the fit sample."""
    read = Corpus(corpus_cfg, storage_options).read_split(Split(**split))
    t = read.table
    if t.num_rows == 0:
        return {"key": np.empty(0, np.uint64), "id": [], "title": [], "text": [], "counts": read.counts.to_dict()}
    key = sample_key(t.column("id").to_numpy())
    pick = np.argsort(key, kind="stable")[:k]
    return {"key": key[pick], "id": t.column("id").to_numpy()[pick].tolist(),
            "title": t.column("title").take(pa.array(pick)).to_pylist(),
            "text": t.column("text").take(pa.array(pick)).to_pylist(), "counts": read.counts.to_dict()}


def merge_fit_samples(parts: list[dict], k: int) -> tuple[list[int], list[str], list[str]]:
    """The `k` smallest keys over every part: the same sample whatever order the parts arrive in."""
    keys = np.concatenate([p["key"] for p in parts]) if parts else np.empty(0, np.uint64)
    ids = [i for p in parts for i in p["id"]]
    titles = [t for p in parts for t in p["title"]]
    texts = [t for p in parts for t in p["text"]]
    order = np.lexsort((np.asarray(ids, dtype=np.int64), keys))[:k] if ids else np.empty(0, np.int64)
    return [ids[i] for i in order], [titles[i] for i in order], [texts[i] for i in order]
