"""A store written before the structure change (commit 02c8fe4) reads, updates and verifies with today's code.

The fixture under tests/fixtures/store_before_27/ was written by 02c8fe4's `precompute run` on the first 24
passages of the bundled sample (bundled MiniLM, 3 layers, PCA-32 int8, DPR + Flat index); see its README.
"""
import shutil
import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

from jobs.cli import main as cli
from pipeline.serve.searcher import Searcher
from pipeline.serve.state_reader import StateReader
from storage import manifest as mf
from storage.fs import Store
from tests.conftest import write_tsv

FIXTURE = Path(__file__).parent / "fixtures" / "store_before_27"
pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def old_store(tmp_path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(FIXTURE / "store", dst)
    return dst


def _rows(path: Path) -> list[tuple[int, str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [(int(i), text, title) for i, text, title in (line.split("\t") for line in lines)]


def test_an_old_store_verifies_and_reads_its_states(old_store):
    assert cli(["verify", "--store", str(old_store)]) == 0
    reader = StateReader(Store(str(old_store)))
    ids = reader.ids()
    assert ids.tolist() == list(range(1, 25))
    got = reader.get([1, 7, 24])
    assert sorted(got) == [1, 7, 24]
    for p in got.values():
        assert p.states.shape == (len(p.token_ids), 384) and np.isfinite(p.states).all()
    assert sum(len(e.token_ids) for e in reader.get_encoded(ids).values()) == 2690  # what 02c8fe4 counted


def test_todays_encoder_writes_the_same_codes_as_the_old_store(old_store, tmp_path, ray_local):
    """Same corpus, model and compressor: today's run stores byte-identical codes and token ids."""
    old = StateReader(Store(str(old_store)))
    artifact = old_store / mf.load(Store(str(old_store))).artifacts["compressor"]["path"]
    new_store = tmp_path / "new"
    rc = cli(["run", "--corpus", str(FIXTURE / "corpus.tsv"), "--store", str(new_store), "--layers", "3",
              "--dims", "32", "--compressor", str(artifact), "--dpr-model", "bundled:all-minilm-l6-v2"])
    assert rc == 0
    new = StateReader(Store(str(new_store)))
    ids = old.ids()
    a, b = old.get_encoded(ids), new.get_encoded(ids)
    for i in ids.tolist():
        assert np.array_equal(a[i].token_ids, b[i].token_ids)
        assert np.array_equal(a[i].codes, b[i].codes), i
    assert mf.load(Store(str(new_store))).fingerprint == mf.load(Store(str(old_store))).fingerprint


def test_an_old_store_updates_and_the_new_version_verifies(old_store, tmp_path, ray_local):
    rows = _rows(FIXTURE / "corpus.tsv")
    edited = [(i, text + " (edited)" if i in (3, 9) else text, title) for i, text, title in rows if i != 5]
    edited.append((100, "A passage added after the structure change, about tide pools.", "Tide pool"))
    corpus = write_tsv(tmp_path / "new.tsv", edited)
    assert cli(["update", "--corpus", str(corpus), "--store", str(old_store)]) == 0
    assert cli(["verify", "--store", str(old_store)]) == 0
    store = Store(str(old_store))
    assert mf.latest_version(store) == 2
    reader = StateReader(store)
    live = reader.ids().tolist()
    assert 5 not in live and 100 in live and len(live) == 24
    assert reader.get([100])[100].states.shape[1] == 384
    hits = Searcher(store).search(["tide pools"], k=3)[0]
    assert hits[0].id == 100
