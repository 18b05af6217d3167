"""The split plan: which worker reads which part of the corpus. Pure functions, no I/O.

A split is the unit of work end to end: one Ray task reads it, checks it and hashes it, and its
passages become one state shard. The plan is a deterministic function of what one listing and the
footers say (sizes, versions, Parquet row counts), as embedding-reader's `build_pieces`, so a rerun
over unchanged files finds the same splits and reuses the shards an earlier attempt finished.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

# Passages per shard when the config leaves it open: a few thousand manifest entries at 32M
# (3,200 state shards of ~10k passages: tens to a few hundred MB each on object storage), and
# still several shards, so stages overlap, on a corpus of a few thousand passages.
MAX_AUTO_ROWS = 10_000
MIN_AUTO_ROWS = 1_000
AUTO_TARGET_SPLITS = 16


@dataclass(frozen=True)
class SourceFile:
    """One corpus file as the listing (and, for Parquet, the footer) describes it."""
    path: str            # fsspec path, as the corpus filesystem names it
    size: int            # bytes
    version: str         # what change detection compares: ETag / generation / size+mtime
    fmt: str             # tsv | jsonl | parquet | hf
    rows: int | None = None     # Parquet / HF: from the footer; text: unknown until read
    splittable: bool = True     # False for compressed text: it is read whole
    row_groups: tuple[int, ...] = ()  # Parquet: rows per row group; splits are cut on their boundaries
    est_rows: int | None = None  # text: rows estimated from a sample of the file (what sizes its splits)


@dataclass(frozen=True)
class Split:
    """Rows [start, end) of a Parquet/HF file, or the lines that begin in bytes [start, end)."""
    index: int
    path: str
    version: str
    fmt: str
    unit: str    # "bytes" | "rows"
    start: int
    end: int     # exclusive; -1 = to the end of the file

    def to_dict(self) -> dict:
        return asdict(self)


def auto_rows_per_split(estimated_rows: int) -> int:
    """Passages per split when the config does not say: ~16 splits, clamped to [1k, 10k]."""
    return int(min(MAX_AUTO_ROWS, max(MIN_AUTO_ROWS, math.ceil(estimated_rows / AUTO_TARGET_SPLITS))))


def estimated_rows(files: list[SourceFile], bytes_per_row: float) -> int:
    """Rows in the corpus: exact where a footer says, else bytes / average row bytes."""
    total = 0
    for f in files:
        total += f.rows if f.rows is not None else _text_rows(f, bytes_per_row)
    return total


def _text_rows(f: SourceFile, bytes_per_row: float) -> int:
    return f.est_rows if f.est_rows is not None else math.ceil(f.size / max(bytes_per_row, 1.0))


def plan_splits(files: list[SourceFile], rows_per_split: int, bytes_per_row: float) -> list[Split]:
    """Cut every file into splits of about `rows_per_split` passages.

    Text files are cut into equal byte ranges (a line belongs to the split where it starts);
    Parquet files on row-group boundaries (a worker never decodes a row group for rows it does not
    keep; a single row group larger than two splits is cut inside); HF datasets into equal row
    ranges; compressed text stays whole. Splits never span files, so one task reads one file.
    """
    if rows_per_split < 1:
        raise ValueError("rows_per_split must be at least 1")
    splits: list[Split] = []
    for f in files:
        if f.row_groups:
            bounds, unit = _row_group_bounds(f.row_groups, rows_per_split), "rows"
        elif f.rows is not None:  # row-addressed: an HF dataset
            n = max(1, math.ceil(f.rows / rows_per_split))
            bounds = [f.rows * i // n for i in range(n + 1)]
            unit = "rows"
        elif not f.splittable or f.size == 0:
            bounds, unit = [0, -1], "bytes"
        else:
            n = max(1, math.ceil(_text_rows(f, bytes_per_row) / rows_per_split))
            bounds = [f.size * i // n for i in range(n + 1)]
            unit = "bytes"
        for lo, hi in zip(bounds, bounds[1:]):
            if hi != -1 and hi <= lo:
                continue
            splits.append(Split(len(splits), f.path, f.version, f.fmt, unit, lo, hi))
    return splits


def _row_group_bounds(groups: tuple[int, ...], rows_per_split: int) -> list[int]:
    """Cut points on row-group boundaries, each split at least `rows_per_split` rows (the last may
    be short); a group over twice the target is cut into equal parts of its own."""
    bounds, row, since = [0], 0, 0
    for n in groups:
        if n > 2 * rows_per_split:
            if since:
                bounds.append(row)
            parts = math.ceil(n / rows_per_split)
            bounds += [row + n * i // parts for i in range(1, parts + 1)]
            row += n
            since = 0
            continue
        row += n
        since += n
        if since >= rows_per_split:
            bounds.append(row)
            since = 0
    if since:
        bounds.append(row)
    return bounds


def plan_digest(splits: list[Split], policy: dict) -> str:
    """Identity of the input: files, versions, boundaries and the row policies applied to them."""
    h = hashlib.sha256(json.dumps(policy, sort_keys=True).encode())
    for s in splits:
        h.update(json.dumps(s.to_dict(), sort_keys=True).encode())
    return h.hexdigest()[:32]


def sample_splits(n_splits: int, how_many: int = 8) -> list[int]:
    """Splits spread evenly over the plan, where the compressor's fit sample is drawn from.

    A bounded number, so drawing the sample costs the same at 100k passages as at 32M and
    encoding can start right after it.
    """
    if n_splits <= how_many:
        return list(range(n_splits))
    return sorted({(2 * i + 1) * n_splits // (2 * how_many) for i in range(how_many)})


def sample_key(ids) -> "object":
    """Per-id sampling key (uint64): a fixed hash, so the sample does not depend on row order."""
    import numpy as np

    x = np.asarray(ids, dtype=np.uint64)
    # splitmix64: cheap, vectorised, well mixed
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))
