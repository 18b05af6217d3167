"""YAML job files for `ray job submit`: load, check keys against a schema, name the bad one."""
from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.config import ConfigError

NUM = (int, float)
# The `plan:` section every job accepts: what its --dry-run assumes about GPUs (see pipeline/flows/job_cost.py).
PLAN_SCHEMA = {"tokens_per_second": NUM, "peak_tflops": NUM, "utilisation": NUM, "price_per_gpu_hour": NUM}
PLAN_FLAGS = {"tokens_per_second": "--gpu-tokens-per-second", "peak_tflops": "--gpu-tflops",
              "utilisation": "--gpu-utilisation", "price_per_gpu_hour": "--gpu-price"}


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


def check(body: dict[str, Any], schema: dict[str, type | tuple[type, ...]], required: tuple[str, ...] = (),
          where: str = "") -> dict[str, Any]:
    for key, value in body.items():
        if key not in schema:
            raise ConfigError(f"{where}{key}: unknown key (known: {', '.join(schema)})")
        want = schema[key]
        if value is not None and (not isinstance(value, want) or isinstance(value, bool) and bool not in _types(want)):
            expected = "/".join(t.__name__ for t in _types(want))
            raise ConfigError(f"{where}{key}: expected {expected}, got {value!r}")
    missing = [k for k in required if body.get(k) in (None, "")]
    if missing:
        raise ConfigError(f"{', '.join(where + m for m in missing)}: required")
    return body


def _types(want: type | tuple[type, ...]) -> tuple[type, ...]:
    return want if isinstance(want, tuple) else (want,)


def load(path: str, schema: dict[str, type | tuple[type, ...]], required: tuple[str, ...]) -> dict[str, Any]:
    """Read and check a flat job file; a `plan:` mapping is checked against PLAN_SCHEMA."""
    body = check(read(path), {**schema, "plan": dict}, required)
    check(body.get("plan") or {}, PLAN_SCHEMA, where="plan.")
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

    return GpuAssumptions(**check(plan or {}, PLAN_SCHEMA, where="plan."))


def flags(body: dict[str, Any], names: dict[str, str]) -> list[str]:
    """Job keys -> CLI flags (booleans become bare flags, mappings JSON)."""
    argv: list[str] = []
    for key, flag in names.items():
        value = body.get(key)
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def plan_flags(body: dict[str, Any]) -> list[str]:
    return flags(body.get("plan") or {}, PLAN_FLAGS)


@dataclass(frozen=True)
class FlatJob:
    """A job whose YAML keys map one-to-one onto a `precompute` subcommand's flags."""
    name: str
    doc: str
    command: str
    schema: dict[str, Any]
    flags: dict[str, str]
    required: tuple[str, ...]
    dry_run_help: str
    plan_flags: bool = False  # pass the `plan:` section's GPU assumptions to the dry run

    def main(self, argv: list[str] | None = None) -> int:
        p = argparse.ArgumentParser(prog=f"python -m jobs.{self.name}", description=self.doc,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", required=True, help=f"YAML job config (see jobs/examples/{self.name}.yaml)")
        p.add_argument("--dry-run", action="store_true", help=self.dry_run_help)
        p.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
        a = p.parse_args(argv)
        from jobs.cli import configure_logging
        from jobs.cli import main as cli
        configure_logging()
        try:
            body = load(a.config, self.schema, self.required)
            check_store_for_submitted_job(body["store"])
        except ConfigError as exc:
            logging.getLogger(f"jobs.{self.name}").error("%s: %s", a.config, exc)
            return 2
        extra = ["--dry-run", *(plan_flags(body) if self.plan_flags else [])] if a.dry_run else []
        return cli([self.command, *flags(body, self.flags), *extra, *(["--json"] if a.json else [])])
