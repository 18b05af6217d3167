"""Storage cost model: pure functions, no I/O. Every assumption is a named field and is printed."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

GB, GiB, TB, TiB = 1e9, 2**30, 1e12, 2**40

# $/GB-month list prices, us-east / us multi-region, checked 2026 (assumptions: change with --price).
PRICE_TIERS = {
    "s3-standard": 0.023,
    "s3-standard-ia": 0.0125,
    "s3-glacier-instant": 0.004,
    "gcs-standard": 0.020,
    "gcs-nearline": 0.010,
    "azure-hot": 0.0184,
}


# What `estimate` assumes when nothing was measured: the figures of a real store at the paper's geometry
# (all-mpnet-base-v2, 768 wide, lower 5 of 12 layers, PCA-192, the bundled sample; BENCHMARKS.md, "Paper
# geometry, real weights"). zstd ratio on linear codes by bit width, from `precompute report` on that model
# (reports/paper_geometry/table4: 8 bits 1.147, also what `validate` measured on the whole store).
MEASURED_ZSTD_RATIO = {16: 1.075, 8: 1.147, 5.25: 1.918}
TOKEN_ID_BYTES = 2.31      # uint16 ids + list offsets, as Parquet stores them (validate: 2.311)
PER_PASSAGE_BYTES = 22.0   # id, hash, n_tokens, offsets (validate: 0.185 B/token x 120.6 tokens/passage)
# zstd on the float16 scales: 2 B raw, 1.666 B stored at the paper geometry, 1.642 on the sample store (MiniLM)
MEASURED_SCALE_ZSTD_RATIO = 1.20
# Parquet footers of a states shard (column-chunk metadata of each 128-row row group), per passage: 6.81 B at
# the paper geometry (validate: 0.0565 B/token x 120.6), 6.72 on the sample store. It follows the rows, not
# the bytes: the 0.5% of the data bytes assumed before overstated it ~10x.
CONTAINER_PER_PASSAGE = 6.8

# DPR shards: float16 embeddings as Parquet writes them (dictionary pages + indices, list levels), bytes per
# value beyond the 2 B of float16, by embedding width; measured on the sample's DPR shards (MiniLM 384:
# 874.4 B/row; MPNet 768: 1,603 B/row, BENCHMARKS.md "Paper geometry"). Wider rows amortise better.
MEASURED_DPR_OVERHEAD = {384: 0.277, 768: 0.077}
DPR_PER_PASSAGE_BYTES = 8.1    # id and title columns + footers of a DPR shard, per row (sample: 4.5 + 3.7)

# Bookkeeping a run writes beside the data (sample store: 3.4 KB manifest, 2.3 KB shard table for 6 shards,
# ~930 B per shard marker, 262 B index marker).
MANIFEST_BYTES = 3_500.0       # one version's JSON (config, counts, artifacts)
SHARD_TABLE_BYTES = 1_500.0    # the version's shard-table segment: Parquet footer
SHARD_TABLE_ROW_BYTES = 130.0  # per shard (states and DPR each) in that segment
MARKER_BYTES = 950.0           # a finished shard's marker (JSON)
INDEX_MARKER_BYTES = 300.0
SAFETENSORS_HEADER = 1_024.0   # tensor table and codec metadata of a codec artifact, besides the fit ids

# FAISS (index_bytes): what faiss.write_index stores, checked against real files of each layout.
FAISS_ID_BYTES = 8             # int64 id per vector: IVF lists, or the IDMap2 around a flat/HNSW index
FAISS_HEADER_BYTES = 128
IVF_LIST_BYTES = 24            # per inverted list: size, capacity, offset (on-disk lists)
HNSW_FIXED_BYTES = 12          # per vector: level (int32) + neighbour offset (int64)


def default_zstd_ratio(bits: float, bitpacked: bool = False, compressible: bool = True) -> float:
    """The measured ratio at the nearest measured width with no fewer bits (fewer bits compress better,
    so this never flatters); 1.0 for codes zstd cannot shrink (bit-packed, PQ indices)."""
    if bitpacked or not compressible:
        return 1.0
    widths = sorted(w for w in MEASURED_ZSTD_RATIO if w >= bits)
    return MEASURED_ZSTD_RATIO[widths[0]] if widths else 1.0


def codec_assumptions(layout_fields: dict[str, float], compressible: bool, scale_bytes: float, bitpacked: bool,
                      zstd_ratio: float | None) -> dict[str, float]:
    """A planned codec layout as `Assumptions` fields: the scale bytes asked for where the layout has scales,
    and, unless measured or given, the zstd ratio a real store measured at that width."""
    fields = dict(layout_fields)
    if compressible and fields.get("scale_bytes"):
        fields["scale_bytes"] = scale_bytes
    if zstd_ratio is None:
        zstd_ratio = default_zstd_ratio(fields["bits"], bitpacked, compressible=compressible)
    return {**fields, "zstd_ratio": zstd_ratio}


def default_dpr_overhead(dpr_dim: int, bytes_per_value: float = 2.0) -> float:
    """Parquet's bytes per float16 embedding value beyond the 2 B, at the nearest measured width no wider
    (narrower rows carry more overhead per value, so this never flatters); 0 for widths not float16."""
    if bytes_per_value != 2.0 or dpr_dim <= 0:
        return 0.0
    widths = sorted(w for w in MEASURED_DPR_OVERHEAD if w <= dpr_dim)
    return MEASURED_DPR_OVERHEAD[widths[-1] if widths else min(MEASURED_DPR_OVERHEAD)]


def index_bytes(factory: str, n: int, dim: int) -> float:
    """Bytes of a FAISS index file (with its on-disk lists) for `n` vectors of `dim`, from the factory string.

    Pure, so `estimate` prices the index a run would build: per vector the code and an 8 B id (HNSW adds
    2M int32 level-0 links, ~M/(M-1) upper-level links and 12 B of level/offset), plus what does not grow
    with n (coarse centroids, PQ codebooks, OPQ/PCA matrices). Unknown layouts raise ValueError."""
    if n < 0 or dim < 1:
        raise ValueError("index_bytes: n must be non-negative and dim positive")
    d, fixed, per = dim, float(FAISS_HEADER_BYTES), 0.0
    parts = [p.strip() for p in factory.split(",") if p.strip()]
    if not parts:
        raise ValueError("empty index factory")
    ivf = False
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        if part in ("IDMap", "IDMap2", "L2norm"):
            continue
        if part.startswith("OPQ") or part.startswith("RR") or part.startswith("PCA"):
            name = part[:3] if part[:3] in ("OPQ", "PCA") else "RR"
            body = part[len(name):].lstrip("WR") if name == "PCA" else part[len(name):]
            if name == "OPQ":
                m, _, out_s = body.partition("_")
                _int(m, part)
                out = _int(out_s, part) if out_s else d
            else:
                out = _int(body, part)
            fixed += out * d * 4 + (d * d * 4 + 2 * d * 4 if name == "PCA" else 0)  # PCA keeps its eigenbasis
            d = out
            continue
        if part.startswith("IVF"):
            nlist_s, _, graph = part[3:].partition("_")
            nlist = _int(nlist_s, part)
            fixed += nlist * d * 4 + nlist * IVF_LIST_BYTES
            if graph:
                m = _int(graph[4:], part) if graph.startswith("HNSW") else None
                if m is None:
                    raise ValueError(f"index factory {factory!r}: coarse quantizer {graph!r} is not modelled")
                fixed += nlist * _hnsw_links(m)
            ivf = True
            continue
        if part.startswith("HNSW"):
            m = _int(part[4:] or "32", part)
            per += _hnsw_links(m)
            if last:  # "HNSW32" alone stores the full vectors
                per += 4 * d
            continue
        code, codebook = _code_bytes(part, d)
        if code is None or not last:
            raise ValueError(f"index factory {factory!r}: {part!r} is not modelled; pass --index-bytes-per-vector")
        per += code
        fixed += codebook
    if ivf and parts[-1].startswith("IVF"):
        raise ValueError(f"index factory {factory!r}: an IVF factory needs a code (Flat, SQ8, PQm)")
    return fixed + n * (per + FAISS_ID_BYTES)


def _int(text, part: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"index factory part {part!r} is not modelled") from None
    if value < 1:
        raise ValueError(f"index factory part {part!r}: sizes must be positive")
    return value


def _hnsw_links(m: int) -> float:
    """Per vector: 2M int32 neighbours at level 0, M per upper level (a vector reaches level l with
    probability M^-l), level and offset."""
    return 2 * m * 4 + 4 * m / (m - 1 if m > 1 else 1) + HNSW_FIXED_BYTES


def _code_bytes(part: str, d: int) -> tuple[float | None, float]:
    """(code bytes per vector, trained bytes) of a FAISS code, or (None, 0) if not modelled."""
    if part == "Flat":
        return 4.0 * d, 0.0
    if part in ("SQfp16", "SQbf16"):
        return 2.0 * d, 0.0
    if part.startswith("SQ") and part[2:].isdigit():
        bits = int(part[2:])
        return float(-(-d * bits // 8)), 2 * d * 4.0  # per-dimension min and range
    if part.startswith("PQ"):
        m_s, _, nbits_s = part[2:].partition("x")
        if m_s.isdigit() and (not nbits_s or nbits_s.isdigit()):
            m, nbits = int(m_s), int(nbits_s or 8)
            return float(-(-m * nbits // 8)), 2 ** nbits * d * 4.0  # codebook: 2^nbits centroids per sub-space
    return None, 0.0


def codec_artifact_bytes(codec: str, hidden: int, dims: int, projected: bool = True, opq: bool = False,
                         fit_sample: int = 512, id_digits: int = 8) -> float:
    """The codec file a run stores (safetensors, float32): the linear codec's PCA keeps compress and
    decompress weights plus the PCA view (axes again, mean, variance); PQ its codebooks (256 x dims),
    an OPQ rotation and, when projected, the projection. The fit ids are in its metadata."""
    header = SAFETENSORS_HEADER + fit_sample * (id_digits + 2)
    if codec == "linear":
        return 4.0 * (3 * hidden * dims + 2 * dims + 2 * hidden) + header
    if codec == "pq":
        tensors = 256 * dims + (dims * dims if opq else 0)
        if projected:
            tensors += 2 * hidden * dims + hidden + dims
        return 4.0 * tensors + header
    raise ValueError(f"codec {codec!r} has no artifact size model")


@dataclass(frozen=True)
class Assumptions:
    passages: int = 32_000_000
    tokens_per_passage: float = 150.0
    hidden: int = 768
    dims: int = 192
    bits: float = 8                  # 16 = unquantised float16 codes
    bitpacked: bool = False          # False: k-bit codes in int8 containers (zstd removes most slack)
    zstd_ratio: float = 1.0          # raw code bytes / stored code bytes, measured or assumed
    scale_bytes: float = 2.0         # per token, float16 absmax scale (0 when unquantised)
    scale_zstd_ratio: float = MEASURED_SCALE_ZSTD_RATIO  # raw / stored scale bytes
    token_id_bytes: float = TOKEN_ID_BYTES   # per token, uint16 ids and their list offsets
    per_passage_bytes: float = PER_PASSAGE_BYTES
    container_per_passage: float = CONTAINER_PER_PASSAGE  # states shards' Parquet footers, per passage
    container_overhead: float = 0.0  # any further container bytes, as a fraction of the states' data bytes
    dpr_dim: int = 768
    dpr_bytes_per_value: float = 2.0  # float16 embeddings
    dpr_overhead_per_value: float | None = None  # None: the measured one at this width (MEASURED_DPR_OVERHEAD)
    dpr_per_passage_bytes: float = DPR_PER_PASSAGE_BYTES
    index_factory: str = ""          # FAISS factory over the DPR embeddings ("" = no index)
    index_bytes_per_vector: float = 0.0  # set: overrides the factory's model (bytes per vector, all in)
    artifact_bytes: float = 0.0      # the codec file (codec_artifact_bytes)
    shards: int = 0                  # states shards (and as many DPR shards): their markers and the manifest

    def __post_init__(self):
        if self.passages < 0 or self.tokens_per_passage < 0:
            raise ValueError("passages and tokens_per_passage must be non-negative")
        if not (2 <= self.bits <= 8 or self.bits == 16):
            raise ValueError("bits must be 2..8, or 16 for unquantised float16")
        if self.zstd_ratio <= 0 or self.scale_zstd_ratio <= 0:
            raise ValueError("zstd_ratio and scale_zstd_ratio must be positive")
        if self.dims < 1 or self.hidden < 1:
            raise ValueError("dims and hidden must be positive")
        if self.dpr_dim < 0 or self.index_bytes_per_vector < 0 or self.artifact_bytes < 0 or self.shards < 0:
            raise ValueError("dpr_dim, index_bytes_per_vector, artifact_bytes and shards must be non-negative")
        if self.dpr_overhead_per_value is None:
            object.__setattr__(self, "dpr_overhead_per_value",
                               default_dpr_overhead(self.dpr_dim, self.dpr_bytes_per_value))

    @property
    def code_bytes_per_value(self) -> float:
        if self.bits == 16:
            return 2.0
        return (self.bits / 8 if self.bitpacked else 1.0)

    @property
    def tokens(self) -> float:
        return self.passages * self.tokens_per_passage


# What the states shards hold, as `validate` measures them; everything else a run writes is beside them.
STATES_COMPONENTS = ("codes", "scales", "token_ids", "per_passage", "container")


@dataclass
class Estimate:
    assumptions: Assumptions
    components: dict[str, float] = field(default_factory=dict)  # bytes
    notes: list[str] = field(default_factory=list)  # caveats the caller adds (e.g. an index the run would refuse)

    @property
    def total(self) -> float:
        return sum(self.components.values())

    @property
    def states_total(self) -> float:
        return sum(v for k, v in self.components.items() if k in STATES_COMPONENTS)

    def per_token(self) -> float:
        return self.states_total / max(self.assumptions.tokens, 1)

    def to_dict(self) -> dict:
        return {"assumptions": asdict(self.assumptions), "components_bytes": self.components,
                "states_bytes": self.states_total, "total_bytes": self.total,
                "states_bytes_per_token": self.per_token(), "notes": self.notes}


def estimate(a: Assumptions) -> Estimate:
    """Every file a run writes: the states shards by column, the DPR shards, the FAISS index, the codec
    file, and the manifest and shard markers (those last three only where the assumptions name them)."""
    tokens = a.tokens
    codes = tokens * a.dims * a.code_bytes_per_value / a.zstd_ratio
    scales = tokens * (a.scale_bytes / a.scale_zstd_ratio if a.bits != 16 else 0.0)
    ids = tokens * a.token_id_bytes
    per_passage = a.passages * a.per_passage_bytes
    data = codes + scales + ids + per_passage
    comps = {"codes": codes, "scales": scales, "token_ids": ids, "per_passage": per_passage,
             "container": a.passages * a.container_per_passage + data * a.container_overhead}
    if a.dpr_dim:
        comps["dpr_embeddings"] = a.passages * (a.dpr_dim * (a.dpr_bytes_per_value + a.dpr_overhead_per_value)
                                                + a.dpr_per_passage_bytes)
        if a.index_bytes_per_vector:
            comps["dpr_index"] = a.passages * a.index_bytes_per_vector
        elif a.index_factory:
            comps["dpr_index"] = index_bytes(a.index_factory, a.passages, a.dpr_dim)
    if a.artifact_bytes:
        comps["compressor"] = a.artifact_bytes
    if a.shards:
        per_shard = MARKER_BYTES + SHARD_TABLE_ROW_BYTES * (2 if a.dpr_dim else 1)
        comps["manifests"] = (MANIFEST_BYTES + SHARD_TABLE_BYTES + a.shards * per_shard
                              + (INDEX_MARKER_BYTES if "dpr_index" in comps else 0.0))
    return Estimate(a, comps)


def bare_codes(passages: int, tokens_per_passage: float, dims: int, bytes_per_value: float) -> float:
    """Codes alone, no scales, ids or containers: the only quantity the paper's figures count."""
    return passages * tokens_per_passage * dims * bytes_per_value


