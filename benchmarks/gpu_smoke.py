"""First minute on a GPU machine: does the packed path run there, and agree with the masked one?

    python -m benchmarks.gpu_smoke --json OUT/smoke.json

Builds a 2-layer model of BERT-base width (random weights), encodes the same length-sorted batch of
random token ids through the HF layers with a padding mask and through the packed path (varlen flash
attention where torch has it), in the compute dtype, and reports the largest difference against the
float32 masked forward on the same weights. Then the whole shard encoder (token-budget batches, the
codec on the device, overlapped host copies) against float32 on the CPU, through decoded states. Also reports which SDPA kernels torch allows. Exit 1 when
the packed states disagree beyond the dtype's tolerance, so a later step is not timed on wrong output.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def _tiny_checkpoint(tmp: str, hidden: int = 768, layers: int = 2) -> str:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         intermediate_size=4 * hidden)).save_pretrained(tmp)
    return tmp


def packed_vs_mask(model_path: str, device: torch.device, n: int = 48, seed: int = 0) -> dict:
    """Largest |difference| of packed and masked states (compute dtype) from the float32 masked forward."""
    from pipeline.config import ModelConfig
    from pipeline.model.encoder import LayeredEncoder, pad_flat
    from pipeline.model.packed_attention import PackedBatch, PackedLowerLayers, varlen_available

    rng = np.random.default_rng(seed)
    lengths = np.sort(rng.integers(8, 200, n))[::-1].copy()
    ids = rng.integers(1000, 30000, int(lengths.sum()))
    types = (rng.random(ids.size) < 0.5).astype(np.int64)
    cfg = ModelConfig(name=model_path, layers=2)
    enc = LayeredEncoder(cfg, device)
    kernel = "varlen" if varlen_available(device) else "padded"
    packed = PackedLowerLayers(enc.embeddings, enc.embeddings_project, list(enc.layers), enc.type_vocab_size, kernel)
    i, t, am = pad_flat(ids, types, lengths, 0, device)
    with torch.inference_mode():
        masked = enc.embed_and_lower(i, t, am)[am.bool()].float()
        got = packed(PackedBatch.build(ids, types, lengths, device)).float()
    ref_enc = LayeredEncoder(cfg, torch.device("cpu"))  # float32 on the CPU: the reference
    with torch.inference_mode():
        ref = ref_enc.embed_and_lower(i.cpu(), t.cpu(), am.cpu())[am.cpu().bool()]
    scale = float(ref.abs().max())
    err_packed = float((got.cpu() - ref).abs().max()) / scale
    err_masked = float((masked.cpu() - ref).abs().max()) / scale
    return {"kernel": kernel, "dtype": str(enc.dtype), "tokens": int(lengths.sum()), "passages": n,
            "max_rel_err_packed": err_packed, "max_rel_err_masked": err_masked,
            "ok": bool(err_packed <= max(4 * err_masked, 1e-5))}


def shard_encoder_check(model_path: str, device: torch.device, n: int = 64, seed: int = 1) -> dict:
    """ShardEncoder.encode_flat (token-budget batches, codec on the device, overlapped host copies) on
    `device`, packed and masked, against float32 on the CPU: relative error of the decoded states."""
    from pipeline.codec.state_codec import LinearCodec
    from pipeline.codec.projection import PcaAccumulator
    from pipeline.config import ModelConfig
    from pipeline.model.encoder import ShardEncoder

    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 200, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(1000, 30000, int(offsets[-1]))
    types = np.zeros_like(ids)
    cfg = ModelConfig(name=model_path, layers=2)
    acc = PcaAccumulator(768)
    acc.update(rng.standard_normal((2000, 768)))
    codec = LinearCodec(acc.finish(192))
    budget = 2048  # several batches, so copies overlap

    def decoded(dev, attention):
        enc = ShardEncoder(cfg, codec, budget, dev, attention=attention).encode_flat(ids, types, offsets)
        return codec.decode(enc.codes, enc.scales)

    ref = decoded(torch.device("cpu"), "mask")
    out = {}
    for attention in ("packed", "mask"):
        got = decoded(device, attention)
        out[f"encode_flat_rel_err_{attention}"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    out["encode_flat_ok"] = bool(max(out.values()) < 0.05)
    return out


def main(argv=None) -> int:
    import tempfile

    from pipeline.config import ConfigError
    from pipeline.model.encoder import pick_device

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        device = pick_device(a.device)
    except ConfigError as exc:
        print(f"gpu_smoke: {exc}", file=sys.stderr)
        return 2
    res: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        res["sdpa"] = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                       "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                       "cudnn": torch.backends.cuda.cudnn_sdp_enabled()}
        res["bf16"] = torch.cuda.is_bf16_supported()
        res["memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    path = _tiny_checkpoint(tempfile.mkdtemp(prefix="smoke-"))
    res.update(packed_vs_mask(path, device))
    res.update(shard_encoder_check(path, device))
    res["ok"] = res["ok"] and res["encode_flat_ok"]
    res["seconds"] = time.perf_counter() - t0
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
