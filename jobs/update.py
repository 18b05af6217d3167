"""Update job: `ray job submit --working-dir . -- python -m jobs.update --config update.yaml [--dry-run]`.

Keys: store, corpus (required); storage_options (the store's), corpus_storage_options (the corpus's own), format, rebuild_fraction, shard_size, address,
id_column, title_column, text_column (default: the parent version's);
plan (GPU assumptions for --dry-run: tokens_per_second, peak_tflops, utilisation, price_per_gpu_hour).
"""
from __future__ import annotations

from jobs.jobfile import FlatJob

SCHEMA = {"store": str, "corpus": str, "storage_options": dict, "corpus_storage_options": dict, "format": str, "rebuild_fraction": (int, float),
          "shard_size": int, "address": str, "id_column": str, "title_column": str, "text_column": str}
JOB = FlatJob(
    name="update", doc=__doc__, command="update", schema=SCHEMA, required=("store", "corpus"), plan_flags=True,
    flags={"store": "--store", "corpus": "--corpus", "storage_options": "--storage-options",
           "corpus_storage_options": "--corpus-storage-options", "format": "--format",
           "rebuild_fraction": "--rebuild-fraction", "shard_size": "--shard-size", "address": "--address",
           "id_column": "--id-column", "title_column": "--title-column", "text_column": "--text-column"},
    dry_run_help="print new/changed/deleted counts, shards, GPU-hours and storage delta; do nothing")
main = JOB.main

if __name__ == "__main__":
    from jobs.cli import exit_process

    exit_process(main())
