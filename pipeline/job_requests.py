"""The flat commands' settings (update, index, estimate) as one mapping, whichever front end filled it.

`precompute update --corpus c.tsv` and a YAML job `corpus: c.tsv` give the same mapping; it is
checked here by the one type checker (pipeline.schema) and turned into the config the pipeline runs,
so the two front ends cannot drift apart."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, fields
from typing import Any, Mapping

from pipeline.config import (BUNDLED_MODEL, CompressionConfig, CorpusConfig, DprConfig, ModelConfig, RunConfig,
                             run_config_from_dict)
from pipeline.schema import ConfigError, build, check_mapping
from storage.estimate import Assumptions

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- update

# What an update may set instead of the parent version's recorded value, and where that value lives.
UPDATE_OVERRIDES = {
    "model": ("model", "name"), "layers": ("model", "layers"), "dims": ("compression", "dims"),
    "quantize": ("compression", "quantize"), "bits": ("compression", "bits"),
    "shard_size": ("execution", "shard_size"), "format": ("corpus", "format"),
    "on_duplicate": ("corpus", "on_duplicate"), "id_column": ("corpus", "id_column"),
    "title_column": ("corpus", "title_column"), "text_column": ("corpus", "text_column"),
}
UPDATE_SCHEMA = {
    "store": str, "storage_options": dict, "corpus": str, "corpus_storage_options": dict, "address": str,
    "rebuild_fraction": (int, float), "model": str, "layers": int, "dims": int, "quantize": str, "bits": (int, float),
    "shard_size": int, "format": str, "on_duplicate": str, "id_column": str, "title_column": str, "text_column": str,
}
UPDATE_REQUIRED = ("store", "corpus")
REBUILD_FRACTION = 0.2  # rebuild and retrain the index above this share of changed passages


def inherit_config(parent: Mapping[str, Any], version: int, request: Mapping[str, Any],
                   flags: bool = False) -> RunConfig:
    """The parent version's recorded config, with the new corpus and whatever the request overrides.

    A trial run's `limit` is never inherited: it would hide the rest of the new corpus. The compressor
    is always the parent's artifact (the update reuses it), never a file named at the first run. An
    override out of range is named as the request gave it: its flag (`flags`, the CLI) or its key."""
    body = copy.deepcopy(dict(parent))
    if not body:
        raise ConfigError(f"version {version} records no config; pass the run's flags explicitly")
    body["store"] = request["store"]
    body["storage_options"] = request.get("storage_options") or {}
    body["corpus"]["url"] = request["corpus"]
    body["corpus"]["storage_options"] = request.get("corpus_storage_options") or {}
    if body["corpus"].get("limit") is not None:
        log.info("version %s was written with --limit %d; the update reads the whole corpus", version,
                 body["corpus"]["limit"])
        body["corpus"]["limit"] = None
    body["compression"]["compressor"] = None
    body["execution"]["ray_address"] = request.get("address") or None
    names = {}
    for key, (section, field) in UPDATE_OVERRIDES.items():
        if request.get(key) is not None:
            body[section][field] = request[key]
            names[(section, field)] = "--" + key.replace("_", "-") if flags else key
    return run_config_from_dict(body, names)


def update_config(request: Mapping[str, Any], flags: bool = False) -> RunConfig:
    """`precompute update` / `jobs.update`: check the request, read the newest version, inherit its config.
    (The update plans its corpus before Ray starts: an empty file or a missing column fails first.)"""
    from storage import manifest as mf
    from storage.fs import Store

    request = check_mapping(request, UPDATE_SCHEMA, required=UPDATE_REQUIRED)
    parent = mf.load(Store(request["store"], request.get("storage_options") or {}))
    return inherit_config(parent.extra.get("config") or {}, parent.version, request, flags)


# ---------------------------------------------------------------- index

INDEX_SCHEMA = {"store": str, "factory": str, "storage_options": dict, "train_sample": int, "nprobe": int,
                "address": str}


def reindex_config(request: Mapping[str, Any]):
    """`precompute index` / `jobs.index`: the ReindexConfig, its defaults where the request leaves a key unset."""
    from pipeline.flows.reindex import ReindexConfig

    request = check_mapping(request, INDEX_SCHEMA, required=("store", "factory"))
    given = {k: v for k, v in request.items() if v is not None and k not in ("address", "storage_options")}
    return ReindexConfig(**given, ray_address=request.get("address"),
                         storage_options=request.get("storage_options") or {})


# ---------------------------------------------------------------- estimate

@dataclass(frozen=True)
class EstimateRequest:
    """What `precompute estimate` and `jobs.storage` price: the flags' defaults are these fields'."""
    passages: int = 32_000_000
    tokens_per_passage: float = 150.0
    hidden: int = 768
    codec: str = "linear"
    dims: int | None = None            # linear default 192; pq default: no projection (hidden)
    pq_m: int = 32
    opq: bool = False
    bits: float = 8                    # 2..8 quantised, 16 = float16
    bitpacked: bool = False
    zstd_ratio: float | None = None    # default: measured on sample_corpus, else a real store's at this width
    sample_corpus: str | None = None   # measure tokens/passage (and the zstd ratio) on this corpus
    corpus_storage_options: dict | None = None
    id_column: str = CorpusConfig.id_column
    title_column: str = CorpusConfig.title_column
    text_column: str = CorpusConfig.text_column
    sample_size: int = 2000            # passages tokenised for tokens/passage (cheap)
    zstd_sample_size: int = 300        # of those, passages encoded to measure the zstd ratio (the model runs)
    model: str = BUNDLED_MODEL
    layers: int = 3
    scale_bytes: float = 2.0
    token_id_bytes: float = Assumptions.token_id_bytes
    per_passage_bytes: float = Assumptions.per_passage_bytes
    container_overhead: float = Assumptions.container_overhead
    dpr_dim: int = Assumptions.dpr_dim
    index_factory: str = DprConfig.index_factory  # the run's; "none" = no index
    index_bytes_per_vector: float = Assumptions.index_bytes_per_vector  # set: overrides the factory's model
    prices: dict | None = None         # tier -> $/GB-month, added to (or replacing) the list prices

    @classmethod
    def from_mapping(cls, body: Mapping[str, Any]) -> "EstimateRequest":
        """Unset keys keep the defaults."""
        return build(cls, {k: v for k, v in body.items() if v is not None})

    def price_table(self) -> dict[str, float]:
        from storage.estimate import PRICE_TIERS

        prices = dict(PRICE_TIERS)
        for name, value in (self.prices or {}).items():
            try:
                prices[name] = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"prices.{name}: expected dollars per GB-month, got {value!r}") from None
        return prices


ESTIMATE_KEYS = tuple(f.name for f in fields(EstimateRequest))


def _compression(req: EstimateRequest) -> CompressionConfig:
    """The codec settings the estimate prices: the run's own defaults (linear: 192 dims; pq: no projection)."""
    stored = req.dims or req.hidden
    if req.codec == "pq" and (req.pq_m < 1 or stored % req.pq_m):
        raise ConfigError(f"--pq-m {req.pq_m} must be a positive divisor of the stored dims {stored}")
    return CompressionConfig(codec=req.codec, dims=req.dims, quantize="none" if req.bits == 16 else "int8",
                             bits=min(req.bits, 8), pq_m=req.pq_m, opq=req.opq)


