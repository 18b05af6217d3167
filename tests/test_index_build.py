"""The worker-side FAISS build: parts as paths, on-disk merge, delta updates folded by compact.

Tiny random encoder on the real 2,333-passage sample: these are equality checks, not recall figures
(recall on real MiniLM vectors is in benchmarks/index_scale.py and test_pipeline_e2e)."""
import os
import shutil
import sys

import cloudpickle
import faiss
import numpy as np
import pytest

from pipeline.index import faiss_file as fx
from pipeline.flows.compact import compact
from pipeline.config import CompressionConfig, CorpusConfig, DprConfig, ExecutionConfig, ModelConfig, RunConfig
from pipeline.index.build import IndexSpec, _add_task, _merge_task, build_index_from, read_embeddings
from pipeline.flows.run import run
from pipeline.flows.update import run_update
from storage import manifest as mf
from storage.fs import IntegrityError, Store
from tests.conftest import first_passages, write_tsv

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])

FACTORY, NLIST = "IVF8,Flat", 8  # nprobe = nlist with Flat codes: search is exact, so results must be equal


def _cfg(store, corpus, tiny_model, factory=FACTORY):
    return RunConfig(store=str(store), corpus=CorpusConfig(url=str(corpus)), model=ModelConfig(name=tiny_model, layers=2),
                     compression=CompressionConfig(dims=8, fit_sample=64), execution=ExecutionConfig(shard_size=500),
                     dpr=DprConfig(model=tiny_model, pooling="mean", index_factory=factory, nprobe=NLIST))


@pytest.fixture(scope="module")
def stores(ray_local, tmp_path_factory, tiny_model):
    """v1 over the sample, v2 an update of it (1% changed, 0.5% deleted, 23 new), and a scratch run of v2's corpus."""
    tmp = tmp_path_factory.mktemp("ixb")
    rows = first_passages(2333)
    order = np.random.default_rng(1).permutation(len(rows))
    changed, deleted = {rows[i][0] for i in order[:23]}, {rows[i][0] for i in order[23:35]}
    a = write_tsv(tmp / "a.tsv", rows)
    b_rows = ([(p, t + " Revised ." if p in changed else t, ti) for p, t, ti in rows if p not in deleted]
              + [(900_000 + k, f"A new passage number {k} about rowing boats on rivers .", "New") for k in range(23)])
    b = write_tsv(tmp / "b.tsv", b_rows)
    run(_cfg(tmp / "store", a, tiny_model))
    v1 = mf.load(Store(str(tmp / "store")))
    run_update(_cfg(tmp / "store", b, tiny_model))
    run(_cfg(tmp / "scratch", b, tiny_model))
    # an update of the update: ids living only in the delta are changed again or deleted
    again, dropped = sorted(changed)[:5], [900_000 + k for k in range(3)]
    c_rows = [(p, t + " Again ." if p in again else t, ti) for p, t, ti in b_rows if p not in dropped]
    c = write_tsv(tmp / "c.tsv", c_rows + [(950_000 + k, f"Another passage {k} on river locks .", "New")
                                            for k in range(2)])
    shutil.copytree(tmp / "store", tmp / "store2")
    run_update(_cfg(tmp / "store2", c, tiny_model))
    run(_cfg(tmp / "scratch2", c, tiny_model))
    return dict(tmp=tmp, store=Store(str(tmp / "store")), scratch=Store(str(tmp / "scratch")), v1=v1,
                changed=changed, deleted=deleted, store2=Store(str(tmp / "store2")),
                scratch2=Store(str(tmp / "scratch2")))


def _vectors(store: Store, m: mf.Manifest) -> tuple[np.ndarray, np.ndarray]:
    from storage import tombstones
    dead = tombstones.load(store, m.artifacts.get("tombstones"))
    got = [read_embeddings(store.url, {}, s["path"], frozenset(dead.get(s["path"], ()))) for s in m.shards_of("dpr")]
    return np.concatenate([i for i, _ in got]), np.concatenate([v for _, v in got])


def _queries(store: Store, m: mf.Manifest, n=60) -> np.ndarray:
    _, vecs = _vectors(store, m)
    rng = np.random.default_rng(5)
    return vecs[rng.choice(len(vecs), n, replace=False)] + 0.01 * rng.standard_normal((n, vecs.shape[1]), np.float32)


def _top10(store: Store, version: int | None = None, queries: np.ndarray | None = None):
    m = mf.load(store, version)
    index = fx.load_checked(store, m.artifacts["dpr_index"])
    fx.set_nprobe(index, NLIST)
    return index.search(queries, 10)


