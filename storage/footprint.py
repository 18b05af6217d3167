"""Bytes actually written, split by what they hold, read from Parquet footers (no data pages read)."""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow.parquet as pq

from storage.fs import Store
from storage.manifest import Manifest

PER_PASSAGE_COLUMNS = ("id", "content_hash", "n_tokens")


@dataclass
class Footprint:
    passages: int = 0
    tokens: int = 0
    file_bytes: int = 0
    columns: dict[str, int] = field(default_factory=dict)   # compressed column-chunk bytes
    raw_codes: int = 0                                        # uncompressed code bytes (codes before zstd)
    n_tokens: list[int] = field(default_factory=list)         # per passage, for intervals

    @property
    def container(self) -> int:
        return self.file_bytes - sum(self.columns.values())

    def split(self) -> dict[str, int]:
        c = self.columns
        return {"codes": c.get("codes", 0), "scales": c.get("scales", 0), "token_ids": c.get("token_ids", 0),
                "per_passage": sum(c.get(k, 0) for k in PER_PASSAGE_COLUMNS), "container": self.container}


def measure(store: Store, manifest: Manifest) -> Footprint:
    fp = Footprint()
    for shard in manifest.shards_of("states"):
        with store.open(shard["path"]) as fh:
            pf = pq.ParquetFile(fh)
            md = pf.metadata
            for g in range(md.num_row_groups):
                rg = md.row_group(g)
                for c in range(rg.num_columns):
                    col = rg.column(c)
                    name = col.path_in_schema.split(".")[0]
                    fp.columns[name] = fp.columns.get(name, 0) + col.total_compressed_size
            fp.n_tokens += pf.read(columns=["n_tokens"]).column("n_tokens").to_pylist()
        fp.file_bytes += shard["bytes"]
        fp.passages += shard["rows"]
    fp.tokens = int(sum(fp.n_tokens))
    fp.raw_codes = int(manifest.counts.get("raw_code_bytes", 0))
    return fp


@dataclass
class Validation:
    measured: dict[str, float]          # bytes per token by component
    estimated: dict[str, float]         # bytes per token by component
    measured_per_token: float
    estimated_per_token: float
    relative_error: float
    tolerance: float
    tokens_per_passage: float
    zstd_ratio: float
    target_passages: int
    target_bytes: float
    target_interval: tuple[float, float]
    target_bytes_at_150: float

    @property
    def ok(self) -> bool:
        return abs(self.relative_error) <= self.tolerance


def validate(fp: Footprint, layout_fields: dict, target_passages: int, tolerance: float = 0.02) -> Validation:
    """Compare bytes written with the model fed the measured token count and zstd ratio.

    `layout_fields`: what the store's codec stores per token, in the model's names (dims = values per
    token, bits, scale_bytes): the caller asks the codec (`CodeLayout.estimate_fields`)."""
    import numpy as np

    from storage.estimate import Assumptions, estimate

    if fp.passages == 0 or fp.tokens == 0:
        raise ValueError("the store holds no passages to measure")
    split = fp.split()
    zstd_ratio = fp.raw_codes / split["codes"] if fp.raw_codes and split["codes"] else 1.0
    tpp = fp.tokens / fp.passages
    a = Assumptions(passages=fp.passages, tokens_per_passage=tpp, hidden=int(layout_fields["dims"]),
                    zstd_ratio=zstd_ratio, dpr_dim=0, **layout_fields)
    est = estimate(a)
    measured = {k: v / fp.tokens for k, v in split.items()}
    estimated = {k: v / fp.tokens for k, v in est.components.items()}
    m_tok, e_tok = fp.file_bytes / fp.tokens, est.per_token()
    # Extrapolation: bytes per passage is (per-token rate x n_tokens + per-passage bytes); the CLT gives
    # the interval for N passages drawn from the sample's length distribution.
    per_pass_fixed = split["per_passage"] / fp.passages
    per_tok_rate = (fp.file_bytes - split["per_passage"]) / fp.tokens
    b = per_tok_rate * np.asarray(fp.n_tokens, dtype=np.float64) + per_pass_fixed
    total = target_passages * b.mean()
    half = 1.96 * np.sqrt(target_passages) * b.std(ddof=1) if b.size > 1 else 0.0
    return Validation(measured=measured, estimated=estimated, measured_per_token=m_tok, estimated_per_token=e_tok,
                      relative_error=(m_tok - e_tok) / e_tok, tolerance=tolerance, tokens_per_passage=tpp,
                      zstd_ratio=zstd_ratio, target_passages=target_passages, target_bytes=total,
                      target_interval=(total - half, total + half),
                      target_bytes_at_150=target_passages * (per_tok_rate * 150 + per_pass_fixed))
