"""The lower layers over unpadded ("packed") tokens: a batch's passages laid end to end as one [T, hidden].

Every matmul then runs over real tokens only, and attention needs no 4-d additive mask: on CUDA the
passages go through varlen flash attention (`torch.nn.attention.varlen`), which takes the cumulative
lengths; elsewhere attention alone is padded (SDPA with a key mask) and everything else stays packed.
Q, K and V come from one fused matmul. BERT-family layers only (BERT, ELECTRA: query/key/value,
post-attention LayerNorm, FFN, absolute positions); anything else keeps the masked forward.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

PACKED_MODEL_TYPES = ("bert", "electra")


def token_index(offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions in a flat token array of the tokens of `rows`, row after row (no Python loop per row)."""
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    run_start = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(starts - run_start, lengths)


def packed_unsupported(model) -> str | None:
    """Why `model` cannot take the packed forward (None: it can)."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in PACKED_MODEL_TYPES:
        return f"model type {getattr(cfg, 'model_type', None)!r} (packed supports {', '.join(PACKED_MODEL_TYPES)})"
    if getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute"):
        return f"position_embedding_type={cfg.position_embedding_type!r} (packed needs absolute positions)"
    return None


def varlen_available(device: torch.device) -> bool:
    """Varlen flash attention: CUDA, torch >= 2.10, and an Ampere (sm80) or newer GPU (flash kernels)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class PackedBatch:
    """One batch's tokens on the device, with what attention needs to keep passages apart."""
    ids: torch.Tensor         # [T] int64
    types: torch.Tensor       # [T] int64
    positions: torch.Tensor   # [T] int64, position within its own passage
    cu_seqlens: torch.Tensor  # [B + 1] int32, cumulative lengths (varlen attention)
    slots: torch.Tensor       # [T] int64, row * max_len + position (padded attention)
    n_seqs: int
    max_len: int

    @classmethod
    def build(cls, ids: np.ndarray, types: np.ndarray, lengths: np.ndarray, device: torch.device) -> "PackedBatch":
        """`ids`/`types`: the batch's tokens end to end, in the order of `lengths`."""
        lengths = lengths.astype(np.int64)
        starts = np.cumsum(lengths) - lengths
        n = int(lengths.sum())
        positions = np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)
        max_len = int(lengths.max())
        slots = np.repeat(np.arange(lengths.size, dtype=np.int64) * max_len, lengths) + positions
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        pin = device.type == "cuda"

        def put(a: np.ndarray, dtype) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(a, dtype=dtype))
            return (t.pin_memory() if pin else t).to(device, non_blocking=pin)

        return cls(ids=put(ids, np.int64), types=put(types, np.int64), positions=put(positions, np.int64),
                   cu_seqlens=put(cu, np.int32), slots=put(slots, np.int64), n_seqs=int(lengths.size),
                   max_len=max_len)


def varlen_attention(q, k, v, batch: PackedBatch) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn
    return varlen_attn(q, k, v, batch.cu_seqlens, batch.cu_seqlens, batch.max_len, batch.max_len)


def padded_attention(q, k, v, batch: PackedBatch) -> torch.Tensor:
    """[T, H, D] -> [T, H, D] through SDPA on [B, H, L, D]; padded keys are masked, padded queries dropped."""
    t, heads, dim = q.shape
    rows, width = batch.n_seqs, batch.max_len

    def pad(x):
        out = x.new_zeros(rows * width, heads, dim).index_copy_(0, batch.slots, x)
        return out.view(rows, width, heads, dim).transpose(1, 2)

    valid = torch.zeros(rows * width, dtype=torch.bool, device=q.device).index_fill_(0, batch.slots, True)
    mask = valid.view(rows, 1, 1, width)
    out = torch.nn.functional.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(rows * width, heads, dim).index_select(0, batch.slots)


class PackedLayer(torch.nn.Module):
    """One BERT layer's weights, split around attention: `project` (fused QKV) and `finish` (the rest)."""

    def __init__(self, layer):
        super().__init__()
        sa = layer.attention.self
        self.heads, self.head_dim = int(sa.num_attention_heads), int(sa.attention_head_size)
        weight = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight])
        bias = torch.cat([sa.query.bias, sa.key.bias, sa.value.bias])
        self.qkv = torch.nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.qkv.weight.copy_(weight)
            self.qkv.bias.copy_(bias)
        self.attention_output = layer.attention.output  # dense + dropout + LayerNorm(x + residual)
        self.intermediate = layer.intermediate
        self.output = layer.output

    def project(self, h: torch.Tensor):
        return self.qkv(h).view(h.shape[0], 3, self.heads, self.head_dim).unbind(1)

    def finish(self, context: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        a = self.attention_output(context.reshape(h.shape[0], -1), h)
        return self.output(self.intermediate(a), a)


class PackedLowerLayers:
    """Embeddings + the first `n` layers over a PackedBatch, returning [T, hidden] states.

    `compile`: torch.compile each layer's two dense halves with a symbolic token count (one compile,
    no per-batch recompiles); attention stays outside the compiled graphs."""

    def __init__(self, embeddings, project, layers, type_vocab_size: int, attention: str, compile: bool = False):
        if attention not in ("varlen", "padded"):
            raise ValueError(f"attention kernel {attention!r}: varlen or padded")
        self.embeddings, self.embeddings_project = embeddings, project
        self.layers = [PackedLayer(layer).eval() for layer in layers]
        self.type_vocab_size = type_vocab_size
        self.kernel = attention
        self.attend = varlen_attention if attention == "varlen" else padded_attention
        self._project = [layer.project for layer in self.layers]
        self._finish = [layer.finish for layer in self.layers]
        if compile:
            self._project = [torch.compile(f, dynamic=True) for f in self._project]
            self._finish = [torch.compile(f, dynamic=True) for f in self._finish]

    @torch.inference_mode()
    def __call__(self, batch: PackedBatch) -> torch.Tensor:
        kwargs = {"input_ids": batch.ids[None], "position_ids": batch.positions[None]}
        if self.type_vocab_size > 1:
            kwargs["token_type_ids"] = batch.types[None]
        h = self.embeddings(**kwargs)
        if self.embeddings_project is not None:
            h = self.embeddings_project(h)
        h = h[0]
        for project, finish in zip(self._project, self._finish):
            q, k, v = project(h)
            h = finish(self.attend(q, k, v, batch), h)
        return h
