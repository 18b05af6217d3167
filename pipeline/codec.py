"""State codecs: how a token state becomes stored codes and back, behind one interface (training a
PQ codebook lives in `pipeline/pqfit.py`).

The encoder, the reader, the fidelity report, estimate and validate only ever talk to a `Codec`,
so a new scheme is a new class here, never a branch elsewhere. Two exist:

- `LinearCodec`: the paper's scheme, a linear projection to `dims` (PCA or trained), then int8 codes
  with a per-token float16 scale (or float16 values), zstd-packed per passage.
- `PQCodec`: a product quantiser (optionally after a projection, optionally with an OPQ rotation):
  one uint8 centroid index per sub-space, no scale.

A codec's artifact is safetensors (never pickle); its sha256 is the store's `compressor_sha256`,
so a different codebook is a different fingerprint. Readers decode with numpy and never load torch;
`encoder()` and `decode_torch()` import it when called (on the device where the states are).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from pipeline.compress import Compressor, CompressorError, canonical_safetensors, safetensors_metadata
from pipeline.quantize import dequantize

if TYPE_CHECKING:
    import torch

@dataclass(frozen=True)
class CodeLayout:
    """What one stored token looks like: `width` values of `dtype`, plus a float16 scale if `scaled`."""
    dtype: str
    width: int
    scaled: bool

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    def nbytes(self, n_tokens: int) -> int:
        return n_tokens * self.width * self.itemsize

    def view(self, raw: bytes, n_tokens: int) -> np.ndarray:
        return np.frombuffer(raw, dtype=self.dtype).reshape(n_tokens, self.width)

    def estimate_fields(self, bits: float = 8) -> dict[str, float]:
        """The storage model's (`storage.estimate.Assumptions`) names for this layout: values per token,
        bits per value (16 = two bytes), scale bytes per token."""
        return {"dims": self.width, "bits": 16 if self.itemsize == 2 else (bits if self.scaled else 8),
                "scale_bytes": 2.0 if self.scaled else 0.0}


class Codec(ABC):
    kind: ClassVar[str]
    hidden: int   # the input component's state size (what decode returns)
    dims: int     # values per token after any projection (what the code describes)
    metadata: dict[str, str]  # fit provenance (fit_ids, seed, tokens), stored in the artifact

    @property
    @abstractmethod
    def layout(self) -> CodeLayout: ...

    @abstractmethod
    def fingerprint_fields(self) -> dict[str, Any]:
        """Keys this codec adds to a store's fingerprint: what must match for states to be mixed."""

    @abstractmethod
    def encoder(self, device, dtype) -> Callable[["torch.Tensor"], tuple["torch.Tensor", "torch.Tensor | None"]]:
        """A function [n, hidden] states -> (codes [n, width] in layout.dtype, scales [n] float16 or None),
        run where the states are, so only codes leave the device."""

    @abstractmethod
    def decode(self, codes: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
        """[n, width] codes (+ scales) -> [n, hidden] float32 states."""

    @abstractmethod
    def decode_torch(self, codes: "torch.Tensor", scales: "torch.Tensor | None") -> "torch.Tensor":
        """The same on the codes' device: float32 [n, hidden]."""

    @abstractmethod
    def to_bytes(self) -> bytes: ...

    def describe(self) -> str:
        return f"{self.kind} {self.hidden} -> {self.layout.width} x {self.layout.dtype}"


# ---------------------------------------------------------------- the paper's scheme

class LinearCodec(Codec):
    kind = "linear"

    def __init__(self, compressor: Compressor, quantize: str = "int8", bits: float = 8):
        if quantize not in ("int8", "none"):
            raise CompressorError(f"linear codec: quantize={quantize!r} is not int8 or none")
        self.compressor = compressor
        self.quantize = quantize
        self.bits = float(bits) if quantize != "none" else 16.0
        self.hidden, self.dims = compressor.hidden, compressor.dims
        self.metadata = compressor.metadata
        self._torch: dict[Any, tuple] = {}

    @property
    def layout(self) -> CodeLayout:
        return self.planned_layout(self.dims, self.quantize, 0)

    @staticmethod
    def planned_layout(dims: int, quantize: str, pq_m: int) -> CodeLayout:
        return CodeLayout("float16", dims, scaled=False) if quantize == "none" else CodeLayout("int8", dims, True)

    def fingerprint_fields(self) -> dict[str, Any]:
        bits = self.bits if self.quantize != "none" else 16
        if bits == int(bits):
            bits = int(bits)
        return {"dims": self.dims, "quantize": self.quantize, "bits": bits}

    def describe(self) -> str:
        q = "float16" if self.quantize == "none" else f"{self.bits:g}-bit codes + scale"
        return f"linear {self.hidden} -> {self.dims} dims, {q}"

    def encoder(self, device, dtype):
        from pipeline.quantize import quantize

        project = self.compressor.torch_module(device, dtype)
        if self.quantize == "none":
            return lambda h: (project(h).to(_torch().float16), None)
        return lambda h: quantize(project(h), self.bits)

    def decode(self, codes: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
        z = codes.astype(np.float32) if scales is None else dequantize(codes, scales)
        return self.compressor.decompress(z)

    def decode_torch(self, codes, scales):
        torch = _torch()
        w, b = self._weights(codes.device)
        z = codes.float() if scales is None else codes.float() * scales.float().unsqueeze(-1)
        return torch.nn.functional.linear(z, w, b)

    def _weights(self, device):
        if device not in self._torch:
            torch = _torch()
            c = self.compressor
            self._torch[device] = (torch.as_tensor(c.decompress_weight, device=device),
                                   torch.as_tensor(c.decompress_bias, device=device))
        return self._torch[device]

    def to_bytes(self) -> bytes:
        return self.compressor.to_bytes()


# ---------------------------------------------------------------- product quantisation

PQ_BITS = 8  # 256 centroids per sub-space: one uint8 per sub-quantiser


@dataclass
class PQCodec(Codec):
    """Codes = argmin over each sub-space's 256 centroids of (optionally rotated, projected) states."""
    centroids: np.ndarray                 # [m, 256, dsub] float32
    rotation: np.ndarray | None = None    # [dims, dims] orthonormal (OPQ): r = z @ rotation.T
    projection: Compressor | None = None  # optional linear projection hidden -> dims before PQ
    metadata: dict[str, str] = field(default_factory=dict)
    kind: ClassVar[str] = "pq"

    def __post_init__(self):
        m, k, dsub = self.centroids.shape
        self.m, self.dsub = m, dsub
        self.dims = m * dsub
        self.hidden = self.projection.hidden if self.projection is not None else self.dims
        self._torch: dict[Any, tuple] = {}

    @property
    def layout(self) -> CodeLayout:
        return self.planned_layout(self.dims, "pq", self.m)

    @staticmethod
    def planned_layout(dims: int, quantize: str, pq_m: int) -> CodeLayout:
        return CodeLayout("uint8", pq_m, scaled=False)

    def fingerprint_fields(self) -> dict[str, Any]:
        return {"codec": "pq", "dims": self.dims, "quantize": "pq", "bits": PQ_BITS, "pq_m": self.m,
                "opq": self.rotation is not None}

    def describe(self) -> str:
        proj = f"projected to {self.dims}, " if self.projection is not None else ""
        return (f"{'OPQ' if self.rotation is not None else 'PQ'} {self.hidden} dims, {proj}{self.m} sub-quantisers "
                f"x {PQ_BITS} bits ({self.m} B/token)")

    # ---- encode (torch, on the device)
    def encoder(self, device, dtype):
        torch = _torch()
        project = self.projection.torch_module(device, torch.float32) if self.projection is not None else None
        cent, rot, _ = self._tensors(device)

        def encode(h):
            z = h.float()
            if project is not None:
                z = project(z)
            if rot is not None:
                z = z @ rot.T
            return nearest_centroids(z, cent).to(torch.uint8), None

        return encode

    def _tensors(self, device):
        if device not in self._torch:
            torch = _torch()
            cent = torch.as_tensor(self.centroids, device=device)
            rot = torch.as_tensor(self.rotation, device=device) if self.rotation is not None else None
            back = None
            if self.projection is not None:
                p = self.projection
                back = (torch.as_tensor(p.decompress_weight, device=device),
                        torch.as_tensor(p.decompress_bias, device=device))
            self._torch[device] = (cent, rot, back)
        return self._torch[device]

    # ---- decode
    def decode(self, codes: np.ndarray, scales: np.ndarray | None = None) -> np.ndarray:
        z = self.centroids[np.arange(self.m), codes.astype(np.int64)].reshape(codes.shape[0], self.dims)
        if self.rotation is not None:
            z = z @ self.rotation
        return self.projection.decompress(z) if self.projection is not None else z.astype(np.float32)

    def decode_torch(self, codes, scales=None):
        torch = _torch()
        cent, rot, back = self._tensors(codes.device)
        z = cent[torch.arange(self.m, device=codes.device), codes.long()].reshape(codes.shape[0], self.dims)
        if rot is not None:
            z = z @ rot
        return torch.nn.functional.linear(z, *back) if back is not None else z

    # ---- serialisation
    def to_bytes(self) -> bytes:
        tensors = {"pq.centroids": np.ascontiguousarray(self.centroids, np.float32)}
        if self.rotation is not None:
            tensors["opq.rotation"] = np.ascontiguousarray(self.rotation, np.float32)
        if self.projection is not None:
            p = self.projection
            tensors.update({"compress.weight": p.compress_weight, "compress.bias": p.compress_bias,
                            "decompress.weight": p.decompress_weight, "decompress.bias": p.decompress_bias})
        md = {**self.metadata, "codec": "pq", "pq_m": str(self.m), "pq_bits": str(PQ_BITS),
              "opq": str(self.rotation is not None).lower(), "dims": str(self.dims), "hidden": str(self.hidden)}
        return canonical_safetensors(st_save(tensors, metadata=md))

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "codec") -> "PQCodec":
        tensors, md = _load_safetensors(data, where)
        cent = tensors.get("pq.centroids")
        if cent is None or cent.ndim != 3 or cent.shape[1] != 2 ** PQ_BITS or cent.shape[0] < 1 or cent.shape[2] < 1:
            raise CompressorError(f"{where}: a pq codec needs pq.centroids of shape [m, 256, dsub]; found "
                                  f"{None if cent is None else cent.shape}")
        dims = cent.shape[0] * cent.shape[2]
        rot = tensors.get("opq.rotation")
        if rot is not None and rot.shape != (dims, dims):
            raise CompressorError(f"{where}: opq.rotation is {rot.shape}, expected ({dims}, {dims})")
        proj = None
        if "compress.weight" in tensors:
            proj = Compressor.from_bytes(st_save({k: v for k, v in tensors.items()
                                                  if k.startswith(("compress.", "decompress."))}), where)
            if proj.dims != dims:
                raise CompressorError(f"{where}: projection to {proj.dims} dims, but the codebooks cover {dims}")
        for name, t in (("pq.centroids", cent), ("opq.rotation", rot)):
            if t is not None and not np.isfinite(t).all():
                raise CompressorError(f"{where}: {name} contains NaN or infinite values")
        return cls(np.ascontiguousarray(cent, np.float32), None if rot is None else np.asarray(rot, np.float32),
                   proj, {k: v for k, v in md.items() if k not in ("codec", "pq_m", "pq_bits", "opq", "dims", "hidden")})


def nearest_centroids(x: "torch.Tensor", cent: "torch.Tensor") -> "torch.Tensor":
    """Nearest centroid per sub-space: [n, m] indices; ||r - c||^2 ranks as ||c||^2 - 2 r.c."""
    import torch

    m, k, dsub = cent.shape
    sq = (cent * cent).sum(-1).unsqueeze(1)          # [m, 1, k]
    ct = cent.transpose(1, 2).mul(-2)                  # [m, dsub, k]
    out = torch.empty(x.shape[0], m, dtype=torch.long, device=x.device)
    # distances are [m, chunk, k] floats: chunks keep them under ~64 MB
    step = max(1, (16 << 20) // (m * k))
    for s in range(0, x.shape[0], step):
        r = x[s:s + step].reshape(-1, m, dsub).transpose(0, 1)   # [m, chunk, dsub]
        out[s:s + step] = torch.baddbmm(sq, r, ct).argmin(-1).T
    return out


# ---------------------------------------------------------------- loading

def _load_safetensors(data: bytes, where: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        tensors = st_load(data)
        md = safetensors_metadata(data)
    except (SafetensorError, ValueError, OSError) as exc:
        raise CompressorError(f"{where}: not a safetensors file ({exc})") from exc
    return tensors, md


def artifact_kind(data: bytes, where: str = "codec") -> str:
    """'pq' for a PQ codebook file, 'linear' for a projection (the paper's compressor)."""
    _, md = _load_safetensors(data, where)
    return "pq" if md.get("codec") == "pq" else "linear"


def codec_from_bytes(data: bytes, where: str, quantize: str = "int8", bits: float = 8) -> Codec:
    """A codec from its artifact; `quantize`/`bits` complete a linear one (its file holds the projection only)."""
    if artifact_kind(data, where) == "pq":
        return PQCodec.from_bytes(data, where)
    return LinearCodec(Compressor.from_bytes(data, where), quantize, bits)


def codec_for_store(data: bytes, where: str, fingerprint: dict) -> Codec:
    """The codec a store version was written with: its artifact plus the fingerprint's settings."""
    codec = codec_from_bytes(data, where, fingerprint.get("quantize", "int8"), fingerprint.get("bits", 8))
    if codec.kind != fingerprint.get("codec", "linear"):
        raise CompressorError(f"{where}: a {codec.kind} codec, but the store's fingerprint records "
                              f"{fingerprint.get('codec', 'linear')}")
    return codec


CODECS: dict[str, type[Codec]] = {"linear": LinearCodec, "pq": PQCodec}


def planned_layout(codec: str, dims: int, quantize: str = "int8", pq_m: int = 32) -> CodeLayout:
    """What a codec of this kind and these settings will store per token, before it is fitted (estimates)."""
    return CODECS[codec].planned_layout(dims, quantize, pq_m)


def _torch():
    import torch
    return torch
