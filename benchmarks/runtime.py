"""Runtime latency of the decoupled reader against the standard model: the paper's Table 6, on this machine.

    python -m benchmarks.runtime                      # CPU: MiniLM 3-3 (real weights), BERT-base 5-7 (random)
    python -m benchmarks.runtime --report             # the markdown table from reports/runtime_cpu.json
    python -m benchmarks.runtime --device cuda --geometries bert-base-5-7 \
        --out reports/runtime_gpu.json --details reports/runtime_gpu_details.json   # GPU columns (bf16)

In the same process, on the same questions and passages, alternating in each round:
  (a) standard: [CLS] q [SEP] p [SEP] for each of K passages, one batch, all layers;
  (b) decoupled: the question through the lower layers once, the passages' lower-layer states held in
      memory (float32, uncompressed, no fetch), re-encoding and the upper layers on K sequences;
  (c) decoupled+compressed: as (b), but the states are fetched from a local store written by the real
      pipeline (dims + int8 + zstd) and decoded on the device; fetch and decode are counted.
Settings, in tokens (64 + 448 = BERT's 512 positions): short = 16-token question, 150-token passage;
long = 64 / 448. Every stored passage is cut to exactly that length (the corpus texts are longer).
"""
from __future__ import annotations

import argparse
import dataclasses
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

from pipeline.config import BUNDLED_CORPUS, BUNDLED_MODEL, CompressionConfig, CorpusConfig, ModelConfig, RunConfig, \
    resolve_corpus, resolve_model
from pipeline.serve.qa_reader import DecoupledReader, RuntimeConfig
from benchmarks.geometry import bert_base_checkpoint
from benchmarks.proc import start_benchmark
from storage.fs import Store

log = logging.getLogger("benchmark")

ROWS = Path("reports/runtime_cpu.json")
DETAILS = Path("reports/runtime_cpu_details.json")
SETTINGS = {"short": (16, 150), "long": (64, 448)}  # (question tokens, passage tokens)
PAPER = {"gpu": (0.31, 0.30), "cpu": ("40-46%", "39-43%")}  # Table 6: uncompressed / 4x compression


@dataclasses.dataclass(frozen=True)
class Geometry:
    label: str
    layers: int
    dims: int
    weights: str  # "minilm": the bundled MiniLM; "random-bert-base": time only; "mpnet": real 768-wide, 12 layers
    residual_pq_m: int = 0  # > 0: the store codes the residual after the static-embedding prediction, OPQ M x 8 bits


GEOMETRIES = {"minilm-3-3": Geometry("minilm-3-3", 3, 96, "minilm"),
              "bert-base-5-7": Geometry("bert-base-5-7", 5, 192, "random-bert-base"),
              "mpnet-5-7": Geometry("mpnet-5-7", 5, 192, "mpnet"),  # benchmarks.fetch_mpnet, fetched on first use
              "minilm-3-3-residual8": Geometry("minilm-3-3-residual8", 3, 96, "minilm", residual_pq_m=8),
              "mpnet-5-7-residual32": Geometry("mpnet-5-7-residual32", 5, 192, "mpnet", residual_pq_m=32)}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    geometries: tuple[str, ...] = ("minilm-3-3", "bert-base-5-7")
    settings: tuple[str, ...] = ("short", "long")
    ks: tuple[int, ...] = (1, 10)
    rounds: int = 5
    passages: int = 20
    workdir: str | None = None
    device: str = "cpu"
    vocab_from: str | None = None  # tokenizer folder for the random BERT-base (default: bundled, else .gpucarry)


def model_path(g: Geometry, tmp: Path, vocab_from: str | None = None) -> str:
    if g.weights == "mpnet":
        from benchmarks.fetch_mpnet import DEFAULT_CACHE, fetch
        return str(fetch(DEFAULT_CACHE))
    if g.weights == "minilm":
        return resolve_model(BUNDLED_MODEL)
    return bert_base_checkpoint(tmp / "bert-base", vocab_from)


