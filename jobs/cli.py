"""`precompute`: the command-line face of the pipeline. Parsing and reporting only."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from pipeline.config import (BUNDLED_CORPUS, BUNDLED_MODEL, CompressionConfig, ConfigError, CorpusConfig,
                             ExecutionConfig, ModelConfig, RunConfig)

log = logging.getLogger("precompute")

EXIT_USAGE = 2
EXIT_FAILED = 1


def _storage_options(raw: str | None) -> dict:
    """fsspec options as JSON (e.g. an endpoint_url); credentials belong in the environment."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--storage-options is not valid JSON: {exc.msg}") from exc
    if not isinstance(value, dict):
        raise ConfigError("--storage-options must be a JSON object")
    return value


def _add_corpus(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("corpus")
    g.add_argument("--corpus", default=BUNDLED_CORPUS,
                   help="fsspec URL, glob or directory (TSV/JSONL/Parquet), or a HF dataset with --format hf "
                        f"(default: {BUNDLED_CORPUS}, the bundled 2,333 Wikipedia passages)")
    g.add_argument("--format", default="auto", choices=["auto", "tsv", "jsonl", "parquet", "hf"])
    g.add_argument("--id-column", default="id")
    g.add_argument("--title-column", default="title")
    g.add_argument("--text-column", default="text")
    g.add_argument("--hf-split", default="train")
    g.add_argument("--on-empty", default="skip", choices=["skip", "error"], help="empty text (default: skip, counted)")
    g.add_argument("--on-invalid-utf8", default="skip", choices=["skip", "error"], help="default: skip, counted")
    g.add_argument("--on-malformed", default="error", choices=["error", "skip"],
                   help="wrong field count, bad id, oversized field (default: error naming file:line)")
    g.add_argument("--on-duplicate", default="error", choices=["error", "keep-first"])
    g.add_argument("--limit", type=int, default=None, help="use only the first N valid passages")


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=BUNDLED_MODEL,
                   help=f"HF hub name or local path of a BERT/ELECTRA/RoBERTa encoder (default: {BUNDLED_MODEL})")
    g.add_argument("--model-revision", default=None, help="hub revision to pin (recorded in the fingerprint)")
    g.add_argument("--layers", type=int, default=5, help="lower layers that form the input component (default 5)")
    g.add_argument("--max-length", type=int, default=None, help="tokens per passage (default: model maximum)")
    g.add_argument("--on-too-long", default="truncate", choices=["truncate", "skip"], help="default: truncate, counted")


