"""Side information: what a decoder already knows about each token before reading its codes.

A store keeps every passage's token ids beside its codes, so the decoder can recompute each token's
*static embedding* e: the output of the model's embedding layer (word + position + token type
embeddings, LayerNorm) for that id at that position in that segment. At the lower layers a token's
state is largely a function of e, so a codec may predict the state from e (`Prediction`, a ridge map
p = e·A + b fitted on the fit sample) and code only the residual h - p (`pipeline.codec.state_codec.ResidualCodec`).

Why the codec artifact holds fp16 copies of the embedding tables instead of reading them from the
model at decode time: the decoder stays self-contained (readers, `lookup` and `verify` never load the
model or torch; decode is numpy), the tables are covered by the artifact's sha256 (the store's
fingerprint), so a checkpoint edited after the store was written cannot silently change decoded states,
and encoder and decoder compute e from the very same numbers. The cost is the artifact's size: the word
table dominates (MiniLM: 30522 x 384 x 2 B = 23 MB; BERT-base: 47 MB), once per store, not per token.

Token types are not stored in the shards: they are derived from the ids by the pair convention the
tokenizer uses ([CLS] title [SEP] text [SEP]: segment 0 up to and including the first [SEP], 1 after),
at encode and decode alike, so both ends always agree. Positions restart at each passage (plus the
padding offset RoBERTa/MPNet-style models number positions from).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.codec.projection import CompressorError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PREFIX = "residual."


@dataclass(frozen=True)
class SideInfo:
    """The tokens of one or more passages laid end to end: ids [T] and each passage's length [n]."""
    ids: np.ndarray
    lengths: np.ndarray

    def __post_init__(self):
        if int(np.sum(self.lengths)) != len(self.ids):
            raise ValueError(f"side info: {len(self.ids)} token ids, but the lengths add up to {int(np.sum(self.lengths))}")

    @classmethod
    def of(cls, token_ids: list[np.ndarray]) -> "SideInfo":
        """Per-passage id arrays (as the reader holds them) -> one flat record."""
        lengths = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=len(token_ids))
        ids = np.concatenate(token_ids).astype(np.int64, copy=False) if token_ids else np.zeros(0, np.int64)
        return cls(ids, lengths)

    @classmethod
    def from_padded(cls, input_ids: "torch.Tensor", attention_mask: "torch.Tensor") -> "SideInfo":
        """The real tokens of a padded [B, L] batch, in the row-major order `h[mask]` takes them."""
        real = attention_mask.bool()
        return cls(input_ids[real].cpu().numpy().astype(np.int64), real.sum(1).cpu().numpy().astype(np.int64))

    def positions(self) -> np.ndarray:
        """Each token's index within its passage."""
        starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        return np.arange(len(self.ids), dtype=np.int64) - np.repeat(starts, self.lengths)

    def segments(self, sep_id: int) -> np.ndarray:
        """0 up to and including a passage's first separator, 1 after it (the tokenizer's pair types)."""
        if len(self.ids) == 0:
            return np.zeros(0, np.int64)
        is_sep = (self.ids == sep_id).astype(np.int64)
        before = np.cumsum(is_sep) - is_sep  # separators strictly before each token, whole array
        starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        base = np.repeat(before[np.minimum(starts, len(self.ids) - 1)], self.lengths)
        return np.minimum(before - base, 1)


