"""Commands that write a store version: run, update, fit-compressor, compact."""
from __future__ import annotations

import json

from jobs.cli import options as o
from pipeline.config import DprConfig, ExecutionConfig, RunConfig
from pipeline.job_requests import REBUILD_FRACTION
from pipeline.schema import CHOICES, ConfigError

# ---------------------------------------------------------------- run


def run_body(a) -> dict:
    """`precompute run`'s flags as a job file's mapping: one schema (pipeline.config.run_flags) for both."""
    from pipeline.config import run_flags

    body: dict = {"store": a.store, "storage_options": o.storage_options(a.storage_options)}
    for (section, key), flag in run_flags().items():
        value = getattr(a, flag[2:].replace("-", "_"))
        if key == "storage_options":  # a location's options: JSON on the command line, a mapping in a job file
            value = o.storage_options(value, flag) if value else None
        body.setdefault(section, {})[key] = value
    if not a.dpr_model:
        body["dpr"] = None  # no --dpr-model: no DPR pass (a job file leaves out its dpr section)
    return body


def cmd_run(a) -> int:
    from pipeline.config import run_config_from_dict, run_flags

    cfg = run_config_from_dict(run_body(a), run_flags())  # a value out of range is named by its flag
    if a.dry_run:
        return print_plan(cfg, o.gpu_assumptions(a), a.json)
    return run_and_report(cfg, a.summary_json)


def print_plan(cfg: RunConfig, gpu, as_json: bool) -> int:
    """Dry run of an encode: scan the corpus, tokenise a sample, price it; start nothing, write nothing."""
    from pipeline.flows.dry_run import plan_run

    plan = plan_run(cfg, gpu)
    print(json.dumps(plan.to_dict(), indent=1) if as_json else plan.render())
    return 0


def run_and_report(cfg: RunConfig, summary_json: str | None) -> int:
    from pipeline.flows.run import run

    summary = run(cfg)
    print(summary.render())
    if summary_json:
        with open(summary_json, "w") as fh:
            json.dump(summary.to_dict(), fh, indent=1)
    return 0


def add_run(sub) -> None:
    r = o.command(sub, "run", cmd_run, "encode a corpus into a new store version", (
        "Validate the corpus (nothing is written if it is unusable), encode it on Ray, commit one version. "
        "Rerunning after a crash reuses every finished shard."), (o.add_store, o.add_corpus, o.add_model))
    g = r.add_argument_group("compression")
    o.add_codec(g)
    g.add_argument("--compressor", default=None, help="codec file, safetensors (trained, or from fit-compressor); "
                   "default: fit the codec on --fit-sample passages of the corpus and store it")
    g.add_argument("--compressor-storage-options", default=None,
                   help="fsspec options for a --compressor URL, as JSON (default: the store's when the file lives "
                        "under --store, else none)")
    g.add_argument("--fit-sample", type=int, default=512,
                   help="passages sampled uniformly from the corpus to fit the PCA compressor on (default 512)")
    g.add_argument("--quantize", default="int8", choices=CHOICES["quantize"],
                   help="int8: k-bit codes + one float16 scale per token (default); none: float16 states")
    g.add_argument("--bits", type=float, default=8, help="bits per code in the int8 container, 2..8; fractional "
                   "values set the level count (5.25 = 37 levels)")
    g.add_argument("--zstd-level", type=int, default=None, help="zstd level for each passage's frame (0 = codes "
                   "stored raw; default 3 for linear, 0 for pq, whose codes do not compress)")
    g = r.add_argument_group("DPR retrieval index (same run, same ids)")
    g.add_argument("--dpr-model", default=None, help="passage encoder, e.g. facebook/dpr-ctx_encoder-single-nq-base "
                   "or bundled:all-minilm-l6-v2 (default: no DPR pass)")
    g.add_argument("--dpr-pooling", default="auto", choices=CHOICES["pooling"],
                   help="auto: DPR pooler / sentence-transformers config / CLS")
    g.add_argument("--dpr-question-model", default=None, help="default: the DPR question twin, or the same model")
    g.add_argument("--dpr-dtype", default="float16", choices=CHOICES["dtype"],
                   help="stored embedding dtype (default float16)")
    g.add_argument("--dpr-revision", default=None, help="hub revision of the DPR model to pin")
    g.add_argument("--dpr-normalize", default=None, type=o.tristate, metavar="{auto,true,false}",
                   help="L2-normalise embeddings (default auto: as the model's sentence-transformers config says)")
    g.add_argument("--index-factory", default="Flat", help="FAISS factory string, inner product (see plan-index)")
    g.add_argument("--train-sample", type=int, default=DprConfig.train_sample,
                   help="vectors sampled uniformly to train an IVF index (default 100000)")
    g.add_argument("--nprobe", type=int, default=16, help="IVF lists searched per query (default 16)")
    g = r.add_argument_group("execution")
    g.add_argument("--address", default=None, help="Ray address (default: start a local cluster)")
    o.add_device(g, help="default auto: cuda where the cluster has GPUs")
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
    g.add_argument("--attention", default=ExecutionConfig.attention, choices=CHOICES["attention"],
                   help="packed: unpadded batches, varlen flash attention on CUDA (padded attention elsewhere); "
                        "mask: the model's own layers on padded batches (default auto: packed for BERT/ELECTRA)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the packed layers (a one-off compile per encoder actor; see BENCHMARKS.md)")
    g.add_argument("--summary-json", default=None, help="also write the run summary here")
    o.add_plan(r)


