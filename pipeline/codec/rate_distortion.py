"""Rate-distortion: stored bytes per token against the fidelity the reader feels.

Fidelity is the final-layer token cosine when the upper layers run on decoded states instead of the
original ones. Every point is a codec (`pipeline.codec.state_codec`): the linear family (PCA axes are nested, so
one full-width fit serves every `dims`), the product-quantiser family (PQ/OPQ, one fit per M), and both
again on the residual after the static-embedding prediction (`pipeline.codec.side_info`: what the stored token
ids already say is not coded): `residual-linear` and `residual-opq`.
"""
from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
import zstandard

from pipeline.codec.state_codec import Codec, LinearCodec, ResidualCodec
from pipeline.codec.pq_training import PQFit, fit_pq
from pipeline.codec.projection import PcaAccumulator
from pipeline.config import ModelConfig
from pipeline.model.encoder import LayeredEncoder, pad_batch, token_budget_batches
from pipeline.codec.side_info import SideInfo
from storage.estimate import Assumptions
from pipeline.model.tokenizer import PairTokenizer

log = logging.getLogger(__name__)


@dataclass
class RDPoint:
    dims: int
    bits: float              # 16 = float16 (unquantised storage); fractional = 2*qmax+1 levels; PQ: 8 per code
    storage: str             # "int8+zstd", "bitpacked", "fp16+zstd"; PQ: "raw", "zstd"
    code_bytes_per_token: float
    scale_bytes_per_token: float
    token_cosine: float
    delta_vs_unquantised: float = 0.0
    family: str = "linear"   # "linear", "pq", "opq", "residual-linear", "residual-opq"
    pq_m: int = 0            # PQ: sub-quantisers
    tokens_per_passage: float = 0.0  # of the measured passages: prices token ids and per-passage bytes

    @property
    def label(self) -> str:
        if self.family.endswith("linear"):
            pre = "residual " if self.family.startswith("residual") else ""
            return f"{pre}PCA-{self.dims} {self.bits:g}-bit {self.storage}"
        return f"{self.family.upper()} {self.pq_m}x8 on {self.dims} dims, {self.storage}"

    @property
    def all_in_per_token(self) -> float:
        """Codes + scales + the stored token ids and per-passage columns, at the storage model's calibration
        (`storage.estimate.Assumptions`): what a store of this codec holds per token."""
        a = Assumptions()
        return self.bytes_per_token + a.token_id_bytes + a.per_passage_bytes / max(self.tokens_per_passage, 1.0)

    @property
    def bytes_per_token(self) -> float:
        return self.code_bytes_per_token + self.scale_bytes_per_token

    @property
    def bytes_per_value(self) -> float:
        return self.bytes_per_token / self.dims

    def to_dict(self) -> dict:
        return {**asdict(self), "bytes_per_token": self.bytes_per_token, "bytes_per_value": self.bytes_per_value,
                "all_in_bytes_per_token": self.all_in_per_token, "label": self.label}


def _encode_passages(enc: LayeredEncoder, tok: PairTokenizer, titles, texts, budget: int):
    t = tok(titles, texts)
    ids = [t.input_ids[i] for i in np.flatnonzero(t.keep)]
    types = [t.token_type_ids[i] for i in np.flatnonzero(t.keep)]
    lengths = np.array([len(s) for s in ids])
    out = []
    for batch in token_budget_batches(lengths, budget):
        i, tt, am = pad_batch([ids[k] for k in batch], [types[k] for k in batch], 0, enc.device)
        out.append((enc.embed_and_lower(i, tt, am).float(), am, SideInfo.from_padded(i, am), tt[am.bool()].cpu().numpy()))
    return out


@dataclass(frozen=True)
class Scored:
    token_cosine: float
    tokens: int
    zstd_bytes: int      # codes, one zstd frame per passage (as stored)
    raw_bytes: int       # codes as they are
    passages: int


