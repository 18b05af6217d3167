"""Injected faults against real components: a dying Ray worker, a SIGKILLed driver, a flaky S3."""
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time

import cloudpickle
import numpy as np
import pytest

from jobs.cli import main as cli
from pipeline.config import CompressionConfig, CorpusConfig, ExecutionConfig, ModelConfig, RunConfig
from pipeline.serve.state_reader import StateReader
from pipeline.flows.run import run
from pipeline.workers.steps import EncodeStage
from storage import manifest as mf
from storage.fs import Store
from tests.conftest import REPO, S3_SECRET, make_bucket, s3_options
from tests.flaky_proxy import FlakyProxy

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import tests/

N_PASSAGES, SHARD = 300, 50
# The SIGKILL test uses smaller shards: tasks Ray Data already queued on live actors finish after the driver dies,
# and with 6 shards they could be all of them, leaving the rerun nothing to resume.
KILL_SHARD = 20


def _cfg(store: str, tiny_model: str, sample_tsv, storage_options=None, shard_size: int = SHARD) -> RunConfig:
    return RunConfig(store=store, corpus=CorpusConfig(url=str(sample_tsv), limit=N_PASSAGES),
                     model=ModelConfig(name=tiny_model, layers=2),
                     compression=CompressionConfig(dims=8, fit_sample=64),
                     execution=ExecutionConfig(shard_size=shard_size), storage_options=storage_options or {})


class CrashOnceEncodeStage(EncodeStage):
    """Exits the actor process hard the first time it is handed shard 2."""

    def __call__(self, batch):
        flag = os.environ.get("CRASH_FLAG") or self.ctx.store_url + "/../crash.flag"
        for shard in set(batch.column("split").to_pylist()):
            if shard == 2 and not os.path.exists(flag):
                open(flag, "w").close()
                os._exit(1)
        return super().__call__(batch)


def _content(store: Store) -> tuple[list, list]:
    m = mf.load(store)
    return [s["sha256"] for s in m.shards], StateReader(store).ids().tolist()


def test_worker_killed_mid_encoding_still_commits_every_passage_once(ray_local, tmp_path, tiny_model, sample_tsv):
    store = str(tmp_path / "store")
    summary = run(_cfg(store, tiny_model, sample_tsv), encode_stage=CrashOnceEncodeStage)
    assert os.path.exists(tmp_path / "crash.flag"), "the fault was not injected"
    assert summary.written == N_PASSAGES
    s = Store(store)
    assert StateReader(s).ids().tolist() == list(range(1, N_PASSAGES + 1))
    assert mf.verify(s, mf.load(s)).ok


def _settled_marker_count(store: Store, quiet_s: float = 5.0, limit_s: float = 60.0) -> int:
    """Markers once none has appeared for quiet_s: the killed driver's workers can finish a write after it dies."""
    count, since, start = -1, time.time(), time.time()
    while time.time() - start < limit_s:
        now = len([f for f in store.walk_files("runs") if f.path.endswith(".done.json")])
        if now != count:
            count, since = now, time.time()
        elif time.time() - since >= quiet_s:
            break
        time.sleep(0.5)
    return count


def test_driver_sigkill_then_rerun_equals_an_uninterrupted_run(ray_local, tmp_path, tiny_model, sample_tsv):
    killed = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "jobs.cli", "run", "--store", killed, "--corpus", str(sample_tsv),
           "--limit", str(N_PASSAGES), "--model", tiny_model, "--layers", "2", "--dims", "8", "--fit-sample", "64",
           "--shard-size", str(KILL_SHARD), "--num-encoders", "1"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    store = Store(killed)
    done_before = 0
    while time.time() < deadline and proc.poll() is None:
        done_before = len([f for f in store.walk_files("runs") if f.path.endswith(".done.json")])
        if done_before >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the job finished before it could be killed; make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert mf.latest_version(store) is None  # nothing committed by the killed driver
    done_at_kill = _settled_marker_count(store)
    assert 2 <= done_at_kill < N_PASSAGES // KILL_SHARD

    resumed = run(_cfg(killed, tiny_model, sample_tsv, shard_size=KILL_SHARD))
    # a write task already in flight when the driver died may land one more marker; resume reuses what it lists
    assert done_at_kill <= resumed.shards_resumed < N_PASSAGES // KILL_SHARD
    assert resumed.passages_encoded_this_run == N_PASSAGES - resumed.shards_resumed * KILL_SHARD

    reference = str(tmp_path / "reference")
    full = run(_cfg(reference, tiny_model, sample_tsv, shard_size=KILL_SHARD))
    assert full.shards_resumed == 0 and full.passages_encoded_this_run == N_PASSAGES
    assert resumed.run_id == full.run_id
    assert _content(store) == _content(Store(reference))  # byte-identical shards, same ids
    assert mf.load(store).counts == mf.load(Store(reference)).counts


