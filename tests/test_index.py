"""FAISS index mechanics and the plan-index arithmetic (no Ray, no model)."""
import numpy as np
import pytest

from jobs.cli import main as cli
from pipeline.index import faiss_file as fx
from pipeline.index.plan import parse_bytes, plan_index
from storage.fs import Store, sha256_bytes
from tests.faiss_helpers import add_part, merge


def test_plan_for_wikipedia_scale_shows_flat_is_98gb_and_picks_a_compressed_ivf(capsys):
    plan = plan_index(32_000_000, 768, parse_bytes("64GB"))
    assert plan.fits and plan.factory.startswith("IVF") and plan.factory.endswith("SQ8")
    text = plan.render()
    assert "98.3 GB" in text and "776 B/vector" in text
    assert plan.total_bytes <= 64e9 and plan.train_vectors == 64 * 16384
    small = plan_index(32_000_000, 768, parse_bytes("8GB"))
    assert "PQ" in small.factory and small.fits and small.bytes_per_vector < plan.bytes_per_vector
    assert plan_index(2333, 384, parse_bytes("1GB")).factory == "Flat"
    assert not plan_index(32_000_000, 768, parse_bytes("100MB")).fits
    assert cli(["plan-index", "--vectors", "32000000", "--dim", "768", "--memory", "64GB"]) == 0
    assert "98.3 GB" in capsys.readouterr().out
    assert cli(["plan-index", "--vectors", "10", "--memory", "lots"]) == 2


def test_parse_bytes_units():
    assert parse_bytes("64GB") == 64 * 10**9 and parse_bytes("1GiB") == 2**30 and parse_bytes("123") == 123
    with pytest.raises(ValueError):
        parse_bytes("-1GB")


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "IVF8,SQ8", "HNSW16"])
def test_parts_merged_equal_one_build_with_passage_ids(factory):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 32)).astype(np.float32)
    ids = rng.choice(10**9, 600, replace=False).astype(np.int64)
    trained = fx.to_bytes(fx.train(fx.new_index(factory, 32), x))
    merged = merge(trained, [add_part(trained, ids[i:i + 200], x[i:i + 200]) for i in range(0, 600, 200)])
    single = fx.from_bytes(trained)
    single.add_with_ids(x, ids)
    assert merged.ntotal == 600
    assert np.array_equal(fx.index_ids(merged), np.sort(ids))
    fx.set_nprobe(merged, 8), fx.set_nprobe(single, 8)
    _, a = merged.search(x[:20], 5)
    _, b = single.search(x[:20], 5)
    assert (a[:, 0] == ids[:20]).mean() >= 0.9 and (a[:, 0] == b[:, 0]).mean() >= 0.9
    if factory != "HNSW16":  # removal for incremental updates (HNSW cannot remove: rebuilt instead)
        merged.remove_ids(ids[:10])
        assert merged.ntotal == 590 and not set(fx.index_ids(merged)) & set(ids[:10].tolist())


def test_index_file_is_loaded_only_when_its_checksum_matches(tmp_path):
    store = Store(str(tmp_path))
    idx = fx.new_index("Flat", 8)
    idx.add_with_ids(np.eye(8, dtype=np.float32), np.arange(8, dtype=np.int64))
    data = fx.to_bytes(idx)
    store.write_bytes("i.faiss", data)
    entry = {"path": "i.faiss", "bytes": len(data), "sha256": sha256_bytes(data)}
    assert fx.load_checked(store, entry).ntotal == 8
    store.write_bytes("i.faiss", data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(fx.IndexIntegrityError, match="checksum"):
        fx.load_checked(store, entry)
    store.remove("i.faiss")
    with pytest.raises(fx.IndexIntegrityError, match="missing"):
        fx.load_checked(store, entry)


def test_bad_factory_and_too_few_training_vectors_are_clear():
    with pytest.raises(ValueError, match="invalid index factory 'NotAnIndex'"):
        fx.new_index("NotAnIndex", 8)
    with pytest.raises(ValueError, match="multiple of the number of subquantizers"):
        fx.check_factory("IVF4,PQ7", 384, 1000, 1000)
    with pytest.raises(ValueError, match="64 lists but only 50 training vectors"):
        fx.check_factory("IVF64,Flat", 8, 50, 100_000)
    fx.check_factory("IVF64,Flat", 8, 5000, 100_000)
    with pytest.raises(ValueError, match="lists but only"):
        fx.train(fx.new_index("IVF64,Flat", 8), np.zeros((10, 8), np.float32))


def test_flat_or_hnsw_over_millions_is_refused_with_an_ivf_proposal():
    from pipeline.config import ConfigError
    for factory in ("Flat", "HNSW32"):
        with pytest.raises(ConfigError, match=r"IVF\d+.*plan-index --vectors 32000000"):
            fx.check_factory(factory, 768, 32_000_000, 100_000)
    fx.check_factory("Flat", 768, 2_000_000, 100_000)  # at the limit: built whole by one task
    fx.check_factory("IVF16384_HNSW32,SQ8", 768, 32_000_000, 100_000)


def test_training_sample_is_sized_to_the_lists_uniform_and_deterministic():
    from pipeline.index.plan import group_shards, sample_positions, train_size
    assert train_size(16384, 32_000_000, 100_000) == 39 * 16384  # FAISS' floor beats a small request
    assert train_size(1024, 32_000_000, 10_000_000) == 256 * 1024  # and its ceiling a big one
    assert train_size(1024, 50_000, 100_000) == 50_000  # never more than the corpus
    rows = [1000, 10, 5000, 0, 4000]
    picks = sample_positions(rows, 2000, seed=3)
    assert picks == sample_positions(rows, 2000, seed=3) and picks != sample_positions(rows, 2000, seed=4)
    assert [len(set(p)) for p in picks] == [len(p) for p in picks] and sum(map(len, picks)) == 2000
    assert all(0 <= x < r for p, r in zip(picks, rows) for x in p)
    share = np.array([len(p) for p in picks]) / 2000
    assert np.allclose(share, np.array(rows) / sum(rows), atol=0.04)  # proportional to the shard's rows
    assert group_shards([400, 400, 400, 2000, 10], 1000) == [[0, 1], [2], [3], [4]]