def _score(enc: LayeredEncoder, batches, refs, codec: Codec, zc) -> Scored:
    """Upper layers on this codec's decoded states against the originals, and the bytes its codes take."""
    encode = codec.encoder(enc.device, torch.float32)
    cos, n_tok, packed, raw, n_pass = [], 0, 0, 0, 0
    for (h, am, side, _), ref in zip(batches, refs):
        real = am.bool()
        codes, scales = encode(h[real], side)
        for part in torch.split(codes, real.sum(1).tolist()):
            packed += len(zc.compress(part.cpu().numpy().tobytes()))
            raw += part.numel() * part.element_size()
            n_pass += 1
        h_rec = torch.zeros_like(h)
        h_rec[real] = codec.decode_torch(codes, scales, side).to(h.dtype)
        got = enc.run_layers(h_rec.to(enc.dtype), am, enc.n_lower, enc.total_layers).float()
        cos.append(torch.nn.functional.cosine_similarity(ref[real], got[real], dim=-1).cpu().numpy())
        n_tok += int(real.sum())
    return Scored(float(np.concatenate(cos).mean()), n_tok, packed, raw, n_pass)


@dataclass(frozen=True)
class PQFamily:
    m_list: tuple[int, ...] = (16, 32, 48, 64, 96)
    variants: tuple[str, ...] = ("opq",)  # "pq" and/or "opq"
    dims: int | None = None               # project first; None = the raw states


@dataclass(frozen=True)
class ResidualFamily:
    """Codecs on the residual after the static-embedding prediction: OPQ at each M, linear at each (dims, bits)."""
    pq_m: tuple[int, ...] = (4, 8, 12, 16, 24, 32)
    linear: tuple[tuple[int, float], ...] = ()


