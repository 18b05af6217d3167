"""A rerun never pays twice: duplicate ids fail before encoding, --on-duplicate does not invalidate
encoded shards, a losing update's rerun reuses its delta shards; and the counts the run reports."""
import logging
import sys
from dataclasses import replace

import cloudpickle
import numpy as np
import pytest

from pipeline.config import CompressionConfig, CorpusConfig, ExecutionConfig, ModelConfig, RunConfig
from pipeline.corpus.rows import CorpusError, content_hash, normalise
from pipeline.flows.run import run
from pipeline.flows.update import reusable_shards, run_update
from pipeline.serve.state_reader import StateReader
from storage import manifest as mf
from storage.fs import Store
from tests.conftest import first_passages, write_tsv

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _cfg(store, corpus, tiny_model, shard_size=40, **corpus_kw) -> RunConfig:
    return RunConfig(store=str(store), corpus=CorpusConfig(url=str(corpus), **corpus_kw),
                     model=ModelConfig(name=tiny_model, layers=2), compression=CompressionConfig(dims=8, fit_sample=32),
                     execution=ExecutionConfig(shard_size=shard_size))


def _live_hashes(store: Store) -> dict[int, bytes]:
    """{id: content hash} of the newest version's live rows, read from its shards and tombstones."""
    from storage import tombstones
    from storage.shards import read_rows

    m = mf.load(store)
    dead = tombstones.load(store, m.artifacts.get("tombstones"))
    out = {}
    for s in m.shards_of("states"):
        t = read_rows(store, s["path"], columns=["id", "content_hash"])
        for i, h in zip(t.column("id").to_pylist(), t.column("content_hash").to_pylist()):
            if i not in dead.get(s["path"], ()):
                assert i not in out, f"id {i} live twice"
                out[i] = h
    return out


def _h(*xs):
    return np.array([x.to_bytes(16, "little") for x in xs], dtype="S16")


def test_reusable_shards_takes_only_shards_whose_every_row_is_wanted_once():
    want_ids, want_h = np.array([5, 1, 9, 3]), _h(50, 10, 90, 30)
    shards = [(np.array([1, 3]), _h(10, 30)),      # all wanted: taken
              (np.array([5, 7]), _h(50, 70)),      # 7 is not wanted: the whole shard is encoded again
              (np.array([9]), _h(91)),             # same id, other content: not taken
              (np.array([3, 9]), _h(30, 90)),      # 3 already covered by the first shard
              (np.array([9]), _h(90))]             # taken
    take, covered = reusable_shards(want_ids, want_h, shards)
    assert take == [True, False, False, False, True]
    assert covered.tolist() == [1, 3, 9]
    assert reusable_shards(np.empty(0, np.int64), _h(), shards)[0] == [False] * 5


@pytest.mark.ray
def test_duplicate_ids_across_splits_fail_before_anything_is_encoded(ray_local, tmp_path, tiny_model):
    rows = first_passages(120)
    dup = (rows[4][0], "A later copy of the fifth passage .", "Copy")
    path = write_tsv(tmp_path / "c.tsv", rows + [dup])
    store = Store(str(tmp_path / "store"))
    with pytest.raises(CorpusError, match=rf"\[{dup[0]}\].*--on-duplicate keep-first.*before encoding"):
        run(_cfg(store.url, path, tiny_model))
    assert [f.path for f in store.walk_files("") if f.path.endswith(".parquet") or "artifacts/" in f.path] == []
    # the rerun with the flag the message names encodes every passage once and keeps the first copy
    summary = run(_cfg(store.url, path, tiny_model, on_duplicate="keep-first"))
    assert summary.passages_encoded_this_run == len(rows) + 1 and summary.written == len(rows)
    assert summary.skipped["duplicate"] == 1
    first = rows[4]
    assert _live_hashes(store)[dup[0]] == content_hash(normalise(first[2]), normalise(first[1]))


@pytest.mark.ray
def test_another_duplicate_policy_reuses_every_encoded_shard(ray_local, tmp_path, tiny_model):
    path = write_tsv(tmp_path / "c.tsv", first_passages(120))
    store = Store(str(tmp_path / "store"))
    first = run(_cfg(store.url, path, tiny_model, on_duplicate="keep-first"))
    assert first.shards >= 3 and first.passages_encoded_this_run == 120
    again = run(_cfg(store.url, path, tiny_model))  # --on-duplicate error: the default
    assert again.shards_resumed == first.shards and again.passages_encoded_this_run == 0
    assert again.run_id == first.run_id and not again.committed


