"""What a run needs to know about its models, read once on the driver before Ray starts.

Every config load is a chance for a hub revision to move mid-run, and each cost seconds; so the
driver reads each checkpoint's config (and, where the DPR pass needs to compare vocabularies,
its tokenizer) exactly once, here, and hands the result down: to preflight's checks, the
fingerprint, the dry-run plan and, inside `StageContext`, to the workers, which load weights only.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pipeline.config import ConfigError, DprConfig, ModelConfig, RunConfig, resolve_model

_LOAD_ERRORS = (OSError, ValueError, KeyError)
_ROBERTA_STYLE = ("roberta", "xlm-roberta", "camembert")  # two position slots reserved for the padding offset


@dataclass(frozen=True)
class TokenizerFacts:
    """What decides whether two tokenizers turn a passage into the same ids."""
    kind: str  # the tokenizer's class name
    vocab_digest: str  # sha256 of its vocabulary (token -> id)
    do_lower_case: bool | None
    size: int  # len(tokenizer): added tokens included
    is_fast: bool

    @classmethod
    def of(cls, tok) -> "TokenizerFacts":
        vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode()
        return cls(type(tok).__name__, hashlib.sha256(vocab).hexdigest(), getattr(tok, "do_lower_case", None),
                   len(tok), bool(getattr(tok, "is_fast", False)))

    def same_ids(self, other: "TokenizerFacts") -> bool:
        return (self.vocab_digest, self.kind, self.do_lower_case) == (other.vocab_digest, other.kind,
                                                                      other.do_lower_case)


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint's facts from its config. `hf_config` is kept so that whoever loads the weights
    (a worker, preflight's state check) is handed it instead of reading config.json again."""
    name: str
    path: str
    requested_revision: str | None  # --model-revision / --dpr-revision as given
    load_revision: str | None  # passed to from_pretrained: the given one, else the hub commit the config came from
    model_type: str
    depth: int | None  # num_hidden_layers
    hidden: int | None
    intermediate: int | None
    positions: int  # max_position_embeddings (512 when the config does not say)
    type_vocab_size: int
    projection_dim: int | None
    tokenizer: TokenizerFacts | None = None  # read only where a vocabulary comparison needs it
    hf_config: Any = field(default=None, compare=False, repr=False)

    @cached_property
    def revision(self) -> str:
        """As recorded in the fingerprint: the given one, a local checkpoint's digest, or "main". Computed
        on first use, once (hashing a local checkpoint reads every weight file; a dry run never needs it)."""
        from pipeline.model.encoder import model_revision

        return model_revision(ModelConfig(name=self.name, revision=self.requested_revision))

    @property
    def embedding_width(self) -> int:
        """The width of the vectors the model's pooled output has (a DPR projection, else hidden)."""
        return int(self.projection_dim or self.hidden)

    def model_config(self, base: ModelConfig) -> ModelConfig:
        """`base` with the revision workers must load: the one this config was read at."""
        from dataclasses import replace

        return replace(base, revision=self.load_revision)


def read_checkpoint(name: str, revision: str | None, tokenizer: bool = False) -> Checkpoint:
    """Read a checkpoint's config (and tokenizer, when asked) once. Raises what transformers raises."""
    from transformers import AutoConfig

    path = resolve_model(name)
    cfg = AutoConfig.from_pretrained(path, revision=revision)
    tok = None
    if tokenizer:
        from transformers import AutoTokenizer

        tok = TokenizerFacts.of(AutoTokenizer.from_pretrained(path, revision=revision, use_fast=True, config=cfg))
    as_int = lambda key: getattr(cfg, key) if isinstance(getattr(cfg, key, None), int) else None  # noqa: E731
    return Checkpoint(
        name=name, path=path, requested_revision=revision, load_revision=revision or getattr(cfg, "_commit_hash", None), model_type=getattr(cfg, "model_type", ""),
        depth=as_int("num_hidden_layers"), hidden=as_int("hidden_size"), intermediate=as_int("intermediate_size"),
        positions=int(getattr(cfg, "max_position_embeddings", 512)),
        type_vocab_size=int(getattr(cfg, "type_vocab_size", 2) or 1), projection_dim=as_int("projection_dim"),
        tokenizer=tok, hf_config=cfg)


