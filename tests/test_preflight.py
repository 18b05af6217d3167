"""Fail fast: each mistake a newcomer makes is one line on stderr, exit 2, before Ray starts, nothing written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]


def _cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    base.update(PYTHONPATH=str(REPO), AWS_EC2_METADATA_DISABLED="true", **(env or {}))
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=base, capture_output=True,
                          text=True, timeout=300)


def _one_line_exit_2(proc: subprocess.CompletedProcess, *expect: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "\x1b[" not in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr  # failed before Ray
    for e in expect:
        assert e in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def squad_like(tmp_path):
    """Passages with pid/heading/body keys: the mapping a user forgets."""
    rows = [{"pid": i, "heading": f"Heading {i}", "body": f"Body text of passage {i}."} for i in range(1, 6)]
    jsonl = tmp_path / "paras.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    parquet = tmp_path / "paras.parquet"
    pq.write_table(pa.table({"id": [r["pid"] for r in rows], "text": [r["body"] for r in rows]}), parquet)
    return jsonl, parquet


def test_jsonl_without_a_title_column_is_an_error_unless_mapped_or_declared_absent(tmp_path, squad_like, tiny_model):
    jsonl, _ = squad_like
    store = tmp_path / "store"
    common = ["run", "--store", str(store), "--corpus", str(jsonl), "--id-column", "pid", "--text-column", "body",
              "--model", tiny_model, "--layers", "1", "--dims", "8"]
    line = _one_line_exit_2(_cli(common), "no key(s) ['title']", "--title-column")
    assert "'heading'" in line  # the keys it does have, so the user sees what to map
    assert not store.exists()
    for title in (["--title-column", "heading"], ["--title-column", ""]):
        proc = _cli(common + title + ["--dry-run", "--json"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout)["passages"] == 5
    assert not store.exists()


def test_parquet_without_a_title_column_is_an_error(tmp_path, squad_like, tiny_model):
    _, parquet = squad_like
    store = tmp_path / "store"
    _one_line_exit_2(_cli(["run", "--store", str(store), "--corpus", str(parquet), "--model", tiny_model,
                           "--layers", "1", "--dims", "8"]), "missing column(s) ['title']")
    assert not store.exists()


def test_s3_store_without_credentials_is_one_line_before_anything_runs(s3_server):
    proc = _cli(["run", "--store", "s3://no-creds-bucket/x", "--storage-options",
                 json.dumps({"endpoint_url": s3_server})],
                env={"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"})
    _one_line_exit_2(proc, "s3://no-creds-bucket/x is not writable", "no credentials")


@pytest.mark.parametrize("flags, expect", [
    (["--dims", "1000"], "exceeds"),
    (["--layers", "99"], "--layers 99"),
    (["--model", "/nonexistent/model-dir"], "cannot load its config"),
    (["--dpr-model", "bundled:all-minilm-l6-v2", "--index-factory", "IVFbogus,Flat"], "invalid index factory"),
])
def test_model_geometry_and_factory_fail_before_ray(tmp_path, tiny_model, flags, expect):
    store = tmp_path / "store"
    base = ["run", "--store", str(store), "--model", tiny_model, "--layers", "1", "--dims", "8"]
    _one_line_exit_2(_cli(base + flags), expect)
    assert not store.exists()


def test_an_error_raised_in_a_ray_worker_is_one_line_with_its_exit_code(ray_local, caplog):
    from jobs.cli import guarded
    from pipeline.corpus.rows import CorpusError
    from storage.manifest import CommitConflict

    @ray_local.remote
    def bad(kind):
        raise (CorpusError if kind == "usage" else CommitConflict)("first line\nsecond line \x1b[31mred\x1b[0m")

    assert guarded(lambda: ray_local.get(bad.remote("usage"))) == 2
    assert guarded(lambda: ray_local.get(bad.remote("failed"))) == 1
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert lines[-2:] == ["first line second line red"] * 2
    with pytest.raises(ZeroDivisionError):  # a bug is not a product error: it keeps its traceback
        guarded(lambda: 1 / 0)


def test_run_prints_readable_progress_before_ray_starts_and_per_shard(tmp_path, tiny_model, sample_tsv):
    """A line with passages and splits comes before Ray's start-up; then shards done of total; never '0/?'."""
    import re
    import time

    store = tmp_path / "store"
    args = [sys.executable, "-m", "jobs.cli", "run", "--store", str(store), "--corpus", str(sample_tsv), "--limit",
            "300", "--shard-size", "100", "--model", tiny_model, "--layers", "1", "--dims", "8", "--fit-sample", "64"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_EC2_METADATA_DISABLED": "true"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append((time.perf_counter() - t0, line.rstrip("\n")))
    proc.wait(timeout=600)
    assert proc.returncode == 0, "\n".join(l for _, l in lines[-30:])
    text = [l for _, l in lines]
    first = next(i for i, l in enumerate(text) if re.search(r"corpus .*: \d+ file\(s\), ~?\d+ passages, \d+ splits", l))
    ray_up = next((i for i, l in enumerate(text) if "Started a local Ray instance" in l), len(text))
    assert first < ray_up, text[:20]
    print(f"first readable progress line after {lines[first][0]:.1f} s: {text[first]}")
    # in-flight lines estimate (~); the last one counts the markers ("encoded 3/3 shards (300 passages, ...) in ...")
    shards = [l for l in text if re.search(r"encoded \d+/3 shards \(~?[\d,]+ passages, [\d,]+ passages/s\)", l)]
    assert shards and "encoded 3/3 shards" in shards[-1], text[-30:]
    assert not any("0/?" in l for l in text)
    noise = ("Token authentication is enabled", "Progress bars disabled")
    assert not [line for line in text if any(n in line for n in noise)]


def test_progress_line_and_sizes_render():
    from pipeline.flows.run import progress_line
    from storage.manifest import Sizes

    assert progress_line(3, 12, 3_000, 30.0) == "encoded 3/12 shards (~3,000 passages, 100 passages/s), ETA 1m 30s"
    assert progress_line(0, 12, 0, 5.0).endswith("ETA unknown")
    s = Sizes(states=25_510_000, states_shards=3, dpr=2_530_000, dpr_shards=3, index=3_590_000, other=10_000)
    assert s.total == 31_640_000 and Sizes.from_dict(s.to_dict()) == s
    assert s.render() == ("31.64 MB in all: states 25.51 MB in 3 shards, DPR embeddings 2.53 MB in 3 shards, "
                          "FAISS index 3.59 MB, other 10.00 KB")