def test_parts_cross_ray_get_as_paths_and_counts_never_bytes(stores, monkeypatch):
    import ray
    store, v1 = stores["store"], stores["v1"]
    returned = []
    real_get = ray.get

    def spy(refs, *a, **kw):
        out = real_get(refs, *a, **kw)
        returned.extend(out if isinstance(out, list) else [out])
        return out

    monkeypatch.setattr(ray, "get", spy)
    spec = IndexSpec(store.url, {}, FACTORY, 2000, NLIST, part_rows=600)
    entry = build_index_from(spec, store, "runs/test-parts", v1.shards_of("dpr"))
    monkeypatch.undo()

    def small(x):
        if isinstance(x, dict):
            return all(small(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return all(small(v) for v in x)
        return isinstance(x, (str, int, float, bool)) or x is None

    parts = [r for r in returned if isinstance(r, dict) and "/staging-" in r.get("path", "") and "ntotal" in r]
    assert len(parts) >= 3, returned  # 2,333 vectors in parts of <= 600
    assert returned and all(small(r) for r in returned), [type(r) for r in returned]
    assert entry["format"] == fx.ONDISK and entry["ntotal"] == 2333
    assert not store.walk_files("runs/test-parts/index/staging-" + entry["path"].rsplit("dpr-", 1)[-1][:8])


def test_on_disk_index_searches_like_the_in_memory_build(stores):
    store, v1 = stores["store"], stores["v1"]
    entry = v1.artifacts["dpr_index"]
    assert entry["format"] == fx.ONDISK and entry["lists"]["bytes"] > 0
    live = fx.load_checked(store, entry)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(live.base).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists)  # memory-mapped, not loaded
    ids, vecs = _vectors(store, v1)
    memory = fx.from_bytes(store.read_verified(entry["trained"]))  # today's in-memory build, same training
    memory.add_with_ids(vecs, ids)
    for nprobe in (2, NLIST):
        fx.set_nprobe(live, nprobe)
        fx.set_nprobe(memory, nprobe)
        q = _queries(store, v1)
        d1, i1 = live.search(q, 10)
        d2, i2 = memory.search(q, 10)
        assert np.array_equal(i1, i2) and np.allclose(d1, d2, atol=1e-6)
    assert entry["trained"]["vectors"] == 2333  # whole sample: fewer vectors than 39 x nlist floors allow


def test_update_adds_a_delta_and_compact_folds_it_equal_to_a_scratch_build(stores, tmp_path):
    store, scratch = stores["store"], stores["scratch"]
    v2 = mf.load(store)
    entry = v2.artifacts["dpr_index"]
    assert entry["delta"]["ntotal"] == 23 + 23  # changed + new: the work follows the change
    assert entry["removed"]["count"] == 23 + 12  # changed + deleted, hidden from the untouched base
    assert entry["lists"] == stores["v1"].artifacts["dpr_index"]["lists"]  # the base was not rewritten
    assert mf.verify(store, v2).ok
    q = _queries(scratch, mf.load(scratch))
    want_d, want_i = _top10(scratch, queries=q)
    got_d, got_i = _top10(store, queries=q)
    assert np.array_equal(got_i, want_i) and np.allclose(got_d, want_d, atol=1e-5)

    # hidden means hidden: a deleted passage's own old vector does not find it
    old_ids, old_vecs = _vectors(store, stores["v1"])
    gone = np.isin(old_ids, sorted(stores["deleted"]))
    _, hits = _top10(store, queries=old_vecs[gone])
    assert not set(hits.ravel().tolist()) & stores["deleted"]
    # the delta shares the base's quantizer: a non-exhaustive probe equals one in-memory index of v2's rows
    live = fx.load_checked(store, entry)
    memory = fx.from_bytes(store.read_verified(entry["trained"]))
    ids, vecs = _vectors(store, v2)
    memory.add_with_ids(vecs, ids)
    for idx in (live, memory):
        fx.set_nprobe(idx, 2)
    (d1, i1), (d2, i2) = live.search(q, 10), memory.search(q, 10)
    assert np.array_equal(i1, i2) and np.allclose(d1, d2, atol=1e-6)
    assert live.search(q[:2], 5000)[1].shape == (2, 5000)  # k above ntotal: padded with -1
    assert (live.search(q[:2], 5000)[1][:, -1] == -1).all()

    shutil.copytree(store.url, tmp_path / "copy")
    copy = Store(str(tmp_path / "copy"))
    compact(copy, shard_size=1000)
    folded = mf.load(copy).artifacts["dpr_index"]
    assert "delta" not in folded and "removed" not in folded and folded["ntotal"] == 2333 - 12 + 23
    assert folded["trained"] == entry["trained"]  # same quantizer, not retrained
    got_d, got_i = _top10(copy, queries=q)
    assert np.array_equal(got_i, want_i) and np.allclose(got_d, want_d, atol=1e-5)
    assert mf.verify(copy, mf.load(copy)).ok


def test_a_corrupted_part_or_merged_file_is_refused_before_faiss_reads_it(stores, tmp_path):
    store, v1 = stores["store"], stores["v1"]
    entry = v1.artifacts["dpr_index"]
    spec = IndexSpec(store.url, {}, FACTORY, 2000, NLIST)
    trained = store.read_verified(entry["trained"])
    parts = [_add_task(spec, trained, [(s["path"], frozenset())], f"runs/test-corrupt/part-{k}.faiss")
             for k, s in enumerate(v1.shards_of("dpr")[:2])]
    path = store.local_path(parts[0]["path"])
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(IntegrityError, match="part-0"):
        _merge_task(spec, entry["trained"], parts, "runs/test-corrupt/m.index", "runs/test-corrupt/m.ivfdata")

    shutil.copytree(store.url, tmp_path / "copy")
    copy = Store(str(tmp_path / "copy"))
    lists = copy.local_path(entry["lists"]["path"])
    with open(lists, "r+b") as fh:
        fh.seek(entry["lists"]["bytes"] // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(IntegrityError, match="ivfdata"):
        fx.load_checked(copy, entry)
    assert not mf.verify(copy, v1).ok


def test_object_store_copies_stream_and_are_checked(any_store, tmp_path):
    url, opts = any_store
    store = Store(url, opts)
    src = tmp_path / "big.bin"
    src.write_bytes(np.random.default_rng(0).bytes(3 << 20))
    entry = store.upload_file(str(src), "index/x.bin")
    assert entry["bytes"] == 3 << 20 and store.read_bytes("index/x.bin") == src.read_bytes()
    store.download_verified(entry, str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    with pytest.raises(IntegrityError):
        store.download_verified({**entry, "sha256": "0" * 64}, str(tmp_path / "bad.bin"))
    assert not (tmp_path / "bad.bin").exists()


def test_an_update_of_an_update_edits_the_delta_and_still_equals_a_scratch_build(stores):
    store2, scratch2 = stores["store2"], stores["scratch2"]
    v3 = mf.load(store2)
    entry = v3.artifacts["dpr_index"]
    # previous delta 46, minus 5 changed again and 3 deleted new ones, plus 5 re-encoded and 2 new
    assert entry["delta"]["ntotal"] == 46 - 8 + 7 and entry["ntotal"] == 2333 - 12 + 23 - 3 + 2
    q = _queries(scratch2, mf.load(scratch2))
    want_d, want_i = _top10(scratch2, queries=q)
    got_d, got_i = _top10(store2, queries=q)
    assert np.array_equal(got_i, want_i) and np.allclose(got_d, want_d, atol=1e-5)
    assert mf.verify(store2, v3).ok


def test_a_build_marker_is_reused_only_for_the_same_inputs(stores, caplog):
    import logging
    store, v1 = stores["store"], stores["v1"]
    spec = IndexSpec(store.url, {}, FACTORY, 2000, NLIST)
    shards = v1.shards_of("dpr")
    first = build_index_from(spec, store, "runs/test-reuse", shards)
    with caplog.at_level(logging.INFO, logger="pipeline.index.build"):
        again = build_index_from(spec, store, "runs/test-reuse", shards)
    assert again == first and "reusing" in caplog.text
    fewer = build_index_from(spec, store, "runs/test-reuse", shards, {shards[0]["path"]: np.array([1, 2, 3])})
    assert fewer["ntotal"] == first["ntotal"] - 3 and fewer["path"] != first["path"]


def test_an_index_on_an_object_store_is_searched_from_a_verified_local_copy(stores, s3_bucket, tmp_path):
    store, v1 = stores["store"], stores["v1"]
    url, opts = s3_bucket
    remote = Store(url, opts)
    entry = v1.artifacts["dpr_index"]
    for f in mf.artifact_files(entry):
        remote.write_bytes(f["path"], store.read_bytes(f["path"]))
    cache = str(tmp_path / "cache")
    q = _queries(store, v1, 10)
    want = fx.load_checked(store, entry).search(q, 10)
    got = fx.load_checked(remote, entry, cache_dir=cache).search(q, 10)
    assert np.array_equal(got[1], want[1])
    copy = [os.path.join(r, f) for r, _, fs in os.walk(cache) for f in fs if f.endswith(".ivfdata")]
    assert len(copy) == 1
    with open(copy[0], "r+b") as fh:  # a damaged cached copy is replaced, not mapped
        fh.write(b"\xff" * 64)
    assert np.array_equal(fx.load_checked(remote, entry, cache_dir=cache).search(q, 10)[1], want[1])
    remote.write_bytes(entry["lists"]["path"], b"tampered")
    shutil.rmtree(cache)
    with pytest.raises(IntegrityError):
        fx.load_checked(remote, entry, cache_dir=cache)