@dataclass
class StaticEmbedding:
    """The model's embedding layer, as tables: e = LayerNorm(word[id] + position[pos + offset] + type[seg])."""
    word: np.ndarray                # [V, E] float16
    position: np.ndarray | None     # [P, E] float16 (None: the model has no absolute positions)
    token_type: np.ndarray | None   # [S, E] float16 (None: no segment embeddings)
    ln_weight: np.ndarray           # [E] float32
    ln_bias: np.ndarray             # [E] float32
    eps: float
    position_offset: int            # RoBERTa/MPNet number positions from padding_idx + 1
    sep_id: int

    @property
    def width(self) -> int:
        return int(self.word.shape[1])

    def _check_ids(self, side: SideInfo) -> None:
        if len(side.ids) and (int(side.ids.min()) < 0 or int(side.ids.max()) >= self.word.shape[0]):
            raise CompressorError(f"token id {int(side.ids.max())} is outside the codec's {self.word.shape[0]}-word "
                                  f"embedding table: the store's tokens and its codec disagree")
        if self.position is not None and len(side.lengths) and \
                int(side.lengths.max()) + self.position_offset > self.position.shape[0]:
            raise CompressorError(f"a {int(side.lengths.max())}-token passage exceeds the codec's "
                                  f"{self.position.shape[0]} positions")

    def compute(self, side: SideInfo) -> np.ndarray:
        """[T, E] float32, numpy (readers)."""
        self._check_ids(side)
        x = self.word[side.ids].astype(np.float32)
        if self.position is not None:
            x += self.position[side.positions() + self.position_offset]
        if self.token_type is not None:
            x += self.token_type[side.segments(self.sep_id) if self.token_type.shape[0] > 1 else 0]
        mean = x.mean(-1, keepdims=True)
        x -= mean
        var = (x * x).mean(-1, keepdims=True)
        x *= 1.0 / np.sqrt(var + self.eps)
        return x * self.ln_weight + self.ln_bias

    def compute_torch(self, side: SideInfo, tensors: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """The same on `tensors`' device (from `device_tensors`): float32 [T, E]."""
        import torch

        self._check_ids(side)
        device = tensors["word"].device
        as_t = lambda a: torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
        x = tensors["word"][as_t(side.ids)].float()
        if "position" in tensors:
            x += tensors["position"][as_t(side.positions() + self.position_offset)].float()
        if "token_type" in tensors:
            seg = side.segments(self.sep_id) if tensors["token_type"].shape[0] > 1 else np.zeros(len(side.ids), np.int64)
            x += tensors["token_type"][as_t(seg)].float()
        return torch.nn.functional.layer_norm(x, (self.width,), tensors["ln_weight"], tensors["ln_bias"], self.eps)

    def device_tensors(self, device) -> dict[str, "torch.Tensor"]:
        import torch

        out = {"word": torch.as_tensor(self.word, device=device),
               "ln_weight": torch.as_tensor(self.ln_weight, device=device),
               "ln_bias": torch.as_tensor(self.ln_bias, device=device)}
        if self.position is not None:
            out["position"] = torch.as_tensor(self.position, device=device)
        if self.token_type is not None:
            out["token_type"] = torch.as_tensor(self.token_type, device=device)
        return out

    # ---- the model's own embedding layer -> tables, checked against it
    @classmethod
    def from_model(cls, model, sep_id: int, name: str) -> "StaticEmbedding":
        """Copy the tables of a HF encoder's `embeddings` module. Refused (one line) when that module is not
        word + position + token type + LayerNorm; checked by `check_against` on real tokens."""
        emb = getattr(model, "embeddings", None)
        arch = f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')})"
        word = getattr(emb, "word_embeddings", None)
        ln = getattr(emb, "LayerNorm", None)
        if word is None or not isinstance(ln, _torch().nn.LayerNorm) or getattr(emb, "embed_proj", None) is not None:
            raise CompressorError(f"--residual embeddings: {name} ({arch}) has no word + position + token type + "
                                  f"LayerNorm embedding layer to recompute from token ids; use --residual none")
        pos = getattr(emb, "position_embeddings", None)
        if getattr(model.config, "position_biased_input", True) is False:
            pos = None  # DeBERTa: relative positions only, none added at the input
        types = getattr(emb, "token_type_embeddings", None)
        pad = getattr(emb, "padding_idx", None)
        f16 = lambda m: m.weight.detach().float().cpu().numpy().astype(np.float16)  # noqa: E731
        return cls(word=f16(word), position=None if pos is None else f16(pos),
                   token_type=None if types is None else f16(types),
                   ln_weight=ln.weight.detach().float().cpu().numpy(), ln_bias=ln.bias.detach().float().cpu().numpy(),
                   eps=float(ln.eps), position_offset=pad + 1 if pad is not None else 0, sep_id=int(sep_id))

    def check_against(self, model, side: SideInfo, name: str, tolerance: float = 2e-2) -> float:
        """The tables against the model's own embedding layer (fed the same derived segments) on real
        passages: relative error of the embedding output. Returns it; refuses above `tolerance`."""
        import torch

        got = self.compute(side)
        types = side.segments(self.sep_id)
        emb = model.embeddings
        device = next(emb.parameters()).device
        errs, start = [], 0
        with torch.inference_mode():
            for n in side.lengths[:32]:
                ids = torch.as_tensor(side.ids[start:start + n], device=device)[None]
                kwargs = {"input_ids": ids}
                if getattr(emb, "token_type_embeddings", None) is not None:
                    kwargs["token_type_ids"] = torch.as_tensor(types[start:start + n], device=device)[None]
                ref = emb(**kwargs)[0].float().cpu().numpy()
                errs.append(np.linalg.norm(got[start:start + n] - ref) / max(np.linalg.norm(ref), 1e-12))
                start += n
        err = float(max(errs)) if errs else 0.0
        if err > tolerance:
            raise CompressorError(f"--residual embeddings: {name}'s embedding layer is not reproduced from token ids "
                                  f"(relative error {err:.1e}): its embeddings add something beyond word + position "
                                  f"+ token type + LayerNorm; use --residual none")
        return err

    # ---- serialisation (inside the codec's safetensors file)
    def tensors(self) -> dict[str, np.ndarray]:
        out = {PREFIX + "word": np.ascontiguousarray(self.word, np.float16),
               PREFIX + "ln_weight": np.ascontiguousarray(self.ln_weight, np.float32),
               PREFIX + "ln_bias": np.ascontiguousarray(self.ln_bias, np.float32)}
        if self.position is not None:
            out[PREFIX + "position"] = np.ascontiguousarray(self.position, np.float16)
        if self.token_type is not None:
            out[PREFIX + "token_type"] = np.ascontiguousarray(self.token_type, np.float16)
        return out

    def metadata(self) -> dict[str, str]:
        return {PREFIX + "eps": repr(self.eps), PREFIX + "position_offset": str(self.position_offset),
                PREFIX + "sep_id": str(self.sep_id)}

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray], md: dict[str, str], where: str) -> "StaticEmbedding":
        word = t.get(PREFIX + "word")
        if word is None or word.ndim != 2:
            raise CompressorError(f"{where}: a residual codec needs {PREFIX}word [vocab, width]")
        e = word.shape[1]
        for key in ("position", "token_type"):
            v = t.get(PREFIX + key)
            if v is not None and (v.ndim != 2 or v.shape[1] != e):
                raise CompressorError(f"{where}: {PREFIX}{key} is {v.shape}, expected [*, {e}]")
        for key in ("ln_weight", "ln_bias"):
            if t.get(PREFIX + key) is None or t[PREFIX + key].shape != (e,):
                raise CompressorError(f"{where}: {PREFIX}{key} must be [{e}]")
        try:
            eps, offset, sep = float(md[PREFIX + "eps"]), int(md[PREFIX + "position_offset"]), int(md[PREFIX + "sep_id"])
        except (KeyError, ValueError) as exc:
            raise CompressorError(f"{where}: residual metadata eps/position_offset/sep_id missing or bad ({exc})") from None
        return cls(word=word.astype(np.float16), position=t.get(PREFIX + "position"),
                   token_type=t.get(PREFIX + "token_type"), ln_weight=t[PREFIX + "ln_weight"].astype(np.float32),
                   ln_bias=t[PREFIX + "ln_bias"].astype(np.float32), eps=eps, position_offset=offset, sep_id=sep)


