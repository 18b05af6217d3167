"""The input component (lower N layers of a HF encoder), run on length-sorted token-budget batches.

Only d-dimensional codes leave the device: projection and quantisation happen next to the model.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoModel

from pipeline.codec import Codec
from pipeline.config import ATTENTION_CHOICES, ConfigError, ModelConfig
from pipeline.packed import PackedBatch, PackedLowerLayers, packed_unsupported, token_index, varlen_available

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
        # ELECTRA with embedding_size != hidden_size maps embeddings up before the first layer.
        project = getattr(model, "embeddings_project", None)
        self.embeddings_project = project.to(device) if project is not None else None
        self.packed_unsupported = packed_unsupported(model)
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
        if self.embeddings_project is not None:
            h = self.embeddings_project(h)
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
class EncodedTokens:
    """A shard's codes, flat: passage i's tokens are rows offsets[i]:offsets[i+1], in input order."""
    codes: np.ndarray               # [T, width] in the codec's layout
    scales: np.ndarray | None       # [T] float16, for a codec whose layout is scaled
    offsets: np.ndarray             # [n + 1] int64
    seconds: float
    tokens: int
    padded_tokens: int              # tokens the forward passes computed (= tokens when packed)


@dataclass
class EncodedShard:
    codes: list[np.ndarray]        # per passage: [n_tokens, width] in the codec's layout
    scales: list[np.ndarray] | None  # per passage [n_tokens] float16, for a codec whose layout is scaled
    seconds: float
    tokens: int
    padded_tokens: int


def pad_batch(seqs: list[np.ndarray], types: list[np.ndarray], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    lengths = np.fromiter((len(x) for x in seqs), dtype=np.int64, count=len(seqs))
    return pad_flat(np.concatenate(seqs), np.concatenate(types), lengths, pad_id, device)


def pad_flat(ids: np.ndarray, types: np.ndarray, lengths: np.ndarray, pad_id: int,
             device) -> tuple[torch.Tensor, ...]:
    """`pad_batch` for tokens laid end to end (vectorised): [B, max len] ids, types, attention mask."""
    rows, width = lengths.size, int(lengths.max())
    valid = np.arange(width)[None, :] < lengths[:, None]
    out_ids = np.full((rows, width), pad_id, dtype=np.int64)
    out_types = np.zeros((rows, width), dtype=np.int64)
    out_ids[valid] = ids  # row-major order of `valid` is the passages end to end
    out_types[valid] = types
    as_t = lambda a: torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
    return as_t(out_ids), as_t(out_types), as_t(valid.astype(np.int64))


class HostCopies:
    """Device -> host copies that overlap the next batch's compute.

    On CUDA each result is copied into pinned memory on the compute stream and an event is recorded;
    the host waits for batch k's copy only after batch k+1 has been queued. On CPU a result is ready
    at once."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple] = []

    def put(self, tensors: tuple, payload) -> list[tuple]:
        """Queue one batch's result tensors; returns the batches now on the host as (arrays, payload)."""
        if not self.cuda:
            return [(tuple(t.numpy() if t is not None else None for t in tensors), payload)]
        hosts = []
        for t in tensors:
            if t is None:
                hosts.append(None)
                continue
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            hosts.append(host)
        event = torch.cuda.Event(blocking=True)  # the host sleeps on it rather than spinning a core
        event.record()
        self.pending.append((event, hosts, payload))
        return self._ready(keep=1)

    def drain(self) -> list[tuple]:
        return self._ready(keep=0)

    def _ready(self, keep: int) -> list[tuple]:
        done = []
        while len(self.pending) > keep:
            event, hosts, payload = self.pending.pop(0)
            event.synchronize()
            done.append((tuple(h.numpy() if h is not None else None for h in hosts), payload))
        return done


def resolve_attention(requested: str, encoder: LayeredEncoder) -> str:
    """The attention path to run: `mask` (HF layers, 4-d additive mask) or `packed` (pipeline.packed)."""
    if requested not in ATTENTION_CHOICES:
        raise ConfigError(f"attention={requested!r}: one of {', '.join(ATTENTION_CHOICES)}")
    if requested == "mask":
        return "mask"
    if encoder.packed_unsupported:
        if requested == "packed":
            raise ConfigError(f"attention=packed: not for this model: {encoder.packed_unsupported}")
        return "mask"
    return "packed"


