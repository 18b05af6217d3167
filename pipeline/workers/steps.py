"""The per-split steps, as plain callables over Arrow tables whose rows carry their split.

A block holds the rows of exactly one split (Ray Data's block shaping is switched off for the
run, see `encode.py`), and a split's facts travel in `split_meta`: a JSON string in its first row,
null elsewhere, so they survive any transport that keeps rows. Rows are never dropped between
read and write: a passage skipped for length is flagged (`keep`), so row counts can be checked
at the end. Nothing here knows Ray: `encode.py` decides where each step runs.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.codec.state_codec import Codec, codec_from_bytes
from pipeline.config import CompressionConfig, CorpusConfig, DprConfig, ExecutionConfig
from pipeline.model.encoder import ShardEncoder, pick_device
from pipeline.model.spec import ModelSpec
from pipeline.model.tokenizer import PairTokenizer
from storage.fs import Store
from storage.shards import SCHEMA_VERSION


def dpr_schema(dim: int, dtype: str) -> pa.Schema:
    """DPR embedding shard: plain Arrow FixedSizeList vectors (no Ray tensor extension types)."""
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema([pa.field("id", pa.int64(), nullable=False), pa.field("title", pa.string()),
                      pa.field("embedding", pa.list_(value, dim), nullable=False)])


def split_meta(table: pa.Table) -> dict[str, Any]:
    """The split's facts from the first non-null `split_meta` cell."""
    col = table.column("split_meta")
    valid = pc.drop_null(col)
    return json.loads(valid[0].as_py()) if len(valid) else {}


def meta_column(n: int, meta: dict[str, Any]) -> pa.Array:
    return pa.array([json.dumps(meta)] + [None] * (n - 1), pa.string()) if n else pa.array([], pa.string())


def one_split(table: pa.Table) -> int:
    """The split a block belongs to; a block mixing splits is a bug in how the stages were wired."""
    splits = pc.unique(table.column("split"))
    if len(splits) != 1:
        raise RuntimeError(f"a block holds rows of {len(splits)} splits; each block must be one split")
    return int(splits[0].as_py())


@dataclass(frozen=True)
class StageContext:
    """Everything a worker needs to do its step; pickled once per actor or task.

    The model facts come as the driver resolved them (`spec`): a worker loads weights and tokenizer
    files, never a config to re-derive what the driver already knows."""
    store_url: str
    run_dir: str
    spec: ModelSpec
    compression: CompressionConfig
    execution: ExecutionConfig
    compressor_path: str
    compressor_sha256: str
    fingerprint: dict[str, Any]
    scaled_codes: bool = True  # the codec stores a float16 scale per token (its layout says)
    dpr: DprConfig | None = None
    corpus: CorpusConfig | None = None  # where PrepareStage reads splits from (None: staged input slices)
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # the store's
    corpus_storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # the corpus's own

    def store(self) -> Store:
        return Store(self.store_url, self.storage_options)

def load_codec(store: Store, rel: str, sha256: str, compression: CompressionConfig) -> Codec:
    """The run's codec, from its artifact (refused unless its sha256 matches) and the quantisation settings."""
    data = store.read_verified({"path": rel, "sha256": sha256})
    return codec_from_bytes(data, rel, compression.quantize, compression.bits)


