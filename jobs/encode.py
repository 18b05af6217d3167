"""Encode job: `ray job submit --working-dir . -- python -m jobs.encode --config encode.yaml [--dry-run]`.

Keys: store (required), storage_options (the store's), corpus, model, compression, execution, dpr (sections of
`precompute run`'s options; see jobs/examples/encode.yaml; corpus.storage_options and compression.storage_options
are the corpus's and the compressor file's own), plan (GPU assumptions for --dry-run).
Inside `ray job submit` it joins the cluster it was submitted to.
"""
from __future__ import annotations

import argparse
import logging

from jobs import jobfile
from pipeline.config import ConfigError, run_config_from_dict

log = logging.getLogger("jobs.encode")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.encode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML job config")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and corpus, print passages, shards, GPU-hours and storage; do nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    args = p.parse_args(argv)
    from jobs.cli import configure_logging, guarded
    configure_logging()
    try:
        body = jobfile.read(args.config)
        gpu = jobfile.gpu_assumptions(body.pop("plan", None))
        cfg = run_config_from_dict(body)
        jobfile.check_store_for_submitted_job(cfg.store)
    except ConfigError as exc:
        log.error("%s: %s", args.config, exc)
        return 2
    from jobs.cli import print_plan, run_and_report
    if args.dry_run:
        return guarded(lambda: print_plan(cfg, gpu, args.json))
    return guarded(lambda: run_and_report(cfg, None))


if __name__ == "__main__":
    from jobs.cli import exit_process

    exit_process(main())
