"""State codecs: how a token state becomes stored codes and back, behind one interface (training a
PQ codebook lives in `pipeline/codec/pq_training.py`).

The encoder, the reader, the fidelity report, estimate and validate only ever talk to a `Codec`,
so a new scheme is a new class here, never a branch elsewhere. Two exist:

- `LinearCodec`: the paper's scheme, a linear projection to `dims` (PCA or trained), then int8 codes
  with a per-token float16 scale (or float16 values), zstd-packed per passage.
- `PQCodec`: a product quantiser (optionally after a projection, optionally with an OPQ rotation):
  one uint8 centroid index per sub-space, no scale.
- `ResidualCodec`: either of them on what the token ids do not already say: the state minus its
  prediction from the token's static embedding (`pipeline.codec.side_info`), added back at decode.

Every encoder and decoder takes the passages' side information (`SideInfo`: token ids and lengths, which
the store keeps anyway); codecs that predict nothing ignore it.

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

from pipeline.codec.projection import Compressor, CompressorError, canonical_safetensors, safetensors_metadata
from pipeline.codec.quantize import dequantize
from pipeline.codec.side_info import PREFIX as RESIDUAL_PREFIX
from pipeline.codec.side_info import Prediction, SideInfo

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
    residual: ClassVar[str] = "none"  # what the codes are taken relative to (`--residual`)
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
    def encoder(self, device, dtype) -> Callable[..., tuple["torch.Tensor", "torch.Tensor | None"]]:
        """A function ([n, hidden] states, side info of those n tokens or None) -> (codes [n, width] in
        layout.dtype, scales [n] float16 or None), run where the states are, so only codes leave the device."""

    @abstractmethod
    def decode(self, codes: np.ndarray, scales: np.ndarray | None, side: SideInfo | None = None) -> np.ndarray:
        """[n, width] codes (+ scales, + the n tokens' side info) -> [n, hidden] float32 states."""

    @abstractmethod
    def decode_torch(self, codes: "torch.Tensor", scales: "torch.Tensor | None",
                     side: SideInfo | None = None) -> "torch.Tensor":
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
        from pipeline.codec.quantize import quantize

        project = self.compressor.torch_module(device, dtype)
        if self.quantize == "none":
            return lambda h, side=None: (project(h).to(_torch().float16), None)
        return lambda h, side=None: quantize(project(h), self.bits)

    def decode(self, codes: np.ndarray, scales: np.ndarray | None, side: SideInfo | None = None) -> np.ndarray:
        z = codes.astype(np.float32) if scales is None else dequantize(codes, scales)
        return self.compressor.decompress(z)

    def decode_torch(self, codes, scales, side=None):
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

        def encode(h, side=None):
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
    def decode(self, codes: np.ndarray, scales: np.ndarray | None = None, side: SideInfo | None = None) -> np.ndarray:
        z = self.centroids[np.arange(self.m), codes.astype(np.int64)].reshape(codes.shape[0], self.dims)
        if self.rotation is not None:
            z = z @ self.rotation
        return self.projection.decompress(z) if self.projection is not None else z.astype(np.float32)

    def decode_torch(self, codes, scales=None, side=None):
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


# ---------------------------------------------------------------- side information: code the residual

class ResidualCodec(Codec):
    """An inner codec (linear or PQ) on h - p(e): the state minus its prediction from the token's static
    embedding (`pipeline.codec.side_info.Prediction`); decode adds the prediction back.

    The encoder and decoder need the tokens' side information; the artifact holds the inner codec's
    tensors, the prediction's map and the embedding tables it needs, so its sha256 covers them all."""
    residual: ClassVar[str] = "embeddings"

    def __init__(self, inner: Codec, prediction: Prediction):
        if prediction.hidden != inner.hidden:
            raise CompressorError(f"residual codec: the prediction is {prediction.hidden} wide, the inner codec "
                                  f"{inner.hidden}")
        self.inner, self.prediction = inner, prediction
        self.kind = inner.kind  # --codec names the inner codec; --residual the prediction
        self.hidden, self.dims = inner.hidden, inner.dims
        self.metadata = inner.metadata
        self._torch: dict[Any, Callable] = {}

    @property
    def layout(self) -> CodeLayout:
        return self.inner.layout

    def fingerprint_fields(self) -> dict[str, Any]:
        return {**self.inner.fingerprint_fields(), "residual": self.residual}

    def describe(self) -> str:
        return f"{self.inner.describe()}, on the residual after the static-embedding prediction"

    def _side(self, side: SideInfo | None, n: int) -> SideInfo:
        if side is None or len(side.ids) != n:
            raise CompressorError(f"the residual codec needs the token ids of the {n} tokens it codes "
                                  f"(side information); got {None if side is None else len(side.ids)}")
        return side

    def _predict_torch(self, device):
        if device not in self._torch:
            self._torch[device] = self.prediction.torch_predictor(device)
        return self._torch[device]

    def encoder(self, device, dtype):
        inner = self.inner.encoder(device, dtype)
        predict = self._predict_torch(_torch().device(device))

        def encode(h, side=None):
            p = predict(self._side(side, h.shape[0]))
            return inner((h.float() - p).to(h.dtype), side)

        return encode

    def decode(self, codes: np.ndarray, scales: np.ndarray | None, side: SideInfo | None = None) -> np.ndarray:
        r = self.inner.decode(codes, scales, side)
        return r + self.prediction.predict(self._side(side, codes.shape[0]))

    def decode_torch(self, codes, scales, side=None):
        r = self.inner.decode_torch(codes, scales, side)
        return r + self._predict_torch(codes.device)(self._side(side, codes.shape[0]))

    def to_bytes(self) -> bytes:
        inner = self.inner.to_bytes()
        tensors, md = _load_safetensors(inner, "codec")
        md = {**md, **self.prediction.metadata()}
        return canonical_safetensors(st_save({**tensors, **self.prediction.tensors()}, metadata=md))

    @classmethod
    def from_bytes(cls, data: bytes, where: str, quantize: str = "int8", bits: float = 8) -> "ResidualCodec":
        tensors, md = _load_safetensors(data, where)
        prediction = Prediction.from_tensors(tensors, md, where)
        inner_md = {k: v for k, v in md.items() if k != "residual" and not k.startswith(RESIDUAL_PREFIX)}
        inner = st_save({k: v for k, v in tensors.items() if not k.startswith(RESIDUAL_PREFIX)}, metadata=inner_md)
        return cls(_plain_codec(inner, where, quantize, bits), prediction)


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
    """'pq' for a PQ codebook file, 'linear' for a projection (the paper's compressor); either with
    '+residual' when the file also holds a static-embedding prediction."""
    _, md = _load_safetensors(data, where)
    kind = "pq" if md.get("codec") == "pq" else "linear"
    return kind + "+residual" if md.get("residual") == "embeddings" else kind


def _plain_codec(data: bytes, where: str, quantize: str, bits: float) -> Codec:
    if artifact_kind(data, where) == "pq":
        return PQCodec.from_bytes(data, where)
    return LinearCodec(Compressor.from_bytes(data, where), quantize, bits)


def codec_from_bytes(data: bytes, where: str, quantize: str = "int8", bits: float = 8) -> Codec:
    """A codec from its artifact; `quantize`/`bits` complete a linear one (its file holds the projection only)."""
    if artifact_kind(data, where).endswith("+residual"):
        return ResidualCodec.from_bytes(data, where, quantize, bits)
    return _plain_codec(data, where, quantize, bits)


def codec_for_store(data: bytes, where: str, fingerprint: dict) -> Codec:
    """The codec a store version was written with: its artifact plus the fingerprint's settings."""
    codec = codec_from_bytes(data, where, fingerprint.get("quantize", "int8"), fingerprint.get("bits", 8))
    if codec.kind != fingerprint.get("codec", "linear"):
        raise CompressorError(f"{where}: a {codec.kind} codec, but the store's fingerprint records "
                              f"{fingerprint.get('codec', 'linear')}")
    if codec.residual != fingerprint.get("residual", "none"):
        raise CompressorError(f"{where}: a codec with residual={codec.residual}, but the store's fingerprint records "
                              f"residual={fingerprint.get('residual', 'none')}")
    return codec


CODECS: dict[str, type[Codec]] = {"linear": LinearCodec, "pq": PQCodec}


def planned_layout(codec: str, dims: int, quantize: str = "int8", pq_m: int = 32) -> CodeLayout:
    """What a codec of this kind and these settings will store per token, before it is fitted (estimates)."""
    return CODECS[codec].planned_layout(dims, quantize, pq_m)


def _torch():
    import torch
    return torch
