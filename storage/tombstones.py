"""Tombstones: (shard, id) pairs whose rows a version no longer counts as live.

An incremental update appends delta shards and tombstones the superseded rows instead of
rewriting old shards; readers and verify skip tombstoned rows, and compact drops them for good.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.fs import IntegrityError, Store, sha256_bytes
from storage.shards import encode_parquet

if TYPE_CHECKING:  # manifest reads tombstones in verify: a type only, no import cycle
    from storage.manifest import Manifest

SCHEMA = pa.schema([pa.field("shard", pa.string(), nullable=False), pa.field("id", pa.int64(), nullable=False)])


TombstoneError = IntegrityError  # the tombstone file is missing or does not match the manifest


def load(store: Store, entry: dict | None) -> dict[str, np.ndarray]:
    """{shard path: sorted int64 ids}, read column-wise (no Python object per tombstone)."""
    if entry is None:
        return {}
    data = store.read_verified(entry)
    table = pq.read_table(pa.BufferReader(data))
    shards = table.column("shard").combine_chunks().dictionary_encode()
    codes = shards.indices.to_numpy(zero_copy_only=False)
    ids = table.column("id").to_numpy()
    order = np.lexsort((ids, codes))
    codes, ids = codes[order], ids[order]
    cuts = np.flatnonzero(np.diff(codes)) + 1
    names = shards.dictionary.to_pylist()
    return {names[int(group[0])]: chunk for group, chunk in zip(np.split(codes, cuts), np.split(ids, cuts))
            if group.size}


def of_version(store: Store, manifest: Manifest) -> dict[str, np.ndarray]:
    """The rows a version no longer counts as live (empty when it has no tombstone file)."""
    return load(store, manifest.artifacts.get("tombstones"))


def write(store: Store, rel: str, dead: dict[str, Iterable[int]]) -> dict:
    """One Parquet file of (shard, id), sorted; its checksum goes into the manifest."""
    paths = sorted(p for p, ids in dead.items() if len(ids))
    arrays = [np.unique(np.fromiter(dead[p], dtype=np.int64) if not isinstance(dead[p], np.ndarray)
                        else dead[p].astype(np.int64)) for p in paths]
    counts = np.array([a.size for a in arrays], dtype=np.int64)
    shard = pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.arange(len(paths)), counts), pa.int32()),
                                           pa.array(paths, pa.string())).cast(pa.string())
    ids = pa.array(np.concatenate(arrays) if arrays else np.empty(0, np.int64), pa.int64())
    table = pa.Table.from_arrays([shard, ids], schema=SCHEMA)
    data = encode_parquet(table, None, 65536, uncompressed_columns=())
    store.write_bytes(rel, data)
    return {"path": rel, "sha256": sha256_bytes(data), "bytes": len(data), "rows": int(counts.sum())}