def sweep(model: ModelConfig, fit: tuple[list[str], list[str]], evaluate: tuple[list[str], list[str]],
          dims_list: list[int], bits_list: list[int], max_length: int, device: torch.device,
          zstd_level: int = 3, token_budget: int = 8192, pq: PQFamily | None = None,
          residual: ResidualFamily | None = None) -> list[RDPoint]:
    tok = PairTokenizer(model, max_length)
    enc = LayeredEncoder(model, device, keep_upper=True)
    acc = PcaAccumulator(enc.hidden)
    fit_states, fit_batches = [], _encode_passages(enc, tok, *fit, token_budget)
    for h, am, _, _ in fit_batches:
        fit_states.append(h[am.bool()].cpu().numpy())
        acc.update(fit_states[-1])
    batches = _encode_passages(enc, tok, *evaluate, token_budget)
    refs = [enc.run_layers(h.to(enc.dtype), am, enc.n_lower, enc.total_layers).float() for h, am, _, _ in batches]
    zc = zstandard.ZstdCompressor(level=zstd_level)
    points: list[RDPoint] = []
    fp16_cosine: dict[int, float] = {}
    for dims in dims_list:
        comp = acc.finish(dims)
        for bits in sorted(bits_list, reverse=True):
            codec = LinearCodec(comp, "none" if bits == 16 else "int8", bits)
            sc = _score(enc, batches, refs, codec, zc)
            if bits == 16:
                fp16_cosine[dims] = sc.token_cosine
                points.append(RDPoint(dims, 16, "fp16+zstd", sc.zstd_bytes / sc.tokens, 0.0, sc.token_cosine))
            else:
                # bit-packed size per passage: ceil(n x dims x ceil(bits) / 8), what `quantize.bitpack` writes
                packed = sum(-(-int(n) * dims * int(np.ceil(bits)) // 8) for _, am, _, _ in batches for n in am.sum(1))
                points.append(RDPoint(dims, bits, "int8+zstd", sc.zstd_bytes / sc.tokens, 2.0, sc.token_cosine))
                points.append(RDPoint(dims, bits, "bitpacked", packed / sc.tokens, 2.0, sc.token_cosine))
            log.info("%s: cosine %.5f, %.1f B/token", points[-1].label, sc.token_cosine, points[-1].bytes_per_token)
    for family in (pq.variants if pq else ()):
        states = np.concatenate(fit_states)
        for m in pq.m_list:
            codec = fit_pq(states, PQFit(m=m, opq=family == "opq", dims=pq.dims))
            sc = _score(enc, batches, refs, codec, zc)
            for storage, nbytes in (("raw", sc.raw_bytes), ("zstd", sc.zstd_bytes)):
                points.append(RDPoint(codec.dims, 8, storage, nbytes / sc.tokens, 0.0, sc.token_cosine, family=family,
                                      pq_m=m))
            log.info("%s: cosine %.5f, %.1f B/token raw, %.1f with zstd", points[-1].label, sc.token_cosine,
                     sc.raw_bytes / sc.tokens, sc.zstd_bytes / sc.tokens)
    if residual is not None:
        points += _residual_points(enc, tok, fit_batches, fit_states, batches, refs, residual, zc, model.name)
    for p in points:
        if p.dims in fp16_cosine:
            p.delta_vs_unquantised = fp16_cosine[p.dims] - p.token_cosine
    tpp = sum(int(am.sum()) for _, am, _, _ in batches) / max(sum(am.shape[0] for _, am, _, _ in batches), 1)
    for p in points:
        p.tokens_per_passage = tpp
    return points


def _residual_points(enc, tok, fit_batches, fit_states, batches, refs, family: ResidualFamily, zc,
                     name: str) -> list[RDPoint]:
    """One prediction fitted on the fit passages, then each inner codec on its residual."""
    from pipeline.codec.fitting import fit_prediction

    prediction, _, residuals = fit_prediction(enc.model, [b[2] for b in fit_batches], fit_states,
                                              int(tok.tok.sep_token_id), name, [b[3] for b in fit_batches])
    points = []
    if family.linear:
        acc = PcaAccumulator(enc.hidden)
        for r in residuals:
            acc.update(r)
        for dims, bits in family.linear:
            codec = ResidualCodec(LinearCodec(acc.finish(dims), "none" if bits == 16 else "int8", bits), prediction)
            sc = _score(enc, batches, refs, codec, zc)
            points.append(RDPoint(dims, bits, "fp16+zstd" if bits == 16 else "int8+zstd", sc.zstd_bytes / sc.tokens,
                                  0.0 if bits == 16 else 2.0, sc.token_cosine, family="residual-linear"))
            log.info("%s: cosine %.5f, %.1f B/token", points[-1].label, sc.token_cosine, points[-1].bytes_per_token)
    states = np.concatenate(residuals) if family.pq_m else None
    for m in family.pq_m:
        codec = ResidualCodec(fit_pq(states, PQFit(m=m, opq=True)), prediction)
        sc = _score(enc, batches, refs, codec, zc)
        points.append(RDPoint(codec.dims, 8, "raw", sc.raw_bytes / sc.tokens, 0.0, sc.token_cosine,
                              family="residual-opq", pq_m=m))
        log.info("%s: cosine %.5f, %.1f B/token", points[-1].label, sc.token_cosine, points[-1].bytes_per_token)
    return points


def cheapest_within(points: list[RDPoint], dims: int, tolerance: float = 0.002) -> RDPoint | None:
    """The fewest bytes per token of the linear family at `dims` whose cosine is within `tolerance` of unquantised."""
    ok = [p for p in points if p.family == "linear" and p.dims == dims and p.delta_vs_unquantised <= tolerance]
    return min(ok, key=lambda p: p.bytes_per_token) if ok else None


def cheapest_near(points: list[RDPoint], cosine: float, family: str, tolerance: float = 0.002) -> RDPoint | None:
    """The fewest bytes per token of a family whose fidelity is at least `cosine - tolerance`."""
    ok = [p for p in points if p.family == family and p.token_cosine >= cosine - tolerance]
    return min(ok, key=lambda p: p.bytes_per_token) if ok else None


def _family_name(p: RDPoint) -> str:
    if p.family == "linear":
        return "linear (PCA)"
    if p.family == "residual-linear":
        return "residual linear (PCA)"
    return f"{p.family.upper()} M={p.pq_m}"


def plot_png(points: list[RDPoint], title: str) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    linear = [p for p in points if p.family == "linear"]
    for dims in sorted({p.dims for p in linear}):
        ps = sorted((p for p in linear if p.dims == dims and p.storage != "bitpacked"), key=lambda p: p.bytes_per_token)
        ax.plot([p.bytes_per_token for p in ps], [p.token_cosine for p in ps], "o-", label=f"PCA {dims} dims")
        for p in ps:
            ax.annotate(f"{p.bits}b", (p.bytes_per_token, p.token_cosine), fontsize=7, xytext=(3, -8),
                        textcoords="offset points")
    res_lin = sorted((p for p in points if p.family == "residual-linear" and p.storage != "bitpacked"),
                     key=lambda p: p.bytes_per_token)
    if res_lin:
        ax.plot([p.bytes_per_token for p in res_lin], [p.token_cosine for p in res_lin], "^-.",
                label="residual PCA (dims:bits)")
        for p in res_lin:
            ax.annotate(f"{p.dims}:{p.bits:g}", (p.bytes_per_token, p.token_cosine), fontsize=7, xytext=(3, -8),
                        textcoords="offset points")
    for family in sorted({p.family for p in points} - {"linear", "residual-linear"}):
        ps = sorted((p for p in points if p.family == family and p.storage == "raw"), key=lambda p: p.bytes_per_token)
        ax.plot([p.bytes_per_token for p in ps], [p.token_cosine for p in ps], "s--", label=f"{family.upper()} (M x 8 bits)")
        for p in ps:
            ax.annotate(f"M={p.pq_m}", (p.bytes_per_token, p.token_cosine), fontsize=7, xytext=(3, 4),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("stored bytes per token (codes after zstd + scales; PQ: raw codes)")
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
    reference: tuple[int, float] | None = None  # (dims, bits) of the linear point other families are priced against

    def reference_point(self) -> RDPoint | None:
        if self.reference is None:
            return None
        dims, bits = self.reference
        return next((p for p in self.points if p.family == "linear" and p.dims == dims and p.bits == bits
                     and p.storage == "int8+zstd"), None)

    def render(self) -> str:
        """The report as Markdown: the table, the cheapest linear storage per dims within 0.002 cosine, and
        the cheapest point of every family within 0.002 of the reference's fidelity."""
        lines = [f"# Rate-distortion: {self.model}, input component = lower {self.layers} of its layers, hidden "
                 f"{self.hidden}", "", f"Codecs fitted on {self.fit_passages} passages; fidelity on {self.eval_passages} "
                 "held-out passages = mean final-layer token cosine, upper layers on decoded vs original states. "
                 f"Bytes: codes (per-passage zstd level {self.zstd_level}, or raw) + 2 B float16 scale per token for the "
                 "linear codec's int8 codes; PQ codes have no scale. All-in adds what a store keeps per token "
                 "beside the codes: token ids and per-passage columns (the storage model's calibration, "
                 f"{Assumptions().token_id_bytes:g} B/token + {Assumptions().per_passage_bytes:g} B/passage). "
                 "residual-*: the codec on the state minus its prediction from the token's static embedding.", "",
                 "| codec | dims | bits | storage | B/token | all-in B/token | B/value | token cosine | "
                 "loss vs fp16 at dims |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for p in self.points:
            name = _family_name(p)
            lines.append(f"| {name} | {p.dims} | {p.bits:g} | {p.storage} | {p.bytes_per_token:.1f} | "
                         f"{p.all_in_per_token:.1f} | {p.bytes_per_value:.3f} | {p.token_cosine:.5f} | "
                         f"{p.delta_vs_unquantised:+.5f} |")
        lines += ["", "Cheapest linear storage within 0.002 cosine of unquantised (fp16) at the same dims:", ""]
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
        lines += self._against_reference()
        return "\n".join(lines) + "\n"

    def _against_reference(self) -> list[str]:
        ref = self.reference_point()
        if ref is None:
            return []
        lines = ["", f"## Against the reference: {ref.label}, {ref.bytes_per_token:.1f} B/token "
                     f"({ref.all_in_per_token:.1f} all-in), cosine {ref.token_cosine:.5f}", "",
                     "Cheapest point of each family within 0.002 of the reference's fidelity and at or above it "
                     "(pick by bytes), and the most faithful point at or under the reference's bytes (pick by "
                     "fidelity):", "", "| family | cheapest within 0.002 | B/token | x reference bytes | cosine "
                     "| cheapest at or above | all-in B/token | cosine | best at <= reference bytes | cosine |",
                     "|---|---|---:|---:|---:|---|---:|---:|---|---:|"]
        for family in sorted({p.family for p in self.points}):
            near = cheapest_near(self.points, ref.token_cosine, family)
            above = cheapest_near(self.points, ref.token_cosine, family, tolerance=0.0)
            under = [p for p in self.points if p.family == family and p.bytes_per_token <= ref.bytes_per_token]
            top = max(under, key=lambda p: p.token_cosine) if under else None
            lines.append(f"| {family} | {near.label if near else 'none'} | "
                         f"{f'{near.bytes_per_token:.1f}' if near else '-'} | "
                         f"{f'{near.bytes_per_token / ref.bytes_per_token:.2f}' if near else '-'} | "
                         f"{f'{near.token_cosine:.5f}' if near else '-'} | {above.label if above else 'none'} | "
                         f"{f'{above.all_in_per_token:.1f}' if above else '-'} | "
                         f"{f'{above.token_cosine:.5f}' if above else '-'} | {top.label if top else 'none'} | "
                         f"{f'{top.token_cosine:.5f}' if top else '-'} |")
        win = [p for p in self.points if p.token_cosine >= ref.token_cosine
               and p.bytes_per_token <= 0.6 * ref.bytes_per_token]
        if win:
            w = min(win, key=lambda p: p.bytes_per_token)
            lines += ["", f"Goal (fidelity >= the reference's at <= 0.6x its bytes): met by {w.label}, "
                          f"{w.bytes_per_token:.1f} B/token = {w.bytes_per_token / ref.bytes_per_token:.2f}x, cosine "
                          f"{w.token_cosine:.5f}."]
        else:
            lines += ["", "Goal (fidelity >= the reference's at <= 0.6x its bytes): not met by any point measured."]
        return lines


def sweep_corpus(model: ModelConfig, corpus, dims_list: list[int] | None, bits_list: list[float], fit_sample: int,
                 sample: int, seed: int, zstd_level: int, device: torch.device, pq: PQFamily | None = None,
                 reference: tuple[int, float] | None = None, residual: ResidualFamily | None = None) -> RDReport:
    """Fit on `fit_sample` passages of a seeded permutation of the corpus, measure on the next `sample`.

    `reference`: (dims, bits) of the linear setting to price the other families against; default
    hidden/4 at 5.25 bits (37 levels), added to the sweep if it is not in it."""
    from transformers import AutoConfig

    from pipeline.config import ConfigError
    from pipeline.corpus.sample import columns, corpus_table
    from pipeline.model.tokenizer import model_max_length

    table = corpus_table(corpus)
    order = np.random.default_rng(seed).permutation(table.num_rows)
    _, fit_titles, fit_texts = columns(table, order[:fit_sample])
    _, eval_titles, eval_texts = columns(table, order[fit_sample:fit_sample + sample])
    if not eval_texts:
        raise ConfigError("no held-out passages left: lower --fit-sample")
    hidden = AutoConfig.from_pretrained(model.path, revision=model.revision).hidden_size
    dims_list = dims_list or sorted({hidden // 4, hidden * 3 // 8, hidden // 2, hidden * 3 // 4, hidden})
    reference = reference or (hidden // 4, 5.25)
    dims_list = sorted(set(dims_list) | {reference[0]})
    bits_list = sorted(set(bits_list) | {reference[1]})
    if pq is not None:
        bad = [m for m in pq.m_list if (pq.dims or hidden) % m]
        if bad:
            raise ConfigError(f"--pq-m {bad}: each must divide the stored dims {pq.dims or hidden}")
    if residual is not None:
        bad = [m for m in residual.pq_m if hidden % m]
        if bad:
            raise ConfigError(f"--residual-pq-m {bad}: each must divide the hidden size {hidden}")
        bad = [f"{d}:{b:g}" for d, b in residual.linear if not (1 <= d <= hidden and (2 <= b <= 8 or b == 16))]
        if bad:
            raise ConfigError(f"--residual-linear {','.join(bad)}: dims 1..{hidden} and bits 2..8 or 16")
    points = sweep(model, (fit_titles, fit_texts), (eval_titles, eval_texts), dims_list, bits_list,
                   model_max_length(model), device, zstd_level, pq=pq, residual=residual)
    return RDReport(model.name, model.layers, hidden, len(fit_texts), len(eval_texts), zstd_level, dims_list, points,
                    reference)
