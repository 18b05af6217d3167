"""Option groups several commands share, and the small parsers that turn flag text into values.

Allowed values come from pipeline.schema.CHOICES, defaults from the config classes: a flag never
keeps its own copy of either."""
from __future__ import annotations

import argparse
import json

from pipeline.config import BUNDLED_CORPUS, BUNDLED_MODEL, CorpusConfig, ModelConfig, run_flags, section_names
from pipeline.schema import CHOICES, ConfigError, build


def storage_options(raw: str | None, flag: str = "--storage-options") -> dict:
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


def request(a: argparse.Namespace, keys) -> dict:
    """The flags named `keys` as the mapping a YAML job gives: JSON options parsed, unset flags left out."""
    body = {k: getattr(a, k) for k in keys if getattr(a, k, None) is not None}
    for key in [k for k in body if k.endswith("storage_options")]:
        body[key] = storage_options(body[key], "--" + key.replace("_", "-"))
    return body


def command(sub, name: str, func, help: str, description: str | None = None, sections=()) -> argparse.ArgumentParser:
    """A subcommand's parser: its shared option sections (add_store, add_corpus, ...) and the function it runs."""
    p = sub.add_parser(name, help=help, description=description)
    for add in sections:
        add(p)
    p.set_defaults(func=func)
    return p


def add_reading(p, version_help: str | None = None) -> None:
    """The options of the commands that read a version's index: which version, nprobe, device, JSON output."""
    p.add_argument("--version", type=int, default=None, help=version_help)
    p.add_argument("--nprobe", type=int, default=None)
    add_device(p)
    p.add_argument("--json", action="store_true")


def add_device(p, help: str | None = None) -> None:
    p.add_argument("--device", default="auto", choices=CHOICES["device"], help=help)


