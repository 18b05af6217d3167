"""Incremental reindexing on the 2,333-passage sample (tiny model: logic, not statistics)."""
import dataclasses
import sys

import cloudpickle
import numpy as np
import pytest

from jobs.cli import main as cli
from pipeline.config import CompressionConfig, CorpusConfig, DprConfig, ExecutionConfig, ModelConfig, RunConfig
from pipeline.corpus.source import Corpus
from pipeline.serve.state_reader import StateReader
from pipeline.flows.run import run
from pipeline.serve.searcher import Searcher
from pipeline.workers.steps import EncodeStage
from pipeline.flows.update import FingerprintMismatch, diff, run_update
from storage import manifest as mf
from storage.fs import Store
from tests.conftest import first_passages, write_tsv

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_diff_is_set_algebra_on_ids_and_hashes():
    d = diff(np.array([1, 2, 3, 4]), [b"a", b"b", b"c", b"d"], np.array([2, 3, 4, 5]), [b"b", b"X", b"d", b"e"])
    assert d.counts() == {"new": 1, "changed": 1, "deleted": 1, "unchanged": 2}
    assert d.to_encode.tolist() == [3, 5] and d.to_remove.tolist() == [1, 3]


def test_vectorised_diff_equals_set_algebra_on_shuffled_ids():
    rng = np.random.default_rng(4)
    old_ids = rng.permutation(np.arange(1, 20_001))
    old_h = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)) for _ in old_ids]
    new = {int(i): h for i, h in zip(old_ids, old_h)}
    for i in rng.choice(old_ids, 300, replace=False):
        new[int(i)] = bytes(16)  # changed (an all-zero hash: trailing NULs must still compare unequal)
    for i in rng.choice(old_ids, 100, replace=False):
        new.pop(int(i), None)
    new.update({30_000 + k: bytes([k % 256]) * 16 for k in range(50)})
    new_ids = rng.permutation(np.fromiter(new, dtype=np.int64))
    d = diff(old_ids, old_h, new_ids, [new[int(i)] for i in new_ids])
    old = dict(zip(old_ids.tolist(), old_h))
    common = old.keys() & new.keys()
    assert d.changed.tolist() == sorted(i for i in common if old[i] != new[i])
    assert d.unchanged.tolist() == sorted(i for i in common if old[i] == new[i])
    assert d.new.tolist() == sorted(new.keys() - old.keys()) and d.deleted.tolist() == sorted(old.keys() - new.keys())


def test_in_sorted_agrees_with_isin():
    from pipeline.workers.update_scan import in_sorted

    rng = np.random.default_rng(3)
    for size in (0, 1, 7, 5_000):
        hay = np.unique(rng.integers(0, 10_000, size))
        values = rng.integers(-5, 10_005, 3_000)
        assert (in_sorted(hay, values) == np.isin(values, hay)).all()


def test_tombstones_round_trip_as_sorted_arrays_and_are_checked(tmp_path):
    from storage import tombstones
    from storage.fs import IntegrityError
    store = Store(str(tmp_path / "s"))
    entry = tombstones.write(store, "t.parquet", {"b.parquet": {9, 3, 5}, "a.parquet": np.array([7, 1, 7]),
                                                   "empty.parquet": set()})
    back = tombstones.load(store, entry)
    assert sorted(back) == ["a.parquet", "b.parquet"] and entry["rows"] == 5
    assert back["a.parquet"].tolist() == [1, 7] and back["b.parquet"].tolist() == [3, 5, 9]
    assert back["a.parquet"].dtype == np.int64
    assert tombstones.load(store, tombstones.write(store, "e.parquet", {})) == {}
    (tmp_path / "s" / "t.parquet").write_bytes(b"PAR1 not what the manifest hashed")
    with pytest.raises(IntegrityError):
        tombstones.load(store, entry)


