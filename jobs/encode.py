"""Encode job: `ray job submit --working-dir . -- python -m jobs.encode --config encode.yaml [--dry-run]`.

Keys: store (required), storage_options (the store's), corpus, model, compression, execution, dpr (sections of
`precompute run`'s options; see jobs/examples/encode.yaml; corpus.storage_options and compression.storage_options
are the corpus's and the compressor file's own), plan (GPU assumptions for --dry-run).
Inside `ray job submit` it joins the cluster it was submitted to.
"""
from __future__ import annotations

from jobs import jobfile
from pipeline.config import run_config_from_dict


def _load(path: str) -> dict:
    """The file's sections as the RunConfig `precompute run`'s flags would give, and its GPU assumptions."""
    body = jobfile.read(path)
    gpu = jobfile.gpu_assumptions(body.pop("plan", None))
    cfg = run_config_from_dict(body)
    return {"store": cfg.store, "config": cfg, "gpu": gpu}


def _encode(job: dict, a) -> int:
    from jobs.cli.encode import print_plan, run_and_report

    if a.dry_run:
        return print_plan(job["config"], job["gpu"], a.json)
    return run_and_report(job["config"], None)


def main(argv: list[str] | None = None) -> int:
    return jobfile.job_main("encode", __doc__, "validate the config and corpus, print passages, shards, GPU-hours "
                            "and storage; do nothing", _load, _encode, argv)


if __name__ == "__main__":
    from jobs.cli import exit_process

    exit_process(main())