def _add_store(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--store", required=required, help="store URL: local dir, s3://bucket/prefix, gs://...")
    p.add_argument("--storage-options", default=None,
                   help="fsspec options as JSON, e.g. '{\"endpoint_url\": \"http://...\"}'. Credentials: use "
                        "the standard chain (env, profile, instance role); they are never logged or stored")


def _model_cfg(a) -> ModelConfig:
    return ModelConfig(name=a.model, revision=a.model_revision, layers=a.layers, max_length=a.max_length,
                       on_too_long=a.on_too_long)


def _corpus_cfg(a) -> CorpusConfig:
    return CorpusConfig(url=a.corpus, format=a.format, id_column=a.id_column, title_column=a.title_column,
                        text_column=a.text_column, hf_split=a.hf_split, on_empty=a.on_empty,
                        on_invalid_utf8=a.on_invalid_utf8, on_malformed=a.on_malformed,
                        on_duplicate=a.on_duplicate, limit=a.limit)


# ---------------------------------------------------------------- commands

def cmd_run(a) -> int:
    cfg = RunConfig(
        store=a.store, corpus=_corpus_cfg(a), model=_model_cfg(a),
        compression=CompressionConfig(dims=a.dims, compressor=a.compressor, fit_sample=a.fit_sample,
                                      quantize=a.quantize, bits=a.bits, zstd_level=a.zstd_level),
        execution=ExecutionConfig(ray_address=a.address, device=a.device, num_encoders=a.num_encoders,
                                  shard_size=a.shard_size, token_budget=a.token_budget),
        storage_options=_storage_options(a.storage_options))
    return run_and_report(cfg, a.summary_json)


def run_and_report(cfg: RunConfig, summary_json: str | None) -> int:
    from pipeline.run import run

    summary = run(cfg)
    print(summary.render())
    if summary_json:
        with open(summary_json, "w") as fh:
            json.dump(summary.to_dict(), fh, indent=1)
    return 0


def cmd_fit(a) -> int:
    import numpy as np

    from pipeline.corpus import Corpus
    from pipeline.encoder import pick_device
    from pipeline.fit import fit_compressor
    from pipeline.tokenize import model_max_length

    model = _model_cfg(a)
    corpus = Corpus(_corpus_cfg(a))
    scan = corpus.scan()
    rng = np.random.default_rng(a.seed)
    pick = set(rng.choice(scan.n, size=min(a.sample, scan.n), replace=False).tolist())
    ids, titles, texts, pos = [], [], [], 0
    for t in corpus.batches(scan, 4096):
        for i, row in enumerate(t.to_pylist()):
            if pos + i in pick:
                ids.append(row["id"]), titles.append(row["title"]), texts.append(row["text"])
        pos += t.num_rows
    comp = fit_compressor(model, titles, texts, a.dims, model_max_length(model), pick_device(a.device),
                          metadata={"fit_ids": json.dumps(sorted(ids)), "seed": str(a.seed)})
    data = comp.to_bytes()
    tmp = f"{a.out}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, a.out)
    print(f"wrote {a.out}: PCA {comp.hidden} -> {comp.dims} fitted on {len(ids)} passages "
          f"({comp.metadata['tokens']} tokens); explained variance ratio {comp.metadata['explained_variance_ratio']}")
    return 0


def cmd_fidelity(a) -> int:
    from pipeline.compress import Compressor
    from pipeline.corpus import Corpus
    from pipeline.encoder import pick_device
    from pipeline.fit import measure_fidelity
    from pipeline.tokenize import model_max_length

    with open(a.compressor, "rb") as fh:
        comp = Compressor.from_bytes(fh.read(), a.compressor)
    fit_ids = set(json.loads(comp.metadata.get("fit_ids", "[]")))
    model = _model_cfg(a)
    corpus = Corpus(_corpus_cfg(a))
    scan = corpus.scan()
    titles, texts = [], []
    for t in corpus.batches(scan, 4096):
        for row in t.to_pylist():
            if row["id"] not in fit_ids and len(texts) < a.sample:
                titles.append(row["title"]), texts.append(row["text"])
    if not texts:
        raise ConfigError("no held-out passages: every passage was used to fit the compressor")
    modes = [("none", 16), ("int8", 8)] if a.quantize == "both" else [(a.quantize, a.bits)]
    rows = []
    for mode, bits in modes:
        f = measure_fidelity(model, comp, titles, texts, model_max_length(model), pick_device(a.device), mode, bits)
        rows.append({"quantize": mode, "bits": bits, **f.to_dict()})
    print(f"fidelity of {a.compressor} ({comp.hidden} -> {comp.dims}), layers {model.layers}+ upper, on "
          f"{len(texts)} held-out passages (excluded {len(fit_ids)} used for fitting)")
    print(f"{'storage':>10} {'token cos':>10} {'p05':>8} {'pooled':>8} {'state rel err':>14}")
    for r in rows:
        print(f"{r['quantize'] + '/' + str(r['bits']):>10} {r['token_cosine']:>10.4f} {r['token_cosine_p05']:>8.4f} "
              f"{r['pooled_cosine']:>8.4f} {r['state_rel_error']:>14.4f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
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
    import numpy as np

    from pipeline.reader import StateReader
    from storage.fs import Store

    ids = _parse_ids(a.ids)
    reader = StateReader(Store(a.store, _storage_options(a.storage_options)), a.version)
    found = reader.get(ids)
    missing = sorted(set(ids) - set(found))
    arrays = {}
    for pid, ps in found.items():
        arrays[f"token_ids_{pid}"] = ps.token_ids
        arrays[f"states_{pid}"] = ps.states
    tmp = f"{a.out}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, a.out)
    print(f"version {reader.version}: wrote {len(found)} passage(s) to {a.out}"
          + (f"; not in this version: {missing[:20]}{' …' if len(missing) > 20 else ''}" if missing else ""))
    return 0 if not missing else 3


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


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="precompute", description=(
        "Precompute the input component of a decoupled transformer over a passage corpus: encode with the "
        "lower N layers, compress token states, quantise, zstd-pack into versioned Parquet shards."))
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="encode a corpus into a new store version", description=(
        "Validate the corpus (nothing is written if it is unusable), encode it on Ray, commit one version. "
        "Rerunning after a crash reuses every finished shard."))
    _add_store(r)
    _add_corpus(r)
    _add_model(r)
    g = r.add_argument_group("compression")
    g.add_argument("--dims", type=int, default=192, help="compressed dims per token (default 192)")
    g.add_argument("--compressor", default=None, help="safetensors file (trained or from fit-compressor); "
                   "default: fit PCA on --fit-sample passages of the corpus and store it")
    g.add_argument("--fit-sample", type=int, default=512)
    g.add_argument("--quantize", default="int8", choices=["int8", "none"])
    g.add_argument("--bits", type=int, default=8, help="bits per code in the int8 container (2..8)")
    g.add_argument("--zstd-level", type=int, default=3)
    g = r.add_argument_group("execution")
    g.add_argument("--address", default=None, help="Ray address (default: start a local cluster)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--num-encoders", type=int, default=None, help="encoder actors (default: one per GPU, or 1)")
    g.add_argument("--shard-size", type=int, default=1000, help="passages per shard file (default 1000)")
    g.add_argument("--token-budget", type=int, default=16384, help="padded tokens per forward batch")
    g.add_argument("--summary-json", default=None, help="also write the run summary here")
    r.set_defaults(func=cmd_run)

    f = sub.add_parser("fit-compressor", help="fit a PCA compressor on a corpus sample (safetensors)")
    _add_corpus(f)
    _add_model(f)
    f.add_argument("--dims", type=int, default=192)
    f.add_argument("--sample", type=int, default=512, help="passages to fit on (default 512)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    f.add_argument("--out", required=True, help="output .safetensors path")
    f.set_defaults(func=cmd_fit)

    d = sub.add_parser("fidelity", help="upper layers on decompressed vs original states, held-out passages")
    _add_corpus(d)
    _add_model(d)
    d.add_argument("--compressor", required=True)
    d.add_argument("--sample", type=int, default=200, help="held-out passages to measure (default 200)")
    d.add_argument("--quantize", default="both", choices=["both", "int8", "none"])
    d.add_argument("--bits", type=int, default=8)
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("urllib3", "botocore", "s3fs", "fsspec", "filelock", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from pipeline.compress import CompressorError
    from pipeline.corpus import CorpusError
    from pipeline.reader import IntegrityError
    from storage.manifest import CommitConflict, ManifestError, NoVersion

    try:
        return args.func(args)
    except (ConfigError, CorpusError, CompressorError) as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except (NoVersion, ManifestError, IntegrityError, CommitConflict) as exc:
        log.error("%s", exc)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
