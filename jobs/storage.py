"""Storage job: price before launch, or validate a written store.

    python -m jobs.storage --config storage.yaml            # estimate (and validate, if `store` is set)

Keys: passages, tokens_per_passage, hidden, dims, bits, zstd_ratio, sample_corpus, dpr_dim, prices
(mapping tier -> $/GB-month); store, storage_options, target_passages, tolerance for validation.
"""
from __future__ import annotations

import argparse
import logging
import sys

from jobs import jobfile
from pipeline.config import ConfigError

NUM = (int, float)
SCHEMA = {"passages": int, "tokens_per_passage": NUM, "hidden": int, "dims": int, "bits": NUM, "zstd_ratio": NUM,
          "sample_corpus": str, "dpr_dim": int, "prices": dict, "store": str, "storage_options": dict,
          "target_passages": int, "tolerance": NUM}
ESTIMATE = {"passages": "--passages", "tokens_per_passage": "--tokens-per-passage", "hidden": "--hidden",
            "dims": "--dims", "bits": "--bits", "zstd_ratio": "--zstd-ratio", "sample_corpus": "--sample-corpus",
            "dpr_dim": "--dpr-dim"}
VALIDATE = {"store": "--store", "storage_options": "--storage-options", "target_passages": "--target-passages",
            "tolerance": "--tolerance"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.storage", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--dry-run", action="store_true", help="check the config only")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        body = jobfile.load(a.config, SCHEMA, ())
        prices = [f"{k}={float(v)}" for k, v in (body.get("prices") or {}).items()]
    except (ConfigError, TypeError, ValueError) as exc:
        logging.getLogger("jobs.storage").error("%s: %s", a.config, exc)
        return 2
    if a.dry_run:
        print(f"{a.config}: valid; would run estimate{' and validate' if body.get('store') else ''}")
        return 0
    from jobs.cli import main as cli
    rc = cli(["estimate", *jobfile.flags(body, ESTIMATE), *[x for p_ in prices for x in ("--price", p_)]])
    if rc == 0 and body.get("store"):
        rc = cli(["validate", *jobfile.flags(body, VALIDATE)])
    return rc


if __name__ == "__main__":
    sys.exit(main())
