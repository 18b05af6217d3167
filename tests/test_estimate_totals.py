"""Issue 30, "every number adds up": the estimate totals every file a run writes, its paper annotations compare
like with like, amounts print in units that suit them, validate counts live passages, gc says what --min-age
holds back, and an all-absent lookup leaves the output file alone."""
import json
import os

import pytest

from jobs.cli import main as cli
from tests.conftest import edited_corpus, first_passages, write_tsv


def _store_bytes(root) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


# ---------------------------------------------------------------- 1. every component, on the real sample store

@pytest.fixture(scope="module")
def real_sample_store(tmp_path_factory, sample_tsv):
    """The README's first command: the whole sample, MiniLM lower 3 of 6, 384 -> 96 int8, DPR + a Flat index."""
    store = tmp_path_factory.mktemp("sample-store") / "store"
    assert cli(["run", "--store", str(store), "--corpus", str(sample_tsv), "--layers", "3", "--dims", "96",
                "--dpr-model", "bundled:all-minilm-l6-v2"]) == 0
    return store


@pytest.mark.ray
@pytest.mark.real_model
def test_estimate_totals_every_file_of_the_sample_store_within_two_percent(real_sample_store, sample_tsv, capsys):
    """The estimate with the run's settings, fed only the corpus text (tokens/passage and the zstd ratio measured
    on a sample of it), against the bytes of every file under the store."""
    from storage import manifest as mf
    from storage.fs import Store

    capsys.readouterr()
    assert cli(["estimate", "--json", "--passages", "2333", "--sample-corpus", str(sample_tsv), "--sample-size", "2333",
                "--hidden", "384", "--dims", "96", "--layers", "3", "--dpr-dim", "384", "--index-factory", "Flat"]) == 0
    body = json.loads(capsys.readouterr().out)
    est, comps = body["total_bytes"], body["components_bytes"]
    actual = _store_bytes(real_sample_store)
    assert abs(est - actual) / actual < 0.02, (est, actual, comps)
    # component by component, against what the manifest says each holds
    sizes = mf.sizes(mf.load(Store(str(real_sample_store))))
    assert comps["dpr_embeddings"] == pytest.approx(sizes.dpr, rel=0.02)
    assert comps["dpr_index"] == pytest.approx(sizes.index, rel=0.001)
    assert comps["compressor"] == pytest.approx(sizes.other, rel=0.01)
    assert body["states_bytes"] == pytest.approx(sizes.states, rel=0.02)
    assert 0 < comps["manifests"] < 50_000


def test_index_bytes_is_the_size_faiss_writes():
    """The pure model of a factory's bytes against real FAISS files, built as the run builds them."""
    import tempfile

    import faiss
    import numpy as np

    from pipeline.index import faiss_file as fx
    from storage.estimate import index_bytes

    n, d = 3000, 32
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    ids = np.arange(n, dtype=np.int64) * 3 + 1
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # small trainings: threads only contend on a shared machine
    with tempfile.TemporaryDirectory() as tmp:
        for factory in ("Flat", "HNSW16", "HNSW8,SQ8", "IVF16,Flat", "IVF16,PQ8x4", "IVF16,SQ8", "PCA16,IVF16,Flat"):
            index = fx.train(fx.new_index(factory, d), x)
            if fx.is_ivf(index):  # as the run stores it: a header and the merged on-disk lists
                trained, part = os.path.join(tmp, "t.index"), os.path.join(tmp, "p.index")
                faiss.write_index(index, trained)
                filled = faiss.read_index(trained)
                filled.add_with_ids(x, ids)
                faiss.write_index(filled, part)
                lists, header = os.path.join(tmp, f"{factory}.ivfdata"), os.path.join(tmp, f"{factory}.index")
                faiss.write_index(fx.merge_ondisk(faiss.read_index(trained), [part], lists), header)
                written = os.path.getsize(header) + os.path.getsize(lists)
            else:
                index.add_with_ids(x, ids)
                path = os.path.join(tmp, "i.faiss")
                faiss.write_index(index, path)
                written = os.path.getsize(path)
            assert index_bytes(factory, n, d) == pytest.approx(written, rel=0.01), factory
    faiss.omp_set_num_threads(threads)
    with pytest.raises(ValueError):
        index_bytes("LSH", n, d)


