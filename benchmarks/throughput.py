"""Throughput benchmark: a DPR-style naive encoder vs the pipeline's encoder, in the same run.

    python -m benchmarks.throughput                     # CPU: MiniLM, lower 3 layers, the bundled sample
    python -m benchmarks.throughput --e2e-repeat 4      # also the Ray pipeline end to end on 4x the sample
    python -m benchmarks.throughput --bert-base         # GPU: BERT-base geometry (random weights), MFU
    python -m benchmarks.throughput --pq-m 32 --opq     # also the pipeline encoder with a PQ codec (same run)
    python -m benchmarks.throughput --variants mask,packed,packed+compile   # attention paths, same run

Each variant is the pipeline encoder under one attention path: `mask` (the model's layers on padded
batches, a 4-d additive mask), `packed` (unpadded tokens; varlen flash attention on CUDA, padded SDPA
elsewhere) and `+compile` (torch.compile of the packed layers). The first is reported as "pipeline".

Prints tokens/s (real tokens only), their ratio, and on GPU the model-FLOP utilisation against a
bf16 matmul peak measured in the same run. Ratios, not absolute numbers, are what to compare.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from pipeline.codec.state_codec import Codec, LinearCodec
from pipeline.codec.projection import Compressor
from pipeline.config import (BUNDLED_MODEL, CompressionConfig, CorpusConfig, ExecutionConfig, ModelConfig,
                             RunConfig, resolve_model)
from pipeline.corpus.source import Corpus
from pipeline.model.encoder import ShardEncoder, compute_dtype, pick_device
from pipeline.model.tokenizer import PairTokenizer
from benchmarks.geometry import bert_base_checkpoint
from benchmarks.proc import start_benchmark

log = logging.getLogger("benchmark")


def load_passages(url: str, limit: int | None = None) -> tuple[list[int], list[str], list[str]]:
    corpus = Corpus(CorpusConfig(url=url, limit=limit))
    scan = corpus.scan()
    rows = [r for t in corpus.batches(scan, 4096) for r in t.to_pylist()]
    return [r["id"] for r in rows], [r["title"] for r in rows], [r["text"] for r in rows]


def flops_per_token(hidden: int, ffn: int, layers: int, seq: float) -> float:
    """Forward FLOPs per token: QKV+O (8h^2) + FFN (4 h ffn) + attention scores and mix (4 L h)."""
    return layers * (8 * hidden * hidden + 4 * hidden * ffn + 4 * seq * hidden)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


class NaiveEncoder:
    """DPR's encoder loop: pad to 256, fixed batch, corpus order, tokenise inside the loop, full-width
    states to the host, project there. fp32 on CPU, fp16 on GPU."""

    def __init__(self, model_path: str, layers: int, comp: Compressor, device, batch: int = 32, max_len: int = 256):
        self.tok = AutoTokenizer.from_pretrained(model_path)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.model = AutoModel.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self.model.encoder.layer = self.model.encoder.layer[:layers]
        self.model.config.num_hidden_layers = layers
        self.comp, self.device, self.batch, self.max_len = comp, device, batch, max_len

    def __call__(self, titles, texts) -> int:
        tokens = 0
        with torch.no_grad():
            for i in range(0, len(texts), self.batch):
                enc = self.tok(titles[i:i + self.batch], texts[i:i + self.batch], padding="max_length",
                               truncation=True, max_length=self.max_len, return_tensors="pt")
                out = self.model(**{k: v.to(self.device) for k, v in enc.items()}).last_hidden_state
                h = out.float().cpu().numpy()
                mask = enc["attention_mask"].numpy().astype(bool)
                for row in range(h.shape[0]):
                    self.comp.compress(h[row][mask[row]])
                tokens += int(mask.sum())
        return tokens


VARIANTS = {"auto": ("auto", False), "mask": ("mask", False), "packed": ("packed", False),
            "packed+compile": ("packed", True), "auto+compile": ("auto", True)}


class PipelineEncoder:
    """The pipeline's encoder: tokenise (counted here; overlapped on other workers in the pipeline),
    length-sorted token-budget batches, projection and int8 on the device."""

    def __init__(self, model: ModelConfig, codec: Codec, device, budget: int | None, max_len: int,
                 variant: str = "auto"):
        name, _, size = variant.partition("@")
        attention, compile_ = VARIANTS[name]
        self.enc = ShardEncoder(model, codec, int(size) if size else budget, device, attention=attention,
                                compile=compile_)
        self.variant, self.kernel, self.budget = variant, self.enc.kernel, self.enc.token_budget
        self.enc_codec = codec.describe()
        self.tok = PairTokenizer(model, max_len)
        self.tokenise_s: list[float] = []  # per call: the share of the call spent tokenising

    def __call__(self, titles, texts) -> int:
        t0 = time.perf_counter()
        tok = _tok(self.tok, titles, texts)
        self.tokenise_s.append(time.perf_counter() - t0)
        return self.enc.encode(*tok).tokens


def timed(fn, titles, texts, device) -> tuple[int, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = fn(titles, texts)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - t0


def _tok(tok, titles, texts):
    t = tok(titles, texts)
    return t.input_ids, t.token_type_ids


def fit(model: ModelConfig, titles, texts, dims: int, device) -> Compressor:
    from pipeline.codec.fitting import fit_compressor
    from pipeline.model.tokenizer import model_max_length
    return fit_compressor(model, titles[:256], texts[:256], dims, model_max_length(model), device)


def fit_pq_codec(model: ModelConfig, titles, texts, m: int, opq: bool, device) -> Codec:
    from pipeline.codec.fitting import fit_codec
    from pipeline.model.tokenizer import model_max_length
    return fit_codec(model, titles[:256], texts[:256], CompressionConfig(codec="pq", pq_m=m, opq=opq),
                     model_max_length(model), device)


def e2e(model: ModelConfig, comp: Compressor, ids, titles, texts, repeat: int, shard_size: int,
        budget: int, variant: str = "auto") -> dict:
    """The Ray pipeline on the sample repeated with new ids: steady state vs fixed start-up cost."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.flows.run import run

    tmp = tempfile.mkdtemp(prefix="bench-")
    corpus = os.path.join(tmp, "corpus.parquet")  # Parquet: texts that open with a quote stay one field
    base = np.asarray(ids, dtype=np.int64)
    pq.write_table(pa.table({"id": np.concatenate([base + r * 10_000_000 for r in range(repeat)]),
                             "title": titles * repeat, "text": texts * repeat}), corpus, row_group_size=10_000)
    name, _, size = variant.partition("@")
    comp_path = os.path.join(tmp, "c.safetensors")
    with open(comp_path, "wb") as fh:
        fh.write(comp.to_bytes())
    cfg = RunConfig(store=os.path.join(tmp, "store"), corpus=CorpusConfig(url=corpus), model=model,
                    compression=CompressionConfig(dims=comp.dims, compressor=comp_path),
                    execution=ExecutionConfig(shard_size=shard_size, token_budget=int(size) if size else budget,
                                              attention=VARIANTS[name][0], compile=VARIANTS[name][1]))
    t0 = time.perf_counter()
    wall_start = time.time()
    summary = run(cfg)
    wall = time.perf_counter() - t0
    from storage import manifest as mf
    from storage.fs import Store
    store = Store(cfg.store)
    m = mf.load(store)
    markers = sorted((json.loads(store.read_bytes(s["path"].replace(".parquet", ".done.json"))) for s in m.shards),
                     key=lambda x: x["finished_at"])
    first, last = markers[0]["finished_at"], markers[-1]["finished_at"]
    steady_tokens = sum(x["tokens"] for x in markers[1:])
    return {"passages": summary.written, "tokens": summary.tokens, "shards": summary.shards, "wall_s": wall,
            "fixed_s": first - wall_start, "steady_tokens_per_s": steady_tokens / max(last - first, 1e-9),
            "encode_seconds_in_actor": sum(x["encode_seconds"] for x in markers),
            "actor_encode_tokens_per_s": summary.tokens / sum(x["encode_seconds"] for x in markers)}