# ---------------------------------------------------------------- update

def cmd_update(a) -> int:
    from pipeline.job_requests import UPDATE_SCHEMA

    return update_and_report(o.request(a, UPDATE_SCHEMA), o.gpu_assumptions(a) if a.dry_run else None, a.json,
                             flags=True)


def update_and_report(request: dict, gpu, as_json: bool = False, flags: bool = False) -> int:
    """An update from its request (CLI flags or `jobs.update`'s YAML); with `gpu` assumptions, its dry run.
    `flags`: the request came from the command line, so errors name flags rather than keys."""
    from pipeline.job_requests import update_config

    cfg = update_config(request, flags)
    if gpu is not None:
        return _print_update_plan(cfg, gpu, as_json)
    from pipeline.flows.update import run_update

    summary = run_update(cfg, rebuild_fraction=request.get("rebuild_fraction", REBUILD_FRACTION))
    print(summary.render())
    return 0


def _print_update_plan(cfg: RunConfig, gpu, as_json: bool) -> int:
    from pipeline.corpus.source import Corpus
    from pipeline.flows.dry_run import plan_delta
    from pipeline.flows.update import plan_update
    from storage.fs import Store

    plan = plan_update(Store(cfg.store, cfg.storage_options), Corpus(cfg.corpus, cfg.corpus_storage_options),
                       cfg.execution)[-1]
    job = plan_delta(cfg, plan, gpu)
    if as_json:
        print(json.dumps({"update": plan.to_dict(), "plan": job.to_dict()}, indent=1))
    else:
        print(plan.render())
        print(job.render())
    return 0


def add_update(sub) -> None:
    up = o.command(sub, "update", cmd_update, "incremental reindex: encode only new/changed passages, tombstone the rest",
                   "Diff --corpus against the newest version by content hash, encode only new and changed passages, "
                   "tombstone changed and deleted ones, update the FAISS index, and commit one version. Settings "
                   "default to the ones the newest version recorded.", (o.add_store,))
    up.add_argument("--corpus", required=True)
    o.add_corpus_options(up)
    up.add_argument("--format", default=None, choices=CHOICES["format"])
    up.add_argument("--on-duplicate", default=None, choices=CHOICES["on_duplicate"])
    o.add_column_map(up, inherited=True)
    up.add_argument("--rebuild-fraction", type=float, default=REBUILD_FRACTION,
                    help="rebuild and retrain the index when more than this share of passages changed (default 0.2)")
    up.add_argument("--model", default=None, help="override (a different fingerprint is refused)")
    up.add_argument("--layers", type=int, default=None)
    up.add_argument("--dims", type=int, default=None)
    up.add_argument("--quantize", default=None, choices=CHOICES["quantize"])
    up.add_argument("--bits", type=float, default=None)
    up.add_argument("--shard-size", type=int, default=None)
    up.add_argument("--address", default=None)
    o.add_plan(up)


# ---------------------------------------------------------------- fit-compressor, compact

def cmd_fit(a) -> int:
    from pipeline.codec.fitting import fit_on_corpus
    from pipeline.config import CompressionConfig
    from pipeline.model.encoder import pick_device
    from storage.fs import redact_url, write_url

    settings = CompressionConfig(codec=a.codec, dims=a.dims, pq_m=a.pq_m, opq=a.opq, residual=a.residual)
    codec = fit_on_corpus(o.model_cfg(a), o.corpus(a), settings, a.sample, a.seed, pick_device(a.device))
    data = codec.to_bytes()
    write_url(a.out, data)
    md = codec.metadata
    print(f"wrote {redact_url(a.out)} ({len(data):,} bytes): {codec.describe()}, fitted on {md.get('passages')} "
          f"passages ({md.get('tokens')} tokens)"
          + (f"; explained variance ratio {md['explained_variance_ratio']}" if "explained_variance_ratio" in md else ""))
    return 0


def add_fit(sub) -> None:
    f = o.command(sub, "fit-compressor", cmd_fit, "fit a codec (PCA projection, or PQ/OPQ codebooks) on a corpus "
                  "sample (safetensors)", sections=(o.add_corpus, o.add_model, o.add_codec))
    f.add_argument("--sample", type=int, default=512, help="passages to fit on (default 512)")
    f.add_argument("--seed", type=int, default=0)
    o.add_device(f)
    f.add_argument("--out", required=True, help="output .safetensors path")


def cmd_compact(a) -> int:
    from pipeline.flows.compact import compact
    from storage import manifest as mf

    if a.shard_size < 1:
        raise ConfigError("--shard-size must be at least 1")
    store = o.store(a)
    before = mf.load(store)
    m = compact(store, a.shard_size)
    print(f"version {m.version}: {len(before.shards)} shards of version {before.version} rewritten as {len(m.shards)}; "
          f"old files stay until `precompute gc --keep-last K` retires version {before.version}")
    return 0


def add_compact(sub) -> None:
    co = o.command(sub, "compact", cmd_compact, "rewrite live rows into fewer full-size shards as a new version",
                   sections=(o.add_store,))
    co.add_argument("--shard-size", type=int, default=10_000)

