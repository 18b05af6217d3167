"""The two state codecs side by side, in the same run: stored bytes, encode throughput, fetch latency.

    python -m benchmarks.codecs                           # linear PCA-96 5.25-bit vs OPQ M=32 (raw states)
    python -m benchmarks.codecs --pq-m 48 --calls 300
    python -m benchmarks.codecs --report                  # the markdown table from reports/codecs_cpu.json

Both stores are written by the real pipeline (local Ray, MiniLM lower 3 layers, the bundled 2,333-passage
sample). Per codec: bytes per token as `validate` measures them and its estimate's relative error;
the encoder actors' tokens/s (their own timers, so Ray start-up is not counted); `StateReader.get`
latency for K random ids from the local store, calls alternating between the codecs so drift on a
noisy machine hits both alike, with the decode's share timed apart (`get_encoded` vs decode).
Fidelity is not measured here: `precompute report` does that on held-out passages.
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

from pipeline.config import BUNDLED_CORPUS, BUNDLED_MODEL, CompressionConfig, CorpusConfig, ModelConfig, RunConfig
from benchmarks.proc import start_benchmark

log = logging.getLogger("benchmark")

OUT = Path("reports/codecs_cpu.json")


def build(url: str, compression: CompressionConfig) -> dict:
    """Run the pipeline into `url`; what it wrote and how fast its encoders went."""
    from pipeline.codec.state_codec import codec_for_store
    from pipeline.flows.run import run
    from storage import manifest as mf
    from storage.footprint import measure, validate
    from storage.fs import Store

    cfg = RunConfig(store=url, corpus=CorpusConfig(url=BUNDLED_CORPUS), model=ModelConfig(name=BUNDLED_MODEL, layers=3),
                    compression=compression)
    t0 = time.perf_counter()
    summary = run(cfg)
    wall = time.perf_counter() - t0
    store = Store(url)
    m = mf.load(store)
    markers = [json.loads(store.read_bytes(s["path"].replace(".parquet", ".done.json"))) for s in m.shards_of("states")]
    encode_s = sum(x["encode_seconds"] for x in markers)
    art = m.artifacts["compressor"]
    codec = codec_for_store(store.read_verified(art), art["path"], m.fingerprint)
    fp = measure(store, m)
    v = validate(fp, codec.layout.estimate_fields(float(m.fingerprint.get("bits", 8))), 32_000_000)
    return {"codec": codec.describe(), "codebook_bytes": art["bytes"], "passages": summary.written,
            "tokens": summary.tokens, "run_wall_s": wall, "encode_seconds_in_actors": encode_s,
            "actor_encode_tokens_per_s": summary.tokens / encode_s, "state_bytes": fp.file_bytes,
            "bytes_per_token": v.measured_per_token, "code_bytes_per_token": v.measured["codes"],
            "estimated_bytes_per_token": v.estimated_per_token, "estimate_relative_error": v.relative_error,
            "zstd_ratio_on_codes": v.zstd_ratio, "projected_32m_GiB": v.target_bytes / 2**30}


def fetch_latency(urls: dict[str, str], k: int, calls: int) -> dict[str, dict]:
    from pipeline.serve.state_reader import StateReader
    from storage.fs import Store

    readers = {name: StateReader(Store(url), verify="size") for name, url in urls.items()}
    ids = next(iter(readers.values())).ids()
    rng = np.random.default_rng(0)
    picks = [rng.choice(ids, k, replace=False).tolist() for _ in range(calls + 1)]
    for r in readers.values():
        r.get(picks[0])  # warm-up: shard checks, page cache
    times = {name: {"get": [], "fetch": [], "decode": []} for name in readers}
    for pick in picks[1:]:
        for name, r in readers.items():  # alternate per call
            t0 = time.perf_counter()
            got = r.get(pick)
            t1 = time.perf_counter()
            enc = r.get_encoded(pick)
            t2 = time.perf_counter()
            for e in enc.values():
                r.codec.decode(e.codes, e.scales, e.side)
            t3 = time.perf_counter()
            if len(got) != k:
                raise RuntimeError(f"{name}: asked for {k} passages, got {len(got)}")
            times[name]["get"].append((t1 - t0) * 1e3)
            times[name]["fetch"].append((t2 - t1) * 1e3)
            times[name]["decode"].append((t3 - t2) * 1e3)
    return {name: {"get_median_ms": float(np.median(t["get"])), "get_p99_ms": float(np.percentile(t["get"], 99)),
                   "get_encoded_median_ms": float(np.median(t["fetch"])),
                   "decode_median_ms": float(np.median(t["decode"]))} for name, t in times.items()}


def fetch_args(p: argparse.ArgumentParser, out: Path) -> argparse.ArgumentParser:
    """The flags every store-against-store benchmark shares: fetch size and calls, output, --report."""
    p.add_argument("-k", type=int, default=10, help="passages per StateReader.get call")
    p.add_argument("--calls", type=int, default=200, help="get calls per store")
    p.add_argument("--out", default=str(out))
    p.add_argument("--report", action="store_true", help="print the table of an earlier --out, run nothing")
    return p


def compare_stores(settings: dict[str, CompressionConfig], prefix: str, k: int, calls: int, command: str, argv,
                   measure=None) -> dict:
    """One store per codec setting, built in turn; then fetch latency alternating between them and
    `measure(url)` (extra figures per store), Ray shut down first. The first setting is the baseline."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    rows = {name: build(str(tmp / name), c) for name, c in settings.items()}
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # latency first: `measure` may load torch, whose idle worker threads then compete with numpy's BLAS
    lat = fetch_latency({name: str(tmp / name) for name in settings}, k, calls)
    for name in settings if measure is not None else ():
        rows[name].update(measure(str(tmp / name)))
    base = rows[next(iter(settings))]
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU", "k": k, "calls": calls,
            "passages": base["passages"], "tokens": base["tokens"],
            "command": " ".join([command, *(argv if argv is not None else sys.argv[1:])]),
            "rows": [{"name": name, **rows[name], **lat[name]} for name in settings]}


