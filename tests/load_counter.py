"""Count, in this process, how often model configs and tokenizers are loaded and a codec file is decoded.

Every config.json read goes through `PretrainedConfig.get_config_dict` (AutoConfig, a config class's
own from_pretrained, AutoModel and AutoTokenizer when they need the config): that is what is counted
per model path, next to the top-level AutoConfig/AutoTokenizer calls. Ray workers are other
processes, so only the driver is seen.

    PYTHONPATH=$PWD python3 -m tests.load_counter   # `precompute run`, then one with DPR + --compressor
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys
import traceback
from pathlib import Path


def _key(path) -> str:
    """A path as the report names it: the folder's last part (tiny-bert..., model)."""
    return Path(str(path).rstrip("/")).name or str(path)


@contextlib.contextmanager
def counting():
    """Yields a Counter of ("config"|"AutoConfig"|"AutoTokenizer", model folder) and ("codec_decode", "") loads."""
    from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

    from pipeline.codec import state_codec

    counts: collections.Counter = collections.Counter()
    saved = []

    def patch_classmethod(owner, name, label):
        original = owner.__dict__[name]
        func = original.__func__

        def counted(cls, path, *args, **kwargs):
            counts[(label, _key(path))] += 1
            if os.environ.get("LOAD_COUNTER_STACKS"):
                traceback.print_stack(limit=8)
            return func(cls, path, *args, **kwargs)

        setattr(owner, name, classmethod(counted))
        saved.append((owner, name, original))

    patch_classmethod(PretrainedConfig, "get_config_dict", "config")
    patch_classmethod(AutoConfig, "from_pretrained", "AutoConfig")
    patch_classmethod(AutoTokenizer, "from_pretrained", "AutoTokenizer")
    decode = state_codec.codec_from_bytes

    def counted_decode(data, where, *args, **kwargs):
        counts[("codec_decode", "")] += 1
        if os.environ.get("LOAD_COUNTER_STACKS"):
            traceback.print_stack(limit=6)
        return decode(data, where, *args, **kwargs)

    # the function as every module bound it (`from ... import codec_from_bytes`)
    bound = [m for name, m in list(sys.modules.items()) if name.split(".")[0] in ("pipeline", "jobs")
             and getattr(m, "codec_from_bytes", None) is decode]
    for module in bound:
        module.codec_from_bytes = counted_decode
    try:
        yield counts
    finally:
        for module in bound:
            module.codec_from_bytes = decode
        for owner, name, original in saved:
            setattr(owner, name, original)


def run_counted(argv: list[str]) -> tuple[int, dict[str, int]]:
    """`precompute ARGV` in this process; its exit code and the loads it made here."""
    import pipeline.flows.run  # noqa: F401  (bound before counting patches its names)
    from jobs.cli import main

    with counting() as counts:
        rc = main(argv)
    return rc, {f"{label}:{path}" if path else label: n for (label, path), n in sorted(counts.items())}


def two_runs(root: Path, model: str, corpus: Path) -> dict[str, dict[str, int]]:
    """The loads of two runs of `model` on 200 passages of `corpus`: one fitting its codec ("plain"), then
    one given that codec with --compressor and a DPR pass with the bundled MiniLM ("dpr+compressor")."""
    from pipeline.config import BUNDLED_MODEL

    base = ["run", "--corpus", str(corpus), "--limit", "200", "--shard-size", "100", "--model", model,
            "--layers", "1", "--dims", "8", "--fit-sample", "64"]
    out = {}
    rc, out["plain"] = run_counted(base + ["--store", str(root / "plain")])
    if rc:
        raise RuntimeError(f"the plain run exited {rc}")
    codec = next((root / "plain" / "artifacts").glob("compressor-*.safetensors"))
    rc, out["dpr+compressor"] = run_counted(base + ["--store", str(root / "dpr"), "--compressor", str(codec),
                                                   "--dpr-model", BUNDLED_MODEL, "--dpr-pooling", "mean"])
    if rc:
        raise RuntimeError(f"the DPR run exited {rc}")
    return out


if __name__ == "__main__":
    import json
    import logging
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    from transformers import BertModel

    from pipeline.config import BUNDLED_MODEL, resolve_model
    from tests.conftest import SAMPLE_TSV, save_tiny_bert

    with tempfile.TemporaryDirectory(prefix="load-counter-") as tmp:
        tiny = save_tiny_bert(BertModel, Path(tmp) / "tiny-bert", resolve_model(BUNDLED_MODEL), seed=0,
                              max_positions=128)
        print(json.dumps(two_runs(Path(tmp), tiny, SAMPLE_TSV), indent=1))
