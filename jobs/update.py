"""Update job: `ray job submit --working-dir . -- python -m jobs.update --config update.yaml [--dry-run]`.

Keys: store, corpus (required); storage_options, format, rebuild_fraction, shard_size, address.
"""
from __future__ import annotations

import argparse
import logging
import sys

from jobs import jobfile
from pipeline.config import ConfigError

SCHEMA = {"store": str, "corpus": str, "storage_options": dict, "format": str, "rebuild_fraction": (int, float),
          "shard_size": int, "address": str}
FLAGS = {"store": "--store", "corpus": "--corpus", "storage_options": "--storage-options", "format": "--format",
         "rebuild_fraction": "--rebuild-fraction", "shard_size": "--shard-size", "address": "--address"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.update", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--dry-run", action="store_true", help="print new/changed/deleted counts, ETA, storage delta")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        body = jobfile.load(a.config, SCHEMA, ("store", "corpus"))
    except ConfigError as exc:
        logging.getLogger("jobs.update").error("%s: %s", a.config, exc)
        return 2
    from jobs.cli import main as cli
    return cli(["update", *jobfile.flags(body, FLAGS), *(["--dry-run"] if a.dry_run else [])])


if __name__ == "__main__":
    sys.exit(main())
