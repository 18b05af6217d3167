"""Fit a codec on a corpus sample, and measure what it costs the reader (fidelity)."""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.codec.state_codec import Codec
from pipeline.codec.projection import Compressor, PcaAccumulator
from pipeline.config import CompressionConfig, ConfigError, ModelConfig
from pipeline.corpus.source import Corpus
from pipeline.model.encoder import LayeredEncoder, pad_batch, token_budget_batches
from pipeline.codec.pq_training import PQFit, fit_pq
from pipeline.codec.side_info import Prediction, RidgeAccumulator, SideInfo, StaticEmbedding
from pipeline.corpus.sample import held_out, random_rows, rows_at
from pipeline.model.tokenizer import PairTokenizer, model_max_length

log = logging.getLogger(__name__)


def _batches(tok: PairTokenizer, titles: list[str], texts: list[str], token_budget: int):
    t = tok(titles, texts)
    keep = np.flatnonzero(t.keep)
    ids = [t.input_ids[i] for i in keep]
    types = [t.token_type_ids[i] for i in keep]
    lengths = np.array([len(s) for s in ids])
    for batch in token_budget_batches(lengths, token_budget):
        yield [ids[i] for i in batch], [types[i] for i in batch]


@dataclass
class FitStates:
    """The fit sample's input-component states and what the decoder will know of the same tokens."""
    states: list[np.ndarray]   # per batch, float32 [tokens, hidden]
    sides: list[SideInfo]      # per batch, the same tokens' ids and passage lengths
    types: list[np.ndarray]    # per batch, the tokenizer's token types (to check the derived ones)
    encoder: LayeredEncoder
    sep_id: int


def _lower_states(model: ModelConfig, titles: list[str], texts: list[str], max_length: int, device: torch.device,
                  token_budget: int) -> FitStates:
    """The input component's real-token states, a float32 [tokens, hidden] array per batch."""
    tok = PairTokenizer(model, max_length)
    enc = LayeredEncoder(model, device)
    out = FitStates([], [], [], enc, int(tok.tok.sep_token_id if tok.tok.sep_token_id is not None else -1))
    for ids, types in _batches(tok, titles, texts, token_budget):
        i, t, am = pad_batch(ids, types, 0, device)
        out.states.append(enc.embed_and_lower(i, t, am)[am.bool()].float().cpu().numpy())
        out.sides.append(SideInfo.from_padded(i, am))
        out.types.append(t[am.bool()].cpu().numpy())
    return out


def fit_prediction(model, sides: list[SideInfo], states: list[np.ndarray], sep_id: int, model_name: str,
                   types: list[np.ndarray] | None = None) -> tuple[Prediction, dict[str, str], list[np.ndarray]]:
    """The static-embedding prediction of these states (ridge, closed form) and what it leaves per batch.

    `model`: the loaded base model, whose embedding tables are copied and checked; `types`: the tokenizer's
    token types, only to say when the ones derived from the ids differ."""
    if not states:
        raise ConfigError("no passages to fit the codec on")
    table = StaticEmbedding.from_model(model, sep_id, model_name)
    table.check_against(model, sides[0], model_name)
    if types is not None and table.token_type is not None and table.token_type.shape[0] > 1:
        derived, given = np.concatenate([s.segments(sep_id) for s in sides]), np.concatenate(types)
        if not np.array_equal(derived, given):
            log.warning("token types derived from the ids differ from the tokenizer's for %.2f%% of the fit tokens: "
                        "the prediction uses the derived ones at encode and decode alike",
                        100 * float(np.mean(derived != given)))
    ridge = RidgeAccumulator(table.width, states[0].shape[1])
    embedded = [table.compute(side) for side in sides]
    for e, h in zip(embedded, states):
        ridge.update(e, h)
    prediction, stats = ridge.finish(table)
    log.info("static-embedding prediction: the residual keeps %s of the states' centred energy",
             stats["residual_energy_share"])
    return prediction, stats, [h - (e @ prediction.weight + prediction.bias) for e, h in zip(embedded, states)]


def fit_residual(fit: FitStates, compression: CompressionConfig, model_name: str,
                 metadata: dict[str, str] | None = None) -> Codec:
    """`--residual embeddings`: the prediction, then the inner codec (`compression` without the residual)
    fitted on what it leaves."""
    from pipeline.codec.state_codec import ResidualCodec

    prediction, stats, residuals = fit_prediction(fit.encoder.model, fit.sides, fit.states, fit.sep_id, model_name,
                                                  fit.types)
    inner = codec_from_states(iter(residuals), dataclasses.replace(compression, residual="none"),
                              {**(metadata or {}), **stats})
    return ResidualCodec(inner, prediction)


