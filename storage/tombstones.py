"""Tombstones: (shard, id) pairs whose rows a version no longer counts as live.

An incremental update appends delta shards and tombstones the superseded rows instead of
rewriting old shards; readers and verify skip tombstoned rows, and compact drops them for good.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from storage.fs import IntegrityError, Store, sha256_bytes
from storage.shards import encode_parquet

SCHEMA = pa.schema([pa.field("shard", pa.string(), nullable=False), pa.field("id", pa.int64(), nullable=False)])


TombstoneError = IntegrityError  # the tombstone file is missing or does not match the manifest


def load(store: Store, entry: dict | None) -> dict[str, set[int]]:
    if entry is None:
        return {}
    data = store.read_verified(entry)
    table = pq.read_table(pa.BufferReader(data))
    out: dict[str, set[int]] = {}
    for shard, pid in zip(table.column("shard").to_pylist(), table.column("id").to_pylist()):
        out.setdefault(shard, set()).add(pid)
    return out


def write(store: Store, rel: str, dead: dict[str, set[int]]) -> dict:
    pairs = sorted((shard, pid) for shard, ids in dead.items() for pid in ids)
    table = pa.Table.from_arrays([pa.array([p[0] for p in pairs], pa.string()),
                                  pa.array([p[1] for p in pairs], pa.int64())], schema=SCHEMA)
    data = encode_parquet(table, None, 65536, uncompressed_columns=())
    store.write_bytes(rel, data)
    return {"path": rel, "sha256": sha256_bytes(data), "bytes": len(data), "rows": len(pairs)}
