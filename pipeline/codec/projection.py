"""The compression layer: hidden -> dims and back, as two affine maps.

Fitted in closed form (PCA is the optimum of the paper's phase-1 reconstruction loss) or loaded
from a decoupled model's trained weights. Stored as safetensors, never pickle.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from storage.errors import UsageError

if TYPE_CHECKING:
    import torch


class CompressorError(UsageError, ValueError):
    """A compressor file is missing tensors, has inconsistent shapes, or is not safetensors."""


@dataclass(frozen=True)
class Compressor:
    # nn.Linear convention: compress z = h @ compress_weight.T + compress_bias
    compress_weight: np.ndarray    # [dims, hidden]
    compress_bias: np.ndarray      # [dims]
    decompress_weight: np.ndarray  # [hidden, dims]
    decompress_bias: np.ndarray    # [hidden]
    explained_variance: np.ndarray | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return int(self.compress_weight.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.compress_weight.shape[1])

    # ---- numpy side (readers)
    def compress(self, h: np.ndarray) -> np.ndarray:
        return (h.astype(np.float32) @ self.compress_weight.T + self.compress_bias).astype(np.float32)

    def decompress(self, z: np.ndarray) -> np.ndarray:
        return (z.astype(np.float32) @ self.decompress_weight.T + self.decompress_bias).astype(np.float32)

    # ---- torch side (encoders): the projection runs where the states are
    def torch_module(self, device, dtype) -> "TorchCompressor":
        return TorchCompressor(self, device, dtype)

    # ---- serialisation
    def to_bytes(self) -> bytes:
        # C order: safetensors writes an array's memory as it lies, so a transposed view would be
        # stored transposed
        tensors = {
            "compress.weight": np.ascontiguousarray(self.compress_weight, np.float32),
            "compress.bias": np.ascontiguousarray(self.compress_bias, np.float32),
            "decompress.weight": np.ascontiguousarray(self.decompress_weight, np.float32),
            "decompress.bias": np.ascontiguousarray(self.decompress_bias, np.float32),
        }
        if self.explained_variance is not None:
            # The PCA view the fit-compressor command promises: axes, mean, variance.
            tensors["projection"] = self.compress_weight.astype(np.float32)
            tensors["mean"] = self.decompress_bias.astype(np.float32)
            tensors["explained_variance"] = self.explained_variance.astype(np.float32)
        return canonical_safetensors(st_save(tensors, metadata={k: str(v) for k, v in self.metadata.items()}))

    @property
    def content_digest(self) -> str:
        """Digest of the weights and sorted metadata (safetensors orders metadata arbitrarily,
        so two files of the same compressor can differ byte-wise)."""
        h = hashlib.sha256()
        for t in (self.compress_weight, self.compress_bias, self.decompress_weight, self.decompress_bias):
            h.update(np.ascontiguousarray(t, np.float32).tobytes())
        h.update(json.dumps(self.metadata, sort_keys=True).encode())
        return h.hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "compressor") -> "Compressor":
        try:
            tensors = st_load(data)
        except (SafetensorError, ValueError, OSError) as exc:
            raise CompressorError(f"{where}: not a safetensors file ({exc})") from exc
        metadata = safetensors_metadata(data)
        if "compress.weight" in tensors:
            cw = tensors["compress.weight"]
            dw = tensors.get("decompress.weight")
            if dw is None:
                raise CompressorError(f"{where}: has compress.weight but no decompress.weight")
            cb = tensors.get("compress.bias", np.zeros(cw.shape[0], np.float32))
            db = tensors.get("decompress.bias", np.zeros(dw.shape[0], np.float32))
        elif "projection" in tensors and "mean" in tensors:
            cw, mean = tensors["projection"], tensors["mean"]
            cb, dw, db = -(mean @ cw.T), cw.T.copy(), mean
        else:
            raise CompressorError(f"{where}: expected tensors compress.weight/decompress.weight "
                                  f"(trained) or projection/mean (PCA); found {sorted(tensors)}")
        cw, cb, dw, db = (np.asarray(t, np.float32) for t in (cw, cb, dw, db))
        if cw.ndim != 2 or dw.shape != (cw.shape[1], cw.shape[0]) or cb.shape != (cw.shape[0],) \
                or db.shape != (cw.shape[1],):
            raise CompressorError(f"{where}: inconsistent shapes compress {cw.shape}, {cb.shape}; "
                                  f"decompress {dw.shape}, {db.shape}")
        if not all(np.isfinite(t).all() for t in (cw, cb, dw, db)):
            raise CompressorError(f"{where}: contains NaN or infinite weights")
        return cls(cw, cb, dw, db, tensors.get("explained_variance"), metadata)


def canonical_safetensors(data: bytes) -> bytes:
    """Rewrite the JSON header with sorted keys (same length), so equal compressors are equal bytes:
    the file's sha256 goes into every shard's fingerprint."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    if len(header) > n:
        return data
    return data[:8] + header + b" " * (n - len(header)) + data[8 + n:]


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The file's `__metadata__` (string pairs) from its JSON header."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    return dict(header.get("__metadata__") or {})


class TorchCompressor:
    """The projection on the encoder's device. torch is imported here, not at module level, so that
    readers (lookup, verify, search) never load it: no torch thread pool alive at their exit."""

    def __init__(self, c: Compressor, device, dtype):
        import torch

        self._linear = torch.nn.functional.linear
        self.weight = torch.as_tensor(c.compress_weight, device=device, dtype=dtype)
        self.bias = torch.as_tensor(c.compress_bias, device=device, dtype=dtype)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self._linear(h, self.weight, self.bias)


class PcaAccumulator:
    """Streaming mean and covariance of token states (float64), then the top-`dims` axes."""

    def __init__(self, hidden: int):
        self.n = 0
        self.sum = np.zeros(hidden, np.float64)
        self.outer = np.zeros((hidden, hidden), np.float64)

    def update(self, states: np.ndarray) -> None:
        x = states.astype(np.float64, copy=False)
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x

    def finish(self, dims: int, metadata: dict[str, str] | None = None) -> Compressor:
        hidden = self.sum.size
        if dims > hidden:
            raise CompressorError(f"dims={dims} exceeds the hidden size {hidden}")
        if self.n < 2:
            raise CompressorError("need at least two token states to fit a compressor")
        mean = self.sum / self.n
        cov = self.outer / self.n - np.outer(mean, mean)
        evals, evecs = np.linalg.eigh(cov)
        order = np.argsort(evals)[::-1][:dims]
        axes = evecs[:, order].T  # [dims, hidden]
        # Fix each axis's sign so the same data always gives the same bytes (and the same hash).
        signs = np.sign(axes[np.arange(dims), np.abs(axes).argmax(axis=1)])
        axes *= signs[:, None]
        variance = np.clip(evals[order], 0, None)
        md = dict(metadata or {})
        md.update({"kind": "pca", "tokens": str(self.n), "dims": str(dims), "hidden": str(hidden),
                   "explained_variance_ratio": f"{variance.sum() / max(np.trace(cov), 1e-30):.6f}"})
        cw = axes.astype(np.float32)
        m32 = mean.astype(np.float32)
        return Compressor(cw, -(m32 @ cw.T), cw.T.copy(), m32, variance.astype(np.float32), md)
