"""Storage job: price before launch, or validate a written store.

    python -m jobs.storage --config storage.yaml            # estimate (and validate, if `store` is set)

Keys: passages, tokens_per_passage, hidden, dims, bits, zstd_ratio, sample_corpus (corpus_storage_options:
its own fsspec options), dpr_dim, prices
(mapping tier -> $/GB-month); store, storage_options, target_passages, tolerance for validation;
layers, shard_size and plan (GPU assumptions) for --dry-run, which prints the encode plan for that
corpus: passages, shards, GPU-hours and storage, from arithmetic alone.
"""
from __future__ import annotations

import argparse
import logging

from jobs import jobfile
from pipeline.config import ConfigError

NUM = (int, float)
SCHEMA = {"passages": int, "tokens_per_passage": NUM, "hidden": int, "dims": int, "bits": NUM, "zstd_ratio": NUM,
          "sample_corpus": str, "corpus_storage_options": dict, "dpr_dim": int, "prices": dict, "store": str, "storage_options": dict,
          "target_passages": int, "tolerance": NUM, "layers": int, "shard_size": int}
ESTIMATE = {"passages": "--passages", "tokens_per_passage": "--tokens-per-passage", "hidden": "--hidden",
            "dims": "--dims", "bits": "--bits", "zstd_ratio": "--zstd-ratio", "sample_corpus": "--sample-corpus",
            "corpus_storage_options": "--corpus-storage-options", "dpr_dim": "--dpr-dim"}
VALIDATE = {"store": "--store", "storage_options": "--storage-options", "target_passages": "--target-passages",
            "tolerance": "--tolerance"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.storage", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--dry-run", action="store_true",
                   help="print the encode plan for this corpus (passages, shards, GPU-hours, storage); run nothing")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        body = jobfile.load(a.config, SCHEMA, ())
        prices = [f"{k}={float(v)}" for k, v in (body.get("prices") or {}).items()]
    except (ConfigError, TypeError, ValueError) as exc:
        logging.getLogger("jobs.storage").error("%s: %s", a.config, exc)
        return 2
    if a.dry_run:
        try:
            print(_plan(body).render())
        except (ConfigError, ValueError) as exc:
            logging.getLogger("jobs.storage").error("%s: %s", a.config, exc)
            return 2
        return 0
    from jobs.cli import main as cli
    rc = cli(["estimate", *jobfile.flags(body, ESTIMATE), *[x for p_ in prices for x in ("--price", p_)]])
    if rc == 0 and body.get("store"):
        rc = cli(["validate", *jobfile.flags(body, VALIDATE)])
    return rc


NOTE = "tokens per passage and zstd ratio are assumptions here (the zstd ratio unless given: a real 768-wide store's); the encode job's --dry-run measures tokens on the corpus"


def _plan(body: dict):
    """Encode plan from the job's assumptions alone: BERT geometry (FFN = 4 x hidden), no corpus read."""
    from pipeline.flows.job_cost import ModelGeometry, encode_plan
    from storage.estimate import Assumptions, default_zstd_ratio, estimate

    keys = ("passages", "tokens_per_passage", "hidden", "dims", "bits", "zstd_ratio", "dpr_dim")
    given = {k: body[k] for k in keys if body.get(k) is not None}
    given.setdefault("zstd_ratio", default_zstd_ratio(given.get("bits", Assumptions.bits)))
    a = Assumptions(**given)
    hidden = a.hidden
    e = estimate(a)
    return encode_plan("encode (from assumptions)", a.passages, body.get("shard_size") or 1000, a.tokens_per_passage,
                       ModelGeometry(hidden, 4 * hidden, body.get("layers") or 5), jobfile.gpu_assumptions(body.get("plan")),
                       e.total, f"precompute estimate: {a.bits:g}-bit codes, zstd ratio {a.zstd_ratio:g}",
                       notes=(NOTE,))


if __name__ == "__main__":
    from jobs.cli import exit_process

    exit_process(main())
