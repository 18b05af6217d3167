"""Index build job: `ray job submit --working-dir . -- python -m jobs.index --config index.yaml [--dry-run]`.

Rebuilds the FAISS index of the store's newest version from its stored DPR embeddings (a new
factory after `precompute plan-index`, or a retrain after many updates) and commits a new version.
Keys: store, factory (required); storage_options, train_sample, nprobe, address.
"""
from __future__ import annotations

from jobs.jobfile import FlatJob

SCHEMA = {"store": str, "factory": str, "storage_options": dict, "train_sample": int, "nprobe": int, "address": str}
JOB = FlatJob(
    name="index", doc=__doc__, command="index", schema=SCHEMA, required=("store", "factory"),
    flags={"store": "--store", "factory": "--factory", "storage_options": "--storage-options",
           "train_sample": "--train-sample", "nprobe": "--nprobe", "address": "--address"},
    dry_run_help="print vectors, shards, GPU-hours and index size; do nothing")
main = JOB.main

if __name__ == "__main__":
    from jobs.cli import exit_process

    exit_process(main())