def test_estimate_prices_the_index_by_factory_and_refuses_an_unknown_one(capsys):
    from storage.estimate import index_bytes

    assert index_bytes("Flat", 1000, 384) == pytest.approx(1000 * (384 * 4 + 8), abs=200)
    assert index_bytes("IVF1024,PQ32", 10**6, 768) == pytest.approx(
        10**6 * (32 + 8) + 1024 * 768 * 4 + 256 * 768 * 4, rel=0.001)
    hnsw, flat = index_bytes("HNSW32", 10**5, 128), index_bytes("Flat", 10**5, 128)
    assert hnsw - flat == pytest.approx(10**5 * (2 * 32 * 4 + 12 + 4 * 32 / 31), rel=0.001)  # the links
    assert cli(["estimate", "--json", "--passages", "1000", "--dpr-dim", "384", "--index-factory", "IVF16,PQ8"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["components_bytes"]["dpr_index"] == pytest.approx(index_bytes("IVF16,PQ8", 1000, 384))
    assert cli(["estimate", "--json", "--passages", "1000", "--index-factory", "none"]) == 0
    assert "dpr_index" not in json.loads(capsys.readouterr().out)["components_bytes"]
    assert cli(["estimate", "--passages", "1000", "--index-factory", "LSH"]) == 2


# ---------------------------------------------------------------- 2. the paper's figures: like with like

def test_small_corpus_estimate_makes_no_paper_claim(capsys):
    assert cli(["estimate", "--passages", "2333", "--tokens-per-passage", "120"]) == 0
    out = capsys.readouterr().out
    assert "matches" not in out and "paper" not in out.lower()
    assert cli(["estimate", "--json", "--passages", "2333", "--tokens-per-passage", "120"]) == 0
    assert json.loads(capsys.readouterr().out)["paper_check"] == []


def test_paper_verdicts_are_computed_from_the_bytes():
    from storage.estimate import TiB, paper_figures, paper_verdict

    rows = {c.label: c for c in paper_figures()}
    assert "matches in TiB (3.35)" in rows["768 dims x 1 B"].verdict
    assert "does not match" in rows["768 dims x 2 B (fp16)"].verdict
    assert "matches in GiB (858.3)" in rows["192 dims x 1 B (int8)"].verdict
    assert paper_verdict(3.4 * 1e12, "3.4", "TB").startswith("<- matches in TB")
    assert "does not match" in paper_verdict(0.1 * TiB, "3.4", "TB")


# ---------------------------------------------------------------- 3. units that suit the amount

def test_sizes_and_prices_print_in_units_that_suit_them():
    from storage.estimate import fmt_size, fmt_usd

    assert fmt_size(0) == "0 B" and fmt_size(999) == "999 B"
    assert fmt_size(449_800) == "449.80 KB" and fmt_size(31_644_801) == "31.64 MB"
    assert fmt_size(823.5e9) == "823.50 GB" and fmt_size(3.69e12) == "3.69 TB"
    assert fmt_size(2**30, binary=True) == "1.00 GiB" and fmt_size(449_800, binary=True) == "439.26 KiB"
    assert fmt_usd(0) == "$0" and fmt_usd(22.51) == "$22.51" and fmt_usd(20_000) == "$20,000"
    assert fmt_usd(0.00073) == "$0.0007" and fmt_usd(0.0072) == "$0.0072" and fmt_usd(3e-6) == "< $0.0001"


def test_small_corpus_estimate_prints_kb_mb_and_cents(capsys):
    assert cli(["estimate", "--passages", "2333", "--tokens-per-passage", "120", "--hidden", "384", "--dims", "96",
                "--dpr-dim", "384"]) == 0
    out = capsys.readouterr().out
    assert "0.0 GB" not in out and "$0/month" not in out
    assert " MB " in out and " KB " in out and "$0.0007/month" in out


def test_job_plan_and_store_sizes_use_the_same_units():
    from pipeline.flows.job_cost import _fmt
    from storage.manifest import Sizes

    assert _fmt(449_800) == "449.80 KB"
    s = Sizes(states=25_525_037, states_shards=3, dpr=0, dpr_shards=0, index=0, other=449_800)
    assert s.render() == "25.97 MB in all: states 25.53 MB in 3 shards, other 449.80 KB"


# ---------------------------------------------------------------- 4-6. validate, gc, lookup on an updated store

@pytest.fixture(scope="module")
def updated_store(tmp_path_factory, tiny_model):
    """200 passages (tiny model), then an update that changes 7, deletes 5 and adds 3: 12 rows tombstoned."""
    tmp = tmp_path_factory.mktemp("updated")
    rows = first_passages(200)
    first = write_tsv(tmp / "a.tsv", rows)
    store = tmp / "store"
    assert cli(["run", "--store", str(store), "--corpus", str(first), "--model", tiny_model, "--layers", "1",
                "--dims", "8", "--fit-sample", "64"]) == 0
    ids = [r[0] for r in rows]
    second = edited_corpus(tmp / "b.tsv", rows, changed=set(ids[10:17]), deleted=set(ids[50:55]), new=3,
                           first_id=900_000, topic="tide pools")
    assert cli(["update", "--store", str(store), "--corpus", str(second)]) == 0
    return store


@pytest.mark.ray
def test_validate_reports_live_passages_and_extrapolates_every_component(updated_store, capsys):
    capsys.readouterr()
    cli(["validate", "--store", str(updated_store)])  # its tolerance verdict is beside the point here
    out = capsys.readouterr().out
    assert "198 live passages (210 stored, 12 tombstoned)" in out, out
    assert "every component" in out and "of which the states shards" in out
    cli(["validate", "--store", str(updated_store), "--json"])
    body = json.loads(capsys.readouterr().out)
    assert (body["live_passages"], body["stored_passages"], body["tombstoned_passages"]) == (198, 210, 12)
    assert body["target_total_bytes"] > body["target_bytes"]  # the codec file at least comes on top of the states


@pytest.mark.ray
def test_gc_dry_run_reports_files_held_back_by_min_age(updated_store, capsys):
    orphan = updated_store / "runs" / "interrupted0000" / "states" / "part-00000.parquet"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x" * 4321)
    try:
        capsys.readouterr()
        assert cli(["gc", "--store", str(updated_store), "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "would remove 0 file(s)" in out and "held back by --min-age 3600 s" in out
        assert cli(["gc", "--store", str(updated_store), "--dry-run", "--json"]) == 0
        body = json.loads(capsys.readouterr().out)
        assert body["removed"] == [] and "runs/interrupted0000/states/part-00000.parquet" in body["held_back"]
        assert body["bytes_held_back"] >= 4321
        assert f"{len(body['held_back'])} file(s)" in out
        assert cli(["gc", "--store", str(updated_store)]) == 0  # a real run says the same and removes nothing
        assert "held back by --min-age" in capsys.readouterr().out and orphan.exists()
    finally:
        orphan.unlink()


@pytest.mark.ray
def test_lookup_of_only_absent_ids_leaves_the_output_file_alone(updated_store, tmp_path):
    out = tmp_path / "kept.npz"
    out.write_bytes(b"an earlier lookup's result")
    os.utime(out, (1_000_000_000, 1_000_000_000))
    before = (out.read_bytes(), out.stat().st_mtime_ns)
    assert cli(["lookup", "--store", str(updated_store), "--ids", "888888,888889", "--out", str(out)]) == 3
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before
    fresh = tmp_path / "none.npz"
    assert cli(["lookup", "--store", str(updated_store), "--ids", "888888", "--out", str(fresh)]) == 3
    assert not fresh.exists()
    # some present: written (atomically), exit 3 for the rest, as before
    assert cli(["lookup", "--store", str(updated_store), "--ids", "1,888888", "--out", str(out)]) == 3
    import numpy as np
    assert sorted(np.load(out).files) == ["states_1", "token_ids_1"]
