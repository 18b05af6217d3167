"""Title/text pair tokenisation with the model's fast tokenizer, the way DPR feeds its encoder."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from transformers import AutoConfig, AutoTokenizer

from pipeline.config import ConfigError, ModelConfig


@dataclass
class Tokenized:
    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    keep: np.ndarray  # False where the passage was skipped for length
    truncated: int
    skipped_too_long: int
    truncated_rows: list[int] = field(default_factory=list)


def model_max_length(model: ModelConfig) -> int:
    """The longest sequence the model takes: the smaller of the tokenizer's and the positions'.

    For callers without a `ModelSpec` (fitting, reports, benchmarks); a run takes `ModelSpec.max_length`."""
    from pipeline.model.spec import max_length_for, position_limit

    cfg = AutoConfig.from_pretrained(model.path, revision=model.revision)
    return max_length_for(model, position_limit(getattr(cfg, "model_type", ""),
                                                getattr(cfg, "max_position_embeddings", 512)))


class PairTokenizer:
    def __init__(self, model: ModelConfig, max_length: int, config=None):
        """`config`: the checkpoint's HF config when it was read already (`Checkpoint.hf_config`), so that
        loading the tokenizer does not read config.json again."""
        self.tok = AutoTokenizer.from_pretrained(model.path, revision=model.revision, use_fast=True, config=config)
        if not getattr(self.tok, "is_fast", False):
            raise ConfigError(f"{model.name} has no fast tokenizer; the pipeline needs one (tokenizers)")
        self.max_length = max_length
        self.on_too_long = model.on_too_long
        self.vocab_size = len(self.tok)

    def __call__(self, titles: list[str], texts: list[str]) -> Tokenized:
        enc = self.tok(titles, texts, truncation=False, return_token_type_ids=True,
                       return_attention_mask=False, verbose=False)
        ids, types = enc["input_ids"], enc.get("token_type_ids")
        keep = np.ones(len(ids), dtype=bool)
        truncated = skipped = 0
        truncated_rows = []
        for i, seq in enumerate(ids):
            if len(seq) <= self.max_length:
                continue
            if self.on_too_long == "skip":
                keep[i] = False
                skipped += 1
                continue
            one = self.tok(titles[i], texts[i], truncation="longest_first", max_length=self.max_length,
                           return_token_type_ids=True, return_attention_mask=False)
            ids[i] = one["input_ids"]
            if types is not None:
                types[i] = one["token_type_ids"]
            truncated += 1
            truncated_rows.append(i)
        dtype = np.uint16 if self.vocab_size <= 65536 else np.uint32
        input_ids = [np.asarray(s, dtype=dtype) for s in ids]
        token_types = ([np.asarray(t, dtype=np.uint8) for t in types] if types is not None
                       else [np.zeros(len(s), np.uint8) for s in ids])
        return Tokenized(input_ids, token_types, keep, truncated, skipped, truncated_rows)
