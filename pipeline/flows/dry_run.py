"""Gather the facts a dry-run plan needs (corpus scan, a tokenised sample, model geometry), then plan.

Each model's config is read once (`pipeline.model.spec`).

Nothing here starts Ray or writes to the store.
"""
from __future__ import annotations

import logging

import numpy as np

from pipeline.flows import job_cost as jobplan
from pipeline.config import CompressionConfig, ModelConfig, RunConfig
from pipeline.corpus.source import Corpus, CorpusScan
from pipeline.corpus.splits import auto_rows_per_split
from pipeline.model.spec import Checkpoint, ModelSpec, read_checkpoint, resolve_main
from pipeline.model.tokenizer import PairTokenizer, Tokenized
from storage.estimate import Assumptions, estimate

log = logging.getLogger(__name__)

SAMPLE_PASSAGES = 2000


def cost_geometry(ck: Checkpoint, layers: int | None = None) -> jobplan.ModelGeometry:
    """The geometry the job-cost model prices: `layers` of the checkpoint (all of them by default)."""
    return jobplan.ModelGeometry(hidden=ck.hidden, intermediate=ck.intermediate, layers=layers or ck.depth)


def tokenized_sample(corpus: Corpus, scan: CorpusScan, spec: ModelSpec, sample: int = SAMPLE_PASSAGES) -> Tokenized:
    """The first `sample` accepted passages, tokenised as the encoder will see them (after truncation)."""
    rows: list[dict] = []
    for table in corpus.batches(scan, min(sample, 4096)):
        rows += table.to_pylist()
        if len(rows) >= sample:
            break
    rows = rows[:sample]
    tok = PairTokenizer(spec.model, spec.max_length, spec.checkpoint.hf_config)
    return tok([r["title"] for r in rows], [r["text"] for r in rows])


def tokens_per_passage(t: Tokenized) -> tuple[float, int]:
    """Mean tokens per kept passage, and how many passages that mean is over."""
    lengths = [len(x) for x, keep in zip(t.input_ids, t.keep) if keep]
    return (float(np.mean(lengths)) if lengths else 0.0), len(lengths)


def _dpr_checkpoint(cfg: RunConfig) -> tuple[Checkpoint | None, str | None]:
    """The DPR model's config (read once), or None and a note when it cannot be read here."""
    if cfg.dpr is None:
        return None, None
    try:
        return read_checkpoint(cfg.dpr.model, cfg.dpr.revision), None
    except OSError as exc:  # a hub name with no hub: plan with BERT-base geometry, and say so
        return None, f"DPR model config unreadable here ({type(exc).__name__}); planned as BERT-base"


def _dpr_geometry(dpr: Checkpoint | None, note: str | None) -> jobplan.ModelGeometry | None:
    if dpr is not None:
        return cost_geometry(dpr)
    return jobplan.ModelGeometry(hidden=768, intermediate=3072, layers=12) if note else None


def plan_run(cfg: RunConfig, gpu: jobplan.GpuAssumptions) -> jobplan.JobPlan:
    corpus = Corpus(cfg.corpus, cfg.corpus_storage_options)
    scan = corpus.scan()
    dpr, dpr_note = _dpr_checkpoint(cfg)
    if dpr is not None:
        from pipeline.flows.run import check_index_config
        check_index_config(cfg, dpr.embedding_width, scan.n)
    elif cfg.dpr is not None:  # the DPR model's config is not reachable here; the real run checks again
        log.warning("could not read %s's config to check index factory %s", cfg.dpr.model, cfg.dpr.index_factory)
    spec = resolve_main(cfg.model)
    tpp, sampled = tokens_per_passage(tokenized_sample(corpus, scan, spec))
    geometry = cost_geometry(spec.checkpoint, cfg.model.layers)
    notes = [f"tokens/passage {tpp:.1f}, measured with the model's tokenizer on {sampled:,} passages",
             f"corpus counts: {scan.counts.to_dict()}"]
    dpr_geometry = _dpr_geometry(dpr, dpr_note)
    notes += [dpr_note] if dpr_note else []
    from pipeline.codec.state_codec import planned_layout

    c = cfg.compression
    layout = planned_layout(c.codec, c.dims or geometry.hidden, c.quantize, c.pq_m)
    storage = estimate(Assumptions(passages=scan.n, tokens_per_passage=tpp, hidden=geometry.hidden,
                                   **layout.estimate_fields(c.bits), dpr_dim=dpr_geometry.hidden if dpr_geometry else 0))
    basis = (f"precompute estimate model, {c.codec} codec: {layout.width} x {layout.dtype} per token"
             f"{' + a float16 scale' if layout.scaled else ''}, zstd ratio assumed 1.0 (conservative; "
             f"`precompute estimate --sample-corpus` measures it)")
    return jobplan.encode_plan("encode", scan.n, cfg.execution.shard_size or auto_rows_per_split(scan.n), tpp, geometry, gpu, storage.total, basis,
                               dpr_geometry=dpr_geometry, notes=tuple(notes))