class TokenizeStage:
    """Title/text pairs to token ids. Over-long passages are truncated or flagged, never dropped."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.tok = PairTokenizer(ctx.spec.model, ctx.spec.max_length, ctx.spec.checkpoint.hf_config)
        self.dpr_tok = None
        dpr = ctx.spec.dpr
        if dpr is not None and not dpr.shares_tokens:
            from transformers import AutoTokenizer

            ck = dpr.checkpoint
            self.dpr_tok = AutoTokenizer.from_pretrained(ck.path, revision=ck.load_revision, use_fast=True,
                                                         config=ck.hf_config)

    def __call__(self, inp: pa.Table) -> pa.Table:
        if inp.num_rows == 0:
            return inp
        meta = split_meta(inp)
        titles, texts = inp.column("title").to_pylist(), inp.column("text").to_pylist()
        tok = self.tok(titles, texts)
        truncated = np.zeros(inp.num_rows, dtype=bool)
        truncated[tok.truncated_rows] = True
        id_type = pa.uint16() if self.tok.vocab_size <= 65536 else pa.uint32()
        meta.update({"truncated": tok.truncated, "skipped_too_long": tok.skipped_too_long,
                     "vocab_size": self.tok.vocab_size})
        table = pa.table({
            "split": inp.column("split"), "id": inp.column("id"), "content_hash": inp.column("content_hash"),
            "token_ids": pa.array(tok.input_ids, pa.list_(id_type)),
            "token_type_ids": pa.array(tok.token_type_ids, pa.list_(pa.uint8())),
            "keep": pa.array(tok.keep), "truncated": pa.array(truncated),
            "split_meta": meta_column(inp.num_rows, meta),
        })
        if self.ctx.dpr is not None:
            table = table.append_column("title", inp.column("title"))
        if self.dpr_tok is not None:
            enc = self.dpr_tok(titles, texts, truncation=True, max_length=512, return_token_type_ids=True)
            table = table.append_column("dpr_token_ids", pa.array(enc["input_ids"], pa.list_(pa.int32())))
            table = table.append_column("dpr_token_type_ids", pa.array(enc["token_type_ids"], pa.list_(pa.uint8())))
        return table


class EncodeStage:
    """Holds the model: built once per actor, reused for every split it is handed."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        store = ctx.store()
        codec = load_codec(store, ctx.compressor_path, ctx.compressor_sha256, ctx.compression)
        device = pick_device(ctx.execution.device)
        if device.type == "cpu":
            per_actor = max(1, (os.cpu_count() or 1) // (ctx.execution.num_encoders or 1))
            torch.set_num_threads(ctx.execution.torch_threads or per_actor)
        ex = ctx.execution
        self.encoder = ShardEncoder(ctx.spec.model, codec, ex.token_budget, device, attention=ex.attention,
                                    compile=ex.compile, config=ctx.spec.checkpoint.hf_config)
        self.embedder = None
        if ctx.spec.dpr is not None:
            from pipeline.model.dpr import Embedder
            self.embedder = Embedder.from_spec(ctx.spec.dpr, device)

    def __call__(self, table: pa.Table) -> pa.Table:
        if table.num_rows == 0:
            return table
        one_split(table)
        meta = split_meta(table)
        keep_mask = table.column("keep").to_numpy(zero_copy_only=False).astype(bool)
        kept = table.filter(pa.array(keep_mask))
        ids, offsets = flat_lists(kept.column("token_ids"), np.int64)
        types, type_offsets = flat_lists(kept.column("token_type_ids"), np.int64)
        if not np.array_equal(offsets, type_offsets):
            raise RuntimeError("token_ids and token_type_ids differ in length for some passage")
        enc = self.encoder.encode_flat(ids, types, offsets)
        lengths = np.zeros(table.num_rows, np.int64)  # a passage skipped for length has no codes
        lengths[keep_mask] = np.diff(enc.offsets)
        row_bytes = int(np.prod(enc.codes.shape[1:])) * enc.codes.itemsize
        out = {
            "split": table.column("split"), "id": table.column("id"), "content_hash": table.column("content_hash"),
            "n_tokens": pa.array(lengths.astype(np.int32)), "token_ids": table.column("token_ids"),
            "scales": list_column(enc.scales, lengths, keep_mask, pa.float16()),
            "raw_codes": binary_column(enc.codes, lengths * row_bytes),
            "keep": table.column("keep"),
        }
        if self.embedder is not None:
            t0 = time.perf_counter()
            if "dpr_token_ids" in table.column_names:
                d_ids, d_off = flat_lists(kept.column("dpr_token_ids"), np.int64)
                d_types, _ = flat_lists(kept.column("dpr_token_type_ids"), np.int64)
            else:
                d_ids, d_types, d_off = ids, types, offsets
            d_ids, d_types = np.split(d_ids, d_off[1:-1]), np.split(d_types, d_off[1:-1])
            emb = self.embedder.embed_ids(d_ids, d_types) if kept.num_rows else np.zeros((0, self.embedder.dim),
                                                                                       np.float32)
            full = np.zeros((table.num_rows, self.embedder.dim), np.float32)
            full[keep_mask] = emb
            out["title"] = table.column("title")
            out["dpr_embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1), pa.float32()),
                                                                     self.embedder.dim)
            meta["dpr_seconds"] = time.perf_counter() - t0
            meta["dpr_dim"] = self.embedder.dim
        meta.update({"tokens": enc.tokens, "padded_tokens": enc.padded_tokens, "encode_seconds": enc.seconds,
                     "attention": self.encoder.kernel})
        out["split_meta"] = meta_column(table.num_rows, meta)
        return pa.table(out)


def flat_lists(column: pa.ChunkedArray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (every row's values end to end, offsets [n + 1] from 0) in numpy, without a
    Python object per row. A sliced array's offsets start past 0: they are rebased, values cut to match."""
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if isinstance(arr, pa.ChunkedArray):  # a column with no chunks
        arr = pa.array([], column.type)
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]].astype(dtype, copy=False)
    return values, offsets - offsets[0]


def binary_column(flat: np.ndarray, row_bytes: np.ndarray) -> pa.Array:
    """Rows of `flat`'s bytes, `row_bytes[i]` each, as one large_binary column (zero rows: empty)."""
    offsets = np.concatenate([[0], np.cumsum(row_bytes)]).astype(np.int64)
    data = np.ascontiguousarray(flat).view(np.uint8).reshape(-1)
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(row_bytes),
                                            [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def list_column(flat: np.ndarray | None, lengths: np.ndarray, valid: np.ndarray, value_type) -> pa.Array:
    """Rows of `flat`, `lengths[i]` each, as a list column; null where not `valid` (or everywhere without `flat`)."""
    if flat is None:
        return pa.nulls(len(lengths), pa.list_(value_type))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(flat, value_type), mask=pa.array(~valid))


def shard_metadata(ctx: StageContext) -> dict[str, Any]:
    """Key-value metadata every state shard carries, so a lone file still says what it holds."""
    fp = ctx.fingerprint
    return {"model": fp["model"], "model_revision": fp["model_revision"], "layers": fp["layers"],
            "compressor_sha256": fp["compressor_sha256"], "codec": fp.get("codec", "linear"), "dims": fp["dims"],
            "quantize": fp["quantize"], "bits": fp["bits"], "zstd_level": fp["zstd_level"],
            "schema_version": SCHEMA_VERSION, "max_length": fp["max_length"],
            **({"residual": fp["residual"]} if "residual" in fp else {})}