def summary_lines(res: dict) -> list[str]:
    """The human summary of one results dict (also printed by benchmarks.gpu_summary from saved JSON)."""
    base = res["pipeline"]
    lines = [f"{res['device']}: naive {res['naive']['tokens_per_s']:,.0f} tok/s | pipeline encoder "
             f"{base['tokens_per_s']:,.0f} tok/s (encode only {base['encode_only_tokens_per_s']:,.0f}) | speedup "
             f"{res['speedup']:.2f}x" + (f" | MFU {res['mfu_pipeline']:.1%} of a {res['matmul_peak_tflops']:.0f} "
                                         f"TFLOP/s matmul peak" if "mfu_pipeline" in res else "")]
    for name, r in res.items():
        if name.startswith("pipeline") and isinstance(r, dict) and "attention" in r:
            lines.append(f"  {r['variant']:<16} {r['attention']:<9} {r['tokens_per_s']:>11,.0f} tok/s, encode only "
                         f"{r['encode_only_tokens_per_s']:>11,.0f} = "
                         f"{r['encode_only_tokens_per_s'] / base['encode_only_tokens_per_s']:.2f}x '{base['variant']}'"
                         + (f", MFU {r['mfu']:.1%}" if "mfu" in r else "") + f"; warm-up {r['warmup_s']:.1f} s")
    if "pq_vs_linear" in res:
        lines.append(f"pipeline encoder with {res['pipeline_pq']['codec']}: {res['pipeline_pq']['tokens_per_s']:,.0f} "
                     f"tok/s = {res['pq_vs_linear']:.2f}x the linear codec's")
    if "e2e" in res:
        e = res["e2e"]
        lines.append(f"end to end (Ray, {e['passages']:,} passages, {e['shards']} shards, {e['variant']}): steady "
                     f"{e['steady_tokens_per_s']:,.0f} tok/s = {e['steady_vs_encode_only']:.0%} of encode-only "
                     f"({e['steady_vs_tokenise_and_encode']:.0%} of tokenise + encode); fixed start-up "
                     f"{e['fixed_s']:.1f} s; wall {e['wall_s']:.1f} s")
    for basis, row in res.get("projection_32m", {}).items():
        lines.append(f"32M x 150 tokens on 8 GPUs ({basis}): {row['hours_input_component']:.2f} h input component, "
                     f"{row['hours_with_dpr']:.2f} h with DPR" + (f" (${row['usd_input_component']:,.0f} / "
                                                                 f"${row['usd_with_dpr']:,.0f})"
                                                                 if "usd_with_dpr" in row else ""))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="bundled:wiki_passages_2k")
    p.add_argument("--model", default=BUNDLED_MODEL)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--dims", type=int, default=96)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--token-budget", type=int, default=None, help="default: the pipeline's (4096 CPU, 65536 GPU)")
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per encoder (median reported)")
    p.add_argument("--e2e-repeat", type=int, default=0, help="also run the Ray pipeline on the sample x N")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--bert-base", action="store_true", help="BERT-base geometry, random weights (GPU benchmark)")
    p.add_argument("--pq-m", type=int, default=0, help="also time the pipeline encoder with a PQ codec of M "
                   "sub-quantisers, fitted on the same passages (0 = not)")
    p.add_argument("--opq", action="store_true", help="with --pq-m: an OPQ rotation first")
    p.add_argument("--variants", default="auto", help="pipeline encoder variants, comma-separated, the first "
                   f"reported as 'pipeline' and used end to end ({', '.join(VARIANTS)}; default auto)")
    p.add_argument("--repeat", type=int, default=1, help="time the passages N times over per round (a GPU "
                   "finishes the 2,333-passage sample in well under a second)")
    p.add_argument("--gpu-price", type=float, default=None, help="$ per GPU-hour, to price the 32M projection")
    p.add_argument("--vocab-from", default=None, help="with --bert-base: tokenizer folder (default: the bundled "
                   "MiniLM, else .gpucarry/minilm-no-weights)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    variants = a.variants.split(",")
    names = {v.partition("@")[0] for v in variants}
    budgets = [v.partition("@")[2] for v in variants]
    if (names - set(VARIANTS) or len(set(variants)) != len(variants)
            or any(b and (not b.isdigit() or int(b) < 1) for b in budgets)):
        p.error(f"--variants {a.variants!r}: distinct NAME or NAME@TOKEN_BUDGET, NAME from {', '.join(VARIANTS)}")
    if a.repeat < 1:
        p.error("--repeat must be at least 1")
    start_benchmark()
    device = pick_device("auto")
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    ids, titles, texts = load_passages(a.corpus, a.limit)
    timed_titles, timed_texts = titles * a.repeat, texts * a.repeat
    model_path = a.model
    if a.bert_base:
        model_path = bert_base_checkpoint(Path(tempfile.mkdtemp(prefix="bert-base-")), a.vocab_from)
    model = ModelConfig(name=model_path, layers=a.layers)
    path = resolve_model(model.name)
    cfg = AutoModel.from_pretrained(path).config
    comp = fit(model, titles, texts, a.dims, device)
    res: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {torch.cuda.get_device_name() if device.type == 'cuda' else 'no GPU'}",
                 "torch": torch.__version__, "threads": torch.get_num_threads(), "model": a.model if not a.bert_base else "bert-base geometry (random)",
                 "layers": a.layers, "passages": len(texts),
                 "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "device_type": device.type,
                 "date": time.strftime("%Y-%m-%d")}
    naive = NaiveEncoder(path, a.layers, comp, device)
    encoders = {"naive": naive}
    for i, v in enumerate(variants):
        encoders["pipeline" if i == 0 else f"pipeline[{v}]"] = PipelineEncoder(
            model, LinearCodec(comp), device, a.token_budget, 512, v)
    if a.pq_m:
        encoders["pipeline_pq"] = PipelineEncoder(model, fit_pq_codec(model, titles, texts, a.pq_m, a.opq, device),
                                                  device, a.token_budget, 512, variants[0])
    warm = {}
    for name, fn in encoders.items():  # warm-up: allocator, kernels, caches (and a compile: timed, reported)
        warm[name] = timed(fn, titles[:256], texts[:256], device)[1]
    runs: dict[str, list[tuple[int, float]]] = {name: [] for name in encoders}
    for _ in range(a.rounds):  # alternate, so drift on a noisy machine hits all alike
        for name, fn in encoders.items():
            runs[name].append(timed(fn, timed_titles, timed_texts, device))
    for name, rs in runs.items():
        rates = [t / s for t, s in rs]
        res[name] = {"tokens": rs[0][0], "tokens_per_s": float(np.median(rates)), "rounds": rates,
                     "warmup_s": warm[name]}
        if isinstance(encoders[name], PipelineEncoder):
            enc = encoders[name]
            tokenise = enc.tokenise_s[-len(rs):]
            encode_rates = [t / (s - k) for (t, s), k in zip(rs, tokenise)]
            res[name].update(variant=enc.variant, attention=enc.kernel, token_budget=enc.budget,
                             tokenise_s=tokenise, encode_only_tokens_per_s=float(np.median(encode_rates)))
    res["speedup"] = res["pipeline"]["tokens_per_s"] / res["naive"]["tokens_per_s"]
    if a.pq_m:
        res["pipeline_pq"]["codec"] = encoders["pipeline_pq"].enc_codec
        res["pq_vs_linear"] = res["pipeline_pq"]["tokens_per_s"] / res["pipeline"]["tokens_per_s"]
    pipelines = [n for n in encoders if n != "naive"]
    seq = res["pipeline"]["tokens"] / len(timed_texts)
    fpt = flops_per_token(cfg.hidden_size, cfg.intermediate_size, a.layers, seq)
    res["flops_per_token"] = fpt
    res["tokens_per_passage"] = seq
    best = max(pipelines, key=lambda n: res[n]["encode_only_tokens_per_s"])
    res["best_variant"] = best
    if device.type == "cuda":
        peak = matmul_peak(device, compute_dtype(device))
        res["matmul_peak_tflops"] = peak / 1e12
        res["mfu_naive"] = fpt * res["naive"]["tokens_per_s"] / peak  # tokenising inside its loop, as DPR does
        for name in pipelines:  # the input component alone: the pipeline tokenises on other CPU workers
            res[name]["mfu"] = fpt * res[name]["encode_only_tokens_per_s"] / peak
            res[name]["mfu_with_tokenise"] = fpt * res[name]["tokens_per_s"] / peak
        res["mfu_pipeline"] = res["pipeline"]["mfu"]
        res["mfu"] = res[best]["mfu"]
    save(res, a.json)  # what is measured so far survives an end-to-end run cut short
    if a.e2e_repeat:
        res["e2e"] = e2e(model, comp, ids, titles, texts, a.e2e_repeat, a.shard_size, a.token_budget, variants[0])
        e = res["e2e"]
        e["variant"] = variants[0]
        e["steady_vs_encode_only"] = e["steady_tokens_per_s"] / res["pipeline"]["encode_only_tokens_per_s"]
        e["steady_vs_tokenise_and_encode"] = e["steady_tokens_per_s"] / res["pipeline"]["tokens_per_s"]
    if device.type == "cuda":
        # 32M passages x 150 tokens on 8 GPUs; the DPR encoder (12 layers) at the same MFU as the input component.
        dpr_fpt = flops_per_token(768, 3072, 12, 150)
        fpt_150 = flops_per_token(cfg.hidden_size, cfg.intermediate_size, a.layers, 150)
        rates = {"encode_only": res[best]["encode_only_tokens_per_s"] * fpt / fpt_150}
        if "e2e" in res:
            rates["end_to_end"] = res["e2e"]["steady_tokens_per_s"] * fpt / fpt_150
        res["projection_32m"] = {}
        for basis, rate in rates.items():
            hours = {"input_component": 32e6 * 150 / rate / 8 / 3600}
            hours["with_dpr"] = hours["input_component"] * (1 + dpr_fpt / fpt_150)
            row = {"tokens_per_s_per_gpu_at_150": rate, **{f"hours_{k}": h for k, h in hours.items()}}
            if a.gpu_price is not None:
                row.update({f"usd_{k}": h * 8 * a.gpu_price for k, h in hours.items()})
            res["projection_32m"][basis] = row
    print(json.dumps(res, indent=1))
    print()
    print("\n".join(summary_lines(res)))
    save(res, a.json)
    return 0


def save(res: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
