"""k-bit symmetric quantisation with one absmax scale per token, codes stored in int8.

k may be fractional (5.25 -> 37 levels): with zstd as the entropy coder, levels need not be a power
of two, and the rate-distortion report shows the in-between points are worth having.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

_FP16_MAX = 65504.0
_FP16_TINY = 6.2e-5


def qmax(bits: float) -> int:
    """Largest code magnitude for k bits: 2^(k-1) - 1, rounded for fractional k."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: supported range is 2..8")
    return int(round(2 ** (bits - 1) - 1))


def quantize(z: torch.Tensor, bits: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, d] float -> (int8 codes [n, d], float16 scales [n]), on z's device.

    The scale is rounded to float16 before dividing, so dequantisation uses exactly the stored scale.
    """
    import torch  # encoder side only: readers dequantise with numpy and never load torch

    q = qmax(bits)
    z = z.float()
    scale = (z.abs().amax(dim=-1) / q).clamp(min=_FP16_TINY, max=_FP16_MAX).half()
    codes = torch.round(z / scale.float().unsqueeze(-1)).clamp_(-q, q).to(torch.int8)
    return codes, scale


def dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scales.astype(np.float32)[:, None]


def bitpack(codes: np.ndarray, bits: float) -> bytes:
    """k-bit codes, densely packed (offset to unsigned): the alternative to int8 containers + zstd."""
    bits = int(np.ceil(bits))
    offset = 2 ** (bits - 1)
    u = (codes.astype(np.int16) + offset).astype(np.uint8).reshape(-1, 1)
    return np.packbits(np.unpackbits(u, axis=1)[:, 8 - bits:]).tobytes()


def bitunpack(data: bytes, bits: float, count: int) -> np.ndarray:
    bits = int(np.ceil(bits))
    raw = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * bits].reshape(count, bits)
    full = np.zeros((count, 8), dtype=np.uint8)
    full[:, 8 - bits:] = raw
    return (np.packbits(full, axis=1).reshape(-1).astype(np.int16) - 2 ** (bits - 1)).astype(np.int8)