def add_store(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--store", required=required, help="store URL: local dir, s3://bucket/prefix, gs://...")
    p.add_argument("--storage-options", default=None,
                   help="the store's fsspec options as JSON, e.g. '{\"endpoint_url\": \"http://...\"}'. Credentials: "
                        "use the standard chain (env, profile, instance role); they are never logged or stored, and "
                        "never used for the corpus")


def add_corpus_options(g) -> None:
    g.add_argument("--corpus-storage-options", default=None,
                   help="fsspec options for the corpus alone, as JSON (e.g. '{\"anon\": true}' for a public bucket); "
                        "the store's --storage-options are never used to read the corpus")


def add_corpus(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("corpus")
    g.add_argument("--corpus", default=BUNDLED_CORPUS,
                   help="fsspec URL, glob or directory (TSV/JSONL/Parquet), or a HF dataset with --format hf "
                        f"(default: {BUNDLED_CORPUS}, the bundled 2,333 Wikipedia passages)")
    add_corpus_options(g)
    g.add_argument("--format", default="auto", choices=CHOICES["format"],
                   help="default auto: from the file extension (.tsv, .jsonl, .parquet, also compressed)")
    add_column_map(g)
    g.add_argument("--hf-split", default="train", help="split of a Hugging Face dataset (default: train)")
    g.add_argument("--on-empty", default="skip", choices=CHOICES["on_empty"],
                   help="empty text (default: skip, counted)")
    g.add_argument("--on-invalid-utf8", default="skip", choices=CHOICES["on_invalid_utf8"], help="default: skip, counted")
    g.add_argument("--on-malformed", default="error", choices=CHOICES["on_malformed"],
                   help="wrong field count, bad id, oversized field (default: error naming file:line)")
    g.add_argument("--on-duplicate", default="error", choices=CHOICES["on_duplicate"],
                   help="a passage id seen twice (default: error; keep-first keeps the earlier row, counted)")
    g.add_argument("--limit", type=int, default=None, help="use only the first N valid passages")
    g.add_argument("--max-field-bytes", type=int, default=CorpusConfig.max_field_bytes,
                   help="a title or text longer than this is a malformed row, never buffered (default 1 MiB)")


def add_column_map(g, inherited: bool = False) -> None:
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


def add_codec(g) -> None:
    """The codec flags `run`, `fit-compressor` and `estimate` share."""
    g.add_argument("--codec", default="linear", choices=CHOICES["codec"],
                   help="linear: projection to --dims + int8 codes and a scale per token (the paper's; default); "
                   "pq: product quantiser, --pq-m bytes per token (see `precompute report` to choose)")
    g.add_argument("--dims", type=int, default=None, help="dims per token after the projection (linear default 192; "
                   "pq default: no projection)")
    g.add_argument("--pq-m", type=int, default=32, help="pq: sub-quantisers = code bytes per token; must divide the "
                   "stored dims (default 32)")
    g.add_argument("--opq", action="store_true", help="pq: learn a rotation first (OPQ): higher fidelity, slower fit")
    g.add_argument("--residual", default="none", choices=CHOICES["residual"],
                   help="embeddings: code only what each token's static embedding (recomputed from the stored token "
                   "ids) does not predict, with either codec (see `precompute report`); none: the states themselves "
                   "(default)")


def add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=BUNDLED_MODEL,
                   help=f"HF hub name or local path of a BERT/ELECTRA/RoBERTa/MPNet/DeBERTa-style encoder, "
                        f"checked against its own forward before any work (default: {BUNDLED_MODEL})")
    g.add_argument("--model-revision", default=None, help="hub revision to pin (recorded in the fingerprint)")
    g.add_argument("--layers", type=int, default=5, help="lower layers that form the input component (default 5)")
    g.add_argument("--max-length", type=int, default=None, help="tokens per passage (default: model maximum)")
    g.add_argument("--on-too-long", default="truncate", choices=CHOICES["on_too_long"],
                   help="default: truncate, counted")


def add_plan(p: argparse.ArgumentParser) -> None:
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


def gpu_assumptions(a):
    from pipeline.flows.job_cost import GpuAssumptions
    return GpuAssumptions(peak_tflops=a.gpu_tflops, utilisation=a.gpu_utilisation,
                          tokens_per_second=a.gpu_tokens_per_second, price_per_gpu_hour=a.gpu_price)


def tristate(value: str) -> bool | None:
    choices = {"auto": None, "true": True, "false": False}
    if value.lower() not in choices:
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {value!r}")
    return choices[value.lower()]


def model_cfg(a) -> ModelConfig:
    """The --model group's settings; a value out of range is named by its flag, as `run` names it."""
    return build(ModelConfig, dict(name=a.model, revision=a.model_revision, layers=a.layers, max_length=a.max_length,
                                   on_too_long=a.on_too_long), names=section_names(run_flags(), "model"))


def corpus_cfg(a) -> CorpusConfig:
    return build(CorpusConfig, dict(url=a.corpus, format=a.format, id_column=a.id_column, title_column=a.title_column,
                                    text_column=a.text_column, hf_split=a.hf_split, on_empty=a.on_empty,
                                    on_invalid_utf8=a.on_invalid_utf8, on_malformed=a.on_malformed,
                                    on_duplicate=a.on_duplicate, limit=a.limit, max_field_bytes=a.max_field_bytes),
                 names=section_names(run_flags(), "corpus"))


def corpus(a):
    """The corpus the flags name, read with its own options."""
    from pipeline.corpus.source import Corpus

    return Corpus(corpus_cfg(a), storage_options(a.corpus_storage_options, "--corpus-storage-options"))


def store(a):
    from storage.fs import Store

    return Store(a.store, storage_options(a.storage_options))


def write_npz(path: str, arrays: dict) -> None:
    import io

    import numpy as np

    from storage.fs import write_url

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_url(path, buf.getvalue())


def dims_bits(raw: str, flag: str) -> tuple[int, float]:
    dims, _, bits = raw.strip().partition(":")
    try:
        return int(dims), float(bits)
    except ValueError:
        raise ConfigError(f"{flag} {raw!r}: expected DIMS:BITS, e.g. 96:5.25") from None


def number_list(raw: str | None, flag: str) -> list[float]:
    try:
        values = [float(x) for x in (raw or "").split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {raw!r}: expected a comma-separated list of numbers") from None
    if any(v <= 0 for v in values):
        raise ConfigError(f"{flag} {raw!r}: values must be positive")
    return values


def int_list(raw: str | None, flag: str) -> list[int]:
    values = number_list(raw, flag)
    if any(v != int(v) for v in values):
        raise ConfigError(f"{flag} {raw!r}: expected whole numbers")
    return [int(v) for v in values]
