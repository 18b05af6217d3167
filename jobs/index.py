"""Index build job: `ray job submit --working-dir . -- python -m jobs.index --config index.yaml [--dry-run]`.

Rebuilds the FAISS index of the store's newest version from its stored DPR embeddings (a new
factory after `precompute plan-index`, or a retrain after many updates) and commits a new version.
Keys: store, factory (required); storage_options, train_sample, nprobe, address.
"""
from __future__ import annotations

from jobs import jobfile
from pipeline.job_requests import INDEX_SCHEMA

SCHEMA = INDEX_SCHEMA
REQUIRED = ("store", "factory")


def main(argv: list[str] | None = None) -> int:
    from jobs.cli.index import index_and_report

    return jobfile.job_main("index", __doc__, "print vectors, shards, GPU-hours and index size; do nothing",
                            lambda path: jobfile.load(path, SCHEMA, REQUIRED),
                            lambda body, a: index_and_report({k: v for k, v in body.items() if k != "plan"},
                                                             a.dry_run, a.json), argv)


if __name__ == "__main__":
    from jobs.cli import exit_process

    exit_process(main())
