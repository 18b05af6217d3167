import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, CorpusConfig
from pipeline.corpus.rows import CorpusError, content_hash, normalise
from pipeline.corpus.source import Corpus
from tests.conftest import first_passages, write_tsv


def _all(corpus: Corpus):
    scan = corpus.scan()
    rows = [r for t in corpus.batches(scan, 7) for r in t.to_pylist()]
    return scan, rows


def test_sample_tsv_reads_every_passage(sample_tsv):
    scan, rows = _all(Corpus(CorpusConfig(url=str(sample_tsv))))
    assert scan.n == 2333 and len(rows) == 2333
    assert scan.ids.tolist() == list(range(1, 2334))
    assert rows[0]["title"] == "Robert Boulter" and rows[0]["text"].startswith("Robert Boulter is an English")
    assert scan.counts.to_dict()["rows_read"] == 2333


def test_content_hash_covers_normalised_title_and_text():
    assert content_hash("T", "a  b\n") != content_hash("T2", "a  b\n")
    assert content_hash(normalise("T"), normalise(" a \t b ")) == content_hash("T", "a b")


def test_normalise_equals_nfc_then_regex_whitespace_on_any_text():
    """The fast normalise (str.split) must hash exactly as the regex definition stores were built with."""
    import random
    import re
    import unicodedata

    def reference(v: str) -> str:
        return re.sub(r"\s+", " ", unicodedata.normalize("NFC", v)).strip()

    rnd = random.Random(0)
    pool = [chr(c) for c in range(0x3100) if not 0xD800 <= c < 0xE000] + list(" \t\n\r\x0b\x0c\x1c\x1f\x85\xa0"
                                                                            "\u1680\u2000\u200a\u2028\u202f\u3000")
    samples = ["", " ", "e\u0301 x", "A\u00a0B", "tab\tsep\u2003x ", "\u3000full\u3000width\u3000"]
    samples += ["".join(rnd.choice(pool) for _ in range(rnd.randint(0, 16))) for _ in range(20_000)]
    for v in samples:
        assert normalise(v) == reference(v), repr(v)


def test_jsonl_parquet_and_gz_with_mapped_columns(tmp_path):
    rows = first_passages(30)
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as fh:
        for pid, text, title in rows:
            fh.write(json.dumps({"pid": pid, "body": text, "heading": title}) + "\n")
    cfg = dict(id_column="pid", text_column="body", title_column="heading")
    _, got = _all(Corpus(CorpusConfig(url=str(tmp_path / "c.jsonl.gz"), **cfg)))
    pq.write_table(pa.table({"pid": [r[0] for r in rows], "body": [r[1] for r in rows],
                             "heading": [r[2] for r in rows]}), tmp_path / "c.parquet")
    _, got2 = _all(Corpus(CorpusConfig(url=str(tmp_path / "c.parquet"), **cfg)))
    assert [r["id"] for r in got] == [r[0] for r in rows]
    assert got == got2


def test_directory_and_glob_of_parquet_files(tmp_path):
    rows = first_passages(20)
    for i in range(2):
        part = rows[i * 10:(i + 1) * 10]
        pq.write_table(pa.table({"id": [r[0] for r in part], "text": [r[1] for r in part],
                                 "title": [r[2] for r in part]}), tmp_path / f"part-{i}.parquet")
    for url in (str(tmp_path), str(tmp_path / "part-*.parquet")):
        scan, _ = _all(Corpus(CorpusConfig(url=url)))
        assert scan.ids.tolist() == [r[0] for r in rows]


def test_hf_dataset_saved_dir_and_load_dataset_path(tmp_path):
    import datasets
    rows = first_passages(12)
    ds = datasets.Dataset.from_dict({"id": [str(r[0]) for r in rows], "text": [r[1] for r in rows],
                                     "title": [r[2] for r in rows]})
    ds.save_to_disk(str(tmp_path / "saved"))
    scan, got = _all(Corpus(CorpusConfig(url=str(tmp_path / "saved"), format="hf")))
    assert scan.ids.tolist() == [r[0] for r in rows]
    # the load_dataset code path (what a hub name takes), on a local folder of data files
    (tmp_path / "raw").mkdir()
    ds.to_parquet(str(tmp_path / "raw" / "train.parquet"))
    scan2, got2 = _all(Corpus(CorpusConfig(url=str(tmp_path / "raw"), format="hf")))
    assert got2 == got


def test_missing_column_names_the_file(tmp_path):
    p = write_tsv(tmp_path / "c.tsv", [(1, "x", "t")], header="id\tbody\ttitle")
    with pytest.raises(CorpusError, match=r"c\.tsv.*missing column.*text"):
        Corpus(CorpusConfig(url=str(p))).scan()


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(CorpusError, match="bad.parquet"):
        Corpus(CorpusConfig(url=str(tmp_path / "bad.parquet"))).scan()
    with pytest.raises(CorpusError, match="not found"):
        Corpus(CorpusConfig(url=str(tmp_path / "nope.tsv"))).scan()
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(CorpusError, match="empty file"):
        Corpus(CorpusConfig(url=str(tmp_path / "empty.tsv"))).scan()
    write_tsv(tmp_path / "header_only.tsv", [])
    with pytest.raises(CorpusError, match="no usable passages"):
        Corpus(CorpusConfig(url=str(tmp_path / "header_only.tsv"))).scan()
    (tmp_path / "c.xyz").write_text("id\ttext\ttitle\n")
    with pytest.raises(CorpusError, match="--format"):
        Corpus(CorpusConfig(url=str(tmp_path / "c.xyz"))).scan()


