"""Entry points on bad input: clear errors and exit codes, and nothing written before validation."""
import os

import pytest
import yaml

from jobs import encode as encode_job
from jobs.cli import build_parser, main as cli
from pipeline.config import ConfigError, run_config_from_dict
from tests.conftest import write_tsv


def _files(path):
    return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs] if os.path.exists(path) else []


@pytest.mark.parametrize("rows,extra,msg", [
    ([(1, "a", "T"), (1, "b", "T")], [], "duplicate passage id"),
    ([(1, "a", "T"), ("x1", "b", "T")], [], "not a non-negative integer"),
    ([], [], "no usable passages"),
    ([(1, "a", "T")], ["--text-column", "body"], "missing column"),
])
def test_run_rejects_bad_corpora_before_writing_anything(tmp_path, caplog, rows, extra, msg):
    corpus = write_tsv(tmp_path / "c.tsv", rows)
    store = tmp_path / "store"
    rc = cli(["run", "--store", str(store), "--corpus", str(corpus), "--layers", "1", "--dims", "4", *extra])
    assert rc == 2
    assert msg in caplog.text
    assert _files(store) == []  # validation precedes every write


def test_run_rejects_bad_flags_and_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--store", "x", "--quantize", "int3"])
    assert "invalid choice" in capsys.readouterr().err
    assert cli(["run", "--store", str(tmp_path), "--storage-options", "{bad json"]) == 2
    assert cli(["run", "--store", str(tmp_path), "--storage-options", "[1]"]) == 2
    assert cli(["run", "--store", str(tmp_path), "--bits", "12"]) == 2
    assert cli(["run", "--store", str(tmp_path), "--layers", "0"]) == 2


def test_lookup_and_verify_on_an_empty_store_say_so(tmp_path, caplog):
    assert cli(["lookup", "--store", str(tmp_path), "--ids", "1", "--out", str(tmp_path / "o.npz")]) == 1
    assert "no committed version" in caplog.text
    assert cli(["verify", "--store", str(tmp_path)]) == 1
    assert not (tmp_path / "o.npz").exists()


def test_fidelity_refuses_a_non_safetensors_compressor(tmp_path, caplog):
    bad = tmp_path / "c.safetensors"
    bad.write_bytes(b"\x80\x04\x95pickle")
    assert cli(["fidelity", "--compressor", str(bad)]) == 2
    assert "not a safetensors file" in caplog.text


def test_job_config_names_the_bad_key(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"model\.layerz: unknown key"):
        run_config_from_dict({"store": "x", "model": {"layerz": 3}})
    with pytest.raises(ConfigError, match=r"compression\.dims: expected int"):
        run_config_from_dict({"store": "x", "compression": {"dims": "96"}})
    with pytest.raises(ConfigError, match="store: required"):
        run_config_from_dict({"model": {}})
    with pytest.raises(ConfigError, match=r"compression\.quantize="):
        run_config_from_dict({"store": "x", "compression": {"quantize": "fp4"}})
    cfg = run_config_from_dict(yaml.safe_load(open("jobs/examples/encode.yaml")))
    assert cfg.model.layers == 3 and cfg.compression.dims == 96
    job = tmp_path / "job.yaml"
    job.write_text("store: x\nexecution: {shard_sise: 10}\n")
    assert encode_job.main(["--config", str(job)]) == 2
    job.write_text("store: [unclosed\n")
    assert encode_job.main(["--config", str(job)]) == 2


def test_encode_job_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys, sample_tsv):
    import json
    job = tmp_path / "job.yaml"
    store = tmp_path / "store"
    job.write_text(yaml.safe_dump({"store": str(store), "corpus": {"url": str(sample_tsv)},
                                   "execution": {"shard_size": 500}}))
    assert encode_job.main(["--config", str(job), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["passages"] == 2333 and plan["shards"] == 5
    assert _files(store) == []


def test_storage_and_update_jobs_check_their_keys(tmp_path, capsys):
    from jobs import storage as storage_job
    from jobs import update as update_job
    job = tmp_path / "s.yaml"
    job.write_text("passages: 32000000\ntokens_per_passage: 150\ndims: 192\nbits: 8\nprices: {mine: 0.01}\n")
    assert storage_job.main(["--config", str(job)]) == 0
    out = capsys.readouterr().out
    assert "858.3 GiB" in out and "mine" in out
    job.write_text("passages: lots\n")
    assert storage_job.main(["--config", str(job)]) == 2
    job.write_text("pasages: 1\n")
    assert storage_job.main(["--config", str(job)]) == 2
    up = tmp_path / "u.yaml"
    up.write_text("store: x\n")
    assert update_job.main(["--config", str(up)]) == 2  # corpus: required
    up.write_text(f"store: {tmp_path / 'nostore'}\ncorpus: c.tsv\nrebuild_fraction: 0.1\n")
    assert update_job.main(["--config", str(up), "--dry-run"]) == 1  # no version to update yet: said clearly
