"""Encode job for `ray job submit --working-dir . -- python -m jobs.encode --config job.yaml`."""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys

import yaml

from pipeline.config import ConfigError, run_config_from_dict

log = logging.getLogger("jobs.encode")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.encode", description=(
        "Run the encode pipeline from a YAML job config (see jobs/examples/encode.yaml). Inside `ray job "
        "submit` it joins the cluster it was submitted to."))
    p.add_argument("--config", required=True, help="YAML job config")
    p.add_argument("--dry-run", action="store_true", help="validate the config and corpus, print the plan, do nothing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with open(args.config, encoding="utf-8") as fh:
            body = yaml.safe_load(fh)
        cfg = run_config_from_dict(body)
    except (OSError, yaml.YAMLError, ConfigError) as exc:
        log.error("%s: %s", args.config, exc)
        return 2
    if args.dry_run:
        from pipeline.corpus import Corpus, CorpusError
        try:
            scan = Corpus(cfg.corpus, cfg.storage_options).scan()
        except CorpusError as exc:
            log.error("%s", exc)
            return 2
        plan = {"passages": scan.n, "counts": scan.counts.to_dict(),
                "shards": math.ceil(scan.n / cfg.execution.shard_size), "config": cfg.public_dict()}
        print(json.dumps(plan, indent=1))
        return 0
    from jobs.cli import run_and_report
    return run_and_report(cfg, None)


if __name__ == "__main__":
    sys.exit(main())
