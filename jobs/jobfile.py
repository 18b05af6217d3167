"""YAML job files for `ray job submit`: read one, check it with the CLI's own checker, run the CLI's command.

A job's keys are the command's settings under their config names; the mapping goes to the same
pipeline function the flags go to (pipeline.job_requests, pipeline.config), never through argv."""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Callable

import yaml

from pipeline.schema import ConfigError, Schema, check_mapping, dataclass_schema


def read(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            body = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read job config: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}") from exc
    if not isinstance(body, dict):
        raise ConfigError("the job config must be a mapping of keys to values")
    return body


def plan_schema() -> dict:
    """The `plan:` section every job accepts: what its --dry-run assumes about GPUs (pipeline/flows/job_cost.py)."""
    from pipeline.flows.job_cost import GpuAssumptions

    return dataclass_schema(GpuAssumptions)


def load(path: str, schema: Schema, required: tuple[str, ...]) -> dict[str, Any]:
    """Read and check a flat job file; a `plan:` mapping is checked against the GPU assumptions' fields."""
    body = check_mapping(read(path), {**schema, "plan": dict}, required=required)
    check_mapping(body.get("plan") or {}, plan_schema(), where="plan.")
    return body


def check_store_for_submitted_job(store: str) -> None:
    """Refuse a relative local store inside `ray job submit --working-dir`: the job's cwd is Ray's
    temporary copy of the repo, so the store would be written there and lost with it."""
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not job or "://" in store or os.path.isabs(os.path.expanduser(store)):
        return
    try:
        working_dir = (json.loads(job).get("runtime_env") or {}).get("working_dir")
    except (ValueError, AttributeError):
        return
    if working_dir:
        raise ConfigError(f"store: {store!r} is a relative path, and this job runs in Ray's temporary copy of the "
                          f"working dir, where the store would be lost. Use s3://bucket/prefix (or gs://) on a "
                          f"cluster, or an absolute path on a single machine.")


def gpu_assumptions(plan: dict[str, Any] | None):
    from pipeline.flows.job_cost import GpuAssumptions

    return GpuAssumptions(**check_mapping(plan or {}, plan_schema(), where="plan."))


def job_main(name: str, doc: str, dry_run_help: str, load_body: Callable[[str], dict],
             command: Callable[[dict, argparse.Namespace], int], argv: list[str] | None = None,
             json_flag: bool = True) -> int:
    """`python -m jobs.<name> --config job.yaml [--dry-run] [--json]`: load and check the file (a bad key is
    one line naming it, exit 2), then run the command as `precompute` would, with the same error handling."""
    p = argparse.ArgumentParser(prog=f"python -m jobs.{name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help=f"YAML job config (see jobs/examples/{name}.yaml)")
    p.add_argument("--dry-run", action="store_true", help=dry_run_help)
    if json_flag:
        p.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    a = p.parse_args(argv)
    from jobs.cli import configure_logging, run_command
    configure_logging()
    try:
        body = load_body(a.config)
        if body.get("store"):
            check_store_for_submitted_job(body["store"])
    except ConfigError as exc:
        logging.getLogger(f"jobs.{name}").error("%s: %s", a.config, exc)
        return 2
    return run_command(lambda: command(body, a), body.get("store"))
