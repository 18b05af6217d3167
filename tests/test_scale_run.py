"""The split-parallel run on a real local Ray cluster: duplicates across splits, a corpus that
changes under the run, and the commit through the sink."""
import pytest

from pipeline.flows import run as runner
from pipeline.config import CompressionConfig, CorpusConfig, ExecutionConfig, ModelConfig, RunConfig
from pipeline.serve.state_reader import StateReader
from pipeline.flows.run import run
from storage import manifest as mf
from storage.fs import Store
from tests.conftest import first_passages, write_tsv

pytestmark = pytest.mark.ray


def _cfg(store, corpus, tiny_model, **corpus_kw) -> RunConfig:
    return RunConfig(store=str(store), corpus=CorpusConfig(url=str(corpus), **corpus_kw),
                     model=ModelConfig(name=tiny_model, layers=2), compression=CompressionConfig(dims=8, fit_sample=32),
                     execution=ExecutionConfig(shard_size=40))


@pytest.fixture()
def corpus_with_a_duplicate_across_splits(tmp_path):
    rows = first_passages(120)
    dup = (rows[4][0], "A later copy of the fifth passage .", "Copy")
    path = write_tsv(tmp_path / "c.tsv", [(pid, text, title) for pid, text, title in rows] + [dup])
    return path, rows, dup


def test_duplicate_ids_across_splits_are_refused_before_anything_is_committed(
        ray_local, tmp_path, tiny_model, corpus_with_a_duplicate_across_splits):
    path, rows, dup = corpus_with_a_duplicate_across_splits
    store = tmp_path / "store"
    from pipeline.corpus.rows import CorpusError
    with pytest.raises(CorpusError, match=rf"duplicate passage id.*\[{dup[0]}\]"):
        run(_cfg(store, path, tiny_model))
    assert mf.latest_version(Store(str(store))) is None


def test_keep_first_keeps_the_earlier_copy_and_counts_the_later_one(
        ray_local, tmp_path, tiny_model, corpus_with_a_duplicate_across_splits):
    path, rows, dup = corpus_with_a_duplicate_across_splits
    store = Store(str(tmp_path / "store"))
    summary = run(_cfg(store.url, path, tiny_model, on_duplicate="keep-first"))
    assert summary.shards >= 3, "the duplicate must land in a different split than the first copy"
    assert summary.written == len(rows) and summary.skipped["duplicate"] == 1
    reader = StateReader(store)
    assert reader.ids().tolist() == sorted(r[0] for r in rows)
    m = mf.load(store)
    assert mf.verify(store, m).ok and m.counts["accepted"] == len(rows)
    # the live copy of the id is the first one in corpus order: its content hash is the first text's
    from pipeline.corpus.rows import content_hash, normalise
    from storage import tombstones
    from storage.shards import read_rows
    dead = tombstones.load(store, m.artifacts.get("tombstones"))
    live = [h for s in m.shards_of("states")
            for i, h in zip(*(lambda t: (t.column("id").to_pylist(), t.column("content_hash").to_pylist()))(
                read_rows(store, s["path"], columns=["id", "content_hash"])))
            if i == dup[0] and i not in dead.get(s["path"], ())]
    first = rows[4]
    assert live == [content_hash(normalise(first[2]), normalise(first[1]))]


def test_a_corpus_changed_between_plan_and_encode_is_refused_naming_the_file(
        ray_local, tmp_path, tiny_model, monkeypatch):
    rows = first_passages(80)
    path = write_tsv(tmp_path / "moving.tsv", [(pid, text, title) for pid, text, title in rows])
    real = runner._obtain_compressor

    def then_edit(*args, **kwargs):
        out = real(*args, **kwargs)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write("999999\tA passage added while the run was going .\tLate\n")
        return out

    monkeypatch.setattr(runner, "_obtain_compressor", then_edit)
    store = tmp_path / "store"
    from pipeline.corpus.rows import CorpusChanged
    with pytest.raises(CorpusChanged, match=r"moving\.tsv changed after the run was planned"):
        run(_cfg(store, path, tiny_model))
    assert mf.latest_version(Store(str(store))) is None


def test_a_split_that_keeps_no_passage_is_still_counted(ray_local, tmp_path, tiny_model):
    filler = "word " * 60
    hole = range(25, 96)  # longer than two splits: at least one split keeps nothing
    rows = [(i, ("   " + " " * 300) if i in hole else f"passage {i} {filler}", f"T{i}") for i in range(1, 121)]
    path = write_tsv(tmp_path / "holes.tsv", rows)
    store = Store(str(tmp_path / "store"))
    summary = run(_cfg(store.url, path, tiny_model))
    kept = [r[0] for r in rows if r[0] not in hole]
    assert summary.skipped["empty"] == len(hole) and summary.written == len(kept) and summary.passages_in == 120
    assert StateReader(store).ids().tolist() == kept
    m = mf.load(store)
    from pipeline.corpus.source import Corpus
    n_splits = len(Corpus(CorpusConfig(url=str(path))).plan(40).splits)
    assert mf.verify(store, m).ok and len(m.shards_of("states")) < n_splits  # an empty split has no shard file


def test_a_later_copy_skipped_for_length_is_still_a_duplicate(ray_local, tmp_path, tiny_model):
    rows = [(pid, " ".join(text.split()[:40]), title) for pid, text, title in first_passages(120)]  # < 128 tokens
    long_copy = (rows[4][0], "far too long " * 200, "Copy")  # > 128 tokens: skipped under on_too_long=skip
    path = write_tsv(tmp_path / "c.tsv", [(pid, text, title) for pid, text, title in rows] + [long_copy])
    cfg = _cfg(tmp_path / "store", path, tiny_model, on_duplicate="keep-first")
    cfg = RunConfig(store=cfg.store, corpus=cfg.corpus, model=ModelConfig(name=tiny_model, layers=2, on_too_long="skip"),
                    compression=cfg.compression, execution=cfg.execution)
    summary = run(cfg)
    assert summary.written == len(rows)
    assert summary.skipped["duplicate"] == 1 and summary.skipped["too_long"] == 0
    store = Store(cfg.store)
    assert StateReader(store).ids().tolist() == sorted(r[0] for r in rows) and mf.verify(store, mf.load(store)).ok
