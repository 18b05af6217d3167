"""The guard that refuses a model whose states this pipeline would compute wrongly, before any work.

A run that exits 0 with wrong states is the worst failure this product can have: MPNet's layers take
a relative position bias that its encoder computes once, and running bare layers dropped it (token
cosine 0.58 to the model's own states, exit 0). So every path that computes states is compared, on
a probe batch, with the model's own full forward: the input component with `hidden_states[N]`, the
upper layers (fidelity, report, answer) with the last hidden state. Pure tensor arithmetic here;
`pipeline.model.encoder` runs the forwards.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import ConfigError

# Worst per-token relative error ||got - ref|| / ||ref|| over a probe's real tokens. float32 paths
# agree to ~1e-6 (kernel order only); a 16-bit path (bf16/fp16 on a GPU) to ~1e-2. A dropped
# position bias or a misplaced layer norm is 0.1-1.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 6e-2, torch.bfloat16: 6e-2}
PROBE_LENGTHS = (48, 29)  # two passages of different lengths, so padding and masks are exercised


@dataclass(frozen=True)
class Probe:
    """A padded batch of synthetic passages: the check is of arithmetic, so any in-vocabulary ids do."""
    input_ids: torch.Tensor       # [B, L]
    token_type_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L], 1 on real tokens

    @classmethod
    def build(cls, vocab_size: int, type_vocab_size: int, max_positions: int | None, pad_id: int,
              device: torch.device) -> "Probe":
        cap = max(2, (max_positions or 512) - 4)
        lengths = [min(n, cap) for n in PROBE_LENGTHS]
        width = max(lengths)
        gen = torch.Generator().manual_seed(20261205)
        low = min(5, vocab_size - 2)
        ids = torch.randint(low, vocab_size, (len(lengths), width), generator=gen)
        ids[ids == pad_id] = low if low != pad_id else low + 1
        mask = torch.zeros(len(lengths), width, dtype=torch.long)
        types = torch.zeros(len(lengths), width, dtype=torch.long)
        for row, n in enumerate(lengths):
            mask[row, :n] = 1
            if type_vocab_size > 1:
                types[row, n // 2:n] = 1  # a title/text pair's second segment
        ids[mask == 0] = pad_id
        return cls(ids.to(device), types.to(device), mask.to(device))


def worst_relative_error(got: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    """Worst per-token ||got - ref|| / ||ref|| over the tokens where `mask` is 1 ([B, L, H] inputs)."""
    keep = mask.bool()
    g, r = got[keep].float(), ref[keep].float()
    err = (g - r).norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-6)
    return float(err.max()) if err.numel() else 0.0


def require_match(got: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, *, model: str, architecture: str,
                  what: str, reference: str) -> float:
    """Raise one line naming the model and its architecture when `got` is not the model's own `ref`."""
    tol = TOLERANCE.get(ref.dtype, TOLERANCE[torch.float16])
    if got.shape != ref.shape:
        raise ConfigError(f"model {model} ({architecture}) refused before any work: {what} give shape "
                          f"{tuple(got.shape)}, the model's own {reference} {tuple(ref.shape)}")
    err = worst_relative_error(got, ref, mask)
    if not err <= tol:  # also catches NaN
        raise ConfigError(f"model {model} ({architecture}) refused before any work: {what} do not reproduce the "
                          f"model's own {reference} (worst token relative error {err:.3g} > {tol:g} in "
                          f"{str(ref.dtype)[6:]}), so its states would be wrong")
    return err
