"""The checks that cost seconds, made before Ray starts or anything is written.

A wrong flag should cost a user one line and exit 2, not a Ray start-up and a worker traceback:
the store must take a write, the model's config must load and fit --layers and --dims, and the
DPR model and index factory must agree (`run.check_index_config`, after the corpus is listed)."""
from __future__ import annotations

import logging

from pipeline.config import ConfigError, ModelConfig, RunConfig
from storage.fs import check_writable, read_url, redact_url

log = logging.getLogger(__name__)


def model_geometry(model: ModelConfig) -> tuple[int, int]:
    """(layers, hidden size) from the model's config alone: no weights are loaded."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model.path, revision=model.revision)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model {model.name!r}: cannot load its config ({first[:300]}); pass a hub name or a "
                          f"local directory with config.json") from exc
    layers = getattr(cfg, "num_hidden_layers", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not isinstance(layers, int) or not isinstance(hidden, int):
        raise ConfigError(f"model {model.name!r} is not a BERT-style encoder (its config has no num_hidden_layers/"
                          f"hidden_size)")
    return layers, hidden


def check_model(model: ModelConfig, dims: int | None) -> int:
    """The model's hidden size, once --layers and --dims are known to fit it."""
    depth, hidden = model_geometry(model)
    if model.layers > depth:
        raise ConfigError(f"--layers {model.layers}: {model.name} has {depth} layers; the input component is at "
                          f"most all of them (the paper uses the lower 5 of 12)")
    if dims is not None and dims > hidden:
        raise ConfigError(f"--dims {dims} exceeds {model.name}'s hidden size {hidden}: the compressor can only "
                          f"reduce dimensions (the paper keeps 192 of 768)")
    return hidden


def check_states(model: ModelConfig, attention: str) -> None:
    """The input component, on the path the encoders will take, must reproduce the model's own
    `hidden_states[N]` (float32 here; each encoder repeats the check on its own device and dtype)."""
    import torch

    from pipeline.model.encoder import InputComponent

    lower = InputComponent(model, torch.device("cpu"), attention=attention)
    log.info("checked: %s's lower %d layers on the %s path reproduce its own forward (worst token relative "
             "error %.1e)", model.name, model.layers, lower.attention, lower.check_error)


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


def preflight_run(cfg: RunConfig) -> bytes | None:
    """Store, model and compression settings, in that order; the first problem raises.

    Returns the bytes of a given --compressor (read once, here), else None."""
    from pipeline.codec.state_codec import codec_from_bytes

    check_writable(cfg.store, cfg.storage_options)
    hidden = check_model(cfg.model, cfg.compression.dims)
    check_states(cfg.model, cfg.execution.attention)
    c = cfg.compression
    if c.codec == "pq" and c.dims is None and hidden % c.pq_m:
        raise ConfigError(f"--pq-m {c.pq_m} does not divide {cfg.model.name}'s hidden size {hidden}: pick a divisor, "
                          f"or project first with --dims")
    data = None
    if c.compressor:
        where = redact_url(c.compressor)
        data = read_url(cfg.compressor_location)
        check_compressor(codec_from_bytes(data, where, c.quantize, c.bits), where, c, hidden)
    if cfg.dpr is not None:
        from pipeline.model.dpr import embedding_dim

        try:
            embedding_dim(cfg.dpr.model, cfg.dpr.revision)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"DPR model {cfg.dpr.model!r}: cannot load its config "
                              f"({str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc!r})") from exc
    log.info("checked: store %s writable, model %s fits --layers %d", redact_url(cfg.store), cfg.model.name,
             cfg.model.layers)
    return data
