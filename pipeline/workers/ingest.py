"""Worker-side input: read, check and hash a split of the corpus (or a staged slice), then tokenise.

The driver only hands out split descriptors; every byte of the corpus is read here, on the
workers, in parallel. A split's counts ride along in `split_meta` to the sink, which records them
in the split's marker. A split that keeps no passage at all is finished here: its marker is
written at once, so the commit still accounts for every row it read.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa

from pipeline.corpus.rows import CorpusCounts
from pipeline.corpus.source import Corpus
from pipeline.corpus.splits import Split
from pipeline.workers.steps import StageContext, TokenizeStage, meta_column
from storage.layout import input_path
from storage.shard_marker import ShardMarker
from storage.shards import read_rows


class PrepareStage:
    """One split in, its accepted passages tokenised out (one block, one split)."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.store = ctx.store()
        self.corpus = Corpus(ctx.corpus, ctx.corpus_storage_options) if ctx.corpus is not None else None
        self.tokenize = TokenizeStage(ctx)

    def __call__(self, batch: pa.Table) -> pa.Table:
        parts = [self._one(json.loads(raw)) for raw in batch.column("split_json").to_pylist()]
        parts = [p for p in parts if p.num_rows]
        if not parts:
            return pa.table({"split": pa.array([], pa.int32())})
        if len(parts) > 1:
            raise RuntimeError("PrepareStage takes one split per batch (batch_size=1)")
        return parts[0]

    def _one(self, split: dict) -> pa.Table:
        t0 = time.perf_counter()
        if self.corpus is not None:
            read = self.corpus.read_split(Split(**split))
            table, counts, digest = read.table, read.counts, read.digest
        else:  # an update's staged slice: already checked by the driver
            inp = read_rows(self.store, input_path(self.ctx.run_dir, split["index"]))
            table = inp.add_column(0, "split", pa.array(np.full(inp.num_rows, split["index"], np.int32)))
            counts = CorpusCounts(rows_read=inp.num_rows, accepted=inp.num_rows)
            digest = ""
        meta = {"shard": split["index"], "read": counts.to_dict(), "digest": digest,
                "passages_in": counts.accepted, "read_seconds": time.perf_counter() - t0}
        if table.num_rows == 0:
            self._finish_empty(split["index"], meta)
            return table
        table = table.append_column("split_meta", meta_column(table.num_rows, meta))
        return self.tokenize(table)

    def _finish_empty(self, shard: int, meta: dict) -> None:
        ShardMarker(shard=shard, file=None, passages_in=meta["passages_in"], truncated=0, skipped_too_long=0,
                    tokens=0, padded_tokens=0, encode_seconds=0.0, raw_code_bytes=0, write_seconds=0.0,
                    finished_at=time.time(), read=meta["read"], digest=meta["digest"],
                    read_seconds=meta["read_seconds"]).write(self.store, self.ctx.run_dir)
