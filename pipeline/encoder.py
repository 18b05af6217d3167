"""The input component (lower N layers of a HF encoder), run on length-sorted token-budget batches.

Only d-dimensional codes leave the device: projection and quantisation happen next to the model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoModel

from pipeline.codec import Codec
from pipeline.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda asked for, but torch sees no GPU")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def compute_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_token_budget(device: torch.device) -> int:
    """Padded tokens per forward pass: small on CPU (cache-friendly, measured best at 4096 here),
    large on GPU to fill the device."""
    return 65536 if device.type == "cuda" else 4096


def token_budget_batches(lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Group indices (longest first) so each batch's padded size, count x max length, fits `budget`."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < order.size:
        longest = int(lengths[order[start]])
        count = max(1, budget // max(longest, 1))
        batches.append(order[start:start + count])
        start += count
    return batches


def _layer_stack(model) -> torch.nn.ModuleList:
    for path in ("encoder.layer", "transformer.layer", "layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ConfigError(f"{type(model).__name__}: no encoder layer stack found (supported: BERT, ELECTRA, "
                      f"RoBERTa-style models with .encoder.layer)")


class LayeredEncoder:
    """Embeddings plus the layer stack, callable over any contiguous range of layers."""

    def __init__(self, model_cfg: ModelConfig, device: torch.device, keep_upper: bool = False, model=None):
        """`model`: an already loaded base model (e.g. the encoder inside a QA checkpoint) instead of loading one."""
        self.device = device
        self.dtype = compute_dtype(device)
        if model is None:
            model = AutoModel.from_pretrained(model_cfg.path, revision=model_cfg.revision, dtype=self.dtype)
        model.eval().requires_grad_(False)
        layers = _layer_stack(model)
        self.total_layers = len(layers)
        if model_cfg.layers > self.total_layers:
            raise ConfigError(f"--layers {model_cfg.layers}: {model_cfg.name} has only {self.total_layers} layers")
        self.n_lower = model_cfg.layers
        keep = self.total_layers if keep_upper else self.n_lower
        self.layers = torch.nn.ModuleList(list(layers)[:keep]).to(device)
        self.embeddings = model.embeddings.to(device)
        self.hidden = int(model.config.hidden_size)
        self.vocab_size = int(model.config.vocab_size)
        self.type_vocab_size = int(getattr(model.config, "type_vocab_size", 1) or 1)
        del model

    def additive_mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        mask = torch.zeros(attention_mask.shape[0], 1, 1, attention_mask.shape[1], device=self.device, dtype=dtype)
        return mask.masked_fill_(attention_mask[:, None, None, :] == 0, torch.finfo(dtype).min)

    @torch.inference_mode()
    def embed_and_lower(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": input_ids}
        if self.type_vocab_size > 1:
            kwargs["token_type_ids"] = token_type_ids
        h = self.embeddings(**kwargs)
        return self.run_layers(h, attention_mask, 0, self.n_lower)

    @torch.inference_mode()
    def run_layers(self, h: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if stop > len(self.layers):
            raise ConfigError("upper layers were not loaded (keep_upper=False)")
        mask = self.additive_mask(attention_mask, h.dtype)
        for layer in self.layers[start:stop]:
            out = layer(h, attention_mask=mask)
            h = out[0] if isinstance(out, tuple) else out
        return h


@dataclass
class EncodedShard:
    codes: list[np.ndarray]        # per passage: [n_tokens, width] in the codec's layout
    scales: list[np.ndarray] | None  # per passage [n_tokens] float16, for a codec whose layout is scaled
    seconds: float
    tokens: int
    padded_tokens: int


def pad_batch(seqs: list[np.ndarray], types: list[np.ndarray], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    tt = np.zeros((len(seqs), width), dtype=np.int64)
    am = np.zeros((len(seqs), width), dtype=np.int64)
    for i, (s, t) in enumerate(zip(seqs, types)):
        ids[i, :len(s)] = s
        tt[i, :len(t)] = t
        am[i, :len(s)] = 1
    as_t = lambda a: torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
    return as_t(ids), as_t(tt), as_t(am)


def _to_host(t: torch.Tensor) -> np.ndarray:
    """Device -> host through pinned memory (an async DMA on GPU); a plain view on CPU."""
    if t.device.type != "cuda":
        return t.numpy()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    torch.cuda.current_stream().synchronize()
    return host.numpy()


class ShardEncoder:
    """Lower layers -> the codec's encoder, all on the device; returns per-passage codes."""

    def __init__(self, model_cfg: ModelConfig, codec: Codec, token_budget: int | None, device: torch.device,
                 pad_id: int = 0):
        self.encoder = LayeredEncoder(model_cfg, device)
        if codec.hidden != self.encoder.hidden:
            raise ConfigError(f"the codec expects hidden size {codec.hidden}, "
                              f"model {model_cfg.name} has {self.encoder.hidden}")
        self.encode_states = codec.encoder(device, self.encoder.dtype)
        self.scaled = codec.layout.scaled
        self.token_budget = token_budget or default_token_budget(device)
        self.pad_id = pad_id

    def encode(self, input_ids: list[np.ndarray], token_types: list[np.ndarray]) -> EncodedShard:
        import time
        t0 = time.perf_counter()
        lengths = np.fromiter((len(s) for s in input_ids), dtype=np.int64, count=len(input_ids))
        codes: list[np.ndarray | None] = [None] * len(input_ids)
        scales: list[np.ndarray | None] | None = [None] * len(input_ids) if self.scaled else None
        padded = 0
        device = self.encoder.device
        for batch in token_budget_batches(lengths, self.token_budget):
            ids, tt, am = pad_batch([input_ids[i] for i in batch], [token_types[i] for i in batch],
                                    self.pad_id, device)
            padded += ids.numel()
            with torch.inference_mode():
                h = self.encoder.embed_and_lower(ids, tt, am)
                q, s = self.encode_states(h[am.bool()])  # only real tokens, packed [sum(n_i), hidden]
            q_host = _to_host(q)
            s_host = _to_host(s) if s is not None else None
            offset = 0
            for i in batch:
                n = int(lengths[i])
                codes[i] = q_host[offset:offset + n]
                if scales is not None:
                    scales[i] = s_host[offset:offset + n]
                offset += n
        return EncodedShard(codes=codes, scales=scales, seconds=time.perf_counter() - t0,
                            tokens=int(lengths.sum()), padded_tokens=padded)


def model_revision(model_cfg: ModelConfig) -> str:
    """Pin what was run: the given revision, or a digest of a local checkpoint's files."""
    import hashlib
    import os

    path = model_cfg.path
    if not os.path.isdir(path):
        if model_cfg.revision is None:
            log.warning("model %s has no --model-revision pinned; recording 'main'", model_cfg.name)
        return model_cfg.revision or "main"
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".bin", ".json", ".txt")):
            with open(os.path.join(path, name), "rb") as fh:
                while chunk := fh.read(8 << 20):
                    h.update(chunk)
    return f"local-sha256:{h.hexdigest()[:16]}"
