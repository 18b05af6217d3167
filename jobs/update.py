"""Update job: `ray job submit --working-dir . -- python -m jobs.update --config update.yaml [--dry-run]`.

Keys: store, corpus (required); storage_options (the store's), corpus_storage_options (the corpus's own), format, rebuild_fraction, shard_size, address,
id_column, title_column, text_column (default: the parent version's);
plan (GPU assumptions for --dry-run: tokens_per_second, peak_tflops, utilisation, price_per_gpu_hour).
"""
from __future__ import annotations

from jobs import jobfile
from pipeline.job_requests import UPDATE_REQUIRED, UPDATE_SCHEMA

# The keys of `precompute update`'s settings a job file may set (the rest always come from the parent version).
KEYS = ("store", "corpus", "storage_options", "corpus_storage_options", "format", "rebuild_fraction", "shard_size",
        "address", "id_column", "title_column", "text_column")
SCHEMA = {k: UPDATE_SCHEMA[k] for k in KEYS}


def _update(body: dict, a) -> int:
    from jobs.cli.encode import update_and_report

    gpu = jobfile.gpu_assumptions(body.get("plan")) if a.dry_run else None
    return update_and_report({k: v for k, v in body.items() if k != "plan"}, gpu, a.json)


def main(argv: list[str] | None = None) -> int:
    return jobfile.job_main("update", __doc__,
                            "print new/changed/deleted counts, shards, GPU-hours and storage delta; do nothing",
                            lambda path: jobfile.load(path, SCHEMA, UPDATE_REQUIRED), _update, argv)


if __name__ == "__main__":
    from jobs.cli import exit_process

    exit_process(main())
