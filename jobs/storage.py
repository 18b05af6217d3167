"""Storage job: price before launch, or validate a written store.

    python -m jobs.storage --config storage.yaml            # estimate (and validate, if `store` is set)

Keys: passages, tokens_per_passage, hidden, dims, bits, zstd_ratio, sample_corpus (corpus_storage_options:
its own fsspec options; sample_size, zstd_sample_size), dpr_dim, index_factory ("none": no index), prices
(mapping tier -> $/GB-month); store, storage_options, target_passages, tolerance for validation;
layers, shard_size and plan (GPU assumptions) for --dry-run, which prints the encode plan for that
corpus: passages, shards, GPU-hours and storage, from arithmetic alone.
"""
from __future__ import annotations

from jobs import jobfile
from pipeline.job_requests import EstimateRequest
from pipeline.schema import dataclass_schema

# `precompute estimate`'s settings a job may set (the rest keep the estimate's defaults) ...
ESTIMATE = ("passages", "tokens_per_passage", "hidden", "dims", "bits", "zstd_ratio", "sample_corpus",
            "corpus_storage_options", "sample_size", "zstd_sample_size", "dpr_dim", "index_factory", "prices")
# ... `precompute validate`'s, and the dry run's
VALIDATE = {"store": str, "storage_options": dict, "target_passages": int, "tolerance": (int, float)}
PLAN = {"layers": int, "shard_size": int}
SCHEMA = {**{k: v for k, v in dataclass_schema(EstimateRequest).items() if k in ESTIMATE}, **VALIDATE, **PLAN}


def _storage(body: dict, a) -> int:
    from jobs.cli.storage import estimate_and_report
    from jobs.cli.store import TARGET_PASSAGES, TOLERANCE, validate_and_report
    from storage.fs import Store

    # a whole number for a float setting is that float, as `--bits 8` gives it (the report prints "8.0 bits")
    req = EstimateRequest.from_mapping({k: float(v) if SCHEMA[k] is float and type(v) is int else v
                                        for k, v in body.items() if k in ESTIMATE})
    if a.dry_run:
        from pipeline.job_requests import encode_plan_from_assumptions

        gpu = jobfile.gpu_assumptions(body.get("plan"))
        print(encode_plan_from_assumptions(req, body.get("layers"), body.get("shard_size"), gpu).render())
        return 0
    rc = estimate_and_report(req, as_json=False)
    if rc == 0 and body.get("store"):
        rc = validate_and_report(Store(body["store"], body.get("storage_options") or {}), None,
                                 body.get("target_passages") or TARGET_PASSAGES, body.get("tolerance") or TOLERANCE,
                                 as_json=False)
    return rc


def main(argv: list[str] | None = None) -> int:
    return jobfile.job_main("storage", __doc__, "print the encode plan for this corpus (passages, shards, GPU-hours, "
                            "storage); run nothing", lambda path: jobfile.load(path, SCHEMA, ()), _storage, argv,
                            json_flag=False)


if __name__ == "__main__":
    from jobs.cli import exit_process

    exit_process(main())