@dataclass
class Prediction:
    """p(e) = e·A + b: the part of a token's state its static embedding predicts (A [E, H], b [H]).

    A linear map on e also absorbs a linear projection after the embedding layer (ELECTRA's
    `embeddings_project` when its embedding size differs from the hidden size), so E may differ from H."""
    embedding: StaticEmbedding
    weight: np.ndarray   # [E, H] float32
    bias: np.ndarray     # [H] float32

    @property
    def hidden(self) -> int:
        return int(self.weight.shape[1])

    def predict(self, side: SideInfo) -> np.ndarray:
        return self.embedding.compute(side) @ self.weight + self.bias

    def torch_predictor(self, device):
        """side -> [T, H] float32 on `device` (tables moved there once)."""
        import torch

        tables = self.embedding.device_tensors(device)
        w, b = torch.as_tensor(self.weight, device=device), torch.as_tensor(self.bias, device=device)
        return lambda side: torch.addmm(b, self.embedding.compute_torch(side, tables), w)

    def tensors(self) -> dict[str, np.ndarray]:
        return {**self.embedding.tensors(), PREFIX + "map": np.ascontiguousarray(self.weight, np.float32),
                PREFIX + "bias": np.ascontiguousarray(self.bias, np.float32)}

    def metadata(self) -> dict[str, str]:
        return {"residual": "embeddings", **self.embedding.metadata()}

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray], md: dict[str, str], where: str) -> "Prediction":
        emb = StaticEmbedding.from_tensors(t, md, where)
        w, b = t.get(PREFIX + "map"), t.get(PREFIX + "bias")
        if w is None or b is None or w.ndim != 2 or w.shape[0] != emb.width or b.shape != (w.shape[1],):
            raise CompressorError(f"{where}: {PREFIX}map must be [{emb.width}, hidden] and {PREFIX}bias [hidden]; "
                                  f"found {None if w is None else w.shape}, {None if b is None else b.shape}")
        for name, a in (("map", w), ("bias", b), ("ln_weight", emb.ln_weight)):
            if not np.isfinite(a).all():
                raise CompressorError(f"{where}: {PREFIX}{name} contains NaN or infinite values")
        return cls(emb, np.ascontiguousarray(w, np.float32), np.ascontiguousarray(b, np.float32))


