"""Propose a FAISS index for a corpus size, dimension and memory budget. Pure: no I/O, no faiss."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

ID_BYTES = 8  # int64 passage id per vector in IVF lists / IDMap


@dataclass
class IndexPlan:
    factory: str
    bytes_per_vector: float
    total_bytes: float
    train_vectors: int
    build_seconds_cpu: float
    build_seconds_gpu: float
    fits: bool
    arithmetic: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"proposed index: {self.factory}   ({'fits' if self.fits else 'DOES NOT FIT'} the budget)"]
        lines += ["  " + a for a in self.arithmetic]
        return "\n".join(lines)


def _pow2_near(x: float) -> int:
    return 2 ** max(4, int(round(math.log2(max(x, 16)))))


def parse_bytes(text: str) -> int:
    """'64GB' -> 64e9, '64GiB' -> 64 * 2**30, '512MB', plain integers as bytes."""
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9, "MB": 10**6,
             "KB": 10**3, "B": 1}
    s = text.strip().upper().replace(" ", "")
    for unit, mult in units.items():
        if s.endswith(unit):
            number = s[: -len(unit)]
            break
    else:
        number, mult = s, 1
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read a size from {text!r}; use e.g. 64GB or 48GiB") from None
    if value <= 0:
        raise ValueError(f"memory budget must be positive, got {text!r}")
    return int(value * mult)


def plan_index(n: int, dim: int, memory_bytes: float, cpu_flops: float = 2e11, gpu_flops: float = 2e13) -> IndexPlan:
    """The most accurate index whose memory fits: Flat, then IVF+SQ8, then IVF+PQ with fewer bytes.

    Build time is FLOP arithmetic (k-means training, list assignment, encoding), an order of
    magnitude, not a promise: it assumes `cpu_flops`/`gpu_flops` sustained.
    """
    if n < 1 or dim < 1:
        raise ValueError("vectors and dim must be positive")
    lines = [f"{n:,} vectors x {dim} dims, budget {memory_bytes / 1e9:,.1f} GB"]
    flat = 4 * dim
    lines.append(f"Flat (exact, fp32): {dim} x 4 B = {flat} B/vector -> {n * flat / 1e9:,.1f} GB")
    if n * (flat + ID_BYTES) <= memory_bytes or n <= 20_000:
        total = n * (flat + ID_BYTES)
        lines.append(f"  + {ID_BYTES} B id = {total / 1e9:,.2f} GB: fits, exact search, no training")
        search = n * dim * 2
        lines.append(f"  search cost: {search / 1e9:,.2f} GFLOP per query (brute force)")
        return IndexPlan("Flat", flat + ID_BYTES, total, 0, n * dim / cpu_flops, n * dim / gpu_flops,
                         total <= memory_bytes, lines)
    nlist = _pow2_near(4 * math.sqrt(n))
    coarse = f"IVF{nlist}_HNSW32" if nlist >= 16384 else f"IVF{nlist}"
    quantizer_bytes = nlist * dim * 4 + (nlist * 32 * 2 * 4 if nlist >= 16384 else 0)
    train = min(n, 64 * nlist)
    lines.append(f"IVF lists: nlist = 2^round(log2(4 sqrt(n))) = {nlist}; coarse quantizer {nlist} x {dim} x 4 B"
                 f"{' + HNSW32 links' if nlist >= 16384 else ''} = {quantizer_bytes / 1e6:,.0f} MB; "
                 f"train on 64 x nlist = {train:,} vectors")
    candidates = [("SQ8", dim)] + [(f"PQ{m}", m) for m in (dim // 2, dim // 4, dim // 8, dim // 16, dim // 32)
                                   if m >= 8 and dim % m == 0]
    chosen = None
    for code, code_bytes in candidates:
        per = code_bytes + ID_BYTES
        total = n * per + quantizer_bytes
        lines.append(f"{coarse},{code}: {code_bytes} B code + {ID_BYTES} B id = {per} B/vector -> "
                     f"{total / 1e9:,.2f} GB {'fits' if total <= memory_bytes else 'too big'}")
        if total <= memory_bytes:
            chosen = (code, per, total)
            break
    if chosen is None:
        code, code_bytes = candidates[-1]
        chosen = (code, code_bytes + ID_BYTES, n * (code_bytes + ID_BYTES) + quantizer_bytes)
        lines.append("nothing fits: shard the index across machines or raise the budget")
    code, per, total = chosen
    kmeans = 20 * train * nlist * dim * 2
    assign = n * nlist * dim * 2 if nlist < 16384 else n * dim * 2 * 32 * 2 * math.log2(nlist)
    flops = kmeans + assign
    lines.append(f"build: k-means 20 it x {train:,} x {nlist} x {dim} x 2 = {kmeans:.2e} FLOP; assignment "
                 f"{assign:.2e} FLOP -> ~{flops / cpu_flops / 3600:,.1f} h CPU at {cpu_flops:.0e} FLOP/s, "
                 f"~{flops / gpu_flops / 60:,.1f} min GPU at {gpu_flops:.0e} FLOP/s")
    if code.startswith("PQ"):
        lines.append("PQ recall is lower than SQ8: re-rank the top candidates with exact vectors if recall matters")
    return IndexPlan(f"{coarse},{code}", per, total, train, flops / cpu_flops, flops / gpu_flops,
                     total <= memory_bytes, lines)


def factory_bytes_per_vector(factory: str, dim: int) -> float | None:
    """Stored bytes per vector for common FAISS factory strings (codes + 8 B id); None if not modelled.

    The coarse quantizer (nlist x dim x 4 B) is excluded: it does not grow with the corpus.
    """
    parts = [p.strip() for p in factory.split(",")]
    code = parts[-1]
    graph = next((p for p in parts if p.startswith("HNSW")), None)
    if code == "Flat" or code == graph:  # "HNSW32" alone stores full fp32 vectors
        per = 4.0 * dim
    elif code == "SQ8":
        per = float(dim)
    elif code == "SQ4":
        per = dim / 2
    elif code in ("SQfp16", "SQbf16"):
        per = 2.0 * dim
    elif code.startswith("PQ") and code[2:].replace("x", "", 1).isdigit():
        m, _, nbits = code[2:].partition("x")
        per = int(m) * int(nbits or 8) / 8
    else:
        return None
    if graph is not None:
        m = int(graph[4:]) if graph[4:].isdigit() else 32
        per += 2 * m * 4  # HNSW links: 2M int32 neighbours per vector at level 0
    return per + ID_BYTES


# ---------------------------------------------------------------- worker-side build plan

MIN_TRAIN_PER_LIST = 39    # below this FAISS warns that k-means is under-fed
MAX_TRAIN_PER_LIST = 256   # above this FAISS subsamples anyway
MIN_TRAIN_CODEC = 9_984    # 39 x 256 centroids: what a PQ/SQ codebook needs
WHOLE_INDEX_MAX_VECTORS = 2_000_000  # Flat/HNSW are built whole in one worker's memory; above this: refuse


def train_size(nlist: int | None, n_vectors: int, requested: int) -> int:
    """Training vectors for a factory: the requested count clamped to 39-256 x nlist, never above the corpus."""
    if n_vectors < 1:
        return 0
    if nlist is None:
        return min(n_vectors, max(requested, MIN_TRAIN_CODEC))
    lo = max(MIN_TRAIN_PER_LIST * nlist, MIN_TRAIN_CODEC)
    return min(n_vectors, max(lo, min(requested, MAX_TRAIN_PER_LIST * nlist)))


def sample_positions(rows: list[int], n_train: int, seed: int = 0) -> list[list[int]]:
    """A uniform sample of n_train row positions over all shards, as sorted positions within each shard.

    Deterministic for (rows, n_train, seed); what the driver holds is n_train int64, not the corpus."""
    import numpy as np

    rng = np.random.default_rng(seed)
    counts = np.asarray(rows, dtype=np.int64)
    n = min(n_train, int(counts.sum()))
    # how many of the n fall in each shard (exactly as a uniform draw without replacement would), then
    # which rows: memory follows n and the largest shard, never the corpus
    if n == 0:
        per_shard = np.zeros_like(counts)
    elif counts.sum() < 10**9:  # numpy's exact method stops there
        per_shard = rng.multivariate_hypergeometric(counts, n, method="marginals")
    else:
        per_shard = np.minimum(rng.multinomial(n, counts / counts.sum()), counts)
    return [np.sort(rng.choice(int(r), size=int(c), replace=False)).tolist() if c else []
            for r, c in zip(counts, per_shard)]


def group_shards(rows: list[int], part_rows: int) -> list[list[int]]:
    """Consecutive shard indexes grouped so that a group holds at most part_rows vectors (or one shard)."""
    if part_rows < 1:
        raise ValueError("part_rows must be positive")
    groups: list[list[int]] = []
    held = part_rows
    for k, r in enumerate(rows):
        if held + r > part_rows and (not groups or groups[-1]):
            groups.append([])
            held = 0
        groups[-1].append(k)
        held += r
    return groups


def whole_index_refusal(factory: str, n_vectors: int, dim: int) -> str | None:
    """Why a non-IVF factory cannot be built at this size (it is held whole by one process), or None."""
    if n_vectors <= WHOLE_INDEX_MAX_VECTORS:
        return None
    budget = n_vectors * dim * 2.0  # half of Flat's size, so that the proposal has inverted lists
    proposal = plan_index(n_vectors, dim, budget).factory
    return (f"index factory {factory!r} has no inverted lists: it would be built and searched whole in one "
            f"process, and {n_vectors:,} vectors is over the {WHOLE_INDEX_MAX_VECTORS:,} this tool builds that "
            f"way; use an IVF factory, e.g. {proposal!r} (`precompute plan-index --vectors {n_vectors} --dim {dim} "
            f"--memory {budget / 1e9:.0f}GB`)")