# ---------------------------------------------------------------- the paper's figures

PAPER_PASSAGES, PAPER_TOKENS_PER_PASSAGE = 32_000_000, 150


@dataclass(frozen=True)
class PaperCheck:
    label: str
    dims: int
    bytes_per_value: float
    bytes: float
    paper_says: str     # the paper's figure this row is held against ("" = none)
    verdict: str        # computed from `bytes`: which unit, if any, reproduces the paper's figure

    @property
    def line(self) -> str:
        said = f"paper: {self.paper_says}  {self.verdict}" if self.paper_says else ""
        return (f"{self.label:<28} {self.bytes / TB:8.2f} TB  {self.bytes / TiB:7.2f} TiB  "
                f"{self.bytes / GiB:9.1f} GiB   {said}").rstrip()


def paper_verdict(nbytes: float, figure: str, unit: str) -> str:
    """Which unit reproduces the paper's rounded figure (`figure` as printed, in `unit`), if any: computed
    from the bytes, never a fixed claim."""
    decimal, binary = {"TB": (TB, TiB), "GB": (GB, GiB)}[unit]
    places = len(figure.partition(".")[2])
    figure = float(figure)
    if round(nbytes / decimal, places) == figure:
        return f"<- matches in {unit} ({nbytes / decimal:.{places + 1}f})"
    if round(nbytes / binary, places) == figure:
        return f"<- matches in {unit[0]}iB ({nbytes / binary:.{places + 1}f}), not {unit} ({nbytes / decimal:.{places + 1}f})"
    return f"<- does not match ({nbytes / decimal:.{places + 1}f} {unit}, {nbytes / binary:.{places + 1}f} {unit[0]}iB)"


