"""DPR-style passage and question embeddings (the retriever half that decides which states to fetch).

`DPRContextEncoder`/`DPRQuestionEncoder` for DPR checkpoints (their pooler output); any other HF
encoder with CLS or mean pooling. `pooling="auto"` reads a sentence-transformers pooling config.
"""
from __future__ import annotations

import json
import os
import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from pipeline.config import DprConfig, resolve_model  # noqa: F401  (DprConfig re-exported)
from pipeline.model.encoder import compute_dtype, default_token_budget, pad_batch, token_budget_batches

def resolve_pooling(model: str, pooling: str) -> str:
    """`auto`: as the model's sentence-transformers pooling config says (CLS without one)."""
    if pooling != "auto":
        return pooling
    path = resolve_model(model)
    st = os.path.join(path, "1_Pooling", "config.json")
    if os.path.exists(st):
        with open(st) as fh:
            cfg = json.load(fh)
        return "mean" if cfg.get("pooling_mode_mean_tokens") else "cls"
    return "cls"


def resolve_normalize(model: str, normalize: bool | None) -> bool:
    """Cosine models (sentence-transformers with a Normalize module) are searched normalised."""
    if normalize is not None:
        return normalize
    path = os.path.join(resolve_model(model), "modules.json")
    if not os.path.exists(path):
        return False
    with open(path) as fh:
        return any(m.get("type", "").endswith("Normalize") for m in json.load(fh))


class Embedder:
    """One model, one pooling; encodes passages (title, text pairs) or questions (single segment)."""

    def __init__(self, model: str, revision: str | None, pooling: str, device: torch.device, role: str = "ctx",
                 normalize: bool | None = None, config=None):
        """`config`: the checkpoint's HF config when the driver read it already (`DprSpec`): weights and
        tokenizer files are then all this reads."""
        path = resolve_model(model)
        self.device = device
        self.dtype = compute_dtype(device)
        cfg = config if config is not None else AutoConfig.from_pretrained(path, revision=revision)
        self.is_dpr = cfg.model_type == "dpr"
        if self.is_dpr:
            from transformers import DPRContextEncoder, DPRQuestionEncoder
            cls = DPRQuestionEncoder if role == "question" else DPRContextEncoder
            self.model = cls.from_pretrained(path, revision=revision, dtype=self.dtype, config=cfg)
        else:
            self.model = AutoModel.from_pretrained(path, revision=revision, dtype=self.dtype, config=cfg)
        self.model.to(device).eval().requires_grad_(False)
        self.tok = AutoTokenizer.from_pretrained(path, revision=revision, use_fast=True, config=cfg)
        self.pooling = "cls" if self.is_dpr else resolve_pooling(model, pooling)
        self.normalize = resolve_normalize(model, normalize)
        self.dim = int(getattr(cfg, "projection_dim", 0) or cfg.hidden_size)
        self.max_length = min(int(getattr(cfg, "max_position_embeddings", 512)), 512)  # = DprSpec.max_length
        self.type_vocab = int(getattr(cfg, "type_vocab_size", 2) or 1)

    @classmethod
    def from_spec(cls, spec, device: torch.device) -> "Embedder":
        """The passage encoder of a run, as the driver resolved it (`pipeline.model.spec.DprSpec`)."""
        ck = spec.checkpoint
        return cls(ck.name, ck.load_revision, spec.pooling, device, normalize=spec.normalize, config=ck.hf_config)

    @torch.inference_mode()
    def embed_ids(self, input_ids: list[np.ndarray], token_types: list[np.ndarray],
                  token_budget: int | None = None) -> np.ndarray:
        lengths = np.fromiter((len(s) for s in input_ids), dtype=np.int64, count=len(input_ids))
        out = np.zeros((len(input_ids), self.dim), dtype=np.float32)
        pad = self.tok.pad_token_id or 0
        for batch in token_budget_batches(lengths, token_budget or default_token_budget(self.device)):
            ids, tt, am = pad_batch([input_ids[i][: self.max_length] for i in batch],
                                    [token_types[i][: self.max_length] for i in batch], pad, self.device)
            kwargs = {"input_ids": ids, "attention_mask": am}
            if self.type_vocab > 1:
                kwargs["token_type_ids"] = tt
            res = self.model(**kwargs)
            if self.is_dpr:
                emb = res.pooler_output
            elif self.pooling == "cls":
                emb = res.last_hidden_state[:, 0]
            else:
                m = am.unsqueeze(-1).to(res.last_hidden_state.dtype)
                emb = (res.last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1)
            out[batch] = emb.float().cpu().numpy()
        if self.normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def embed_passages(self, titles: list[str], texts: list[str]) -> np.ndarray:
        enc = self.tok(titles, texts, truncation=True, max_length=self.max_length, return_token_type_ids=True)
        return self.embed_ids([np.asarray(x) for x in enc["input_ids"]],
                              [np.asarray(x) for x in enc["token_type_ids"]])

    def embed_questions(self, questions: list[str]) -> np.ndarray:
        enc = self.tok(questions, truncation=True, max_length=self.max_length, return_token_type_ids=True)
        return self.embed_ids([np.asarray(x) for x in enc["input_ids"]],
                              [np.asarray(x) for x in enc["token_type_ids"]])
