"""Bytes actually written, split by what they hold, read from Parquet footers (no data pages read)."""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow.parquet as pq

from storage.fs import Store
from storage.manifest import Manifest, sizes

PER_PASSAGE_COLUMNS = ("id", "content_hash", "n_tokens")


@dataclass
class Footprint:
    passages: int = 0       # rows in the states shards, tombstoned ones included (their bytes are still there)
    tokens: int = 0
    file_bytes: int = 0
    columns: dict[str, int] = field(default_factory=dict)   # compressed column-chunk bytes
    raw_codes: int = 0                                        # uncompressed code bytes (codes before zstd)
    n_tokens: list[int] = field(default_factory=list)         # per passage, for intervals
    tombstoned: int = 0     # states rows this version no longer counts (an update's superseded rows)
    dpr_rows: int = 0
    dpr_bytes: int = 0
    index: dict = field(default_factory=dict)                 # the dpr_index entry: factory, dim, ntotal
    index_bytes: int = 0
    other_bytes: int = 0    # the codec file, tombstones, shard tables: what does not grow with passages

    @property
    def live(self) -> int:
        return self.passages - self.tombstoned

    @property
    def container(self) -> int:
        return self.file_bytes - sum(self.columns.values())

    def split(self) -> dict[str, int]:
        c = self.columns
        return {"codes": c.get("codes", 0), "scales": c.get("scales", 0), "token_ids": c.get("token_ids", 0),
                "per_passage": sum(c.get(k, 0) for k in PER_PASSAGE_COLUMNS), "container": self.container}


def measure(store: Store, manifest: Manifest) -> Footprint:
    from storage import tombstones

    fp = Footprint()
    dead = tombstones.of_version(store, manifest)
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
        fp.tombstoned += len(dead.get(shard["path"], ()))
    fp.tokens = int(sum(fp.n_tokens))
    fp.raw_codes = int(manifest.counts.get("raw_code_bytes", 0))
    dpr = manifest.shards_of("dpr")
    fp.dpr_rows, fp.dpr_bytes = sum(s["rows"] for s in dpr), sum(s["bytes"] for s in dpr)
    size = sizes(manifest)
    fp.index = {k: v for k, v in manifest.artifacts.get("dpr_index", {}).items() if k in ("factory", "dim", "ntotal")}
    fp.index_bytes, fp.other_bytes = size.index, size.other
    return fp


def extrapolate(fp: Footprint, states_bytes: float, target_passages: int) -> dict[str, float]:
    """Every component at `target_passages` like these: the states (the caller's per-passage extrapolation),
    the DPR shards per stored row, the index by its factory's model (per vector where it is not modelled),
    and the codec file and other small files as they are (they do not grow with the corpus)."""
    from storage.estimate import index_bytes

    out = {"states": float(states_bytes)}
    if fp.dpr_rows:
        out["dpr_embeddings"] = fp.dpr_bytes / fp.dpr_rows * target_passages
    if fp.index_bytes:
        try:
            out["dpr_index"] = index_bytes(fp.index["factory"], target_passages, int(fp.index["dim"]))
        except (KeyError, TypeError, ValueError):
            out["dpr_index"] = fp.index_bytes / max(int(fp.index.get("ntotal") or fp.dpr_rows or 1), 1) * target_passages
    out["other"] = float(fp.other_bytes)
    return out


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
    target_components: dict[str, float] = field(default_factory=dict)  # every component at target_passages

    @property
    def target_total(self) -> float:
        return sum(self.target_components.values())

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
                      target_bytes_at_150=target_passages * (per_tok_rate * 150 + per_pass_fixed),
                      target_components=extrapolate(fp, total, target_passages))