def paper_figures(passages: int = PAPER_PASSAGES, tokens_per_passage: float = PAPER_TOKENS_PER_PASSAGE
                  ) -> list[PaperCheck]:
    """Bare codes at the paper's geometries, held against its 3.4 TB ('16-bit', 768 dims) and 858 GB
    (192 dims): only meaningful at the paper's 32M passages x 150 tokens (see `at_paper_settings`)."""
    rows = [("768 dims x 2 B (fp16)", 768, 2.0, ("3.4", "TB")), ("768 dims x 1 B", 768, 1.0, ("3.4", "TB")),
            ("192 dims x 2 B (fp16)", 192, 2.0, None), ("192 dims x 1 B (int8)", 192, 1.0, ("858", "GB"))]
    out = []
    for label, d, b, said in rows:
        nbytes = bare_codes(passages, tokens_per_passage, d, b)
        out.append(PaperCheck(label, d, b, nbytes, " ".join(said) if said else "",
                              paper_verdict(nbytes, *said) if said else ""))
    return out


def at_paper_settings(a: Assumptions) -> bool:
    """The paper's figures are for 32M passages x 150 tokens: any other corpus is not the same quantity."""
    return a.passages == PAPER_PASSAGES and a.tokens_per_passage == PAPER_TOKENS_PER_PASSAGE


