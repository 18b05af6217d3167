"""`precompute`: the command-line face of the pipeline. Parsing and reporting only."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from pipeline.config import (
    ATTENTION_CHOICES,
    BUNDLED_CORPUS,
    BUNDLED_MODEL,
    ConfigError,
    CorpusConfig,
    DprConfig,
    ExecutionConfig,
    ModelConfig,
    RunConfig,
)

log = logging.getLogger("precompute")

EXIT_USAGE = 2
EXIT_FAILED = 1


def _storage_options(raw: str | None, flag: str = "--storage-options") -> dict:
    """fsspec options as JSON (e.g. an endpoint_url); credentials belong in the environment."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} is not valid JSON: {exc.msg}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object")
    return value


def _add_corpus_options(g) -> None:
    g.add_argument("--corpus-storage-options", default=None,
                   help="fsspec options for the corpus alone, as JSON (e.g. '{\"anon\": true}' for a public bucket); "
                        "the store's --storage-options are never used to read the corpus")


def _corpus(a):
    """The corpus the flags name, read with its own options."""
    from pipeline.corpus.source import Corpus

    return Corpus(_corpus_cfg(a), _storage_options(a.corpus_storage_options, "--corpus-storage-options"))


def _add_corpus(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("corpus")
    g.add_argument("--corpus", default=BUNDLED_CORPUS,
                   help="fsspec URL, glob or directory (TSV/JSONL/Parquet), or a HF dataset with --format hf "
                        f"(default: {BUNDLED_CORPUS}, the bundled 2,333 Wikipedia passages)")
    _add_corpus_options(g)
    g.add_argument("--format", default="auto", choices=["auto", "tsv", "jsonl", "parquet", "hf"],
                   help="default auto: from the file extension (.tsv, .jsonl, .parquet, also compressed)")
    _add_column_map(g)
    g.add_argument("--hf-split", default="train", help="split of a Hugging Face dataset (default: train)")
    g.add_argument("--on-empty", default="skip", choices=["skip", "error"], help="empty text (default: skip, counted)")
    g.add_argument("--on-invalid-utf8", default="skip", choices=["skip", "error"], help="default: skip, counted")
    g.add_argument("--on-malformed", default="error", choices=["error", "skip"],
                   help="wrong field count, bad id, oversized field (default: error naming file:line)")
    g.add_argument("--on-duplicate", default="error", choices=["error", "keep-first"],
                   help="a passage id seen twice (default: error; keep-first keeps the earlier row, counted)")
    g.add_argument("--limit", type=int, default=None, help="use only the first N valid passages")
    g.add_argument("--max-field-bytes", type=int, default=CorpusConfig.max_field_bytes,
                   help="a title or text longer than this is a malformed row, never buffered (default 1 MiB)")


def _add_column_map(g, inherited: bool = False) -> None:
    """--id/--title/--text-column; for an update, unset means the parent version's recorded mapping."""
    d = CorpusConfig()
    default = (lambda v: None) if inherited else (lambda v: v)
    said = "the parent version's" if inherited else None
    g.add_argument("--id-column", default=default(d.id_column),
                   help=f"column (JSON key) of the passage id, an integer (default: {said or d.id_column})")
    g.add_argument("--title-column", default=default(d.title_column),
                   help=f"column of the title (default: {said or d.title_column}); '' for a corpus without titles. "
                        "A column that is missing is an error")
    g.add_argument("--text-column", default=default(d.text_column),
                   help=f"column of the passage text (default: {said or d.text_column})")


def _add_codec(g) -> None:
    """The codec flags `run`, `fit-compressor` and `estimate` share."""
    g.add_argument("--codec", default="linear", choices=["linear", "pq"],
                   help="linear: projection to --dims + int8 codes and a scale per token (the paper's; default); "
                   "pq: product quantiser, --pq-m bytes per token (see `precompute report` to choose)")
    g.add_argument("--dims", type=int, default=None, help="dims per token after the projection (linear default 192; "
                   "pq default: no projection)")
    g.add_argument("--pq-m", type=int, default=32, help="pq: sub-quantisers = code bytes per token; must divide the "
                   "stored dims (default 32)")
    g.add_argument("--opq", action="store_true", help="pq: learn a rotation first (OPQ): higher fidelity, slower fit")
    g.add_argument("--residual", default="none", choices=["none", "embeddings"],
                   help="embeddings: code only what each token's static embedding (recomputed from the stored token "
                   "ids) does not predict, with either codec (see `precompute report`); none: the states themselves "
                   "(default)")


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=BUNDLED_MODEL,
                   help=f"HF hub name or local path of a BERT/ELECTRA/RoBERTa/MPNet/DeBERTa-style encoder, "
                        f"checked against its own forward before any work (default: {BUNDLED_MODEL})")
    g.add_argument("--model-revision", default=None, help="hub revision to pin (recorded in the fingerprint)")
    g.add_argument("--layers", type=int, default=5, help="lower layers that form the input component (default 5)")
    g.add_argument("--max-length", type=int, default=None, help="tokens per passage (default: model maximum)")
    g.add_argument("--on-too-long", default="truncate", choices=["truncate", "skip"], help="default: truncate, counted")


