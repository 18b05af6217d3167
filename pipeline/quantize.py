"""k-bit symmetric quantisation with one absmax scale per token (k = 2..8, stored in int8)."""
from __future__ import annotations

import numpy as np
import torch

_FP16_MAX = 65504.0
_FP16_TINY = 6.2e-5


def qmax(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: supported range is 2..8")
    return 2 ** (bits - 1) - 1


def quantize(z: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, d] float -> (int8 codes [n, d], float16 scales [n]), on z's device.

    The scale is rounded to float16 before dividing, so dequantisation uses exactly the stored scale.
    """
    q = qmax(bits)
    z = z.float()
    scale = (z.abs().amax(dim=-1) / q).clamp(min=_FP16_TINY, max=_FP16_MAX).half()
    codes = torch.round(z / scale.float().unsqueeze(-1)).clamp_(-q, q).to(torch.int8)
    return codes, scale


def dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scales.astype(np.float32)[:, None]