def test_compaction_plan_cuts_id_ranges_by_live_rows_from_the_manifest_alone():
    from pipeline.flows.compact import plan_ranges
    lo, hi = np.array([1, 1001, 2001, 50]), np.array([1000, 2000, 3000, 2900])  # the last: a delta spanning all
    ranges = plan_ranges(lo, hi, np.array([1000, 900, 1000, 30]), 1000)
    assert ranges[0][0] == 1 and ranges[-1][1] == 3000
    assert all(b + 1 == c for (_, b), (c, _) in zip(ranges, ranges[1:]))  # contiguous, no gaps, no overlap
    assert len(ranges) == 3  # 2,930 live rows in shards of ~1,000
    assert plan_ranges(lo, hi, np.zeros(4, np.int64), 1000) == []


def _corpora(tmp_path):
    rows = first_passages(2333)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(rows))
    changed = set(rows[i][0] for i in order[:23])          # 1%
    deleted = set(rows[i][0] for i in order[23:35])        # 0.5%
    new_rows = [(100_000 + k, f"A new passage number {k} about the history of rowing boats .", "New") for k in range(23)]
    a = write_tsv(tmp_path / "a.tsv", [(pid, text, title) for pid, text, title in rows])
    b_rows = [(pid, (text + " Revised .") if pid in changed else text, title)
              for pid, text, title in rows if pid not in deleted] + new_rows
    b = write_tsv(tmp_path / "b.tsv", b_rows)
    return a, b, changed, deleted, {r[0] for r in new_rows}


def _cfg(store, corpus, tiny_model, compressor=None, layers=2):
    return RunConfig(store=str(store), corpus=CorpusConfig(url=str(corpus)), model=ModelConfig(name=tiny_model, layers=layers),
                     compression=CompressionConfig(dims=8, fit_sample=64, compressor=compressor),
                     execution=ExecutionConfig(shard_size=500),
                     dpr=DprConfig(model=tiny_model, pooling="mean", index_factory="Flat"))


class FailingEncodeStage(EncodeStage):
    def __call__(self, batch):
        for shard in set(batch.column("split").to_pylist()):
            if shard == 0:
                raise RuntimeError("injected failure in the middle of an update")
        return super().__call__(batch)