CORPUS_SECRET, CODEC_SECRET = "corpus-secret-never-logged-5b1e", "codec-secret-never-logged-c07a"


def test_s3_end_to_end_run_lookup_verify_gc_without_leaking_credentials(ray_local, s3_server, s3_bucket, tiny_model,
                                                                        sample_tsv, tmp_path, caplog):
    """Three locations, three sets of credentials (corpus, compressor file, store): none is stored or logged."""
    caplog.set_level(logging.INFO)
    url, opts = s3_bucket
    corpus_opts = s3_options(s3_server, "AKIACORPUSONLY000KEY", CORPUS_SECRET)
    codec_opts = s3_options(s3_server, "AKIACODECONLY0000KEY", CODEC_SECRET)
    corpus = f"s3://{make_bucket(s3_server, objects={'c.tsv': sample_tsv.read_bytes()})}/c.tsv"
    codec = tmp_path / "codec.safetensors"
    assert cli(["fit-compressor", "--corpus", corpus, "--corpus-storage-options", json.dumps(corpus_opts),
                "--limit", str(N_PASSAGES), "--model", tiny_model, "--layers", "2", "--dims", "8", "--sample", "64",
                "--out", str(codec)]) == 0
    codec_url = f"s3://{make_bucket(s3_server, objects={'c.safetensors': codec.read_bytes()})}/c.safetensors"
    base = _cfg(url, tiny_model, sample_tsv, opts)
    cfg = dataclasses.replace(base, corpus=dataclasses.replace(base.corpus, url=corpus),
                              compression=dataclasses.replace(base.compression, compressor=codec_url),
                              corpus_storage_options=corpus_opts, compressor_storage_options=codec_opts)
    summary = run(cfg)
    assert summary.written == N_PASSAGES and summary.store == url
    args = ["--store", url, "--storage-options", json.dumps(opts)]
    out = tmp_path / "s.npz"
    assert cli(["lookup", *args, "--ids", "1,150,300", "--out", str(out)]) == 0
    assert sorted(np.load(out).files) == sorted(f"{k}_{i}" for k in ("token_ids", "states") for i in (1, 150, 300))
    assert cli(["verify", *args]) == 0
    assert cli(["gc", *args, "--min-age", "0"]) == 0
    store = Store(url, opts)
    assert not store.walk_files("runs/" + summary.run_id + "/input")  # staging inputs collected
    assert cli(["verify", *args]) == 0
    for f in store.walk_files():  # no object anywhere holds a secret
        for secret in (S3_SECRET, CORPUS_SECRET, CODEC_SECRET):
            assert secret.encode() not in store.read_bytes(f.path), f.path
    for secret in (S3_SECRET, CORPUS_SECRET, CODEC_SECRET):
        assert secret not in caplog.text


def test_transient_s3_errors_are_retried_and_nothing_is_lost_or_duplicated(ray_local, s3_server, s3_bucket,
                                                                           tiny_model, sample_tsv):
    url, opts = s3_bucket
    with FlakyProxy(s3_server, drop_request_every=7, drop_response_every=11) as proxy:
        flaky = {**opts, "endpoint_url": proxy.url, "config_kwargs": {"retries": {"max_attempts": 10, "mode": "standard"}}}
        summary = run(_cfg(url, tiny_model, sample_tsv, flaky))
        assert proxy.injected > 10, proxy.injected
    store = Store(url, opts)  # read back directly, past the proxy
    assert summary.written == N_PASSAGES
    assert StateReader(store).ids().tolist() == list(range(1, N_PASSAGES + 1))
    assert mf.list_versions(store) == [1]
    assert mf.verify(store, mf.load(store)).ok