class ShardEncoder:
    """Lower layers -> the codec's encoder, all on the device; returns codes for real tokens only.

    `attention`: `packed` runs unpadded batches (varlen flash attention on CUDA), `mask` the HF layers
    on padded batches; `auto` is packed wherever the model allows it."""

    def __init__(self, model_cfg: ModelConfig, codec: Codec, token_budget: int | None, device: torch.device,
                 pad_id: int = 0, attention: str = "auto", compile: bool = False):
        self.encoder = LayeredEncoder(model_cfg, device)
        if codec.hidden != self.encoder.hidden:
            raise ConfigError(f"the codec expects hidden size {codec.hidden}, "
                              f"model {model_cfg.name} has {self.encoder.hidden}")
        self.encode_states = codec.encoder(device, self.encoder.dtype)
        self.scaled = codec.layout.scaled
        self.token_budget = token_budget or default_token_budget(device)
        self.pad_id = pad_id
        self.attention = resolve_attention(attention, self.encoder)
        self.packed = None
        if self.attention == "packed":
            kernel = "varlen" if varlen_available(device) else "padded"
            enc = self.encoder
            self.packed = PackedLowerLayers(enc.embeddings, enc.embeddings_project, list(enc.layers)[:enc.n_lower],
                                            enc.type_vocab_size, kernel, compile)
        elif compile and attention == "mask":
            raise ConfigError("compile needs the packed attention path (attention=packed or auto)")
        elif compile:
            log.warning("compile skipped: %s runs the masked path (%s)", model_cfg.name,
                        self.encoder.packed_unsupported)
        self.kernel = self.packed.kernel if self.packed is not None else "sdpa-mask"
        log.info("encoder: attention %s (%s), token budget %d, compile %s, %s", self.attention, self.kernel,
                 self.token_budget, compile, self.encoder.dtype)

    def _states(self, ids: np.ndarray, types: np.ndarray, lengths: np.ndarray) -> tuple[torch.Tensor, int]:
        """One batch (tokens end to end) -> [T, hidden] lower-layer states of its real tokens, and the
        tokens computed."""
        device = self.encoder.device
        if self.packed is not None:
            return self.packed(PackedBatch.build(ids, types, lengths, device)), int(lengths.sum())
        i, t, am = pad_flat(ids, types, lengths, self.pad_id, device)
        return self.encoder.embed_and_lower(i, t, am)[am.bool()], i.numel()

    def encode_flat(self, ids: np.ndarray, types: np.ndarray, offsets: np.ndarray) -> EncodedTokens:
        """Passages as flat token arrays plus offsets (Arrow's list layout) -> flat codes, same offsets."""
        t0 = time.perf_counter()
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.size == 0:
            raise ValueError("offsets: n + 1 entries for n passages (at least [0])")
        lengths = np.diff(offsets)
        total = int(offsets[-1] - offsets[0])
        codes = scales = None
        padded = 0
        copies = HostCopies(self.encoder.device)

        def place(done):
            nonlocal codes, scales
            for (q, s), rows in done:
                if codes is None:
                    codes = np.empty((total,) + q.shape[1:], dtype=q.dtype)
                    scales = np.empty(total, dtype=s.dtype) if s is not None else None
                codes[rows - offsets[0]] = q
                if scales is not None:
                    scales[rows - offsets[0]] = s

        for batch in token_budget_batches(lengths, self.token_budget):
            rows = token_index(offsets, batch)
            with torch.inference_mode():
                h, computed = self._states(ids[rows], types[rows], lengths[batch])
                padded += computed
                q, s = self.encode_states(h)
            place(copies.put((q, s), rows))
        place(copies.drain())
        if codes is None:  # no passages
            codes = np.zeros((0, 0), np.int8)
        return EncodedTokens(codes=codes, scales=scales, offsets=offsets - offsets[0], seconds=time.perf_counter() - t0, tokens=total, padded_tokens=padded)

    def encode(self, input_ids: list[np.ndarray], token_types: list[np.ndarray]) -> EncodedShard:
        """Per-passage arrays in, per-passage codes out (views into one flat result)."""
        lengths = np.fromiter((len(s) for s in input_ids), dtype=np.int64, count=len(input_ids))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        cat = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)  # noqa: E731
        flat = self.encode_flat(cat(input_ids), cat(token_types), offsets)
        cut = offsets[1:-1]
        return EncodedShard(codes=np.split(flat.codes, cut),
                            scales=np.split(flat.scales, cut) if flat.scales is not None else None,
                            seconds=flat.seconds, tokens=flat.tokens, padded_tokens=flat.padded_tokens)


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
