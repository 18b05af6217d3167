"""Parquet shards with an explicit schema: writing (to bytes, then one atomic object) and
row-group-pruned reading by passage id."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.fs import Store, sha256_bytes

SCHEMA_VERSION = 1
METADATA_KEY = b"decoupled.precompute"


def token_id_type(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 65536 else pa.uint32()


def state_schema(vocab_size: int, scaled: bool) -> pa.Schema:
    """Token-state shard: one row per passage, only real tokens stored."""
    return pa.schema([
        pa.field("id", pa.int64(), nullable=False),
        pa.field("content_hash", pa.binary(16), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("token_ids", pa.list_(token_id_type(vocab_size)), nullable=False),
        # Per-token dequantisation scale; null for a codec without scales (float16 values, PQ codes).
        pa.field("scales", pa.list_(pa.float16()), nullable=not scaled),
        # The [n_tokens x width] code matrix, row-major: a zstd frame, or raw when zstd_level is 0.
        pa.field("codes", pa.binary(), nullable=False),
    ])


def input_schema() -> pa.Schema:
    """Validated, normalised corpus slice handed from the driver to the Ray stages."""
    return pa.schema([
        pa.field("id", pa.int64(), nullable=False),
        pa.field("content_hash", pa.binary(16), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
    ])


@dataclass(frozen=True)
class ShardFile:
    path: str
    rows: int
    bytes: int
    sha256: str
    id_min: int
    id_max: int

    def to_dict(self) -> dict:
        return {"path": self.path, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256,
                "id_min": self.id_min, "id_max": self.id_max}

    def entry(self, kind: str) -> dict:
        """This file as a version lists it: its fields and what it holds ("states", "dpr")."""
        return {**self.to_dict(), "kind": kind}


def encode_parquet(table: pa.Table, metadata: dict | None = None, row_group_size: int = 256,
                   uncompressed_columns: Iterable[str] = ("codes",)) -> bytes:
    """Serialise a table sorted by id, so each row group covers a tight id range."""
    if table.num_rows and "id" in table.column_names:
        table = table.sort_by("id")
    if metadata is not None:
        md = dict(table.schema.metadata or {})
        md[METADATA_KEY] = json.dumps(metadata, sort_keys=True).encode()
        table = table.replace_schema_metadata(md)
    skip = set(uncompressed_columns)
    compression = {name: ("none" if name in skip else "zstd") for name in table.column_names}
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=max(1, row_group_size), compression=compression,
                   write_statistics=["id"] if "id" in table.column_names else False)
    return buf.getvalue()


def write_shard(store: Store, rel_path: str, table: pa.Table, metadata: dict | None = None,
                row_group_size: int = 256) -> ShardFile:
    """Write one shard as a single atomic object and describe it for the manifest."""
    data = encode_parquet(table, metadata, row_group_size)
    store.write_bytes(rel_path, data)
    ids = table.column("id")
    return ShardFile(
        path=rel_path, rows=table.num_rows, bytes=len(data), sha256=sha256_bytes(data),
        id_min=int(pc.min(ids).as_py()) if table.num_rows else 0,
        id_max=int(pc.max(ids).as_py()) if table.num_rows else -1,
    )


def read_metadata(store: Store, rel_path: str) -> dict:
    with store.open(rel_path) as fh:
        md = pq.read_schema(fh).metadata or {}
    raw = md.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def footer_row_count(store: Store, rel_path: str) -> int:
    with store.open(rel_path) as fh:
        return pq.ParquetFile(fh).metadata.num_rows


def read_rows(store: Store, rel_path: str, ids: Iterable[int] | None = None,
              columns: list[str] | None = None) -> pa.Table:
    """Read the rows whose id is in `ids`, touching only row groups whose id range can hold them.

    Only those byte ranges are fetched: no read-ahead, and each row group's column chunks are read
    as one coalesced range (pre_buffer), so a remote lookup costs a request per row group."""
    with store.open_ranges(rel_path) as fh:
        pf = pq.ParquetFile(fh, pre_buffer=True)
        if ids is None:
            return pf.read(columns=columns)
        wanted = np.unique(np.fromiter(ids, dtype=np.int64))
        if wanted.size == 0:
            return pf.schema_arrow.empty_table().select(columns) if columns else pf.schema_arrow.empty_table()
        id_idx = pf.schema_arrow.get_field_index("id")
        groups = []
        for g in range(pf.num_row_groups):
            stats = pf.metadata.row_group(g).column(id_idx).statistics
            if stats is None or not stats.has_min_max:
                groups.append(g)
                continue
            lo = np.searchsorted(wanted, stats.min, side="left")
            if lo < wanted.size and wanted[lo] <= stats.max:
                groups.append(g)
        if not groups:
            schema = pf.schema_arrow
            return (schema.empty_table().select(columns) if columns else schema.empty_table())
        cols = columns if columns is None or "id" in columns else ["id", *columns]
        table = pf.read_row_groups(groups, columns=cols)
    mask = pc.is_in(table.column("id"), value_set=pa.array(wanted))
    table = table.filter(mask)
    return table.select(columns) if columns else table
