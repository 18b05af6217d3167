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
    token_id_bytes: float = TOKEN_ID_BYTES   # per token, uint16 ids and their list offsets
    per_passage_bytes: float = PER_PASSAGE_BYTES
    container_overhead: float = 0.005  # Parquet pages, footers, manifest: fraction of data bytes
    dpr_dim: int = 768
    dpr_bytes_per_value: float = 2.0  # float16 embeddings
    index_bytes_per_vector: float = 0.0  # from plan-index (e.g. Flat fp32: 4 * dim)

    def __post_init__(self):
        if self.passages < 0 or self.tokens_per_passage < 0:
            raise ValueError("passages and tokens_per_passage must be non-negative")
        if not (2 <= self.bits <= 8 or self.bits == 16):
            raise ValueError("bits must be 2..8, or 16 for unquantised float16")
        if self.zstd_ratio <= 0:
            raise ValueError("zstd_ratio must be positive")
        if self.dims < 1 or self.hidden < 1:
            raise ValueError("dims and hidden must be positive")

    @property
    def code_bytes_per_value(self) -> float:
        if self.bits == 16:
            return 2.0
        return (self.bits / 8 if self.bitpacked else 1.0)

    @property
    def tokens(self) -> float:
        return self.passages * self.tokens_per_passage


@dataclass
class Estimate:
    assumptions: Assumptions
    components: dict[str, float] = field(default_factory=dict)  # bytes

    @property
    def total(self) -> float:
        return sum(self.components.values())

    @property
    def states_total(self) -> float:
        return sum(v for k, v in self.components.items() if not k.startswith("dpr"))

    def per_token(self) -> float:
        return self.states_total / max(self.assumptions.tokens, 1)

    def to_dict(self) -> dict:
        return {"assumptions": asdict(self.assumptions), "components_bytes": self.components,
                "states_bytes": self.states_total, "total_bytes": self.total,
                "states_bytes_per_token": self.per_token()}


def estimate(a: Assumptions) -> Estimate:
    tokens = a.tokens
    codes = tokens * a.dims * a.code_bytes_per_value / a.zstd_ratio
    scales = tokens * (a.scale_bytes if a.bits != 16 else 0.0)
    ids = tokens * a.token_id_bytes
    per_passage = a.passages * a.per_passage_bytes
    data = codes + scales + ids + per_passage
    comps = {"codes": codes, "scales": scales, "token_ids": ids, "per_passage": per_passage,
             "container": data * a.container_overhead}
    if a.dpr_dim:
        comps["dpr_embeddings"] = a.passages * a.dpr_dim * a.dpr_bytes_per_value
    if a.index_bytes_per_vector:
        comps["dpr_index"] = a.passages * a.index_bytes_per_vector
    return Estimate(a, comps)


def bare_codes(passages: int, tokens_per_passage: float, dims: int, bytes_per_value: float) -> float:
    """Codes alone, no scales, ids or containers: the only quantity the paper's figures count."""
    return passages * tokens_per_passage * dims * bytes_per_value


@dataclass(frozen=True)
class PaperCheck:
    label: str
    dims: int
    bytes_per_value: float
    bytes: float
    paper_says: str

    @property
    def line(self) -> str:
        return (f"{self.label:<28} {self.bytes / TB:8.2f} TB  {self.bytes / TiB:7.2f} TiB  "
                f"{self.bytes / GiB:9.1f} GiB   paper: {self.paper_says}")


def paper_figures(passages: int = 32_000_000, tokens_per_passage: float = 150) -> list[PaperCheck]:
    """The paper's 3.4 TB and 858 GB only come out at 1 byte per value in binary units."""
    rows = [("768 dims x 2 B (fp16)", 768, 2.0, "'3.4 TB, 16-bit' would be this: 2x off"),
            ("768 dims x 1 B", 768, 1.0, "3.4 TB  <- matches in TiB (3.35)"),
            ("192 dims x 2 B (fp16)", 192, 2.0, "-"),
            ("192 dims x 1 B (int8)", 192, 1.0, "858 GB  <- matches in GiB (858.3)")]
    return [PaperCheck(l, d, b, bare_codes(passages, tokens_per_passage, d, b), p) for l, d, b, p in rows]


def monthly_cost(nbytes: float, price_per_gb_month: float) -> float:
    return nbytes / GB * price_per_gb_month


def fmt_bytes(n: float) -> str:
    return f"{n / GB:,.1f} GB ({n / GiB:,.1f} GiB)"


def render(e: Estimate, prices: dict[str, float]) -> str:
    a = e.assumptions
    lines = [f"Assumptions: {a.passages:,} passages x {a.tokens_per_passage:g} tokens = {a.tokens:,.0f} tokens; "
             f"hidden {a.hidden} -> {a.dims} dims; {a.bits if a.bits != 16 else 'fp16'} bits"
             f"{' bit-packed' if a.bitpacked and a.bits != 16 else (' in int8 containers' if a.bits != 16 else '')}; "
             f"zstd ratio on codes {a.zstd_ratio:g}; scale {a.scale_bytes:g} B/token; token id {a.token_id_bytes:g} "
             f"B/token; {a.per_passage_bytes:g} B/passage; container overhead {a.container_overhead:.1%}",
             "", f"{'component':<16} {'GB':>12} {'GiB':>12} {'B/token':>9}"]
    for k, v in e.components.items():
        lines.append(f"{k:<16} {v / GB:12,.1f} {v / GiB:12,.1f} {v / max(a.tokens, 1):9.2f}")
    lines.append(f"{'states total':<16} {e.states_total / GB:12,.1f} {e.states_total / GiB:12,.1f} {e.per_token():9.2f}")
    lines.append(f"{'total':<16} {e.total / GB:12,.1f} {e.total / GiB:12,.1f}")
    lines += ["", "Monthly storage cost of the total (list prices, assumptions):"]
    for tier, price in prices.items():
        lines.append(f"  {tier:<20} ${price:.4f}/GB-month  ->  ${monthly_cost(e.total, price):,.0f}/month")
    lines += ["", f"The paper's figures, bare codes only, {a.passages:,} x {a.tokens_per_passage:g} tokens:"]
    lines += ["  " + c.line for c in paper_figures(a.passages, a.tokens_per_passage)]
    lines.append("  The paper calls its 3.4 TB '16-bit', but both figures fit 1 byte per value in binary units "
                 "(TiB/GiB); at fp16 they would be 2x larger.")
    return "\n".join(lines)
