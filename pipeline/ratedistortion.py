"""Rate-distortion: stored bytes per token against the fidelity the reader feels.

Fidelity is the final-layer token cosine when the upper layers run on decompressed states instead
of the original ones. PCA axes are nested, so one full-width fit serves every `dims`.
"""
from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
import zstandard

from pipeline.compress import PcaAccumulator
from pipeline.config import ModelConfig
from pipeline.encoder import LayeredEncoder, pad_batch, token_budget_batches
from pipeline.quantize import bitpack, dequantize, quantize
from pipeline.tokenize import PairTokenizer

log = logging.getLogger(__name__)


@dataclass
class RDPoint:
    dims: int
    bits: float              # 16 = float16 (unquantised storage); fractional = 2*qmax+1 levels
    storage: str             # "int8+zstd", "bitpacked", "fp16+zstd"
    code_bytes_per_token: float
    scale_bytes_per_token: float
    token_cosine: float
    delta_vs_unquantised: float = 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.code_bytes_per_token + self.scale_bytes_per_token

    @property
    def bytes_per_value(self) -> float:
        return self.bytes_per_token / self.dims

    def to_dict(self) -> dict:
        return {**asdict(self), "bytes_per_token": self.bytes_per_token, "bytes_per_value": self.bytes_per_value}


def _encode_passages(enc: LayeredEncoder, tok: PairTokenizer, titles, texts, budget: int):
    t = tok(titles, texts)
    ids = [t.input_ids[i] for i in np.flatnonzero(t.keep)]
    types = [t.token_type_ids[i] for i in np.flatnonzero(t.keep)]
    lengths = np.array([len(s) for s in ids])
    out = []
    for batch in token_budget_batches(lengths, budget):
        i, tt, am = pad_batch([ids[k] for k in batch], [types[k] for k in batch], 0, enc.device)
        out.append((enc.embed_and_lower(i, tt, am).float(), am))
    return out


def sweep(model: ModelConfig, fit: tuple[list[str], list[str]], evaluate: tuple[list[str], list[str]],
          dims_list: list[int], bits_list: list[int], max_length: int, device: torch.device,
          zstd_level: int = 3, token_budget: int = 8192) -> list[RDPoint]:
    tok = PairTokenizer(model, max_length)
    enc = LayeredEncoder(model, device, keep_upper=True)
    acc = PcaAccumulator(enc.hidden)
    for h, am in _encode_passages(enc, tok, *fit, token_budget):
        acc.update(h[am.bool()].cpu().numpy())
    batches = _encode_passages(enc, tok, *evaluate, token_budget)
    refs = [enc.run_layers(h.to(enc.dtype), am, enc.n_lower, enc.total_layers).float() for h, am in batches]
    zc = zstandard.ZstdCompressor(level=zstd_level)
    points: list[RDPoint] = []
    for dims in dims_list:
        comp = acc.finish(dims)
        for bits in sorted(bits_list, reverse=True):
            cos, n_tok, int8_bytes, packed_bytes = [], 0, 0, 0
            for (h, am), ref in zip(batches, refs):
                real = am.bool()
                z = torch.from_numpy(comp.compress(h[real].cpu().numpy()))
                lengths = real.sum(1).tolist()
                if bits == 16:
                    q16 = z.half()
                    z_rec = q16.float().numpy()
                    for part in torch.split(q16, lengths):
                        int8_bytes += len(zc.compress(part.numpy().tobytes()))
                else:
                    codes, scales = quantize(z, bits)
                    z_rec = dequantize(codes.numpy(), scales.numpy())
                    for part in torch.split(codes, lengths):  # one zstd frame per passage, as stored
                        int8_bytes += len(zc.compress(part.numpy().tobytes()))
                        packed_bytes += len(bitpack(part.numpy(), bits))
                h_rec = torch.zeros_like(h)
                h_rec[real] = torch.from_numpy(comp.decompress(z_rec)).to(h.device)
                got = enc.run_layers(h_rec.to(enc.dtype), am, enc.n_lower, enc.total_layers).float()
                cos.append(torch.nn.functional.cosine_similarity(ref[real], got[real], dim=-1).cpu().numpy())
                n_tok += int(real.sum())
            c = float(np.concatenate(cos).mean())
            scale_b = 0.0 if bits == 16 else 2.0
            if bits == 16:
                points.append(RDPoint(dims, 16, "fp16+zstd", int8_bytes / n_tok, 0.0, c))
            else:
                points.append(RDPoint(dims, bits, "int8+zstd", int8_bytes / n_tok, scale_b, c))
                points.append(RDPoint(dims, bits, "bitpacked", packed_bytes / n_tok, scale_b, c))
            log.info("dims %d bits %d: cosine %.5f, %.1f B/token", dims, bits, c, points[-1].bytes_per_token)
        base = next((p.token_cosine for p in points if p.dims == dims and p.bits == 16), None)
        for p in points:
            if p.dims == dims and base is not None:
                p.delta_vs_unquantised = base - p.token_cosine
    return points


