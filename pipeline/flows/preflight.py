"""The checks that cost seconds, made before Ray starts or anything is written.

A wrong flag should cost a user one line and exit 2, not a Ray start-up and a worker traceback:
the store must take a write, the model's config must load and fit --layers and --dims, and the
DPR model and index factory must agree (`run.check_index_config`, after the corpus is listed).
What these checks read (the models' configs, a --compressor file) is handed to the run, not read again."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.config import ConfigError, RunConfig
from pipeline.model.spec import ModelSpec, resolve_dpr, resolve_main
from storage.fs import check_writable, read_url, redact_url, sha256_bytes

log = logging.getLogger(__name__)


def check_model(spec: ModelSpec, dims: int | None) -> int:
    """The model's hidden size, once --layers and --dims are known to fit it."""
    model, depth, hidden = spec.model, spec.checkpoint.depth, spec.hidden
    if model.layers > depth:
        raise ConfigError(f"--layers {model.layers}: {model.name} has {depth} layers; the input component is at "
                          f"most all of them (the paper uses the lower 5 of 12)")
    if dims is not None and dims > hidden:
        raise ConfigError(f"--dims {dims} exceeds {model.name}'s hidden size {hidden}: the compressor can only "
                          f"reduce dimensions (the paper keeps 192 of 768)")
    return hidden


def check_states(spec: ModelSpec, attention: str) -> None:
    """The input component, on the path the encoders will take, must reproduce the model's own
    `hidden_states[N]` (float32 here; each encoder repeats the check on its own device and dtype)."""
    import torch

    from pipeline.model.encoder import InputComponent

    lower = InputComponent(spec.model, torch.device("cpu"), attention=attention, config=spec.checkpoint.hf_config)
    log.info("checked: %s's lower %d layers on the %s path reproduce its own forward (worst token relative "
             "error %.1e)", spec.name, spec.layers, lower.attention, lower.check_error)


def check_compressor(codec, where: str, compression, hidden: int | None) -> None:
    """A given codec file must be the codec, dims and sub-quantiser count the flags ask for."""
    if codec.kind != compression.codec:
        raise ConfigError(f"--compressor {where} holds a {codec.kind} codec, but --codec is {compression.codec}: "
                          f"pass --codec {codec.kind}")
    if compression.dims is not None and codec.dims != compression.dims:
        raise ConfigError(f"--compressor {where} stores {codec.dims} dims per token, but --dims is "
                          f"{compression.dims}: pass --dims {codec.dims}")
    if codec.residual != compression.residual:
        raise ConfigError(f"--compressor {where} codes residual={codec.residual}, but --residual is "
                          f"{compression.residual}: pass --residual {codec.residual}")
    m = codec.fingerprint_fields().get("pq_m")
    if m is not None and m != compression.pq_m:
        raise ConfigError(f"--compressor {where} has {m} sub-quantisers, but --pq-m is {compression.pq_m}: "
                          f"pass --pq-m {m}")
    if hidden is not None and codec.hidden != hidden:
        raise ConfigError(f"--compressor {where} expects {codec.hidden}-dim states, but the model's are {hidden}")


@dataclass(frozen=True)
class GivenCodec:
    """A --compressor file as preflight read, decoded and checked it: the run stores these bytes and
    fingerprints this digest, without reading or decoding the file again."""
    data: bytes = field(repr=False)
    sha256: str
    codec: Any = field(repr=False)


@dataclass(frozen=True)
class Preflight:
    spec: ModelSpec  # every model fact the run needs, read once
    compressor: GivenCodec | None  # the --compressor file, when one was given


def read_given_codec(cfg: RunConfig, hidden: int | None) -> GivenCodec:
    """Read and decode --compressor once; it must be what the flags ask for (and fit `hidden`, when known)."""
    from pipeline.codec.state_codec import codec_from_bytes

    c = cfg.compression
    where = redact_url(c.compressor)
    data = read_url(cfg.compressor_location)
    codec = codec_from_bytes(data, where, c.quantize, c.bits)
    check_compressor(codec, where, c, hidden)
    return GivenCodec(data, sha256_bytes(data), codec)


def preflight_run(cfg: RunConfig) -> Preflight:
    """Store, model and compression settings, in that order; the first problem raises.

    Each model's config is read here, once (`ModelSpec`), and a given --compressor read and decoded once."""
    check_writable(cfg.store, cfg.storage_options)
    spec = resolve_main(cfg.model, tokenizer=cfg.dpr is not None)
    hidden = check_model(spec, cfg.compression.dims)
    check_states(spec, cfg.execution.attention)
    c = cfg.compression
    if c.codec == "pq" and c.dims is None and hidden % c.pq_m:
        raise ConfigError(f"--pq-m {c.pq_m} does not divide {cfg.model.name}'s hidden size {hidden}: pick a divisor, "
                          f"or project first with --dims")
    given = read_given_codec(cfg, hidden) if c.compressor else None
    if cfg.dpr is not None:
        spec = replace(spec, dpr=resolve_dpr(cfg.dpr, spec.checkpoint))
    log.info("checked: store %s writable, model %s fits --layers %d", redact_url(cfg.store), cfg.model.name,
             cfg.model.layers)
    return Preflight(spec, given)
