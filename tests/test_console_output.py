"""What `precompute` prints on a console that is not a terminal: one log format, no Ray notices that do
not apply, no progress bars or colour codes, `-q` warnings only, `-v` Ray's own lines too.

Each command runs as a real subprocess with its output captured (a pipe, as in CI or `| cat`); a few
runs on a small corpus serve all the assertions."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, S3_KEY, S3_SECRET, first_passages, make_bucket, write_tsv

# Our one log format (jobs/cli configure_logging): "2026-01-02 03:04:05,678 INFO name: message"
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.\-]+: ")
QUESTION = "Who is Robert Boulter?"


def precompute(*argv: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("FORCE_COLOR", None)
    return subprocess.run([sys.executable, "-m", "jobs.cli", *argv], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=str(REPO))


def lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


def not_in_format(stderr: str) -> list[str]:
    return [ln for ln in lines(stderr) if not LOG_LINE.match(ln)]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    rows = first_passages(200)
    before = write_tsv(tmp / "before.tsv", rows)
    after = write_tsv(tmp / "after.tsv", [(pid, text + " Revised ." if pid % 20 == 0 else text, title)
                                          for pid, text, title in rows]
                      + [(900_000 + k, f"A new passage number {k} about rowing boats .", "New") for k in range(5)])
    return tmp, before, after


def _run_args(store: str, corpus: Path, model: str) -> list[str]:
    return ["run", "--store", store, "--corpus", str(corpus), "--model", model, "--layers", "2", "--dims", "8",
            "--fit-sample", "64", "--shard-size", "100", "--dpr-model", model, "--dpr-pooling", "mean"]


@pytest.fixture(scope="module")
def s3_session(s3_server, corpora, tiny_model):
    """run, update, search and answer at the default level on a store in S3, credentials from the
    environment (as a user's shell has them): every command's captured output."""
    tmp, before, after = corpora
    store = f"s3://{make_bucket(s3_server)}/store"
    opts = ["--storage-options", json.dumps({"endpoint_url": s3_server, "client_kwargs": {"region_name": "us-east-1"}})]
    env = {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    out = {"run": precompute(*_run_args(store, before, tiny_model), *opts, env=env)}
    assert out["run"].returncode == 0, out["run"].stderr[-3000:]
    out["update"] = precompute("update", "--store", store, *opts, "--corpus", str(after), env=env)
    assert out["update"].returncode == 0, out["update"].stderr[-3000:]
    out["search"] = precompute("search", "--store", store, *opts, QUESTION, "--with-states", env=env)
    out["answer"] = precompute("answer", "--store", store, *opts, QUESTION, "-k", "5", env=env)
    for name in ("search", "answer"):
        assert out[name].returncode == 0, out[name].stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def quiet_then_verbose(corpora, tiny_model):
    """`-q run` on a local store, then `-v update` of it."""
    tmp, before, after = corpora
    store = str(tmp / "local-store")
    quiet = precompute("-q", *_run_args(store, before, tiny_model))
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    verbose = precompute("-v", "update", "--store", store, "--corpus", str(after))
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    return quiet, verbose


# ---------------------------------------------------------------- 1. Ray's actor-restart notice

def test_run_prints_no_ray_actor_restart_notice(s3_session):
    for name in ("run", "update"):
        err = s3_session[name].stderr
        assert "core_worker" not in err and "actor restart will fail" not in err, (name, err[-2000:])


# ---------------------------------------------------------------- 2. Ray Data's "will hang"

def test_update_does_not_warn_that_the_dataset_will_hang(s3_session):
    assert "will hang" not in s3_session["update"].stderr
    assert "available CPUs" not in s3_session["update"].stderr


# ---------------------------------------------------------------- 3. progress bars

def test_no_weight_loading_progress_bars_by_default(s3_session):
    for name, proc in s3_session.items():
        err = proc.stderr
        assert "Loading weights" not in err and "\r" not in err and "it/s]" not in err, (name, err[-2000:])


# ---------------------------------------------------------------- 4. credentials notice

def test_no_credentials_notice_on_s3_commands(s3_session):
    for name, proc in s3_session.items():
        assert "Found credentials" not in proc.stderr + proc.stdout, name


# ---------------------------------------------------------------- 5. colour, one format

def test_no_colour_codes_and_every_line_in_one_format(s3_session):
    for name, proc in s3_session.items():
        assert "\x1b[" not in proc.stderr + proc.stdout, name
        assert not not_in_format(proc.stderr), (name, not_in_format(proc.stderr)[:5])


# ---------------------------------------------------------------- 6. -q and -v

def test_quiet_prints_warnings_and_errors_only(quiet_then_verbose):
    quiet, _ = quiet_then_verbose
    assert not not_in_format(quiet.stderr), not_in_format(quiet.stderr)[:5]
    assert not [ln for ln in lines(quiet.stderr) if LOG_LINE.match(ln).group(1) in ("DEBUG", "INFO")]
    assert "committed as version 1" in quiet.stdout  # the result still goes to stdout


def test_verbose_shows_rays_own_lines_in_our_format(quiet_then_verbose):
    _, verbose = quiet_then_verbose
    ray_lines = [ln for ln in lines(verbose.stderr) if LOG_LINE.match(ln) and " ray." in ln]
    assert ray_lines, verbose.stderr[-3000:]
    assert "\x1b[" not in verbose.stderr


# ---------------------------------------------------------------- 7. --version

def test_version_prints_the_package_version(capsys):
    from jobs.cli import build_parser

    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--version"])
    assert done.value.code == 0
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert capsys.readouterr().out.strip() == f"precompute {version}"


# ---------------------------------------------------------------- 8. answer without a QA head

def test_answer_without_a_qa_head_prints_passages_snippets_and_how_to_get_spans(s3_session):
    proc = s3_session["answer"]
    ranked = [ln for ln in proc.stdout.splitlines() if re.match(r"^\s*\d+\.\s+\d+\s+-?\d+\.\d+\s+\S", ln)]
    assert len(ranked) == 5, proc.stdout
    snippets = [ln for ln in proc.stdout.splitlines() if ln.startswith("       ") and ln.strip()]
    assert len(snippets) == 5 and all(len(s.strip()) > 10 for s in snippets), proc.stdout
    assert "QA head" in proc.stdout and "--model" in proc.stdout, proc.stdout


def test_encode_waits_until_the_cpus_of_tasks_just_finished_show_free(ray_local):
    """Ray Data's "will hang unless more CPUs are freed" check reads a resource view that still counts
    tasks that just ended (an update's assembly tasks): the encode waits for the view to catch up."""
    import time

    from pipeline.workers.dataflow import wait_for_free_cpu

    @ray_local.remote(num_cpus=0.5)
    def hold():
        time.sleep(0.3)

    for _ in range(3):
        ray_local.get([hold.remote() for _ in range(4)])  # every CPU of the 2-CPU test cluster, ending together
        assert wait_for_free_cpu()
        assert ray_local.available_resources().get("CPU")