def fit_compressor(model: ModelConfig, titles: list[str], texts: list[str], dims: int | None, max_length: int,
                   device: torch.device, token_budget: int = 8192,
                   metadata: dict[str, str] | None = None) -> Compressor:
    """PCA of the input component's token states: the optimum of phase-1 reconstruction (MSE)."""
    codec = fit_codec(model, titles, texts, CompressionConfig(dims=dims), max_length, device, token_budget, metadata)
    c = codec.compressor
    log.info("PCA %d -> %d: explained variance %s", c.hidden, c.dims, c.metadata.get("explained_variance_ratio"))
    return c


def fit_codec(model: ModelConfig, titles: list[str], texts: list[str], compression: CompressionConfig,
              max_length: int, device: torch.device, token_budget: int = 8192,
              metadata: dict[str, str] | None = None) -> Codec:
    """The codec `compression` asks for, fitted on these passages' input-component states."""
    md = {"model": model.name, "layers": str(model.layers), "passages": str(len(texts))}
    md.update(metadata or {})
    fit = _lower_states(model, titles, texts, max_length, device, token_budget)
    if compression.residual == "embeddings":
        codec = fit_residual(fit, compression, model.name, md)
    else:
        codec = codec_from_states(iter(fit.states), compression, md)
    log.info("fitted %s on %s token states of %d passages", codec.describe(), codec.metadata.get("tokens"),
             len(texts))
    return codec


def codec_from_states(batches, compression: CompressionConfig, metadata: dict[str, str] | None = None) -> Codec:
    """Fit on an iterable of [tokens, hidden] float32 arrays: PCA streams them; PQ keeps them (a bounded sample)."""
    from pipeline.codec.state_codec import LinearCodec

    if compression.codec == "linear":
        acc = None
        for states in batches:
            acc = acc or PcaAccumulator(states.shape[1])
            acc.update(states)
        if acc is None:
            raise ConfigError("no passages to fit the codec on")
        comp = acc.finish(compression.dims or acc.sum.size, metadata)
        return LinearCodec(comp, compression.quantize, compression.bits)
    parts = list(batches)
    if not parts:
        raise ConfigError("no passages to fit the codec on")
    return fit_pq(np.concatenate(parts), PQFit(m=compression.pq_m, opq=compression.opq, dims=compression.dims),
                  metadata)


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


def measure_fidelity(model: ModelConfig, codec: Codec, titles: list[str], texts: list[str], max_length: int,
                     device: torch.device, token_budget: int = 8192) -> Fidelity:
    """Upper layers on decoded vs original states: the loss the cross component sees."""
    tok = PairTokenizer(model, max_length)
    enc = LayeredEncoder(model, device, keep_upper=True)
    encode = codec.encoder(device, torch.float32)
    cos_all, pooled, rel = [], [], []
    for ids, types in _batches(tok, titles, texts, token_budget):
        i, t, am = pad_batch(ids, types, 0, device)
        h = enc.embed_and_lower(i, t, am).float()
        real = am.bool()
        side = SideInfo.from_padded(i, am)
        codes, scales = encode(h[real], side)
        h_rec = torch.zeros_like(h)
        h_rec[real] = codec.decode_torch(codes, scales, side).to(h.dtype)
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


def fit_on_corpus(model: ModelConfig, corpus: Corpus, compression: CompressionConfig, sample: int, seed: int,
                  device: torch.device) -> Codec:
    """A codec fitted on `sample` passages drawn uniformly (seeded) from a whole corpus; their ids are recorded."""
    scan = corpus.scan()
    ids, titles, texts = rows_at(corpus, scan, random_rows(scan.n, sample, seed))
    return fit_codec(model, titles, texts, compression, model_max_length(model), device,
                     metadata={"fit_ids": json.dumps(sorted(ids)), "seed": str(seed)})


def fidelity_on_corpus(model: ModelConfig, corpus: Corpus, codecs: list[tuple[str, Codec]], sample: int,
                       device: torch.device) -> tuple[list[dict], int, int]:
    """(rows of figures per labelled codec, passages measured, passages excluded as used for fitting).

    The codecs share one fit (their `fit_ids` metadata), so the held-out set is the same for all."""
    fit_ids: set[int] = set()
    for _, codec in codecs:
        fit_ids |= set(json.loads(codec.metadata.get("fit_ids", "[]")))
    _, titles, texts = held_out(corpus, fit_ids, sample)
    if not texts:
        raise ConfigError("no held-out passages: every passage was used to fit the codec")
    rows = []
    for label, codec in codecs:
        f = measure_fidelity(model, codec, titles, texts, model_max_length(model), device)
        rows.append({"codec": label, "bytes_per_token_raw": codec.layout.nbytes(1) + 2 * codec.layout.scaled,
                     **f.to_dict()})
    return rows, len(texts), len(fit_ids)