def test_empty_and_whitespace_text_are_skipped_and_counted(tmp_path):
    p = write_tsv(tmp_path / "c.tsv", [(1, "real text", "A"), (2, "", "B"), (3, "   \u3000 ", "C"), (4, "more", "")])
    scan, rows = _all(Corpus(CorpusConfig(url=str(p))))
    assert scan.ids.tolist() == [1, 4] and scan.counts.skipped_empty == 2
    assert rows[1]["title"] == ""
    with pytest.raises(CorpusError, match="passage 2 has empty text"):
        Corpus(CorpusConfig(url=str(p), on_empty="error")).scan()


def test_invalid_utf8_is_skipped_and_counted_tsv_and_jsonl(tmp_path):
    tsv = tmp_path / "c.tsv"
    tsv.write_bytes(b"id\ttext\ttitle\n1\tgood\tT\n2\tbad \xff\xfe bytes\tT\n3\tfine\tT\n")
    scan, _ = _all(Corpus(CorpusConfig(url=str(tsv))))
    assert scan.ids.tolist() == [1, 3] and scan.counts.skipped_invalid_utf8 == 1
    with pytest.raises(CorpusError, match=r"c\.tsv:3: invalid UTF-8"):
        Corpus(CorpusConfig(url=str(tsv), on_invalid_utf8="error")).scan()
    jl = tmp_path / "c.jsonl"
    jl.write_bytes(b'{"id": 1, "text": "ok"}\n{"id": 2, "text": "\xc3\x28"}\n')
    scan, _ = _all(Corpus(CorpusConfig(url=str(jl), title_column="")))
    assert scan.ids.tolist() == [1] and scan.counts.skipped_invalid_utf8 == 1


def test_duplicate_ids_error_by_default_or_keep_first(tmp_path):
    p = write_tsv(tmp_path / "c.tsv", [(1, "a", "T"), (2, "b", "T"), (1, "a again", "T"), (3, "c", "T")])
    with pytest.raises(CorpusError, match=r"duplicate passage id.*\[1\]"):
        Corpus(CorpusConfig(url=str(p))).scan()
    scan, rows = _all(Corpus(CorpusConfig(url=str(p), on_duplicate="keep-first")))
    assert [r["id"] for r in rows] == [1, 2, 3] and rows[0]["text"] == "a"
    assert scan.counts.skipped_duplicate == 1 and scan.n == 3


def test_malformed_rows_error_with_location_or_counted_skip(tmp_path):
    p = tmp_path / "c.tsv"
    p.write_text("id\ttext\ttitle\n1\tok\tT\n2\tonly two fields\nabc\ttext\tT\n-5\tneg\tT\n3\tfine\tT\n")
    with pytest.raises(CorpusError, match=r"c\.tsv:3: 2 fields"):
        Corpus(CorpusConfig(url=str(p))).scan()
    scan, _ = _all(Corpus(CorpusConfig(url=str(p), on_malformed="skip")))
    assert scan.ids.tolist() == [1, 3] and scan.counts.skipped_malformed == 3
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"id": 1, "text": "ok"}\n{not json}\n[1, 2]\n{"id": true, "text": "x"}\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: invalid JSON"):
        Corpus(CorpusConfig(url=str(jl), title_column="")).scan()
    scan, _ = _all(Corpus(CorpusConfig(url=str(jl), title_column="", on_malformed="skip")))
    assert scan.ids.tolist() == [1] and scan.counts.skipped_malformed == 3


def test_oversized_fields_and_lines_are_malformed_not_buffered(tmp_path):
    huge = "x" * 5000
    p = write_tsv(tmp_path / "c.tsv", [(1, "ok", "T"), (2, huge, "T"), (3, "fine", "T")])
    scan, _ = _all(Corpus(CorpusConfig(url=str(p), max_field_bytes=1000, on_malformed="skip")))
    assert scan.ids.tolist() == [1, 3] and scan.counts.skipped_malformed == 1
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"id": 1, "text": "ok"}) + "\n" + json.dumps({"id": 2, "text": huge}) + "\n"
                  + json.dumps({"id": 3, "text": "ok"}) + "\n")
    scan, _ = _all(Corpus(CorpusConfig(url=str(jl), title_column="", max_field_bytes=1000, on_malformed="skip")))
    assert scan.ids.tolist() == [1, 3] and scan.counts.skipped_malformed == 1


def test_limit_and_policy_validation(sample_tsv):
    scan, rows = _all(Corpus(CorpusConfig(url=str(sample_tsv), limit=25)))
    assert scan.n == 25 and len(rows) == 25
    with pytest.raises(ConfigError, match="on_duplicate"):
        CorpusConfig(on_duplicate="whatever")


def test_batches_replay_exactly_what_scan_accepted(tmp_path):
    p = write_tsv(tmp_path / "c.tsv", [(i, f"text {i}" if i % 5 else "", "T") for i in range(1, 60)])
    corpus = Corpus(CorpusConfig(url=str(p)))
    scan = corpus.scan()
    rows = [r for t in corpus.batches(scan, 10) for r in t.to_pylist()]
    assert np.array_equal(scan.ids, [r["id"] for r in rows])
    assert scan.hashes == [r["content_hash"] for r in rows]