def _add_store(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--store", required=required, help="store URL: local dir, s3://bucket/prefix, gs://...")
    p.add_argument("--storage-options", default=None,
                   help="the store's fsspec options as JSON, e.g. '{\"endpoint_url\": \"http://...\"}'. Credentials: "
                        "use the standard chain (env, profile, instance role); they are never logged or stored, and "
                        "never used for the corpus")


def _tristate(value: str) -> bool | None:
    choices = {"auto": None, "true": True, "false": False}
    if value.lower() not in choices:
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {value!r}")
    return choices[value.lower()]


def _model_cfg(a) -> ModelConfig:
    return ModelConfig(name=a.model, revision=a.model_revision, layers=a.layers, max_length=a.max_length,
                       on_too_long=a.on_too_long)


def _corpus_cfg(a) -> CorpusConfig:
    return CorpusConfig(url=a.corpus, format=a.format, id_column=a.id_column, title_column=a.title_column,
                        text_column=a.text_column, hf_split=a.hf_split, on_empty=a.on_empty,
                        on_invalid_utf8=a.on_invalid_utf8, on_malformed=a.on_malformed,
                        on_duplicate=a.on_duplicate, limit=a.limit, max_field_bytes=a.max_field_bytes)


# ---------------------------------------------------------------- commands

def run_body(a) -> dict:
    """`precompute run`'s flags as a job file's mapping: one schema (pipeline.config.run_flags) for both."""
    from pipeline.config import run_flags

    body: dict = {"store": a.store, "storage_options": _storage_options(a.storage_options)}
    for (section, key), flag in run_flags().items():
        value = getattr(a, flag[2:].replace("-", "_"))
        if key == "storage_options":  # a location's options: JSON on the command line, a mapping in a job file
            value = _storage_options(value, flag) if value else None
        body.setdefault(section, {})[key] = value
    if not a.dpr_model:
        body["dpr"] = None  # no --dpr-model: no DPR pass (a job file leaves out its dpr section)
    return body


def cmd_run(a) -> int:
    from pipeline.config import run_config_from_dict

    cfg = run_config_from_dict(run_body(a))
    if a.dry_run:
        return print_plan(cfg, _gpu_assumptions(a), a.json)
    return run_and_report(cfg, a.summary_json)


def print_plan(cfg: RunConfig, gpu, as_json: bool) -> int:
    """Dry run of an encode: scan the corpus, tokenise a sample, price it; start nothing, write nothing."""
    from pipeline.flows.dry_run import plan_run

    plan = plan_run(cfg, gpu)
    print(json.dumps(plan.to_dict(), indent=1) if as_json else plan.render())
    return 0


def _gpu_assumptions(a):
    from pipeline.flows.job_cost import GpuAssumptions
    return GpuAssumptions(peak_tflops=a.gpu_tflops, utilisation=a.gpu_utilisation,
                          tokens_per_second=a.gpu_tokens_per_second, price_per_gpu_hour=a.gpu_price)


def _add_plan(p: argparse.ArgumentParser) -> None:
    from pipeline.flows.job_cost import GpuAssumptions
    d = GpuAssumptions()
    g = p.add_argument_group("dry-run plan (GPU-hours)")
    g.add_argument("--dry-run", action="store_true", help="print passages, shards, GPU-hours and storage; do nothing")
    g.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    g.add_argument("--gpu-tokens-per-second", type=float, default=None,
                   help="measured tokens/s per GPU (benchmarks/throughput.py); overrides the FLOP model")
    g.add_argument("--gpu-tflops", type=float, default=d.peak_tflops,
                   help=f"GPU dense bf16 peak for the FLOP model (default {d.peak_tflops:g}: A10/A10G class)")
    g.add_argument("--gpu-utilisation", type=float, default=d.utilisation,
                   help=f"share of peak the encoder sustains (default {d.utilisation:g}, an assumption)")
    g.add_argument("--gpu-price", type=float, default=None, help="$ per GPU-hour, to price the GPU time")


def run_and_report(cfg: RunConfig, summary_json: str | None) -> int:
    from pipeline.flows.run import run

    summary = run(cfg)
    print(summary.render())
    if summary_json:
        with open(summary_json, "w") as fh:
            json.dump(summary.to_dict(), fh, indent=1)
    return 0


def _fit_settings(a):
    from pipeline.config import CompressionConfig

    return CompressionConfig(codec=a.codec, dims=a.dims, pq_m=a.pq_m, opq=a.opq, residual=a.residual)


def cmd_fit(a) -> int:
    from pipeline.model.encoder import pick_device
    from pipeline.codec.fitting import fit_on_corpus
    from storage.fs import redact_url, write_url

    codec = fit_on_corpus(_model_cfg(a), _corpus(a), _fit_settings(a), a.sample, a.seed, pick_device(a.device))
    data = codec.to_bytes()
    write_url(a.out, data)
    md = codec.metadata
    print(f"wrote {redact_url(a.out)} ({len(data):,} bytes): {codec.describe()}, fitted on {md.get('passages')} "
          f"passages ({md.get('tokens')} tokens)"
          + (f"; explained variance ratio {md['explained_variance_ratio']}" if "explained_variance_ratio" in md else ""))
    return 0


def cmd_fidelity(a) -> int:
    from pipeline.codec.state_codec import codec_from_bytes
    from pipeline.model.encoder import pick_device
    from pipeline.codec.fitting import fidelity_on_corpus
    from storage.fs import Location, read_url, redact_url, write_url

    where = redact_url(a.compressor)
    data = read_url(Location("compressor", a.compressor,
                             _storage_options(a.compressor_storage_options, "--compressor-storage-options")))
    model = _model_cfg(a)
    modes = [("none", 16), ("int8", a.bits)] if a.quantize == "both" else [(a.quantize, a.bits)]
    codecs: dict[str, tuple] = {}
    for q, bits in modes:  # quantisation settings complete a linear codec; other codecs ignore them
        codec = codec_from_bytes(data, where, q, bits)
        codecs.setdefault(json.dumps(codec.fingerprint_fields(), sort_keys=True), (codec.describe(), codec))
    rows, measured, excluded = fidelity_on_corpus(model, _corpus(a), list(codecs.values()), a.sample,
                                                  pick_device(a.device))
    print(f"fidelity of {where}, layers {model.layers}+ upper, on {measured} held-out passages (excluded {excluded} "
          f"used for fitting)")
    print(f"{'B/token':>8} {'token cos':>10} {'p05':>8} {'pooled':>8} {'state rel err':>14}  codec")
    for r in rows:
        print(f"{r['bytes_per_token_raw']:>8} {r['token_cosine']:>10.4f} {r['token_cosine_p05']:>8.4f} "
              f"{r['pooled_cosine']:>8.4f} {r['state_rel_error']:>14.4f}  {r['codec']}")
    if a.json:
        write_url(a.json, json.dumps(rows, indent=1).encode())
    return 0


def _parse_ids(raw: str) -> list[int]:
    out = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or len(part) > 19:
            raise ConfigError(f"--ids: {part[:30]!r} is not a passage id (non-negative integer)")
        out.append(int(part))
    if not out:
        raise ConfigError("--ids is empty: pass e.g. --ids 3,17,42")
    if len(out) > 100_000:
        raise ConfigError("--ids: more than 100,000 ids in one lookup; split the request")
    return out


def cmd_lookup(a) -> int:
    from pipeline.serve.state_reader import StateReader
    from storage.fs import Store

    ids = _parse_ids(a.ids)
    reader = StateReader(Store(a.store, _storage_options(a.storage_options)), a.version)
    found = reader.get(ids)
    missing = sorted(set(ids) - set(found))
    arrays = {}
    for pid, ps in found.items():
        arrays[f"token_ids_{pid}"] = ps.token_ids
        arrays[f"states_{pid}"] = ps.states
    _write_npz(a.out, arrays)
    print(f"version {reader.version}: wrote {len(found)} passage(s) to {a.out}"
          + (f"; not in this version: {missing[:20]}{' …' if len(missing) > 20 else ''}" if missing else ""))
    return 0 if not missing else 3


def _write_npz(path: str, arrays: dict) -> None:
    import io

    import numpy as np

    from storage.fs import write_url

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_url(path, buf.getvalue())


def cmd_verify(a) -> int:
    from storage import manifest as mf
    from storage.fs import Store

    store = Store(a.store, _storage_options(a.storage_options))
    m = mf.load(store, a.version)
    report = mf.verify(store, m)
    if report.ok:
        print(f"version {m.version} OK: {report.checked_files} files match their checksums, "
              f"{report.rows} passages, ids unique")
        return 0
    for p in report.problems:
        print(f"FAIL {p}")
    print(f"version {m.version}: {len(report.problems)} problem(s)")
    return EXIT_FAILED


def cmd_gc(a) -> int:
    from storage import manifest as mf
    from storage.fs import Store

    store = Store(a.store, _storage_options(a.storage_options))
    r = mf.collect_garbage(store, keep_last=a.keep_last, dry_run=a.dry_run, min_age_s=a.min_age)
    verb = "would remove" if r.dry_run else "removed"
    for p in r.removed:
        log.info("%s %s", verb, p)
    print(f"kept versions {r.kept_versions or 'none'}; {verb} {len(r.removed)} file(s), {r.bytes_removed / 1e6:.2f} MB")
    return 0


def cmd_estimate(a) -> int:
    from storage.estimate import PRICE_TIERS, Assumptions, default_zstd_ratio, estimate, render

    from pipeline.codec.state_codec import planned_layout

    tpp, ratio = a.tokens_per_passage, a.zstd_ratio
    if a.sample_corpus:
        tpp, ratio = _measure_sample(a, tpp, ratio)
    if a.codec == "pq" and (a.pq_m < 1 or (a.dims or a.hidden) % a.pq_m):
        raise ConfigError(f"--pq-m {a.pq_m} must be a positive divisor of the stored dims {a.dims or a.hidden}")
    layout = planned_layout(a.codec, a.dims or (192 if a.codec == "linear" else a.hidden),
                            "none" if a.bits == 16 else "int8", a.pq_m)
    fields = layout.estimate_fields(a.bits)
    if a.codec == "linear" and layout.scaled:
        fields["scale_bytes"] = a.scale_bytes
    if ratio is None:
        ratio = default_zstd_ratio(fields["bits"], a.bitpacked, compressible=a.codec == "linear")
    try:
        assumptions = Assumptions(
            passages=a.passages, tokens_per_passage=tpp, hidden=a.hidden, **fields,
            bitpacked=a.bitpacked, zstd_ratio=ratio, token_id_bytes=a.token_id_bytes,
            per_passage_bytes=a.per_passage_bytes, container_overhead=a.container_overhead,
            dpr_dim=a.dpr_dim, index_bytes_per_vector=a.index_bytes_per_vector)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    prices = dict(PRICE_TIERS)
    for item in a.price or []:
        name, _, value = item.partition("=")
        try:
            prices[name] = float(value)
        except ValueError:
            raise ConfigError(f"--price {item!r}: expected NAME=DOLLARS_PER_GB_MONTH") from None
    e = estimate(assumptions)
    if a.json:
        from storage.estimate import paper_figures
        body = e.to_dict()
        body["monthly_cost_usd"] = {k: e.total / 1e9 * v for k, v in prices.items()}
        body["paper_check"] = [{"label": c.label, "bytes": c.bytes, "TiB": c.bytes / 2**40, "GiB": c.bytes / 2**30,
                                "TB": c.bytes / 1e12, "paper": c.paper_says} for c in paper_figures(a.passages, tpp)]
        print(json.dumps(body, indent=1))
    else:
        print(render(e, prices))
    return 0


def _measure_sample(a, tpp: float, ratio: float | None) -> tuple[float, float | None]:
    """Tokens per passage (and, with --zstd-ratio unset, the code zstd ratio) from a corpus sample."""
    from pipeline.corpus.source import Corpus
    from pipeline.flows.dry_run import measure_sample

    from pipeline.config import CompressionConfig

    settings = CompressionConfig(codec=a.codec, dims=a.dims, quantize="none" if a.bits == 16 else "int8",
                                 bits=min(a.bits, 8), pq_m=a.pq_m, opq=a.opq)
    measured_tpp, measured_ratio = measure_sample(
        ModelConfig(name=a.model, layers=a.layers),
        Corpus(CorpusConfig(url=a.sample_corpus, limit=a.sample_size, id_column=a.id_column,
                            title_column=a.title_column, text_column=a.text_column),
               _storage_options(a.corpus_storage_options, "--corpus-storage-options")),
        a.sample_size, settings, with_zstd_ratio=ratio is None)
    return measured_tpp, ratio if ratio is not None else measured_ratio


def cmd_validate(a) -> int:
    from storage import manifest as mf
    from storage.estimate import GB, GiB, TiB
    from storage.footprint import measure, validate
    from storage.fs import Store

    store = Store(a.store, _storage_options(a.storage_options))
    m = mf.load(store, a.version)
    fp = measure(store, m)
    if a.target_passages < 1 or not 0 < a.tolerance < 1:
        raise ConfigError("--target-passages must be positive and --tolerance in (0, 1)")
    from pipeline.codec.state_codec import codec_for_store

    art = m.artifacts["compressor"]
    codec = codec_for_store(store.read_verified(art), art["path"], m.fingerprint)
    try:
        v = validate(fp, codec.layout.estimate_fields(float(m.fingerprint.get("bits", 8))), a.target_passages,
                     a.tolerance)
    except ValueError as exc:
        raise ConfigError(f"version {m.version}: {exc}") from exc
    if a.json:
        print(json.dumps({**v.__dict__, "ok": v.ok}, indent=1))
    else:
        print(f"version {m.version}: {fp.passages:,} passages, {fp.tokens:,} tokens "
              f"({v.tokens_per_passage:.1f}/passage); {mf.sizes(m).render()}")
        print(f"the states shards ({fp.file_bytes:,} bytes) against the estimate for {codec.describe()}; measured "
              f"zstd ratio on codes {v.zstd_ratio:.3f}")
        print(f"{'component':<12} {'measured B/token':>17} {'estimate B/token':>17}")
        for k in ("codes", "scales", "token_ids", "per_passage", "container"):
            print(f"{k:<12} {v.measured.get(k, 0):17.3f} {v.estimated.get(k, 0):17.3f}")
        print(f"{'total':<12} {v.measured_per_token:17.3f} {v.estimated_per_token:17.3f}   "
              f"difference {v.relative_error:+.2%} (tolerance {v.tolerance:.0%})")
        lo, hi = v.target_interval
        print(f"\nExtrapolated to {v.target_passages:,} passages like these: {v.target_bytes / GB:,.1f} GB = "
              f"{v.target_bytes / GiB:,.1f} GiB (95% interval {lo / GiB:,.2f}-{hi / GiB:,.2f} GiB, sampling only); at the paper's "
              f"150 tokens/passage: {v.target_bytes_at_150 / GiB:,.1f} GiB")
        print(f"Paper (32M x 150 tokens, bare codes): 3.4 TB = 768 x 1 B = {32e6 * 150 * 768 / TiB:.2f} TiB; "
              f"858 GB = 192 x 1 B = {32e6 * 150 * 192 / GiB:.1f} GiB")
    if not v.ok:
        log.error("measured bytes per token differ from the estimate by %.2f%% (> %.0f%%)",
                  100 * v.relative_error, 100 * v.tolerance)
        return EXIT_FAILED
    return 0


def cmd_report(a) -> int:
    from pipeline.model.encoder import pick_device
    from pipeline.codec.rate_distortion import PQFamily, ResidualFamily, plot_png, sweep_corpus
    from storage.fs import redact_url, write_url

    model = _model_cfg(a)
    dims_list = _int_list(a.dims, "--dims") or None
    bits_list = [int(v) if v == int(v) else v for v in _number_list(a.bits, "--bits")]
    pq_m = _int_list(a.pq_m, "--pq-m")
    variants = tuple(v for v in a.pq_variants.split(",") if v)
    if set(variants) - {"pq", "opq"}:
        raise ConfigError(f"--pq-variants {a.pq_variants!r}: a comma list of pq, opq")
    pq = PQFamily(tuple(pq_m), variants, a.pq_dims) if pq_m and variants else None
    reference = _dims_bits(a.reference, "--reference") if a.reference else None
    res_m = tuple(_int_list(a.residual_pq_m, "--residual-pq-m"))
    res_linear = tuple(_dims_bits(v, "--residual-linear") for v in (a.residual_linear or "").split(",") if v.strip())
    residual = ResidualFamily(res_m, res_linear) if res_m or res_linear else None
    rd = sweep_corpus(model, _corpus(a), dims_list, bits_list, a.fit_sample, a.sample, a.seed,
                      a.zstd_level, pick_device(a.device), pq=pq, reference=reference, residual=residual)
    report = rd.render()
    out = a.out_dir.rstrip("/")
    write_url(f"{out}/rate_distortion.md", report.encode())
    write_url(f"{out}/rate_distortion.json", json.dumps([p.to_dict() for p in rd.points], indent=1).encode())
    write_url(f"{out}/rate_distortion.png", plot_png(
        rd.points, f"{model.name.split('/')[-1]}, lower {model.layers} layers, {rd.eval_passages} held-out passages"))
    print(report)
    print(f"wrote {redact_url(out)}/rate_distortion.md, .json, .png")
    return 0


def _dims_bits(raw: str, flag: str) -> tuple[int, float]:
    dims, _, bits = raw.strip().partition(":")
    try:
        return int(dims), float(bits)
    except ValueError:
        raise ConfigError(f"{flag} {raw!r}: expected DIMS:BITS, e.g. 96:5.25") from None


def _number_list(raw: str | None, flag: str) -> list[float]:
    try:
        values = [float(x) for x in (raw or "").split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {raw!r}: expected a comma-separated list of numbers") from None
    if any(v <= 0 for v in values):
        raise ConfigError(f"{flag} {raw!r}: values must be positive")
    return values


def _int_list(raw: str | None, flag: str) -> list[int]:
    values = _number_list(raw, flag)
    if any(v != int(v) for v in values):
        raise ConfigError(f"{flag} {raw!r}: expected whole numbers")
    return [int(v) for v in values]


def cmd_plan_index(a) -> int:
    from pipeline.index.plan import parse_bytes, plan_index

    try:
        plan = plan_index(a.vectors, a.dim, parse_bytes(a.memory))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if a.json:
        print(json.dumps(plan.__dict__, indent=1))
    else:
        print(plan.render())
    return 0 if plan.fits else EXIT_FAILED


def cmd_search(a) -> int:
    from pipeline.serve.searcher import Searcher
    from storage.fs import Store

    if not a.question or not a.question.strip():
        raise ConfigError("the question is empty")
    if len(a.question) > 10_000:
        raise ConfigError("the question is longer than 10,000 characters")
    if not 1 <= a.k <= 10_000:
        raise ConfigError("-k must be between 1 and 10000")
    searcher = Searcher(Store(a.store, _storage_options(a.storage_options)), a.version, a.device, a.nprobe)
    hits = searcher.search([a.question], a.k, with_states=a.with_states or bool(a.out))[0]
    if a.json:
        print(json.dumps([{"id": h.id, "score": h.score, "title": h.title,
                           "n_tokens": int(h.states.token_ids.size) if h.states else None} for h in hits], indent=1))
    else:
        print(f"version {searcher.manifest.version}, top {len(hits)} for {a.question!r}:")
        for rank, h in enumerate(hits, 1):
            extra = f"  [{h.states.states.shape[0]} x {h.states.states.shape[1]} states]" if h.states else ""
            print(f"{rank:3d}. {h.id:>10}  {h.score:8.4f}  {h.title}{extra}")
    if a.out:
        arrays = {}
        for h in hits:
            if h.states:
                arrays[f"token_ids_{h.id}"] = h.states.token_ids
                arrays[f"states_{h.id}"] = h.states.states
        _write_npz(a.out, arrays)
    return 0

# ---------------------------------------------------------------- answer (the decoupled reader)

def cmd_answer(a) -> int:
    from pipeline.serve.qa_reader import DecoupledReader, RuntimeConfig, check_k, check_question
    from storage.fs import Store

    question, k = check_question(a.question), check_k(a.k)
    if len(question) > 10_000:
        raise ConfigError("the question is longer than 10,000 characters")
    cfg = RuntimeConfig(model=a.model, version=a.version, device=a.device, nprobe=a.nprobe,
                        max_answer_tokens=a.max_answer_tokens)
    reader = DecoupledReader(Store(a.store, _storage_options(a.storage_options)), cfg)
    ans = reader.answer(question, k)
    if a.json:
        print(json.dumps({"version": reader.states.version, "question": ans.question, "passages": [
            {"id": p.id, "title": p.title, "dpr_score": p.dpr_score, "text": p.text, "tokens": int(p.token_ids.size),
             "truncated": p.truncated, "span": None if p.span is None else {
                 "text": p.span.text, "start": p.span.start, "end": p.span.end, "score": p.span.score}}
            for p in ans.passages], "best": None if ans.best is None else ans.best.id}, indent=1))
        return 0
    fp = reader.states.manifest.fingerprint
    print(f"version {reader.states.version}, {fp['model']} split {reader.model_cfg.layers}-"
          f"{reader.encoder.total_layers - reader.model_cfg.layers}, top {len(ans.passages)} for {ans.question!r}:")
    for rank, p in enumerate(ans.passages, 1):
        span = f'  "{p.span.text}" ({p.span.score:.2f})' if p.span else ""
        print(f"{rank:3d}. {p.id:>10}  {p.dpr_score:8.4f}  {p.title}{span}")
    if ans.best is not None:
        print(f'answer: "{ans.best.span.text}" (passage {ans.best.id}, {ans.best.title})')
    elif reader.qa_head is None:
        print("(no QA head in this checkpoint: passages and final states only)")
    return 0


def _add_answer(sub) -> None:
    an = sub.add_parser("answer", help="the decoupled reader: DPR top-k, stored states, upper layers (and spans)",
                        description="Runs the question through the input component, fetches the top-k passages' "
                        "stored states, re-encodes each [question; passage] and runs the upper layers on all k "
                        "as one batch. With a QA checkpoint it prints the best span per passage and overall.")
    _add_store(an)
    an.add_argument("question")
    an.add_argument("-k", type=int, default=10, help="passages to read (default 10, at most 100)")
    an.add_argument("--model", default=None, help="the reader checkpoint (default: the model the store was built "
                    "with; another model's files are refused)")
    an.add_argument("--version", type=int, default=None, help="store version (default: newest)")
    an.add_argument("--max-answer-tokens", type=int, default=30, help="longest span in tokens (default 30)")
    an.add_argument("--nprobe", type=int, default=None)
    an.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    an.add_argument("--json", action="store_true")
    an.set_defaults(func=cmd_answer)


def _update_config(a) -> RunConfig:
    """The parent version's recorded config, with the new corpus and any flags the user overrides."""
    import copy

    from pipeline.config import run_config_from_dict
    from storage import manifest as mf
    from storage.fs import Store

    opts = _storage_options(a.storage_options)
    parent = mf.load(Store(a.store, opts))
    body = copy.deepcopy(parent.extra.get("config") or {})
    if not body:
        raise ConfigError(f"version {parent.version} records no config; pass the run's flags explicitly")
    body["store"] = a.store
    body["storage_options"] = opts
    body["corpus"]["url"] = a.corpus
    body["corpus"]["storage_options"] = _storage_options(a.corpus_storage_options, "--corpus-storage-options")
    if body["corpus"].get("limit") is not None:  # a trial run's --limit must not hide the rest of a new corpus
        log.info("version %s was written with --limit %d; the update reads the whole corpus", parent.version,
                 body["corpus"]["limit"])
        body["corpus"]["limit"] = None
    body["compression"]["compressor"] = None  # an update always reuses the parent's compressor artifact
    body["execution"]["ray_address"] = a.address or None
    for section, key, value in (("model", "name", a.model), ("model", "layers", a.layers),
                                ("compression", "dims", a.dims), ("compression", "quantize", a.quantize),
                                ("compression", "bits", a.bits), ("execution", "shard_size", a.shard_size),
                                ("corpus", "format", a.format), ("corpus", "on_duplicate", a.on_duplicate),
                                ("corpus", "id_column", a.id_column), ("corpus", "title_column", a.title_column),
                                ("corpus", "text_column", a.text_column)):
        if value is not None:
            body[section][key] = value
    return run_config_from_dict(body)


def cmd_update(a) -> int:
    from pipeline.corpus.source import Corpus
    from pipeline.flows.update import plan_update, run_update
    from storage.fs import Store

    cfg = _update_config(a)
    if a.dry_run:
        from pipeline.flows.dry_run import plan_delta

        plan = plan_update(Store(cfg.store, cfg.storage_options), Corpus(cfg.corpus, cfg.corpus_storage_options),
                           cfg.execution)[-1]
        job = plan_delta(cfg, plan, _gpu_assumptions(a))
        if a.json:
            print(json.dumps({"update": plan.to_dict(), "plan": job.to_dict()}, indent=1))
        else:
            print(plan.render())
            print(job.render())
        return 0
    summary = run_update(cfg, rebuild_fraction=a.rebuild_fraction)
    print(summary.render())
    return 0


def cmd_index(a) -> int:
    from pipeline.flows.reindex import ReindexConfig, plan_reindex, reindex

    cfg = ReindexConfig(store=a.store, factory=a.factory, train_sample=a.train_sample, nprobe=a.nprobe,
                        ray_address=a.address, storage_options=_storage_options(a.storage_options))
    if a.dry_run:
        plan = plan_reindex(cfg)
        print(json.dumps(plan.to_dict(), indent=1) if a.json else plan.render())
        return 0
    print(reindex(cfg).render())
    return 0


def cmd_compact(a) -> int:
    from pipeline.flows.compact import compact
    from storage import manifest as mf
    from storage.fs import Store

    if a.shard_size < 1:
        raise ConfigError("--shard-size must be at least 1")
    store = Store(a.store, _storage_options(a.storage_options))
    before = mf.load(store)
    m = compact(store, a.shard_size)
    print(f"version {m.version}: {len(before.shards)} shards of version {before.version} rewritten as {len(m.shards)}; "
          f"old files stay until `precompute gc --keep-last K` retires version {before.version}")
    return 0


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from storage.estimate import Assumptions  # pure Python, no I/O: its defaults are the estimate flags' defaults

    p = argparse.ArgumentParser(prog="precompute", description=(
        "Precompute the input component of a decoupled transformer over a passage corpus: encode with the "
        "lower N layers, compress token states, quantise, zstd-pack into versioned Parquet shards."))
    level = p.add_mutually_exclusive_group()
    level.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks with errors")
    level.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="encode a corpus into a new store version", description=(
        "Validate the corpus (nothing is written if it is unusable), encode it on Ray, commit one version. "
        "Rerunning after a crash reuses every finished shard."))
    _add_store(r)
    _add_corpus(r)
    _add_model(r)
    g = r.add_argument_group("compression")
    _add_codec(g)
    g.add_argument("--compressor", default=None, help="codec file, safetensors (trained, or from fit-compressor); "
                   "default: fit the codec on --fit-sample passages of the corpus and store it")
    g.add_argument("--compressor-storage-options", default=None,
                   help="fsspec options for a --compressor URL, as JSON (default: the store's when the file lives "
                        "under --store, else none)")
    g.add_argument("--fit-sample", type=int, default=512,
                   help="passages sampled uniformly from the corpus to fit the PCA compressor on (default 512)")
    g.add_argument("--quantize", default="int8", choices=["int8", "none"],
                   help="int8: k-bit codes + one float16 scale per token (default); none: float16 states")
    g.add_argument("--bits", type=float, default=8, help="bits per code in the int8 container, 2..8; fractional "
                   "values set the level count (5.25 = 37 levels)")
    g.add_argument("--zstd-level", type=int, default=None, help="zstd level for each passage's frame (0 = codes "
                   "stored raw; default 3 for linear, 0 for pq, whose codes do not compress)")
    g = r.add_argument_group("DPR retrieval index (same run, same ids)")
    g.add_argument("--dpr-model", default=None, help="passage encoder, e.g. facebook/dpr-ctx_encoder-single-nq-base "
                   "or bundled:all-minilm-l6-v2 (default: no DPR pass)")
    g.add_argument("--dpr-pooling", default="auto", choices=["auto", "cls", "mean"],
                   help="auto: DPR pooler / sentence-transformers config / CLS")
    g.add_argument("--dpr-question-model", default=None, help="default: the DPR question twin, or the same model")
    g.add_argument("--dpr-dtype", default="float16", choices=["float16", "float32"],
                   help="stored embedding dtype (default float16)")
    g.add_argument("--dpr-revision", default=None, help="hub revision of the DPR model to pin")
    g.add_argument("--dpr-normalize", default=None, type=_tristate, metavar="{auto,true,false}",
                   help="L2-normalise embeddings (default auto: as the model's sentence-transformers config says)")
    g.add_argument("--index-factory", default="Flat", help="FAISS factory string, inner product (see plan-index)")
    g.add_argument("--train-sample", type=int, default=DprConfig.train_sample,
                   help="vectors sampled uniformly to train an IVF index (default 100000)")
    g.add_argument("--nprobe", type=int, default=16, help="IVF lists searched per query (default 16)")
    g = r.add_argument_group("execution")
    g.add_argument("--address", default=None, help="Ray address (default: start a local cluster)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="default auto: cuda where the cluster has GPUs")
    g.add_argument("--num-encoders", type=int, default=None, help="encoder actors (default: one per GPU, or 1)")
    g.add_argument("--shard-size", type=int, default=None,
                   help="passages per split, i.e. per shard file (default: about 16 splits, 1,000..10,000 each)")
    g.add_argument("--token-budget", type=int, default=None,
                   help="padded tokens per forward batch (default: 4096 on CPU, 65536 on GPU)")
    g.add_argument("--row-group-size", type=int, default=ExecutionConfig.row_group_size,
                   help="passages per Parquet row group: a lookup reads one (default 128)")
    g.add_argument("--task-cpus", type=float, default=ExecutionConfig.task_cpus,
                   help="CPUs each read/tokenise/write task declares to Ray (default 0.5)")
    g.add_argument("--encoder-cpus", type=float, default=ExecutionConfig.encoder_cpus,
                   help="CPUs each encoder actor declares to Ray (default 1)")
    g.add_argument("--torch-threads", type=int, default=None,
                   help="threads of a CPU encoder (default: the node's cores / encoders)")
    g.add_argument("--attention", default=ExecutionConfig.attention, choices=ATTENTION_CHOICES,
                   help="packed: unpadded batches, varlen flash attention on CUDA (padded attention elsewhere); "
                        "mask: the model's own layers on padded batches (default auto: packed for BERT/ELECTRA)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the packed layers (a one-off compile per encoder actor; see BENCHMARKS.md)")
    g.add_argument("--summary-json", default=None, help="also write the run summary here")
    _add_plan(r)
    r.set_defaults(func=cmd_run)

    f = sub.add_parser("fit-compressor", help="fit a codec (PCA projection, or PQ/OPQ codebooks) on a corpus "
                       "sample (safetensors)")
    _add_corpus(f)
    _add_model(f)
    _add_codec(f)
    f.add_argument("--sample", type=int, default=512, help="passages to fit on (default 512)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    f.add_argument("--out", required=True, help="output .safetensors path")
    f.set_defaults(func=cmd_fit)

    d = sub.add_parser("fidelity", help="upper layers on decompressed vs original states, held-out passages")
    _add_corpus(d)
    _add_model(d)
    d.add_argument("--compressor", required=True, help="codec file (from fit-compressor, or a store's artifacts/)")
    d.add_argument("--compressor-storage-options", default=None, help="fsspec options for --compressor, as JSON")
    d.add_argument("--sample", type=int, default=200, help="held-out passages to measure (default 200)")
    d.add_argument("--quantize", default="both", choices=["both", "int8", "none"],
                   help="linear codec: measure float16, int8 codes, or both (PQ codecs ignore it)")
    d.add_argument("--bits", type=float, default=8)
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    d.add_argument("--json", default=None, help="also write the figures as JSON")
    d.set_defaults(func=cmd_fidelity)

    lk = sub.add_parser("lookup", help="token ids + decompressed states for passage ids, as .npz")
    _add_store(lk)
    lk.add_argument("--ids", required=True, help="comma-separated passage ids, e.g. 3,17,42")
    lk.add_argument("--version", type=int, default=None, help="store version (default: newest)")
    lk.add_argument("--out", required=True, help="output .npz (arrays token_ids_<id>, states_<id>)")
    lk.set_defaults(func=cmd_lookup)

    v = sub.add_parser("verify", help="check every file of a version against its checksum; ids unique")
    _add_store(v)
    v.add_argument("--version", type=int, default=None)
    v.set_defaults(func=cmd_verify)

    gc = sub.add_parser("gc", help="remove files no kept version references")
    _add_store(gc)
    gc.add_argument("--dry-run", action="store_true")
    gc.add_argument("--keep-last", type=int, default=None, help="keep only the newest K versions (default: all)")
    gc.add_argument("--min-age", type=float, default=3600.0,
                    help="leave unreferenced files younger than this many seconds (a run may still be writing)")
    gc.set_defaults(func=cmd_gc)

    es = sub.add_parser("estimate", help="storage estimate in GB and GiB, monthly cost, and the paper's figures checked")
    es.add_argument("--passages", type=int, default=32_000_000)
    es.add_argument("--tokens-per-passage", type=float, default=150.0)
    es.add_argument("--hidden", type=int, default=768)
    _add_codec(es)
    es.add_argument("--bits", type=float, default=8, help="2..8 quantised, 16 = float16")
    es.add_argument("--bitpacked", action="store_true", help="k-bit codes packed densely (default: int8 containers)")
    es.add_argument("--zstd-ratio", type=float, default=None, help="raw/stored code bytes (default: measured with "
                    "--sample-corpus, else what a real 768-wide store measured at this bit width: 1.147 at 8 bits, "
                    "1.0 for PQ or bit-packed codes)")
    es.add_argument("--sample-corpus", default=None, help="measure tokens/passage (and the zstd ratio) on this corpus")
    _add_corpus_options(es)
    _add_column_map(es)
    es.add_argument("--sample-size", type=int, default=300)
    es.add_argument("--model", default=BUNDLED_MODEL, help="model for --sample-corpus measurements")
    es.add_argument("--layers", type=int, default=3)
    es.add_argument("--scale-bytes", type=float, default=2.0)
    es.add_argument("--token-id-bytes", type=float, default=Assumptions.token_id_bytes,
                    help=f"stored token ids per token, as Parquet writes them (default {Assumptions.token_id_bytes:g}, measured)")
    es.add_argument("--per-passage-bytes", type=float, default=Assumptions.per_passage_bytes,
                    help=f"id, content hash, n_tokens per passage (default {Assumptions.per_passage_bytes:g}, measured)")
    es.add_argument("--container-overhead", type=float, default=0.005)
    es.add_argument("--dpr-dim", type=int, default=768, help="DPR embedding dims stored beside (0 = none)")
    es.add_argument("--index-bytes-per-vector", type=float, default=0.0, help="FAISS index bytes per vector")
    es.add_argument("--price", action="append", metavar="TIER=USD", help="add or override a $/GB-month price")
    es.add_argument("--json", action="store_true")
    es.set_defaults(func=cmd_estimate)

    va = sub.add_parser("validate", help="bytes actually written vs the estimate; extrapolate to a target corpus")
    _add_store(va)
    va.add_argument("--version", type=int, default=None)
    va.add_argument("--target-passages", type=int, default=32_000_000)
    va.add_argument("--tolerance", type=float, default=0.02, help="allowed relative difference (default 2%%)")
    va.add_argument("--json", action="store_true")
    va.set_defaults(func=cmd_validate)

    rp = sub.add_parser("report", help="rate-distortion table + PNG: bytes per token vs fidelity (real text)")
    _add_corpus(rp)
    _add_model(rp)
    rp.add_argument("--dims", default=None, help="comma list (default: hidden/4 .. hidden)")
    rp.add_argument("--bits", default="4,5,5.25,5.5,6,8,16", help="comma list; 16 = float16, fractional = levels")
    rp.add_argument("--fit-sample", type=int, default=512)
    rp.add_argument("--sample", type=int, default=200, help="held-out passages to measure")
    rp.add_argument("--seed", type=int, default=0)
    rp.add_argument("--zstd-level", type=int, default=3)
    rp.add_argument("--pq-m", default="16,32,48,64,96", help="product-quantiser family: sub-quantiser counts to fit "
                    "(comma list; each must divide the stored dims; empty = skip the family)")
    rp.add_argument("--pq-variants", default="opq", help="comma list of pq (plain) and opq (learned rotation)")
    rp.add_argument("--pq-dims", type=int, default=None, help="project to these dims before PQ (default: raw states)")
    rp.add_argument("--residual-pq-m", default="", help="OPQ on the residual after the static-embedding prediction: "
                    "sub-quantiser counts = code bytes per token (comma list, e.g. 4,8,16,32; empty = skip)")
    rp.add_argument("--residual-linear", default="", help="the linear codec on the residual: DIMS:BITS comma list "
                    "(e.g. 96:8,48:5.25; 16 bits = float16; empty = skip)")
    rp.add_argument("--reference", default=None, help="DIMS:BITS of the linear setting the other families are priced "
                    "against (default hidden/4 : 5.25, i.e. 37 levels)")
    rp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    rp.add_argument("--out-dir", default="report")
    rp.set_defaults(func=cmd_report)

    pi = sub.add_parser("plan-index", help="propose a FAISS index for N vectors in a memory budget, with the arithmetic")
    pi.add_argument("--vectors", type=int, required=True)
    pi.add_argument("--dim", type=int, default=768)
    pi.add_argument("--memory", required=True, help="e.g. 64GB or 48GiB")
    pi.add_argument("--json", action="store_true")
    pi.set_defaults(func=cmd_plan_index)

    se = sub.add_parser("search", help="DPR search over a store version: ids, scores, titles (and stored states)")
    _add_store(se)
    se.add_argument("question")
    se.add_argument("-k", type=int, default=10, help="passages to return (default 10)")
    se.add_argument("--with-states", action="store_true", help="also fetch each hit's stored token states")
    se.add_argument("--out", default=None, help="write the hits' token ids and states to this .npz")
    se.add_argument("--version", type=int, default=None)
    se.add_argument("--nprobe", type=int, default=None)
    se.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    se.add_argument("--json", action="store_true")
    se.set_defaults(func=cmd_search)
    _add_answer(sub)

    up = sub.add_parser("update", help="incremental reindex: encode only new/changed passages, tombstone the rest",
                        description="Diff --corpus against the newest version by content hash, encode only new and "
                        "changed passages, tombstone changed and deleted ones, update the FAISS index, and commit one "
                        "version. Settings default to the ones the newest version recorded.")
    _add_store(up)
    up.add_argument("--corpus", required=True)
    _add_corpus_options(up)
    up.add_argument("--format", default=None, choices=["auto", "tsv", "jsonl", "parquet", "hf"])
    up.add_argument("--on-duplicate", default=None, choices=["error", "keep-first"])
    _add_column_map(up, inherited=True)
    up.add_argument("--rebuild-fraction", type=float, default=0.2,
                    help="rebuild and retrain the index when more than this share of passages changed (default 0.2)")
    up.add_argument("--model", default=None, help="override (a different fingerprint is refused)")
    up.add_argument("--layers", type=int, default=None)
    up.add_argument("--dims", type=int, default=None)
    up.add_argument("--quantize", default=None, choices=["int8", "none"])
    up.add_argument("--bits", type=float, default=None)
    up.add_argument("--shard-size", type=int, default=None)
    up.add_argument("--address", default=None)
    _add_plan(up)
    up.set_defaults(func=cmd_update)

    ix = sub.add_parser("index", help="rebuild the FAISS index of the newest version from its stored embeddings",
                        description="Train a FAISS index (any factory string; see plan-index) on the newest version's "
                        "DPR embeddings, without tombstoned rows, add every shard in Ray tasks, and commit it as a "
                        "new version over the same shards.")
    _add_store(ix)
    ix.add_argument("--factory", required=True, help="FAISS factory string, e.g. IVF4096,SQ8 (inner product)")
    ix.add_argument("--train-sample", type=int, default=100_000, help="vectors to train on (default 100000)")
    ix.add_argument("--nprobe", type=int, default=16, help="default nprobe recorded for search")
    ix.add_argument("--address", default=None, help="Ray address (default: start a local cluster)")
    ix.add_argument("--dry-run", action="store_true", help="print vectors, shards and index size; do nothing")
    ix.add_argument("--json", action="store_true")
    ix.set_defaults(func=cmd_index)

    co = sub.add_parser("compact", help="rewrite live rows into fewer full-size shards as a new version")
    _add_store(co)
    co.add_argument("--shard-size", type=int, default=10_000)
    co.set_defaults(func=cmd_compact)
    return p


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose or quiet:  # also when a host (a test, a notebook) configured logging first
        logging.getLogger().setLevel(level)
    # Notices a user cannot act on: Ray's token auth being on; Ray Data saying its operator table is off
    # (the run logs its own progress; -v turns the table back on)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if not verbose:
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    for noisy in ("urllib3", "botocore", "s3fs", "fsspec", "filelock", "httpx", "transformers", "faiss", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def guarded(action, verbose: bool = False) -> int:
    """Run a command; a product error (also one raised in a Ray worker) is one line and its exit code."""
    from storage.errors import find_product_error, one_line

    try:
        return action()
    except Exception as exc:
        err = find_product_error(exc)
        if err is None:
            raise
        log.error("%s", one_line(err))
        if verbose:
            log.debug("traceback", exc_info=exc)
        return err.exit_code


def _new_local_dir(url: str | None) -> str | None:
    """A local store path that does not exist yet: removed again if the command fails leaving it empty."""
    if not url or "://" in url and not url.startswith("file://"):
        return None
    path = os.path.abspath(url.removeprefix("file://"))
    return None if os.path.exists(path) else path


def _remove_if_empty(path: str) -> None:
    for root, _dirs, _files in sorted(os.walk(path), key=lambda t: -len(t[0])):
        try:
            os.rmdir(root)  # only succeeds for an empty directory: files are never removed
        except OSError:
            return


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    fresh = _new_local_dir(getattr(args, "store", None))
    rc = 1
    try:
        rc = guarded(lambda: args.func(args), args.verbose)
        return rc
    finally:
        if rc != 0 and fresh and os.path.isdir(fresh):
            _remove_if_empty(fresh)


def exit_process(rc: int) -> None:
    """End the process once its output is out, without C++ static destructors.

    Under load, pyarrow's thread-pool threads can still be joinable when the interpreter tears
    down, and libstdc++ then aborts ("terminate called without an active exception", SIGABRT)
    after the command already succeeded (apache/arrow#34314; reproduced here: 2 of 100 lookup/verify
    runs under CPU load). Ray is shut down and logs flushed first; then os._exit skips the teardown."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said on it
            pass
    os._exit(rc)


def entry() -> None:
    """The `precompute` console script."""
    exit_process(main())


if __name__ == "__main__":
    entry()