def plan_delta(cfg: RunConfig, update, gpu: jobplan.GpuAssumptions) -> jobplan.JobPlan:
    """Plan for an update: only new and changed passages are encoded (rates from the newest version)."""
    c = update.diff.counts()
    n = c["new"] + c["changed"]
    geometry = cost_geometry(resolve_main(cfg.model).checkpoint, cfg.model.layers)
    dpr, dpr_note = _dpr_checkpoint(cfg)
    dpr_geometry = _dpr_geometry(dpr, dpr_note)
    written = n * update.bytes_per_passage
    basis = f"{update.bytes_per_passage:,.0f} B/passage as stored in version {update.parent}"
    return jobplan.encode_plan("update", n, cfg.execution.shard_size or 10_000, update.tokens_per_passage, geometry, gpu,
                               written, basis, dpr_geometry=dpr_geometry,
                               notes=(f"diff: {c}",) + ((dpr_note,) if dpr_note else ()))


def measure_sample(model: ModelConfig, corpus: Corpus, size: int, compression: CompressionConfig,
                   with_zstd_ratio: bool) -> tuple[float, float | None]:
    """Tokens per passage on a corpus sample, and (when asked) the zstd ratio of the codes the
    configured codec, fitted on that sample, would store."""
    spec = resolve_main(model)
    t = tokenized_sample(corpus, corpus.scan(), spec, size)
    tpp, n = tokens_per_passage(t)
    log.info("measured %.1f tokens per passage on %d sample passages", tpp, n)
    if not with_zstd_ratio:
        return tpp, None
    import torch

    from pipeline.config import ConfigError
    from pipeline.model.encoder import LayeredEncoder, pad_batch
    from pipeline.codec.fitting import codec_from_states
    from pipeline.codec.zstd_frames import Packer

    enc = LayeredEncoder(spec.model, torch.device("cpu"), config=spec.checkpoint.hf_config)
    if compression.dims is not None and compression.dims > enc.hidden:
        raise ConfigError(f"--dims {compression.dims} exceeds the sample model's hidden size {enc.hidden}")
    states = []
    for start in range(0, len(t.input_ids), 32):
        ids, types = t.input_ids[start:start + 32], t.token_type_ids[start:start + 32]
        i, tt, am = pad_batch(ids, types, 0, "cpu")
        h = enc.embed_and_lower(i, tt, am)
        states += [h[row][am[row].bool()].numpy() for row in range(h.shape[0])]
    codec = codec_from_states(iter(states), compression)
    encode, packer = codec.encoder(torch.device("cpu"), torch.float32), Packer(compression.zstd_level or 3)
    raw = packed = 0
    for s in states:
        codes, _ = encode(torch.from_numpy(s))
        raw += codes.numel() * codes.element_size()
        packed += len(packer.pack(codes.numpy().tobytes()))
    ratio = raw / packed
    log.info("measured zstd ratio %.3f on the codes of %d passages (%s, %d layers, %s)",
             ratio, len(states), model.name, model.layers, codec.describe())
    return tpp, ratio
