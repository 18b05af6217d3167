"""Training a product quantiser (PQ, optionally OPQ) on token states, in torch.

All sub-spaces are trained at once (Lloyd's k-means batched over sub-spaces; OPQ alternates it with an
orthogonal Procrustes rotation, Ge et al. 2013, non-parametric): faiss's `OPQMatrix` runs one k-means
per sub-space per iteration, and its overhead took 623 s for M = 96 on 30k MiniLM tokens here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.codec.state_codec import PQ_BITS, PQCodec, nearest_centroids
from pipeline.codec.projection import CompressorError, PcaAccumulator

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PQFit:
    """How a PQ codec is trained: sub-quantisers, OPQ rotation, projection, k-means effort."""
    m: int
    opq: bool = False
    dims: int | None = None       # project to this many dims first (PCA); None = the raw states
    opq_iterations: int = 10      # rotation <-> codebook alternations (OPQ, Ge et al. 2013, non-parametric)
    kmeans_iterations: int = 16   # Lloyd iterations of the final codebooks
    max_tokens: int = 65_536      # 256 per centroid; more only costs time
    seed: int = 1234


def fit_pq(states: np.ndarray, fit: PQFit, metadata: dict[str, str] | None = None) -> PQCodec:
    """(PCA to `dims`) -> (OPQ rotation) -> per-sub-space k-means."""
    import torch

    x = np.ascontiguousarray(states, np.float32)
    hidden = x.shape[1]
    projection = None
    if fit.dims is not None and fit.dims < hidden:
        acc = PcaAccumulator(hidden)
        acc.update(x)
        projection = acc.finish(fit.dims)
        x = projection.compress(x)
    d = x.shape[1]
    if fit.m < 1 or d % fit.m:
        raise CompressorError(f"--pq-m {fit.m}: the {d} stored dims must split into equal sub-spaces "
                              f"(a divisor of {d})")
    k = 2 ** PQ_BITS
    if x.shape[0] < k:
        raise CompressorError(f"a PQ codec needs at least {k} token states to train; the fit sample gave "
                              f"{x.shape[0]}: sample more passages (--fit-sample on run, --sample on fit-compressor)")
    gen = torch.Generator().manual_seed(fit.seed)
    if x.shape[0] > fit.max_tokens:
        x = x[np.sort(torch.randperm(x.shape[0], generator=gen)[:fit.max_tokens].numpy())]
    xt = torch.from_numpy(x)
    cent = xt[torch.randperm(xt.shape[0], generator=gen)[:k]].view(k, fit.m, d // fit.m).transpose(0, 1).contiguous()
    rotation = None
    if fit.opq:
        rot = torch.eye(d)
        for _ in range(fit.opq_iterations):
            xr = xt @ rot.T
            cent, codes = _kmeans(xr, cent, 2, gen)
            y = _gather(cent, codes)
            u, _, vh = torch.linalg.svd(xt.T @ y)   # Procrustes: the rotation taking x closest to y
            rot = (u @ vh).T
        rotation = np.ascontiguousarray(rot.numpy(), dtype=np.float32)
        xt = xt @ rot.T
    cent, _ = _kmeans(xt, cent, fit.kmeans_iterations, gen)
    md = dict(metadata or {})
    md.update({"tokens": str(states.shape[0]), "trained_on": str(xt.shape[0]), "seed": str(fit.seed)})
    return PQCodec(np.ascontiguousarray(cent.numpy(), np.float32), rotation, projection, md)


def _gather(cent: "torch.Tensor", codes: "torch.Tensor") -> "torch.Tensor":
    import torch

    m = cent.shape[0]
    return cent[torch.arange(m), codes].reshape(codes.shape[0], -1)


def _kmeans(x: "torch.Tensor", cent: "torch.Tensor", iterations: int, gen) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Lloyd's algorithm on every sub-space at once; an emptied centroid restarts on a random point."""
    import torch

    m, k, dsub = cent.shape
    xs = x.reshape(-1, m, dsub)
    offsets = (torch.arange(m) * k).unsqueeze(0)
    codes = nearest_centroids(x, cent)
    for _ in range(iterations):
        flat = (codes + offsets).reshape(-1)
        sums = torch.zeros(m * k, dsub).index_add_(0, flat, xs.reshape(-1, dsub))
        counts = torch.bincount(flat, minlength=m * k).to(sums.dtype)
        new = sums / counts.clamp(min=1).unsqueeze(-1)
        empty = counts == 0
        if empty.any():
            picks = torch.randint(0, xs.shape[0], (int(empty.sum()),), generator=gen)
            sub = torch.nonzero(empty).squeeze(-1) // k
            new[empty] = xs[picks, sub]
        cent = new.view(m, k, dsub)
        codes = nearest_centroids(x, cent)
    return cent, codes
