"""Passages drawn from a corpus as columns, for the tools that fit, measure and report on a sample.

fit-compressor and fidelity stream the corpus once and keep only the rows they use; report
permutes the whole (small) corpus, as its figures always have. Rows are picked with Arrow/numpy."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.corpus.source import Corpus, CorpusScan


def corpus_table(corpus: Corpus) -> pa.Table:
    """Every accepted passage (id, content_hash, title, text), in corpus order."""
    scan = corpus.scan()
    return pa.concat_tables(list(corpus.batches(scan, 4096)))


def rows_at(corpus: Corpus, scan: CorpusScan, positions: np.ndarray) -> tuple[list[int], list[str], list[str]]:
    """(ids, titles, texts) at sorted positions of `scan`'s passages, from one streamed pass."""
    positions = np.asarray(positions, dtype=np.int64)
    parts, start = [], 0
    for t in corpus.batches(scan, 4096):
        lo, hi = np.searchsorted(positions, [start, start + t.num_rows])
        if hi > lo:
            parts.append(t.take(pa.array(positions[lo:hi] - start)))
        start += t.num_rows
    return columns(pa.concat_tables(parts)) if parts else ([], [], [])


def held_out(corpus: Corpus, exclude, limit: int) -> tuple[list[int], list[str], list[str]]:
    """The first `limit` passages whose id is not in `exclude`, streamed: the pass stops once it has them."""
    scan = corpus.scan()
    value_set = pa.array(sorted(exclude), pa.int64())
    parts, have = [], 0
    for t in corpus.batches(scan, 4096):
        if have >= limit:
            break
        keep = t.filter(pc.invert(pc.is_in(t.column("id"), value_set=value_set))).slice(0, limit - have)
        parts.append(keep)
        have += keep.num_rows
    return columns(pa.concat_tables(parts)) if parts else ([], [], [])


def columns(table: pa.Table, rows: np.ndarray | None = None) -> tuple[list[int], list[str], list[str]]:
    """(ids, titles, texts) of `rows` (positions; all when None), in that order."""
    if rows is not None:
        table = table.take(pa.array(np.asarray(rows, dtype=np.int64)))
    return (table.column("id").to_pylist(), table.column("title").to_pylist(), table.column("text").to_pylist())


def random_rows(n: int, k: int, seed: int) -> np.ndarray:
    """k positions of n drawn without replacement, in corpus order."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(k, n), replace=False))