class RidgeAccumulator:
    """Streaming closed-form ridge regression of states on static embeddings (float64 moments)."""

    def __init__(self, width: int, hidden: int):
        self.n = 0
        self.sx, self.sy = np.zeros(width), np.zeros(hidden)
        self.xx, self.xy = np.zeros((width, width)), np.zeros((width, hidden))
        self.yy = 0.0

    def update(self, e: np.ndarray, h: np.ndarray) -> None:
        x, y = e.astype(np.float64), h.astype(np.float64)
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.xx += x.T @ x
        self.xy += x.T @ y
        self.yy += float((y * y).sum())

    def finish(self, embedding: StaticEmbedding, lam: float = 1e-3) -> tuple[Prediction, dict[str, Any]]:
        """A = (Cxx + lam·tr(Cxx)/E·I)^-1 Cxy, b = mean(y) - mean(x)·A; and the residual's share of the
        centred energy (how much the prediction leaves to the codes)."""
        if self.n < 2:
            raise CompressorError("need at least two token states to fit the residual prediction")
        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.xx / self.n - np.outer(mx, mx)
        cxy = self.xy / self.n - np.outer(mx, my)
        reg = lam * np.trace(cxx) / cxx.shape[0]
        a = np.linalg.solve(cxx + reg * np.eye(cxx.shape[0]), cxy)
        b = my - mx @ a
        energy = self.yy / self.n - float(my @ my)
        explained = float(np.trace(a.T @ cxy))  # tr(Cyx A) = energy the fitted map removes (ridge: nearly)
        stats = {"residual_energy_share": f"{max(energy - explained, 0.0) / max(energy, 1e-30):.4f}",
                 "ridge_lambda": f"{lam:g}"}
        return Prediction(embedding, a.astype(np.float32), b.astype(np.float32)), stats


def _torch():
    import torch
    return torch