@pytest.mark.ray
def test_keep_first_counts_only_the_tokens_of_live_rows(ray_local, tmp_path, tiny_model):
    rows = first_passages(120)
    dup = (rows[4][0], "A much longer later copy of the fifth passage , " * 3, "Copy")
    path = write_tsv(tmp_path / "c.tsv", rows + [dup])
    store = Store(str(tmp_path / "store"))
    summary = run(_cfg(store.url, path, tiny_model, on_duplicate="keep-first"))
    reader = StateReader(store)
    live = sum(len(e.token_ids) for e in reader.get_encoded(reader.ids()).values())
    assert summary.tokens == live == mf.load(store).counts["tokens"]


@pytest.mark.ray
def test_the_last_progress_line_counts_real_passages_before_the_commit(ray_local, tmp_path, tiny_model, caplog):
    rows = first_passages(130)
    path = write_tsv(tmp_path / "c.tsv", rows)
    with caplog.at_level(logging.INFO):
        summary = run(_cfg(tmp_path / "store", path, tiny_model))
    lines = [r.getMessage() for r in caplog.records]
    final = [i for i, m in enumerate(lines) if m.startswith(f"encoded {summary.shards}/{summary.shards} shards (")]
    committed = [i for i, m in enumerate(lines) if m.startswith("committed version")]
    assert final and committed and final[-1] < committed[0], lines
    assert f"({len(rows):,} passages," in lines[final[-1]]


@pytest.mark.ray
def test_a_losing_updates_rerun_reuses_its_delta_shards(ray_local, tmp_path, tiny_model, monkeypatch):
    n = 300
    rows = first_passages(n)
    base = _cfg(tmp_path / "store", write_tsv(tmp_path / "a.tsv", rows), tiny_model, shard_size=50)
    run(base)
    store = Store(base.store)

    def edited(name, ids, tag):
        out = [(p, t + f" Edit {tag} ." if p in ids else t, ti) for p, t, ti in rows]
        out += [(900_000 + k + (100 if tag == "b" else 0), f"Passage {k} of update {tag} .", "New") for k in range(4)]
        return write_tsv(tmp_path / name, out), out

    ids = [r[0] for r in rows]
    path_a, _ = edited("a2.tsv", set(ids[0:n:7]), "a")
    path_b, rows_b = edited("b2.tsv", set(ids[3:n:5]), "b")
    cfg_a = replace(base, corpus=replace(base.corpus, url=str(path_a)), execution=replace(base.execution, shard_size=20))
    cfg_b = replace(cfg_a, corpus=replace(base.corpus, url=str(path_b)))

    from pipeline.flows import commit as commit_module
    real = commit_module.commit_version

    def a_commits_first(st, draft):  # update a wins the race while b is about to commit
        monkeypatch.setattr(commit_module, "commit_version", real)
        run_update(cfg_a)
        return real(st, draft)

    monkeypatch.setattr(commit_module, "commit_version", a_commits_first)
    with pytest.raises(mf.CommitConflict):
        run_update(cfg_b)
    assert mf.list_versions(store) == [1, 2]
    committed = {p.split("/")[1] for p in mf.load(store).referenced_paths() if p.startswith("runs/")}
    lost = [f.path for f in store.walk_files("runs") if f.path.endswith(".done.json")
            and f.path.startswith("runs/update-") and f.path.split("/")[1] not in committed]
    b_dirs = {p.split("/")[1] for p in lost}
    assert lost

    again = run_update(cfg_b)
    assert again.version == 3
    assert again.shards_resumed == len(lost)  # every delta shard b had encoded
    b_edits = len(ids[3:n:5]) + 4
    assert again.passages_encoded_this_run < again.counts["new"] + again.counts["changed"]
    assert again.passages_encoded_this_run == again.counts["new"] + again.counts["changed"] - b_edits
    v3 = mf.load(store)
    assert b_dirs & {p.split("/")[1] for p in v3.referenced_paths()}
    assert mf.verify(store, v3).ok
    assert StateReader(store).ids().tolist() == sorted(r[0] for r in rows_b)
    assert _live_hashes(store) == {pid: content_hash(normalise(title), normalise(text)) for pid, text, title in rows_b}


def test_markers_of_an_earlier_attempt_ignore_its_index_build_files(tmp_path):
    from pipeline.workers.sink import finished_markers

    store = Store(str(tmp_path / "store"))
    store.write_bytes("runs/update-x-v1/index/dpr-0123abcd.done.json", b"{}")  # the index build's own marker
    store.write_bytes("runs/update-x-v1/states/part-00000.parquet", b"not a finished split")
    assert finished_markers(store, {}, "runs/update-x-v1", None, 0.5) == {}