# ---------------------------------------------------------------- rendering

def monthly_cost(nbytes: float, price_per_gb_month: float) -> float:
    return nbytes / GB * price_per_gb_month


_DECIMAL = (("TB", TB), ("GB", GB), ("MB", 1e6), ("KB", 1e3))
_BINARY = (("TiB", TiB), ("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10))


def fmt_size(n: float, binary: bool = False) -> str:
    """Bytes in the largest unit they reach (B, KB, MB, GB, TB; KiB... with `binary`), two decimals:
    a small corpus reads "449.80 KB", not "0.0 GB". The one size renderer of estimate, validate, gc,
    the run summary and the job plans."""
    for unit, size in (_BINARY if binary else _DECIMAL):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def fmt_usd(x: float) -> str:
    """Dollars with the precision the amount needs: "$1,234", "$12.34", "$0.0007", "< $0.0001"."""
    if x == 0:
        return "$0"
    if abs(x) >= 100:
        return f"${x:,.0f}"
    if abs(x) >= 0.01:
        return f"${x:,.2f}"
    if abs(x) < 1e-4:
        return "< $0.0001"
    return f"${x:.2g}" if x >= 0.001 else f"${x:.1g}"


def fmt_bytes(n: float) -> str:
    return f"{fmt_size(n)} ({fmt_size(n, binary=True)})"


def render(e: Estimate, prices: dict[str, float]) -> str:
    a = e.assumptions
    dpr = (f"; DPR {a.dpr_dim} x {a.dpr_bytes_per_value:g} B + {a.dpr_overhead_per_value:g} B/value Parquet + "
           f"{a.dpr_per_passage_bytes:g} B/passage" if a.dpr_dim else "; no DPR embeddings")
    index = (f"; index {a.index_bytes_per_vector:g} B/vector" if a.dpr_dim and a.index_bytes_per_vector else
             f"; index {a.index_factory}" if a.dpr_dim and a.index_factory else "")
    lines = [f"Assumptions: {a.passages:,} passages x {a.tokens_per_passage:g} tokens = {a.tokens:,.0f} tokens; "
             f"hidden {a.hidden} -> {a.dims} dims; {a.bits if a.bits != 16 else 'fp16'} bits"
             f"{' bit-packed' if a.bitpacked and a.bits != 16 else (' in int8 containers' if a.bits != 16 else '')}; "
             f"zstd ratio on codes {a.zstd_ratio:g}; scale {a.scale_bytes:g} B/token (zstd ratio "
             f"{a.scale_zstd_ratio:g}); token id {a.token_id_bytes:g} B/token; {a.per_passage_bytes:g} B/passage; "
             f"container {a.container_per_passage:g} B/passage"
             f"{f' + {a.container_overhead:.1%}' if a.container_overhead else ''}{dpr}{index}"
             + (f"; {a.shards:,} shards" if a.shards else ""),
             "", f"{'component':<16} {'size':>12} {'binary':>12} {'B/token':>9}"]
    for k, v in e.components.items():
        lines.append(f"{k:<16} {fmt_size(v):>12} {fmt_size(v, True):>12} {v / max(a.tokens, 1):9.2f}")
    lines.append(f"{'states total':<16} {fmt_size(e.states_total):>12} {fmt_size(e.states_total, True):>12} "
                 f"{e.per_token():9.2f}")
    lines.append(f"{'total':<16} {fmt_size(e.total):>12} {fmt_size(e.total, True):>12}")
    lines += [f"note: {n}" for n in e.notes]
    lines += ["", "Monthly storage cost of the total (list prices, assumptions):"]
    for tier, price in prices.items():
        lines.append(f"  {tier:<20} ${price:.4f}/GB-month  ->  {fmt_usd(monthly_cost(e.total, price))}/month")
    if at_paper_settings(a):
        lines += ["", f"The paper's figures, bare codes only, {a.passages:,} x {a.tokens_per_passage:g} tokens:"]
        lines += ["  " + c.line for c in paper_figures(a.passages, a.tokens_per_passage)]
        lines.append("  The paper calls its 3.4 TB '16-bit', but both figures fit 1 byte per value in binary units "
                     "(TiB/GiB); at fp16 they would be 2x larger.")
    return "\n".join(lines)
