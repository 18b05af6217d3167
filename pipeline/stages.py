"""The three per-shard steps, as plain callables over one-row Arrow "envelopes".

Each envelope row is (shard index, Arrow IPC payload). Nothing here knows Ray: `run.py` decides
where each step runs. A shard's output file is written before its marker, so a marker proves a
complete, checksummed shard (datatrove's completion-marker pattern).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.compress import Compressor
from pipeline.config import CompressionConfig, DprConfig, ExecutionConfig, ModelConfig
from pipeline.encoder import ShardEncoder, pick_device
from pipeline.pack import Packer
from pipeline.tokenize import PairTokenizer
from storage.fs import Store
from storage.shards import SCHEMA_VERSION, read_rows, state_schema, write_shard

ENVELOPE = pa.schema([pa.field("shard", pa.int32()), pa.field("payload", pa.large_binary())])


def input_path(run_dir: str, shard: int) -> str:
    return f"{run_dir}/input/part-{shard:05d}.parquet"


def state_path(run_dir: str, shard: int) -> str:
    return f"{run_dir}/states/part-{shard:05d}.parquet"


def dpr_path(run_dir: str, shard: int) -> str:
    return f"{run_dir}/dpr/part-{shard:05d}.parquet"


def dpr_schema(dim: int, dtype: str) -> pa.Schema:
    """DPR embedding shard: plain Arrow FixedSizeList vectors (no Ray tensor extension types)."""
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema([pa.field("id", pa.int64(), nullable=False), pa.field("title", pa.string()),
                      pa.field("embedding", pa.list_(value, dim), nullable=False)])


def marker_path(run_dir: str, shard: int) -> str:
    return f"{run_dir}/states/part-{shard:05d}.done.json"


def to_envelope(shards: list[int], tables: list[pa.Table]) -> pa.Table:
    payloads = []
    for t in tables:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, t.schema) as writer:
            writer.write_table(t)
        payloads.append(sink.getvalue().to_pybytes())
    return pa.Table.from_arrays([pa.array(shards, pa.int32()), pa.array(payloads, pa.large_binary())],
                                schema=ENVELOPE)


def from_envelope(batch: pa.Table) -> list[tuple[int, pa.Table]]:
    out = []
    for shard, payload in zip(batch.column("shard").to_pylist(), batch.column("payload").to_pylist()):
        out.append((shard, pa.ipc.open_stream(payload).read_all()))
    return out


def table_meta(table: pa.Table) -> dict[str, Any]:
    raw = (table.schema.metadata or {}).get(b"stage")
    return json.loads(raw) if raw else {}


def with_meta(table: pa.Table, meta: dict[str, Any]) -> pa.Table:
    return table.replace_schema_metadata({b"stage": json.dumps(meta).encode()})


@dataclass(frozen=True)
class StageContext:
    """Everything a worker needs to do its step; pickled once per actor or task."""
    store_url: str
    run_dir: str
    model: ModelConfig
    compression: CompressionConfig
    execution: ExecutionConfig
    max_length: int
    compressor_path: str
    compressor_sha256: str
    fingerprint: dict[str, Any]
    dpr: DprConfig | None = None
    dpr_shares_tokens: bool = True  # same vocabulary: the DPR pass reuses the token ids
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    def store(self) -> Store:
        return Store(self.store_url, self.storage_options)


def load_compressor(store: Store, rel: str, sha256: str) -> Compressor:
    return Compressor.from_bytes(store.read_verified({"path": rel, "sha256": sha256}), rel)


class TokenizeStage:
    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.store = ctx.store()
        self.tok = PairTokenizer(ctx.model, ctx.max_length)
        self.dpr_tok = None
        if ctx.dpr is not None and not ctx.dpr_shares_tokens:
            from transformers import AutoTokenizer

            from pipeline.config import resolve_model
            self.dpr_tok = AutoTokenizer.from_pretrained(resolve_model(ctx.dpr.model), revision=ctx.dpr.revision,
                                                         use_fast=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        shards, tables = [], []
        for shard in batch.column("shard").to_pylist():
            inp = read_rows(self.store, input_path(self.ctx.run_dir, shard))
            tok = self.tok(inp.column("title").to_pylist(), inp.column("text").to_pylist())
            keep = np.flatnonzero(tok.keep)
            id_type = pa.uint16() if self.tok.vocab_size <= 65536 else pa.uint32()
            table = pa.table({
                "id": inp.column("id").take(keep),
                "content_hash": inp.column("content_hash").take(keep),
                "token_ids": pa.array([tok.input_ids[i] for i in keep], pa.list_(id_type)),
                "token_type_ids": pa.array([tok.token_type_ids[i] for i in keep], pa.list_(pa.uint8())),
            })
            if self.ctx.dpr is not None:
                table = table.append_column("title", inp.column("title").take(keep))
            if self.dpr_tok is not None:
                titles = table.column("title").to_pylist()
                texts = inp.column("text").take(keep).to_pylist()
                enc = self.dpr_tok(titles, texts, truncation=True, max_length=512, return_token_type_ids=True)
                table = table.append_column("dpr_token_ids", pa.array(enc["input_ids"], pa.list_(pa.int32())))
                table = table.append_column("dpr_token_type_ids", pa.array(enc["token_type_ids"], pa.list_(pa.uint8())))
            shards.append(shard)
            tables.append(with_meta(table, {"passages_in": inp.num_rows, "truncated": tok.truncated,
                                            "skipped_too_long": tok.skipped_too_long,
                                            "vocab_size": self.tok.vocab_size}))
        return to_envelope(shards, tables)


class EncodeStage:
    """Holds the model: built once per actor, reused for every shard it is handed."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        store = ctx.store()
        compressor = load_compressor(store, ctx.compressor_path, ctx.compressor_sha256)
        device = pick_device(ctx.execution.device)
        if device.type == "cpu":
            per_actor = max(1, (os.cpu_count() or 1) // (ctx.execution.num_encoders or 1))
            torch.set_num_threads(ctx.execution.torch_threads or per_actor)
        c = ctx.compression
        self.encoder = ShardEncoder(ctx.model, compressor, c.quantize, c.bits, ctx.execution.token_budget, device)
        self.embedder = None
        if ctx.dpr is not None:
            from pipeline.dpr import Embedder
            self.embedder = Embedder(ctx.dpr.model, ctx.dpr.revision, ctx.dpr.pooling, device,
                                     normalize=ctx.fingerprint["dpr"]["normalize"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        shards, tables = [], []
        for shard, table in from_envelope(batch):
            meta = table_meta(table)
            ids = [np.asarray(x, dtype=np.int64) for x in table.column("token_ids").to_numpy(zero_copy_only=False)]
            types = [np.asarray(x) for x in table.column("token_type_ids").to_numpy(zero_copy_only=False)]
            enc = self.encoder.encode(ids, types) if ids else None
            codes = [c.tobytes() for c in enc.codes] if enc else []
            out = {
                "id": table.column("id"),
                "content_hash": table.column("content_hash"),
                "n_tokens": pa.array([len(x) for x in ids], pa.int32()),
                "token_ids": table.column("token_ids"),
                "scales": pa.array([s for s in enc.scales] if enc and enc.scales is not None
                                   else [None] * len(ids), pa.list_(pa.float16())),
                "raw_codes": pa.array(codes, pa.large_binary()),
            }
            if self.embedder is not None:
                t0 = time.perf_counter()
                if "dpr_token_ids" in table.column_names:
                    d_ids = [np.asarray(x, dtype=np.int64) for x in table.column("dpr_token_ids").to_numpy(zero_copy_only=False)]
                    d_types = [np.asarray(x) for x in table.column("dpr_token_type_ids").to_numpy(zero_copy_only=False)]
                else:
                    d_ids, d_types = ids, types
                emb = self.embedder.embed_ids(d_ids, d_types) if d_ids else np.zeros((0, self.embedder.dim), np.float32)
                out["title"] = table.column("title")
                out["dpr_embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()),
                                                                         self.embedder.dim)
                meta["dpr_seconds"] = time.perf_counter() - t0
                meta["dpr_dim"] = self.embedder.dim
            meta.update({"tokens": enc.tokens if enc else 0, "padded_tokens": enc.padded_tokens if enc else 0,
                         "encode_seconds": enc.seconds if enc else 0.0})
            shards.append(shard)
            tables.append(with_meta(pa.table(out), meta))
        return to_envelope(shards, tables)


def shard_metadata(ctx: StageContext) -> dict[str, Any]:
    """Key-value metadata every state shard carries, so a lone file still says what it holds."""
    fp = ctx.fingerprint
    return {"model": fp["model"], "model_revision": fp["model_revision"], "layers": fp["layers"],
            "compressor_sha256": fp["compressor_sha256"], "dims": fp["dims"], "quantize": fp["quantize"],
            "bits": fp["bits"], "zstd_level": fp["zstd_level"], "schema_version": SCHEMA_VERSION,
            "max_length": fp["max_length"]}


class WriteStage:
    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.store = ctx.store()
        self.packer = Packer(ctx.compression.zstd_level)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = {"shard": [], "marker": []}
        for shard, table in from_envelope(batch):
            meta = table_meta(table)
            t0 = time.perf_counter()
            raw = table.column("raw_codes").to_pylist()
            packed = [self.packer.pack(r) for r in raw]
            quantized = self.ctx.compression.quantize != "none"
            schema = state_schema(meta["vocab_size"], quantized)
            out = pa.Table.from_arrays([
                table.column("id"), table.column("content_hash"), table.column("n_tokens"),
                table.column("token_ids").cast(schema.field("token_ids").type),
                table.column("scales"), pa.array(packed, pa.binary()),
            ], schema=schema)
            shard_file = write_shard(self.store, state_path(self.ctx.run_dir, shard), out,
                                     shard_metadata(self.ctx), self.ctx.execution.row_group_size)
            dpr_file = None
            if "dpr_embedding" in table.column_names:
                dpr_file = self._write_dpr(shard, table, meta["dpr_dim"])
            marker = {**shard_file.to_dict(), "kind": "states", "shard": shard,
                      "dpr": dpr_file.to_dict() if dpr_file else None,
                      "passages_in": meta["passages_in"], "truncated": meta["truncated"],
                      "skipped_too_long": meta["skipped_too_long"], "tokens": meta["tokens"],
                      "padded_tokens": meta["padded_tokens"], "encode_seconds": meta["encode_seconds"],
                      "raw_code_bytes": int(sum(len(r) for r in raw)),
                      "write_seconds": time.perf_counter() - t0, "finished_at": time.time()}
            self.store.write_bytes(marker_path(self.ctx.run_dir, shard), json.dumps(marker).encode())
            rows["shard"].append(shard)
            rows["marker"].append(json.dumps(marker))
        return pa.table({"shard": pa.array(rows["shard"], pa.int32()), "marker": pa.array(rows["marker"])})

    def _write_dpr(self, shard: int, table: pa.Table, dim: int):
        schema = dpr_schema(dim, self.ctx.dpr.dtype)
        emb = table.column("dpr_embedding").combine_chunks().cast(schema.field("embedding").type)
        out = pa.Table.from_arrays([table.column("id"), table.column("title"), emb], schema=schema)
        md = {"dpr_model": self.ctx.fingerprint["dpr"]["model"], "pooling": self.ctx.fingerprint["dpr"]["pooling"],
              "dim": dim, "dtype": self.ctx.dpr.dtype, "schema_version": SCHEMA_VERSION}
        return write_shard(self.store, dpr_path(self.ctx.run_dir, shard), out, md, self.ctx.execution.row_group_size)


def read_marker(store: Store, run_dir: str, shard: int, verify_checksum: bool = True) -> dict | None:
    """A shard's marker if it and its file are intact; None if the shard must be (re)done."""
    path = marker_path(run_dir, shard)
    try:
        marker = json.loads(store.read_bytes(path))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None  # torn or foreign marker: redo the shard
    try:
        for entry in (marker, marker.get("dpr")):
            if entry is None:
                continue
            if store.size(entry["path"]) != entry["bytes"]:
                return None
            if verify_checksum and store.sha256(entry["path"]) != entry["sha256"]:
                return None
    except (FileNotFoundError, KeyError, TypeError, AttributeError):
        return None
    return marker