@pytest.fixture(scope="module")
def updated(ray_local, tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("upd")
    a, b, changed, deleted, new = _corpora(tmp)
    base = _cfg(tmp / "store", a, tiny_model)
    run(base)
    store = Store(str(tmp / "store"))
    comp = mf.load(store).artifacts["compressor"]["path"]
    compressor_file = str(tmp / "store" / comp)
    upd_cfg = _cfg(tmp / "store", b, tiny_model)
    # a first attempt dies mid-way: the previous version stays intact and readable
    with pytest.raises(Exception):
        run_update(upd_cfg, encode_stage=FailingEncodeStage)
    # A failed job's driver exits and the rerun is a new driver; do the same here, since Ray Data
    # offers no public way to kill a failed dataset's actors from the process that ran it.
    import ray
    ray.shutdown()
    assert mf.latest_version(store) == 1
    assert len(StateReader(store).get([1, 2])) == 2
    summary = run_update(upd_cfg)
    rebuild = _cfg(tmp / "rebuild", b, tiny_model, compressor=compressor_file)
    run(rebuild)
    return dict(tmp=tmp, store=store, rebuild=Store(str(tmp / "rebuild")), summary=summary, changed=changed,
                deleted=deleted, new=new, b=b, tiny_model=tiny_model, compressor_file=compressor_file)


def test_only_changed_and_new_passages_are_encoded(updated):
    s = updated["summary"]
    assert s.counts == {"new": 23, "changed": 23, "deleted": 12, "unchanged": 2333 - 35}
    assert s.passages_encoded_this_run == 46 and s.version == 2 and s.parent == 1
    m = mf.load(updated["store"])
    assert m.counts["encoded_this_version"] == 46 and m.counts["written"] == 2333 - 12 + 23


def test_new_version_equals_a_full_rebuild(updated):
    store, rebuild = updated["store"], updated["rebuild"]
    r_new, r_full = StateReader(store), StateReader(rebuild)
    assert np.array_equal(r_new.ids(), r_full.ids())
    probe = sorted(updated["changed"])[:10] + sorted(updated["new"])[:5] + [1, 2, 3]
    a, b = r_new.get(probe), r_full.get(probe)
    assert sorted(a) == sorted(b) == sorted(probe)
    for pid in probe:
        assert np.array_equal(a[pid].token_ids, b[pid].token_ids)
        err = np.linalg.norm(a[pid].states - b[pid].states) / np.linalg.norm(b[pid].states)
        assert err < 1e-3, (pid, err)
    assert not r_new.get(sorted(updated["deleted"]))  # deleted ids are gone from the new version
    questions = [t.split(" . ")[0] for _, t, _ in first_passages(40)[::2]] + ["rowing boats"]
    s_new, s_full = Searcher(store), Searcher(rebuild)
    for h1, h2 in zip(s_new.search(questions, 10), s_full.search(questions, 10)):
        assert [h.id for h in h1] == [h.id for h in h2]
    assert mf.verify(store, mf.load(store)).ok


def test_old_version_stays_readable(updated):
    store = updated["store"]
    old = StateReader(store, version=1)
    gone = sorted(updated["deleted"])[:3]
    assert sorted(old.get(gone)) == gone
    assert len(old.ids()) == 2333


def test_fingerprint_change_is_refused_without_a_mixed_version(updated):
    store = updated["store"]
    before = mf.list_versions(store)
    with pytest.raises(FingerprintMismatch, match="layers"):
        run_update(_cfg(updated["tmp"] / "store", updated["b"], updated["tiny_model"], layers=3))
    assert mf.list_versions(store) == before


def test_dry_run_counts_and_writes_nothing(updated, capsys):
    store = updated["store"]
    files = {f.path for f in store.walk_files()}
    assert cli(["update", "--store", store.url, "--corpus", str(updated["b"]), "--model", updated["tiny_model"],
                "--layers", "2", "--dims", "8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "new 0, changed 0, deleted 0, unchanged 2344" in out
    assert "an update on this cluster would take" in out and "s just now" in out
    assert {f.path for f in store.walk_files()} == files


def test_index_job_rebuilds_over_live_rows_only_as_a_new_version(updated, capsys):
    import json

    from pipeline.index.faiss_file import index_ids, load_checked
    from pipeline.flows.reindex import ReindexConfig, reindex
    store = updated["store"]
    before = mf.load(store)
    questions = ["rowing boats", "Robert Boulter"] + [t.split(" . ")[0] for _, t, _ in first_passages(20)[::4]]
    hits_before = [[h.id for h in hs] for hs in Searcher(store).search(questions, 10)]
    assert cli(["index", "--store", store.url, "--factory", "IVF4,Flat", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    live = 2333 - 12 + 23
    assert plan["passages"] == live and plan["shards"] == len(before.shards_of("dpr"))
    assert mf.latest_version(store) == before.version  # a dry run commits nothing
    # nprobe = nlist searches every list: with Flat codes the results must equal the exact index's.
    summary = reindex(ReindexConfig(store=store.url, factory="IVF4,Flat", nprobe=4, train_sample=500))
    after = mf.load(store)
    assert summary.version == after.version == before.version + 1 and summary.ntotal == live
    assert after.shards == before.shards and after.artifacts["tombstones"] == before.artifacts["tombstones"]
    assert after.artifacts["dpr_index"]["factory"] == "IVF4,Flat"
    ids = index_ids(load_checked(store, after.artifacts["dpr_index"]))
    assert sorted(ids.tolist()) == sorted(StateReader(store).ids().tolist())  # tombstoned rows left out
    assert [[h.id for h in hs] for hs in Searcher(store).search(questions, 10)] == hits_before
    assert mf.verify(store, after).ok


def test_compact_keeps_content_and_drops_shard_count(updated):
    from pipeline.flows.compact import compact
    store = updated["store"]
    before = mf.load(store)
    ids_before = StateReader(store).ids()
    probe = [1, 500, 1200] + sorted(updated["changed"])[:3] + sorted(updated["new"])[:2]
    states_before = StateReader(store).get(probe)
    hits_before = [[h.id for h in hs] for hs in Searcher(store).search(["rowing boats", "Robert Boulter"], 10)]
    m = compact(store, shard_size=1000)
    after = mf.load(store)
    assert len(after.shards_of("states")) < len(before.shards_of("states"))
    assert "tombstones" not in after.artifacts
    assert np.array_equal(StateReader(store).ids(), ids_before)
    states_after = StateReader(store).get(probe)
    for pid in probe:
        assert np.array_equal(states_after[pid].states, states_before[pid].states)
    assert [[h.id for h in hs] for hs in Searcher(store).search(["rowing boats", "Robert Boulter"], 10)] == hits_before
    assert mf.verify(store, after).ok and m.version == after.version


def test_diff_corpus_on_workers_handles_unordered_ids_and_duplicates_across_splits(tmp_path, ray_local):
    """Ascending ids skip np.unique; shuffled ids with a duplicate in a later split must not."""
    from pipeline.corpus.rows import content_hash
    from pipeline.workers.update_scan import diff_corpus

    rows = [(i, f"passage {i} text", f"T{i}") for i in (5, 3, 9, 1, 7, 2, 8, 3, 4)]  # id 3 twice: splits 0 and 2
    rows[7] = (3, "a later copy of 3", "T3")
    path = write_tsv(tmp_path / "c.tsv", rows)
    parent_ids = np.array([1, 2, 3, 4, 6], np.int64)
    parent_hashes = np.array([content_hash(f"T{i}", f"passage {i} text") for i in (1, 2, 3, 4)] + [b"x" * 16])
    parent_hashes[1] = b"y" * 16  # id 2 changed
    with pytest.raises(Exception, match="duplicate passage id"):
        diff_corpus(Corpus(CorpusConfig(url=str(path))), 3, parent_ids, parent_hashes)
    scan, parts = diff_corpus(Corpus(CorpusConfig(url=str(path), on_duplicate="keep-first")), 3, parent_ids,
                              parent_hashes)
    assert scan.ids.tolist() == [1, 2, 3, 4, 5, 7, 8, 9]
    assert scan.counts.skipped_duplicate == 1 and scan.counts.accepted == 8
    assert sorted(np.concatenate([p.new for p in parts]).tolist()) == [5, 7, 8, 9]
    assert np.concatenate([p.changed for p in parts]).tolist() == [2]  # the later copy of 3 is not "changed"
    ordered, _ = diff_corpus(Corpus(CorpusConfig(url=str(write_tsv(tmp_path / "o.tsv", sorted(set(rows[:7]) | {rows[8]}))))),
                             3, parent_ids, parent_hashes)
    assert ordered.ids.tolist() == [1, 2, 3, 4, 5, 7, 8, 9] and not ordered.drop


def test_an_update_reads_the_whole_corpus_whatever_the_parents_limit(ray_local, tmp_path, tiny_model, capsys):
    """A trial run's --limit is recorded in the version's config; the update must not inherit it."""
    rows = first_passages(60)
    corpus = write_tsv(tmp_path / "c.tsv", rows)
    cfg = _cfg(tmp_path / "store", corpus, tiny_model)
    run(dataclasses.replace(cfg, corpus=dataclasses.replace(cfg.corpus, limit=40),
                            compression=dataclasses.replace(cfg.compression, fit_sample=20)))
    assert len(StateReader(Store(str(tmp_path / "store"))).ids()) == 40
    assert cli(["update", "--store", str(tmp_path / "store"), "--corpus", str(corpus), "--dry-run"]) == 0
    assert "new 20, changed 0, deleted 0, unchanged 40" in capsys.readouterr().out
