"""`lookup` and `verify` exit 0 every time, under CPU load.

The abort once seen at exit ("terminate called without an active exception", exit 134 after the
output was written) came from a native thread pool still alive during interpreter teardown. The
read commands no longer load torch at all (its intra-op pool was the one such pool they started);
this checks both commands, many times, while other processes keep every core busy."""
import multiprocessing as mp
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import CompressionConfig, CorpusConfig, ExecutionConfig, ModelConfig, RunConfig
from pipeline.flows.run import run

REPO = Path(__file__).resolve().parents[1]
RUNS = 50


def _burn(stop) -> None:
    x = 0
    while not stop.is_set():
        x = (x * 31 + 7) % 1_000_003


@pytest.fixture(scope="module")
def small_store(ray_local, tmp_path_factory, tiny_model, sample_tsv):
    store = tmp_path_factory.mktemp("exit") / "store"
    run(RunConfig(store=str(store), corpus=CorpusConfig(url=str(sample_tsv), limit=200),
                  model=ModelConfig(name=tiny_model, layers=1), compression=CompressionConfig(dims=8, fit_sample=64),
                  execution=ExecutionConfig(shard_size=100)))
    return store


def test_read_commands_never_load_torch():
    code = ("import sys; from jobs.cli import cmd_lookup, cmd_verify; from pipeline.serve.state_reader import StateReader; "
            "from storage import manifest; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_lookup_and_verify_exit_0_fifty_times_each_under_load(small_store, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    commands = []
    for k in range(RUNS):
        commands.append(["lookup", "--store", str(small_store), "--ids", "1,2,3", "--out", str(tmp_path / f"{k}.npz")])
        commands.append(["verify", "--store", str(small_store)])

    def one(args):
        p = subprocess.run([sys.executable, "-m", "jobs.cli", "-q", *args], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
        return args[0], p.returncode, p.stderr[-500:]

    stop = mp.Event()
    burners = [mp.Process(target=_burn, args=(stop,), daemon=True) for _ in range(os.cpu_count() or 2)]
    for b in burners:
        b.start()
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(one, commands))
    finally:
        stop.set()
        for b in burners:
            b.join(timeout=10)
    failed = [r for r in results if r[1] != 0]
    assert not failed, failed[:3]
    assert sum(1 for r in results if r[0] == "lookup") == RUNS == sum(1 for r in results if r[0] == "verify")
    got = np.load(tmp_path / f"{RUNS - 1}.npz")
    assert sorted(k for k in got.files if k.startswith("states_")) == ["states_1", "states_2", "states_3"]
