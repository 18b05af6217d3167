"""Fit a compressor on a corpus sample, and measure what it costs the reader (fidelity)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.compress import Compressor, PcaAccumulator
from pipeline.config import ConfigError, ModelConfig
from pipeline.corpus import Corpus
from pipeline.encoder import LayeredEncoder, pad_batch, token_budget_batches
from pipeline.quantize import dequantize, quantize
from pipeline.sample import held_out, random_rows, rows_at
from pipeline.tokenize import PairTokenizer, model_max_length

log = logging.getLogger(__name__)


def _batches(tok: PairTokenizer, titles: list[str], texts: list[str], token_budget: int):
    t = tok(titles, texts)
    keep = np.flatnonzero(t.keep)
    ids = [t.input_ids[i] for i in keep]
    types = [t.token_type_ids[i] for i in keep]
    lengths = np.array([len(s) for s in ids])
    for batch in token_budget_batches(lengths, token_budget):
        yield [ids[i] for i in batch], [types[i] for i in batch]


def fit_compressor(model: ModelConfig, titles: list[str], texts: list[str], dims: int, max_length: int,
                   device: torch.device, token_budget: int = 8192,
                   metadata: dict[str, str] | None = None) -> Compressor:
    """PCA of the input component's token states: the optimum of phase-1 reconstruction (MSE)."""
    tok = PairTokenizer(model, max_length)
    enc = LayeredEncoder(model, device)
    acc = PcaAccumulator(enc.hidden)
    for ids, types in _batches(tok, titles, texts, token_budget):
        i, t, am = pad_batch(ids, types, 0, device)
        h = enc.embed_and_lower(i, t, am)
        acc.update(h[am.bool()].float().cpu().numpy())
    md = {"model": model.name, "layers": str(model.layers), "passages": str(len(texts))}
    md.update(metadata or {})
    c = acc.finish(dims, md)
    log.info("fitted PCA %d -> %d on %d tokens of %d passages; explained variance %s",
             c.hidden, c.dims, acc.n, len(texts), c.metadata.get("explained_variance_ratio"))
    return c


@dataclass
class Fidelity:
    passages: int
    tokens: int
    token_cosine: float         # final layer, per real token, mean
    token_cosine_p05: float     # 5th percentile: the tail a reader feels
    pooled_cosine: float        # mean-pooled final layer
    state_rel_error: float      # ||h - h'||_F / ||h||_F at the input component's output, mean per passage

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def measure_fidelity(model: ModelConfig, compressor: Compressor, titles: list[str], texts: list[str],
                     max_length: int, device: torch.device, quantize_mode: str = "int8", bits: float = 8,
                     token_budget: int = 8192) -> Fidelity:
    """Upper layers on decompressed vs original states: the loss the cross component sees."""
    tok = PairTokenizer(model, max_length)
    enc = LayeredEncoder(model, device, keep_upper=True)
    cos_all, pooled, rel = [], [], []
    for ids, types in _batches(tok, titles, texts, token_budget):
        i, t, am = pad_batch(ids, types, 0, device)
        h = enc.embed_and_lower(i, t, am).float()
        real = am.bool()
        z = compressor.compress(h[real].cpu().numpy())
        if quantize_mode != "none":
            codes, scales = quantize(torch.from_numpy(z), bits)
            z = dequantize(codes.numpy(), scales.numpy())
        else:
            z = z.astype(np.float16).astype(np.float32)
        h_rec = torch.zeros_like(h)
        h_rec[real] = torch.from_numpy(compressor.decompress(z)).to(h.device)
        top = enc.total_layers
        ref = enc.run_layers(h.to(enc.dtype), am, enc.n_lower, top).float()
        got = enc.run_layers(h_rec.to(enc.dtype), am, enc.n_lower, top).float()
        cos = torch.nn.functional.cosine_similarity(ref[real], got[real], dim=-1)
        cos_all.append(cos.cpu().numpy())
        m = am.unsqueeze(-1).float()
        pr, pg = (ref * m).sum(1) / m.sum(1), (got * m).sum(1) / m.sum(1)
        pooled.append(torch.nn.functional.cosine_similarity(pr, pg, dim=-1).cpu().numpy())
        for row in range(h.shape[0]):
            r = real[row]
            diff = (h[row][r] - h_rec[row][r]).norm() / h[row][r].norm().clamp_min(1e-12)
            rel.append(float(diff))
    cos = np.concatenate(cos_all)
    return Fidelity(passages=len(rel), tokens=int(cos.size), token_cosine=float(cos.mean()),
                    token_cosine_p05=float(np.percentile(cos, 5)), pooled_cosine=float(np.concatenate(pooled).mean()),
                    state_rel_error=float(np.mean(rel)))


def fit_on_corpus(model: ModelConfig, corpus: Corpus, dims: int, sample: int, seed: int,
                  device: torch.device) -> Compressor:
    """PCA fitted on `sample` passages drawn uniformly (seeded) from a whole corpus; their ids are recorded."""
    scan = corpus.scan()
    ids, titles, texts = rows_at(corpus, scan, random_rows(scan.n, sample, seed))
    return fit_compressor(model, titles, texts, dims, model_max_length(model), device,
                          metadata={"fit_ids": json.dumps(sorted(ids)), "seed": str(seed)})


def fidelity_on_corpus(model: ModelConfig, corpus: Corpus, compressor: Compressor, sample: int,
                       modes: list[tuple[str, float]], device: torch.device) -> tuple[list[dict], int, int]:
    """(rows of figures per quantisation mode, passages measured, passages excluded as used for fitting)."""
    fit_ids = set(json.loads(compressor.metadata.get("fit_ids", "[]")))
    _, titles, texts = held_out(corpus, fit_ids, sample)
    if not texts:
        raise ConfigError("no held-out passages: every passage was used to fit the compressor")
    rows = []
    for mode, bits in modes:
        f = measure_fidelity(model, compressor, titles, texts, model_max_length(model), device, mode, bits)
        rows.append({"quantize": mode, "bits": bits, **f.to_dict()})
    return rows, len(texts), len(fit_ids)
