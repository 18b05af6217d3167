"""Updates under real faults: a SIGKILLed update process, and two updates racing for one parent."""
import os
import signal
import subprocess
import sys
import time

import cloudpickle
import numpy as np
import pytest

from jobs.cli import EXIT_FAILED
from pipeline.config import CompressionConfig, CorpusConfig, ExecutionConfig, ModelConfig, RunConfig
from pipeline.serve.state_reader import StateReader
from pipeline.flows.run import run
from pipeline.flows.update import run_update
from storage import manifest as mf
from storage.fs import Store
from tests.conftest import REPO, first_passages, write_tsv

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])

N = 600


def _corpus(path, seed: int, share: float = 0.1):
    """The first N sample passages with a seeded `share` of them edited, 5 deleted and 5 new."""
    rows = first_passages(N)
    rng = np.random.default_rng(seed)
    edit = set(rng.choice([r[0] for r in rows], int(share * N), replace=False).tolist())
    gone = set(rng.choice(sorted(set(r[0] for r in rows) - edit), 5, replace=False).tolist())
    out = [(p, t + f" Edit {seed} ." if p in edit else t, ti) for p, t, ti in rows if p not in gone]
    out += [(500_000 + 100 * seed + k, f"Passage {k} of update {seed} about canals .", "New") for k in range(5)]
    return write_tsv(path, out), sorted(r[0] for r in out)


@pytest.fixture
def base(ray_local, tmp_path, tiny_model):
    a = write_tsv(tmp_path / "a.tsv", first_passages(N))
    cfg = RunConfig(store=str(tmp_path / "store"), corpus=CorpusConfig(url=str(a)),
                    model=ModelConfig(name=tiny_model, layers=2), compression=CompressionConfig(dims=8, fit_sample=64),
                    execution=ExecutionConfig(shard_size=100))
    run(cfg)
    return cfg, Store(cfg.store)


def _update_cmd(store: Store, corpus) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "update", "--store", store.url, "--corpus", str(corpus),
            "--shard-size", "10"]


def _env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}


def test_update_sigkilled_mid_way_leaves_the_parent_and_the_rerun_completes(base, tmp_path):
    cfg, store = base
    b, ids_b = _corpus(tmp_path / "b.tsv", seed=1)
    proc = subprocess.Popen(_update_cmd(store, b), cwd=REPO, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = [f for f in store.walk_files("runs") if "update-" in f.path and f.path.endswith(".done.json")]
        if len(done) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the update finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert mf.latest_version(store) == 1  # nothing committed by the killed update
    assert len(StateReader(store).ids()) == N and mf.verify(store, mf.load(store)).ok

    from dataclasses import replace
    summary = run_update(replace(cfg, corpus=replace(cfg.corpus, url=str(b)),
                                 execution=replace(cfg.execution, shard_size=10)))
    assert summary.version == 2 and summary.shards_resumed >= 2  # the killed run's finished delta shards
    assert StateReader(store).ids().tolist() == ids_b
    assert mf.verify(store, mf.load(store)).ok


def test_two_concurrent_updates_of_one_parent_exactly_one_commits(base, tmp_path):
    _, store = base
    (b1, ids1), (b2, ids2) = _corpus(tmp_path / "b1.tsv", seed=1), _corpus(tmp_path / "b2.tsv", seed=2)
    procs = [subprocess.Popen(_update_cmd(store, b), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for b in (b1, b2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, EXIT_FAILED], (codes, [e[-2000:] for _, e in outs])
    loser = codes.index(EXIT_FAILED)
    assert "committed by another writer" in outs[loser][1]
    assert "Traceback" not in outs[loser][1]
    assert mf.list_versions(store) == [1, 2]
    winner_ids = (ids1, ids2)[codes.index(0)]
    assert StateReader(store).ids().tolist() == winner_ids
    v2 = mf.load(store)
    loser_run = {f.path.split("/")[1] for f in store.walk_files("runs")} - {v2.run_id, mf.load(store, 1).run_id}
    assert loser_run, "the losing update wrote nothing to check"
    assert not any(p.split("/")[1] in loser_run for p in v2.referenced_paths())  # nothing of it referenced
    assert mf.verify(store, v2).ok