def cheapest_within(points: list[RDPoint], dims: int, tolerance: float = 0.002) -> RDPoint | None:
    """The fewest bytes per token at `dims` whose cosine is within `tolerance` of unquantised."""
    ok = [p for p in points if p.dims == dims and p.delta_vs_unquantised <= tolerance]
    return min(ok, key=lambda p: p.bytes_per_token) if ok else None


def plot_png(points: list[RDPoint], title: str) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for dims in sorted({p.dims for p in points}):
        ps = sorted((p for p in points if p.dims == dims and p.storage != "bitpacked"), key=lambda p: p.bytes_per_token)
        ax.plot([p.bytes_per_token for p in ps], [p.token_cosine for p in ps], "o-", label=f"{dims} dims")
        for p in ps:
            ax.annotate(f"{p.bits}b", (p.bytes_per_token, p.token_cosine), fontsize=7, xytext=(3, -8),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("stored bytes per token (codes after zstd + scales)")
    ax.set_ylabel("final-layer token cosine vs original")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


@dataclass
class RDReport:
    model: str
    layers: int
    hidden: int
    fit_passages: int
    eval_passages: int
    zstd_level: int
    dims_list: list[int]
    points: list[RDPoint]

    def render(self) -> str:
        """The report as Markdown: the table, and the cheapest storage per dims within 0.002 cosine."""
        lines = [f"# Rate-distortion: {self.model}, input component = lower {self.layers} of its layers, hidden "
                 f"{self.hidden}", "", f"PCA fitted on {self.fit_passages} passages; fidelity on {self.eval_passages} "
                 "held-out passages = mean final-layer token cosine, upper layers on decompressed vs original states. "
                 f"Bytes: codes after per-passage zstd (level {self.zstd_level}) + 2 B float16 scale per token.", "",
                 "| dims | bits | storage | B/token | B/value | token cosine | loss vs unquantised |",
                 "|---:|---:|---|---:|---:|---:|---:|"]
        for p in self.points:
            lines.append(f"| {p.dims} | {p.bits} | {p.storage} | {p.bytes_per_token:.1f} | {p.bytes_per_value:.3f} | "
                         f"{p.token_cosine:.5f} | {p.delta_vs_unquantised:+.5f} |")
        lines += ["", "Cheapest storage within 0.002 cosine of unquantised (fp16) at the same dims:", ""]
        for dims in self.dims_list:
            best = cheapest_within(self.points, dims, 0.002)
            lines.append(f"- {dims} dims: " + (f"{best.bits}-bit {best.storage}, {best.bytes_per_token:.1f} B/token = "
                                               f"{best.bytes_per_value:.3f} B/value (cosine {best.token_cosine:.5f})"
                                               if best else "none"))
        quarter = self.hidden // 4
        best = cheapest_within(self.points, quarter, 0.002)
        if best:
            goal = "meets" if best.bytes_per_value <= 0.625 else "misses"
            lines += ["", f"At 4x dimension compression ({self.hidden} -> {quarter}): {best.bytes_per_value:.3f} B per "
                          f"stored value including scales; this {goal} the 0.625 B/value goal (BERT-base geometry "
                          f"would be {best.bytes_per_value * 192:.0f} B/token against the paper's 192)."]
        return "\n".join(lines) + "\n"


def sweep_corpus(model: ModelConfig, corpus, dims_list: list[int] | None, bits_list: list[float], fit_sample: int,
                 sample: int, seed: int, zstd_level: int, device: torch.device) -> RDReport:
    """Fit on `fit_sample` passages of a seeded permutation of the corpus, measure on the next `sample`."""
    from transformers import AutoConfig

    from pipeline.config import ConfigError
    from pipeline.sample import columns, corpus_table
    from pipeline.tokenize import model_max_length

    table = corpus_table(corpus)
    order = np.random.default_rng(seed).permutation(table.num_rows)
    _, fit_titles, fit_texts = columns(table, order[:fit_sample])
    _, eval_titles, eval_texts = columns(table, order[fit_sample:fit_sample + sample])
    if not eval_texts:
        raise ConfigError("no held-out passages left: lower --fit-sample")
    hidden = AutoConfig.from_pretrained(model.path, revision=model.revision).hidden_size
    dims_list = dims_list or sorted({hidden // 4, hidden * 3 // 8, hidden // 2, hidden * 3 // 4, hidden})
    points = sweep(model, (fit_titles, fit_texts), (eval_titles, eval_texts), dims_list, bits_list,
                   model_max_length(model), device, zstd_level)
    return RDReport(model.name, model.layers, hidden, len(fit_texts), len(eval_texts), zstd_level, dims_list, points)