def render(data: dict) -> str:
    base = data["rows"][0]
    lines = [f"{data['machine']}; {data['passages']} passages, {data['tokens']:,} tokens; fetch: K = {data['k']} random "
             f"ids, {data['calls']} calls per codec, alternating", "",
             "| codec | B/token (all columns) | code B/token | estimate error | zstd ratio on codes | 32M passages "
             "like these | encoder tok/s | x linear | get(10) median / p99 ms | x linear | decode share ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['codec']} | {r['bytes_per_token']:.1f} | {r['code_bytes_per_token']:.1f} | "
                     f"{r['estimate_relative_error']:+.2%} | {r['zstd_ratio_on_codes']:.3f} | "
                     f"{r['projected_32m_GiB']:,.0f} GiB | {speed_cells(r, base)}")
    return "\n".join(lines)


def speed_cells(r: dict, base: dict) -> str:
    """The table columns every store comparison shares: encoder tok/s and its ratio to the baseline row,
    get(k) median / p99 and its ratio, decode ms."""
    return (f"{r['actor_encode_tokens_per_s']:,.0f} | "
            f"{r['actor_encode_tokens_per_s'] / base['actor_encode_tokens_per_s']:.2f} | "
            f"{r['get_median_ms']:.1f} / {r['get_p99_ms']:.1f} | {r['get_median_ms'] / base['get_median_ms']:.2f} "
            f"| {r['decode_median_ms']:.1f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, default=96, help="linear codec: projected dims (default 96 = hidden/4)")
    p.add_argument("--bits", type=float, default=5.25, help="linear codec: bits (default 5.25 = 37 levels)")
    p.add_argument("--pq-m", type=int, default=32)
    p.add_argument("--no-opq", action="store_true", help="plain PQ instead of OPQ")
    p.add_argument("--pq-zstd-level", type=int, default=None, help="zstd level for the PQ store's codes (default: "
                   "the codec's, 0 = raw)")
    a = fetch_args(p, OUT).parse_args(argv)
    if a.report:
        print(render(json.loads(Path(a.out).read_text())))
        return 0
    start_benchmark()
    settings = {"linear": CompressionConfig(dims=a.dims, bits=a.bits),
                "pq": CompressionConfig(codec="pq", pq_m=a.pq_m, opq=not a.no_opq, zstd_level=a.pq_zstd_level)}
    data = compare_stores(settings, "bench-codecs-", a.k, a.calls, "python -m benchmarks.codecs", argv)
    Path(a.out).write_text(json.dumps(data, indent=1))
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