def sample_rows() -> list[tuple[int, str, str]]:
    import csv

    with open(resolve_corpus(BUNDLED_CORPUS), newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t")
        next(reader)
        return [(int(r[0]), r[1], r[2]) for r in reader]


def long_corpus(rows, n: int, path: Path) -> Path:
    """n passages of 8 consecutive sample passages each (~800 words): every one is cut to the setting's length."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("id\ttext\ttitle\n")
        for i in range(n):
            chunk = rows[i * 8:(i + 1) * 8]
            text = " ".join(r[1] for r in chunk).replace("\t", " ").replace('"', "'")
            fh.write(f"{i + 1}\t{text}\t{chunk[0][2]}\n")
    return path


def build_store(path: str, g: Geometry, setting: str, rows, n: int, tmp: Path) -> str:
    """The real pipeline (local Ray): lower layers, PCA to dims, int8, zstd, Parquet, manifest (or the
    geometry's residual OPQ codec)."""
    from pipeline.flows.run import run

    store = str(tmp / f"store-{g.label}-{setting}")
    if Path(store).exists():
        return store
    corpus = long_corpus(rows, n, tmp / f"corpus-{setting}.tsv")
    cfg = RunConfig(store=store, corpus=CorpusConfig(url=str(corpus)),
                    model=ModelConfig(name=path, layers=g.layers, max_length=SETTINGS[setting][1]),
                    compression=CompressionConfig(dims=g.dims, fit_sample=n) if not g.residual_pq_m else
                    CompressionConfig(codec="pq", pq_m=g.residual_pq_m, opq=True, residual="embeddings", fit_sample=n))
    run(cfg)
    return store


def questions(reader: DecoupledReader, rows, count: int, length: int) -> list[np.ndarray]:
    """Question token ids of exactly `length` ([CLS] ... [SEP]), from sample text the passages do not hold."""
    out = []
    for _, text, _ in rows[-count:]:
        ids = reader.tok(text, truncation=True, max_length=length)["input_ids"]
        if len(ids) != length:
            raise RuntimeError(f"sample passage too short for a {length}-token question")
        out.append(np.asarray(ids, dtype=np.int64))
    return out


def _types_of(token_ids: np.ndarray, sep: int) -> np.ndarray:
    """A stored [CLS] title [SEP] text [SEP] passage's token types, as the pipeline encoded it."""
    first = int(np.flatnonzero(token_ids == sep)[0])
    return (np.arange(token_ids.size) > first).astype(np.int64)


class Variants:
    """The three timed calls over one store, sharing one model (the same weights and kernels)."""

    def __init__(self, reader: DecoupledReader, ids: list[int]):
        self.r = reader
        enc = reader.encoder
        self.device = reader.device
        stored = reader.states.get_encoded(ids)
        self.tokens = {i: stored[i].token_ids for i in ids}
        self.types = {i: _types_of(t, reader.tok.sep_token_id) for i, t in self.tokens.items()}
        self.memory = {}  # (b): the input component's float32 output, uncompressed
        for i in ids:
            t = torch.as_tensor(self.tokens[i], device=self.device)[None]
            types = torch.as_tensor(self.types[i], device=self.device)[None]
            self.memory[i] = enc.embed_and_lower(t, types, torch.ones_like(t))[0]
        self.phases: dict[str, list[float]] = {"fetch_ms": [], "decode_ms": [], "cross_ms": []}

    @torch.inference_mode()
    def standard(self, q: np.ndarray, ids: list[int]) -> torch.Tensor:
        enc = self.r.encoder
        seqs = [np.concatenate([q, self.tokens[i][1:]]) for i in ids]  # [CLS] q [SEP] p [SEP]
        types = [np.concatenate([np.zeros(q.size, np.int64), np.ones(self.tokens[i].size - 1, np.int64)])
                 for i in ids]
        width = max(s.size for s in seqs)
        x = torch.zeros(len(ids), width, dtype=torch.long)
        tt, am = torch.zeros_like(x), torch.zeros_like(x)
        for row, (s, t) in enumerate(zip(seqs, types)):
            x[row, :s.size], tt[row, :s.size], am[row, :s.size] = torch.as_tensor(s), torch.as_tensor(t), 1
        x, tt, am = (t.to(self.device) for t in (x, tt, am))
        h = enc.embeddings(input_ids=x, token_type_ids=tt)
        return enc.run_layers(h, am, 0, enc.total_layers)

    def decoupled(self, q: np.ndarray, ids: list[int]) -> torch.Tensor:
        out, _ = self.r.cross(self.r.lower_question(q), [self.memory[i] for i in ids])
        return out

    def compressed(self, q: np.ndarray, ids: list[int]) -> torch.Tensor:
        t0 = time.perf_counter()
        hq = self.r.lower_question(q)
        t1 = time.perf_counter()
        found = self.r.states.get_encoded(ids)
        t2 = time.perf_counter()
        states = self.r.decode([found[i] for i in ids])
        t3 = time.perf_counter()
        out, _ = self.r.cross(hq, states)
        t4 = time.perf_counter()
        for key, dt in (("fetch_ms", t2 - t1), ("decode_ms", t3 - t2), ("cross_ms", t4 - t3 + t1 - t0)):
            self.phases[key].append(dt * 1e3)
        return out


def _cosines(a: torch.Tensor, b: torch.Tensor, lengths: list[int]) -> np.ndarray:
    """Per-token cosine of two [K, L, hidden] final-state batches over each row's real tokens."""
    a, b = a.float(), b.float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).cpu()
    return np.concatenate([cos[i, :n].numpy() for i, n in enumerate(lengths)])


def measure(cfg: BenchConfig, g: Geometry, setting: str, rows, tmp: Path) -> tuple[list[dict], dict]:
    path = model_path(g, tmp, cfg.vocab_from)
    store = build_store(path, g, setting, rows, cfg.passages, tmp)
    nq, np_ = SETTINGS[setting]
    reader = DecoupledReader(Store(store), RuntimeConfig(device=cfg.device, max_question_tokens=nq))
    sync = torch.cuda.synchronize if reader.device.type == "cuda" else (lambda: None)
    ids = sorted(int(i) for i in reader.states.ids())
    v = Variants(reader, ids)
    if {t.size for t in v.tokens.values()} != {np_}:
        raise RuntimeError(f"stored passages are not all {np_} tokens: {sorted({t.size for t in v.tokens.values()})}")
    qs = questions(reader, rows, cfg.rounds + 1, nq)
    rng = np.random.default_rng(0)
    out_rows, detail = [], {"store_bytes": sum(s["bytes"] for s in reader.states.manifest.shards)}
    calls = {"standard": v.standard, "decoupled": v.decoupled, "decoupled+compressed": v.compressed}
    for k in cfg.ks:
        picks = [rng.choice(ids, k, replace=False).tolist() for _ in range(cfg.rounds + 1)]
        for fn in calls.values():  # warm-up (allocator, kernels, page cache), round 0's inputs
            fn(qs[0], picks[0])
        times: dict[str, list[float]] = {name: [] for name in calls}
        cos = []
        for r in range(1, cfg.rounds + 1):
            order = list(calls)[r % 3:] + list(calls)[:r % 3]  # rotate who goes first
            outs = {}
            for name in order:
                sync()
                t0 = time.perf_counter()
                outs[name] = calls[name](qs[r], picks[r])
                sync()
                times[name].append((time.perf_counter() - t0) * 1e3)
            lengths = [nq + np_] * k
            cos.append(_cosines(outs["decoupled+compressed"], outs["decoupled"], lengths))
        std = float(np.median(times["standard"]))
        for name, ts in times.items():
            ms = float(np.median(ts))
            out_rows.append({"geometry": g.label, "setting": setting, "k": k, "variant": name,
                             "device": reader.device.type, "ms": round(ms, 2),
                             "reduction": round(1 - ms / std, 4)})
        c = np.concatenate(cos)
        detail[f"k={k}"] = {"rounds_ms": times, "final_token_cosine_mean": float(c.mean()),
                            "final_token_cosine_p05": float(np.percentile(c, 5)),
                            "compressed_phases_median_ms": {key: float(np.median(val[-cfg.rounds:]))
                                                            for key, val in v.phases.items()}}
        for val in v.phases.values():
            val.clear()
        log.info("%s %s K=%d: %s", g.label, setting, k, {r["variant"]: (r["ms"], r["reduction"]) for r in out_rows
                                                         if r["k"] == k})
    return out_rows, detail


def render(rows: list[dict], details: dict) -> str:
    by = {(r["geometry"], r["setting"], r["k"], r["variant"]): r for r in rows}
    lines = ["| geometry | setting (q + p tokens) | K | standard ms | decoupled ms (reduction) | "
             "decoupled + compressed ms (reduction) | final-token cosine, compressed vs not | paper (same device kind): decoupled / 4x |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for (geo, setting, k, variant), r in by.items():
        if variant != "standard":
            continue
        d, c = by[(geo, setting, k, "decoupled")], by[(geo, setting, k, "decoupled+compressed")]
        cos = details.get("runs", {}).get(f"{geo}/{setting}", {}).get(f"k={k}", {}).get("final_token_cosine_mean")
        q, p = SETTINGS[setting]
        kind = "gpu" if r.get("device") == "cuda" else "cpu"
        ref = PAPER[kind] if kind == "cpu" else tuple(f"{x:.0%}" for x in PAPER["gpu"])
        base = GEOMETRIES[geo].layers == 5 if geo in GEOMETRIES else geo.startswith("bert-base")  # 768 wide, 5-7
        paper = f"{ref[0]} / {ref[1]}" if base else "(BERT-base only)"
        lines.append(f"| {geo} | {setting} ({q} + {p}) | {k} | {r['ms']:,.1f} | {d['ms']:,.1f} ({d['reduction']:.1%}) | "
                     f"{c['ms']:,.1f} ({c['reduction']:.1%}) | {'' if cos is None else f'{cos:.4f}'} | {paper} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometries", default="minilm-3-3,bert-base-5-7")
    p.add_argument("--settings", default="short,long")
    p.add_argument("--ks", default="1,10")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per cell (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="where the reader runs (default cpu; cuda: bf16, the paper's GPU columns)")
    p.add_argument("--vocab-from", default=None, help="tokenizer folder for the random BERT-base "
                   "(default: the bundled MiniLM, else .gpucarry/minilm-no-weights)")
    p.add_argument("--workdir", default=None, help="keep models and stores here (reused when present)")
    p.add_argument("--out", default=str(ROWS))
    p.add_argument("--details", default=str(DETAILS))
    p.add_argument("--report", action="store_true", help="print the markdown table from --out and --details")
    a = p.parse_args(argv)
    if a.report:
        details = json.loads(Path(a.details).read_text()) if Path(a.details).exists() else {}
        print(render(json.loads(Path(a.out).read_text()), details))
        return 0
    start_benchmark()
    cfg = BenchConfig(geometries=tuple(a.geometries.split(",")), settings=tuple(a.settings.split(",")),
                      ks=tuple(int(k) for k in a.ks.split(",")), rounds=a.rounds, workdir=a.workdir,
                      device=a.device, vocab_from=a.vocab_from)
    unknown = set(cfg.geometries) - set(GEOMETRIES) | set(cfg.settings) - set(SETTINGS)
    if unknown:
        p.error(f"unknown geometry or setting: {sorted(unknown)}")
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    tmp = Path(cfg.workdir or tempfile.mkdtemp(prefix="bench-runtime-"))
    tmp.mkdir(parents=True, exist_ok=True)
    rows = sample_rows()
    all_rows, details = [], {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU" if not torch.cuda.is_available()
        else torch.cuda.get_device_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "command": " ".join(["python -m benchmarks.runtime", *(argv if argv is not None else sys.argv[1:])]),
        "rounds": cfg.rounds, "runs": {}}
    for name in cfg.geometries:  # every store first, then Ray stops: its idle workers stay out of the timings
        for setting in cfg.settings:
            build_store(model_path(GEOMETRIES[name], tmp, cfg.vocab_from), GEOMETRIES[name], setting, rows,
                        cfg.passages, tmp)
    import ray

    if ray.is_initialized():
        ray.shutdown()
    for name in cfg.geometries:
        for setting in cfg.settings:
            got, detail = measure(cfg, GEOMETRIES[name], setting, rows, tmp)
            all_rows += got
            details["runs"][f"{name}/{setting}"] = detail
            Path(a.out).write_text(json.dumps(all_rows, indent=1))  # a long run keeps what it finished
            Path(a.details).write_text(json.dumps(details, indent=1))
    print(render(all_rows, details))
    return 0


if __name__ == "__main__":
    sys.exit(main())