def position_limit(model_type: str, positions: int) -> int:
    """The longest sequence a model takes, from its config's positions (RoBERTa reserves two)."""
    return positions - 2 if model_type in _ROBERTA_STYLE else positions


def max_length_for(model: ModelConfig, limit: int) -> int:
    """--max-length, checked against the model's `limit`; the limit itself when unset."""
    if model.max_length is not None:
        if model.max_length > limit:
            raise ConfigError(f"max_length={model.max_length} exceeds the model's {limit} positions")
        return model.max_length
    return limit


@dataclass(frozen=True)
class DprSpec:
    """The DPR pass's model with its pooling and normalisation decided (never "auto" or None)."""
    checkpoint: Checkpoint
    pooling: str
    normalize: bool
    shares_tokens: bool  # same vocabulary as the input component: the DPR pass reuses its token ids

    @property
    def is_dpr(self) -> bool:
        return self.checkpoint.model_type == "dpr"

    def fingerprint(self, dpr: DprConfig) -> dict[str, Any]:
        """The `dpr` entry of a store's fingerprint (keys and values as stores were always written)."""
        return {"model": dpr.model, "revision": self.checkpoint.revision, "pooling": self.pooling,
                "dtype": dpr.dtype, "normalize": self.normalize, "question_model": dpr.question}


@dataclass(frozen=True)
class ModelSpec:
    """The input component's checkpoint, how much of it runs and on how long a passage, and the DPR side."""
    checkpoint: Checkpoint
    model: ModelConfig  # the run's model section, its revision pinned to the one the config was read at
    max_length: int
    dpr: DprSpec | None = None

    @property
    def name(self) -> str:
        return self.checkpoint.name

    @property
    def layers(self) -> int:
        return self.model.layers

    @property
    def revision(self) -> str:
        return self.checkpoint.revision

    @property
    def hidden(self) -> int:
        return int(self.checkpoint.hidden)


def _first_line(exc: BaseException, empty: str) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else empty


def resolve_main(model: ModelConfig, tokenizer: bool = False) -> ModelSpec:
    """The input component's spec; a config that cannot be read or is no BERT-style encoder is a ConfigError."""
    try:
        ck = read_checkpoint(model.name, model.revision, tokenizer)
    except _LOAD_ERRORS as exc:
        raise ConfigError(f"model {model.name!r}: cannot load its config ({_first_line(exc, type(exc).__name__)}); "
                          f"pass a hub name or a local directory with config.json") from exc
    if ck.depth is None or ck.hidden is None:
        raise ConfigError(f"model {model.name!r} is not a BERT-style encoder (its config has no num_hidden_layers/"
                          f"hidden_size)")
    return ModelSpec(ck, ck.model_config(model), max_length_for(model, position_limit(ck.model_type, ck.positions)))


def resolve_dpr(dpr: DprConfig, main: Checkpoint) -> DprSpec:
    """The DPR side: its config and tokenizer read once, pooling/normalisation and vocabulary decided."""
    from pipeline.model.dpr import resolve_normalize, resolve_pooling

    if main.tokenizer is None:
        raise ValueError("resolve_dpr needs the input component's tokenizer facts (resolve_main(tokenizer=True))")
    same = (dpr.model, dpr.revision) == (main.name, main.requested_revision)  # the same checkpoint: read once
    try:
        ck = main if same else read_checkpoint(dpr.model, dpr.revision, tokenizer=True)
    except _LOAD_ERRORS as exc:
        raise ConfigError(f"DPR model {dpr.model!r}: cannot load its config ({_first_line(exc, repr(exc))})") from exc
    return DprSpec(ck, resolve_pooling(ck.path, dpr.pooling), resolve_normalize(ck.path, dpr.normalize),
                   shares_tokens=main.tokenizer.same_ids(ck.tokenizer))


def resolve_spec(cfg: RunConfig) -> ModelSpec:
    """Everything the run needs to know about its models; each config read once, here."""
    from dataclasses import replace

    spec = resolve_main(cfg.model, tokenizer=cfg.dpr is not None)
    if cfg.dpr is None:
        return spec
    return replace(spec, dpr=resolve_dpr(cfg.dpr, spec.checkpoint))
