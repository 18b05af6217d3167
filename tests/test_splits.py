"""The split plan (pure) and worker-side split reading: byte ranges, row ranges, change detection."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import CorpusConfig
from pipeline.corpus.rows import CorpusChanged, CorpusError
from pipeline.corpus.source import Corpus
from pipeline.corpus.fit_sample import merge_fit_samples
from pipeline.corpus.splits import (SourceFile, Split, auto_rows_per_split, plan_digest, plan_splits, sample_key,
                             sample_splits)
from tests.conftest import first_passages, write_tsv


# ---------------------------------------------------------------- pure planning, no I/O

def test_plan_cuts_text_by_bytes_parquet_by_rows_and_keeps_compressed_files_whole():
    files = [SourceFile("a.tsv", 1000, "v1", "tsv"),
             SourceFile("b.parquet", 5000, "v2", "parquet", rows=250, row_groups=(60, 60, 60, 60, 10)),
             SourceFile("c.tsv.gz", 800, "v3", "tsv", splittable=False),
             SourceFile("d.tsv", 1000, "v4", "tsv", est_rows=500)]
    splits = plan_splits(files, rows_per_split=100, bytes_per_row=4.0)  # a.tsv: 250 rows -> 3 splits
    a = [s for s in splits if s.path == "a.tsv"]
    assert [(s.start, s.end, s.unit) for s in a] == [(0, 333, "bytes"), (333, 666, "bytes"), (666, 1000, "bytes")]
    b = [s for s in splits if s.path == "b.parquet"]  # on row-group boundaries, each >= 100 rows but the last
    assert [(s.start, s.end, s.unit) for s in b] == [(0, 120, "rows"), (120, 240, "rows"), (240, 250, "rows")]
    d = [s for s in splits if s.path == "d.tsv"]  # its own row estimate wins over the fallback
    assert len(d) == 5
    c = [s for s in splits if s.path == "c.tsv.gz"]
    assert [(s.start, s.end) for s in c] == [(0, -1)]
    assert [s.index for s in splits] == list(range(len(splits)))


def test_row_group_cuts_keep_groups_whole_unless_one_is_huge():
    from pipeline.corpus.splits import _row_group_bounds
    assert _row_group_bounds((64,) * 8, 120) == [0, 128, 256, 384, 512]
    assert _row_group_bounds((50, 1000, 50), 100) == [0, 50, 150, 250, 350, 450, 550, 650, 750, 850, 950, 1050, 1100]
    assert _row_group_bounds((10,), 100) == [0, 10]


def test_plan_is_deterministic_and_its_digest_follows_versions_and_policy():
    files = [SourceFile(f"f{i}.jsonl", 10_000 + i, f"v{i}", "jsonl") for i in range(5)]
    one, two = plan_splits(files, 50, 20.0), plan_splits(list(files), 50, 20.0)
    assert one == two and plan_digest(one, {"p": 1}) == plan_digest(two, {"p": 1})
    changed = [*files[:2], SourceFile("f2.jsonl", 10_002, "v2-new", "jsonl"), *files[3:]]
    assert plan_digest(plan_splits(changed, 50, 20.0), {"p": 1}) != plan_digest(one, {"p": 1})
    assert plan_digest(one, {"p": 2}) != plan_digest(one, {"p": 1})


def test_auto_split_size_and_sample_splits_are_bounded():
    assert auto_rows_per_split(2_333) == 1_000
    assert auto_rows_per_split(48_000) == 3_000
    assert auto_rows_per_split(32_000_000) == 10_000  # 3,200 shards at 32M
    assert sample_splits(5) == [0, 1, 2, 3, 4]
    picks = sample_splits(3_200)
    assert len(picks) == 8 and picks == sorted(set(picks)) and picks[0] > 0 and picks[-1] < 3_200


def test_fit_sample_merge_does_not_depend_on_the_order_parts_arrive():
    rng = np.random.default_rng(0)
    parts = []
    for g in range(4):
        ids = rng.choice(10_000, 30, replace=False) + g * 10_000
        key = sample_key(ids)
        parts.append({"key": key, "id": ids.tolist(), "title": [f"t{i}" for i in ids], "text": [f"x{i}" for i in ids]})
    a = merge_fit_samples(parts, 25)
    b = merge_fit_samples(parts[::-1], 25)
    assert a == b and len(a[0]) == 25
    all_ids = np.concatenate([p["id"] for p in parts])
    assert sorted(a[0]) == sorted(all_ids[np.argsort(sample_key(all_ids))[:25]].tolist())


# ---------------------------------------------------------------- worker-side reads

def _rows_of(corpus: Corpus, splits) -> list[tuple]:
    out = []
    for s in splits:
        t = corpus.read_split(s).table
        out += list(zip(t.column("id").to_pylist(), t.column("title").to_pylist(), t.column("text").to_pylist()))
    return out



@pytest.mark.parametrize("k", [1, 2, 7])
def test_byte_range_splits_of_one_tsv_give_exactly_the_unsplit_rows(sample_tsv, k):
    corpus = Corpus(CorpusConfig(url=str(sample_tsv)))
    f = corpus.plan(None).files[0]
    serial = [(pid, title, text) for t in corpus.batches(corpus.scan(), 4096)
              for pid, title, text in zip(t.column("id").to_pylist(), t.column("title").to_pylist(),
                                          t.column("text").to_pylist())]
    bounds = [f.size * i // k for i in range(k + 1)]
    splits = [Split(i, f.path, f.version, "tsv", "bytes", a, b) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    assert _rows_of(corpus, splits) == serial
    assert len(serial) == 2333


@pytest.mark.parametrize("k", [1, 2, 7])
def test_byte_range_splits_of_jsonl_with_bad_lines_count_every_row_once(tmp_path, k):
    lines = []
    for i in range(1, 60):
        if i % 13 == 0:
            lines.append("{not json")
        elif i % 17 == 0:
            lines.append("")
        else:
            lines.append(f'{{"id": {i}, "title": "T{i}", "text": "passage {i} ' + "word " * (i % 9) + '"}')
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(lines) + "\n")
    corpus = Corpus(CorpusConfig(url=str(p), on_malformed="skip"))
    f = corpus.plan(None).files[0]
    bounds = [f.size * i // k for i in range(k + 1)]
    splits = [Split(i, f.path, f.version, "jsonl", "bytes", a, b) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    reads = [corpus.read_split(s) for s in splits]
    ids = [i for r in reads for i in r.table.column("id").to_pylist()]
    assert ids == [i for i in range(1, 60) if i % 13 and i % 17]
    assert sum(r.counts.skipped_malformed for r in reads) == len([i for i in range(1, 60) if i % 13 == 0])
    assert sum(r.counts.rows_read for r in reads) == 59 - len([i for i in range(1, 60) if i % 17 == 0 and i % 13])


def test_malformed_row_in_a_later_split_names_its_absolute_line(tmp_path):
    rows = [(i, f"text {i}", f"T{i}") for i in range(1, 200)]
    p = write_tsv(tmp_path / "c.tsv", rows)
    data = p.read_bytes().replace(b"150\ttext 150\tT150\n", b"150\ttext 150\n")
    p.write_bytes(data)
    corpus = Corpus(CorpusConfig(url=str(p)))
    f = corpus.plan(None).files[0]
    later = Split(1, f.path, f.version, "tsv", "bytes", f.size // 2, -1)
    with pytest.raises(CorpusError, match=r"c\.tsv:151: 2 fields, header has 3"):
        corpus.read_split(later)


def test_parquet_row_range_splits_cross_row_groups(tmp_path):
    ids = np.arange(1, 501)
    table = pa.table({"id": ids, "title": [f"T{i}" for i in ids], "text": [f"passage {i}" for i in ids]})
    p = tmp_path / "c.parquet"
    pq.write_table(table, p, row_group_size=64)
    corpus = Corpus(CorpusConfig(url=str(p)))
    plan = corpus.plan(120)
    assert plan.files[0].rows == 500 and plan.files[0].row_groups == (64,) * 7 + (52,)
    assert [(s.start, s.end) for s in plan.splits] == [(0, 128), (128, 256), (256, 384), (384, 500)]
    got = [i for s in plan.splits for i in corpus.read_split(s).table.column("id").to_pylist()]
    assert got == ids.tolist()


def test_duplicates_inside_one_split_follow_the_policy(tmp_path):
    p = write_tsv(tmp_path / "c.tsv", [(1, "a", "A"), (2, "b", "B"), (1, "c", "C")])
    corpus = Corpus(CorpusConfig(url=str(p)))
    split = corpus.plan(None).splits[0]
    with pytest.raises(CorpusError, match=r"duplicate passage id.*\[1\]"):
        corpus.read_split(split)
    read = Corpus(CorpusConfig(url=str(p), on_duplicate="keep-first")).read_split(split)
    assert read.table.column("id").to_pylist() == [1, 2] and read.counts.skipped_duplicate == 1
    assert read.table.column("text").to_pylist() == ["a", "b"]


def test_a_corpus_file_changed_after_planning_is_refused_naming_it(tmp_path):
    p = write_tsv(tmp_path / "c.tsv", [(i, f"text {i}", "T") for i in range(1, 50)])
    corpus = Corpus(CorpusConfig(url=str(p)))
    split = corpus.plan(None).splits[0]
    with open(p, "a") as fh:
        fh.write("50\ttext 50\tT\n")
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(CorpusChanged, match=r"c\.tsv changed after the run was planned"):
        corpus.read_split(split)


def test_limit_plans_exact_splits_over_the_prefix_only(sample_tsv):
    corpus = Corpus(CorpusConfig(url=str(sample_tsv), limit=300))
    plan = corpus.plan(50)
    counts = [corpus.read_split(s).table.num_rows for s in plan.splits]
    assert counts == [50] * 6
    got = [i for s in plan.splits for i in corpus.read_split(s).table.column("id").to_pylist()]
    assert got == [r[0] for r in first_passages(300)]


@pytest.mark.parametrize("ext", ["gz", "zst", "bz2"])
def test_compressed_text_is_read_whole_and_its_rows_estimated_through_the_codec(tmp_path, ext):
    import bz2
    import gzip

    import zstandard
    rows = [(i, f"passage number {i} " + "word " * (i % 7), f"T{i}") for i in range(1, 3001)]
    plain = write_tsv(tmp_path / "c.tsv", rows).read_bytes()
    pack = {"gz": gzip.compress, "zst": zstandard.ZstdCompressor().compress, "bz2": bz2.compress}[ext]
    p = tmp_path / f"c.tsv.{ext}"
    p.write_bytes(pack(plain))
    corpus = Corpus(CorpusConfig(url=str(p)))
    plan = corpus.plan(None)
    assert len(plan.splits) == 1 and abs(plan.estimated_rows - 3000) <= 30
    assert corpus.read_split(plan.splits[0]).table.column("id").to_pylist() == list(range(1, 3001))