def storage_estimate(req: EstimateRequest):
    """`precompute estimate`: tokens (measured on a sample corpus when one is named), the codec's layout, the
    estimate of every file a run writes. Storage's cost model knows bytes; the codec's layout and defaults,
    the split plan and the run's index factory are the pipeline's."""
    from pipeline.codec.state_codec import planned_layout
    from pipeline.corpus.splits import auto_rows_per_split
    from storage.estimate import codec_artifact_bytes, codec_assumptions, estimate

    settings = _compression(req)
    tpp, ratio = req.tokens_per_passage, req.zstd_ratio
    if req.sample_corpus:
        tpp, measured = _measure_sample(req, settings, with_ratio=ratio is None)
        ratio = ratio if ratio is not None else measured
    stored = settings.dims or req.hidden
    layout = planned_layout(req.codec, stored, settings.quantize, req.pq_m)
    codec = codec_assumptions(layout.estimate_fields(req.bits), req.codec == "linear", req.scale_bytes,
                              req.bitpacked, ratio)
    rest = {k: getattr(req, k) for k in ("passages", "hidden", "bitpacked", "token_id_bytes", "per_passage_bytes",
                                         "container_overhead", "dpr_dim", "index_bytes_per_vector")}
    factory = "" if req.index_factory.strip().lower() in ("", "none") else req.index_factory.strip()
    shards = -(-req.passages // auto_rows_per_split(req.passages)) if req.passages else 0
    try:
        artifact = codec_artifact_bytes(req.codec, req.hidden, stored, projected=req.dims is not None, opq=req.opq,
                                        fit_sample=settings.fit_sample, id_digits=len(str(max(req.passages, 1))))
        e = estimate(Assumptions(tokens_per_passage=tpp, **rest, **codec, index_factory=factory,
                                 artifact_bytes=artifact, shards=shards))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    e.notes = _index_notes(factory, req)
    return e


def _index_notes(factory: str, req: EstimateRequest) -> list[str]:
    """Where the run would refuse the priced index (a whole-built layout over too many vectors), say so."""
    from pipeline.index.plan import whole_index_refusal

    if not factory or not req.dpr_dim or req.index_bytes_per_vector or "IVF" in factory:
        return []
    refusal = whole_index_refusal(factory, req.passages, req.dpr_dim)
    return [f"{refusal}; the {factory} index above is priced all the same"] if refusal else []


def _measure_sample(req: EstimateRequest, settings: CompressionConfig, with_ratio: bool):
    """Tokens per passage from `sample_size` passages of the sample corpus (tokenising only), and the code
    zstd ratio, if asked, from the first `zstd_sample_size` of them (the encoder runs on those): a few
    hundred passages settle the ratio, while tokens per passage needs more of the corpus to be unbiased."""
    from pipeline.corpus.source import Corpus
    from pipeline.flows.dry_run import measure_sample

    if req.sample_size < 1 or req.zstd_sample_size < 1:
        raise ConfigError("--sample-size and --zstd-sample-size must be at least 1")
    model = ModelConfig(name=req.model, layers=req.layers)

    def corpus(limit: int) -> Corpus:
        return Corpus(CorpusConfig(url=req.sample_corpus, limit=limit, id_column=req.id_column,
                                   title_column=req.title_column, text_column=req.text_column),
                      req.corpus_storage_options or {})

    tpp, _ = measure_sample(model, corpus(req.sample_size), req.sample_size, settings, with_zstd_ratio=False)
    if not with_ratio:
        return tpp, None
    size = min(req.sample_size, req.zstd_sample_size)
    return tpp, measure_sample(model, corpus(size), size, settings, with_zstd_ratio=True)[1]



ASSUMED_NOTE = ("tokens per passage and zstd ratio are assumptions here (the zstd ratio unless given: a real "
                "768-wide store's); the encode job's --dry-run measures tokens on the corpus")


def encode_plan_from_assumptions(req: EstimateRequest, layers: int | None, shard_size: int | None, gpu):
    """An encode plan from the estimate's assumptions alone, no corpus or model read: a BERT-shaped encoder
    (FFN = 4 x hidden) of `layers` lower layers (default 5, the paper's), priced like `precompute estimate`."""
    from dataclasses import replace

    from pipeline.flows.job_cost import ModelGeometry, encode_plan

    e = storage_estimate(replace(req, sample_corpus=None))
    a = e.assumptions
    return encode_plan("encode (from assumptions)", a.passages, shard_size or 1000, a.tokens_per_passage,
                       ModelGeometry(a.hidden, 4 * a.hidden, layers or 5), gpu, e.total,
                       f"precompute estimate: {a.bits:g}-bit codes, zstd ratio {a.zstd_ratio:g}", notes=(ASSUMED_NOTE,))
