"""Entry points on bad input: clear errors and exit codes, and nothing written before validation."""
import os

import pytest
import yaml

from jobs import encode as encode_job
from jobs.cli import build_parser
from jobs.cli import main as cli
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
    for flag, value in (("--task-cpus", "-1"), ("--encoder-cpus", "0"), ("--torch-threads", "0"),
                        ("--num-encoders", "0"), ("--max-field-bytes", "0"), ("--max-length", "0")):
        assert cli(["run", "--store", str(tmp_path), flag, value]) == 2, flag
    for flag in ("--train-sample", "--nprobe"):
        assert cli(["run", "--store", str(tmp_path), "--dpr-model", "m", flag, "0"]) == 2, flag


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
    body = yaml.safe_load(open("jobs/examples/encode.yaml"))
    body.pop("plan")  # the job's own section, read by jobs.encode
    cfg = run_config_from_dict(body)
    assert cfg.model.layers == 3 and cfg.compression.dims == 96
    job = tmp_path / "job.yaml"
    job.write_text("store: x\nexecution: {shard_sise: 10}\n")
    assert encode_job.main(["--config", str(job)]) == 2
    job.write_text("store: [unclosed\n")
    assert encode_job.main(["--config", str(job)]) == 2


def test_encode_job_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys, caplog, sample_tsv):
    import json
    job = tmp_path / "job.yaml"
    store = tmp_path / "store"
    job.write_text(yaml.safe_dump({"store": str(store), "corpus": {"url": str(sample_tsv)},
                                   "model": {"layers": 3}, "compression": {"dims": 96},
                                   "execution": {"shard_size": 500},
                                   "plan": {"tokens_per_second": 40000, "price_per_gpu_hour": 2.0}}))
    assert encode_job.main(["--config", str(job), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["passages"] == 2333 and plan["shards"] == 5
    # tokens come from the real tokenizer on a 2,000-passage sample: the full run wrote 278,965
    assert abs(plan["tokens"] - 278_965) / 278_965 < 0.02
    assert plan["gpu_hours"] == pytest.approx(plan["tokens"] / 40000 / 3600)
    assert plan["gpu_cost_usd"] == pytest.approx(2.0 * plan["gpu_hours"])
    assert 20e6 < plan["storage_bytes"] < 40e6  # 25.5 MB written by the real run (README)
    assert _files(store) == []
    job.write_text(yaml.safe_dump({"store": str(store), "plan": {"tokens_per_sec": 1}}))
    assert encode_job.main(["--config", str(job), "--dry-run"]) == 2
    assert "plan.tokens_per_sec: unknown key" in caplog.text


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
    up.write_text(f"store: {tmp_path / 'nostore'}\ncorpus: c.tsv\nformat: xml\n")
    assert update_job.main(["--config", str(up)]) == 2  # the CLI's allowed values, the same error


def _request(argv, keys):
    from jobs.cli.options import request
    return request(build_parser().parse_args(argv), keys)


def test_yaml_jobs_and_flags_give_the_same_configs(tmp_path):
    """One loader: a job file's mapping and the flags' mapping meet in the same pipeline function."""
    from jobs import index as index_job
    from jobs import jobfile
    from jobs import storage as storage_job
    from jobs import update as update_job
    from pipeline.job_requests import INDEX_SCHEMA, UPDATE_SCHEMA, EstimateRequest, inherit_config, reindex_config
    from pipeline.job_requests import ESTIMATE_KEYS

    job = tmp_path / "u.yaml"
    job.write_text("store: s\ncorpus: c.tsv\ncorpus_storage_options: {anon: true}\nshard_size: 50\n"
                   "title_column: ''\nrebuild_fraction: 0.5\n")
    from_yaml = jobfile.load(str(job), update_job.SCHEMA, update_job.UPDATE_REQUIRED)
    from_flags = _request(["update", "--store", "s", "--corpus", "c.tsv", "--corpus-storage-options",
                           '{"anon": true}', "--shard-size", "50", "--title-column", "", "--rebuild-fraction", "0.5"],
                          UPDATE_SCHEMA)
    assert from_yaml == from_flags
    parent = {"corpus": {"url": "old.tsv", "limit": 100}, "model": {"layers": 2}, "compression": {"dims": 8},
              "execution": {}}
    cfg = inherit_config(parent, 1, from_yaml)
    assert cfg == inherit_config(parent, 1, from_flags)
    assert (cfg.corpus.url, cfg.corpus.limit, cfg.corpus.title_column, cfg.execution.shard_size,
            cfg.model.layers, cfg.compression.dims, cfg.corpus_storage_options) == (
        "c.tsv", None, "", 50, 2, 8, {"anon": True})  # --limit is never inherited

    job.write_text("store: s\nfactory: IVF4,Flat\nnprobe: 4\n")
    assert reindex_config(jobfile.load(str(job), index_job.SCHEMA, index_job.REQUIRED)) == reindex_config(
        _request(["index", "--store", "s", "--factory", "IVF4,Flat", "--nprobe", "4"], INDEX_SCHEMA))

    job.write_text("passages: 1000\ndims: 96\nbits: 5.25\nprices: {mine: 0.5}\n")
    body = {k: v for k, v in jobfile.load(str(job), storage_job.SCHEMA, ()).items()}
    flags = _request(["estimate", "--passages", "1000", "--dims", "96", "--bits", "5.25"], ESTIMATE_KEYS)
    assert EstimateRequest.from_mapping(body) == EstimateRequest.from_mapping({**flags, "prices": {"mine": 0.5}})


def test_allowed_values_are_listed_once():
    from pipeline.schema import CHOICES

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    devices = [a.choices for p in sub.choices.values() for a in p._actions if "--device" in a.option_strings]
    assert len(devices) == 6 and all(tuple(c) == CHOICES["device"] for c in devices)
    with pytest.raises(ConfigError, match="device='gpu' is not one of auto, cpu, cuda"):
        run_config_from_dict({"store": "s", "execution": {"device": "gpu"}})
    from pipeline.serve.qa_reader import RuntimeConfig
    with pytest.raises(ConfigError, match="device='gpu'"):
        RuntimeConfig(device="gpu")


def test_a_bad_question_or_k_is_one_error_from_the_cli_and_the_api(tmp_path, caplog):
    from pipeline.serve.checks import MAX_K, MAX_SEARCH_K, check_k, check_question
    from storage.errors import UsageError

    for argv, msg in ((["search", "q", "-k", "0"], "k=0: pass 1..10000"), (["search", "q", "-k", "10001"], "k=10001"),
                      (["search", "  "], "empty question"), (["answer", "q", "-k", "101"], "k=101: pass 1..100"),
                      (["answer", "x" * 10_001], "longer than 10,000")):
        caplog.clear()
        assert cli([argv[0], "--store", str(tmp_path / "none"), *argv[1:]]) == 2, argv
        assert msg in caplog.text, (argv, caplog.text)
        assert not (tmp_path / "none").exists()
    for bad in (0, MAX_K + 1, True, 2.5, "3"):
        with pytest.raises(UsageError, match="pass 1..100"):
            check_k(bad)
    assert check_k(MAX_SEARCH_K, MAX_SEARCH_K) == MAX_SEARCH_K
    with pytest.raises(ValueError, match="empty question"):  # a ConfigError is still a ValueError to old callers
        check_question(" ")
    assert check_question("  who?  ") == "who?"


def test_jobplan_arithmetic():
    from pipeline.flows.job_cost import (
        GpuAssumptions,
        ModelGeometry,
        encode_plan,
        flops_per_token,
    )
    bert5 = ModelGeometry(hidden=768, intermediate=3072, layers=5)
    per_layer_macs = 4 * 768 * 768 + 2 * 768 * 3072 + 2 * 150 * 768
    assert flops_per_token(bert5, 150) == 2 * 5 * per_layer_macs
    gpu = GpuAssumptions(peak_tflops=100, utilisation=0.5)
    plan = encode_plan("encode", 32_000_000, 1000, 150, bert5, gpu, 1e12, "x")
    assert plan.shards == 32_000
    assert plan.gpu_hours == pytest.approx(32e6 * 150 * flops_per_token(bert5, 150) / 50e12 / 3600)
    measured = encode_plan("encode", 1000, 300, 100, bert5, GpuAssumptions(tokens_per_second=1e4), 0, "x")
    assert measured.shards == 4 and measured.gpu_hours == pytest.approx(1000 * 100 / 1e4 / 3600)
    with pytest.raises(ConfigError, match="utilisation"):
        GpuAssumptions(utilisation=1.5)
    with pytest.raises(ConfigError, match="tokens_per_second"):
        GpuAssumptions(tokens_per_second=0)


def test_storage_job_dry_run_plans_wikipedia_from_assumptions(capsys):
    from jobs import storage as storage_job
    assert storage_job.main(["--config", "jobs/examples/storage.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "passages:  32,000,000" in out and "shards:    32,000" in out
    assert "GPU-hours: ~3.12" in out  # 4.8e9 tokens x 73 MFLOP / (125 TFLOPS x 25%), BERT-base lower 5
    # every component a run writes: states (zstd ratio 1.147, ids 2.31 B/token: a real 768-wide store's),
    # DPR embeddings and the run's default (Flat) index over them; 878.16 GB before the index was priced
    assert "storage:   ~973.37 GB" in out


def test_every_job_has_help_and_its_example_passes_its_schema(capsys):
    import importlib
    from pathlib import Path

    from jobs import jobfile
    for name in ("encode", "update", "index", "storage"):
        module = importlib.import_module(f"jobs.{name}")
        with pytest.raises(SystemExit) as exit_:
            module.main(["--help"])
        assert exit_.value.code == 0
        assert "--dry-run" in capsys.readouterr().out
        example = Path(f"jobs/examples/{name}.yaml")
        body = jobfile.read(str(example))
        if name == "encode":
            jobfile.gpu_assumptions(body.pop("plan", None))
            run_config_from_dict(body)
        else:
            jobfile.load(str(example), module.SCHEMA, ())


def test_job_files_name_the_bad_key_and_type(tmp_path, caplog):
    from jobs import index as index_job
    from jobs import jobfile
    job = tmp_path / "i.yaml"
    for text, msg in (("store: x\n", "factory: required"),
                      ("store: x\nfactory: Flat\nnprobe: many\n", "nprobe: expected int"),
                      ("store: x\nfactory: Flat\nnprobe: true\n", "nprobe: expected int"),
                      ("store: x\nfactory: Flat\nfactroy: Flat\n", "factroy: unknown key"),
                      ("store: x\nfactory: Flat\nplan: {peak_tflops: fast}\n", "plan.peak_tflops: expected"),
                      ("- a list\n", "must be a mapping"), ("", "must be a mapping")):
        job.write_text(text)
        caplog.clear()
        assert index_job.main(["--config", str(job)]) == 2, text
        assert msg in caplog.text, (text, caplog.text)
    with pytest.raises(ConfigError, match="cannot read job config"):
        jobfile.read(str(tmp_path / "missing.yaml"))


def test_index_job_refuses_a_store_without_a_version(tmp_path, caplog):
    from jobs import index as index_job
    job = tmp_path / "i.yaml"
    job.write_text(yaml.safe_dump({"store": str(tmp_path / "empty"), "factory": "IVF4,SQ8"}))
    assert index_job.main(["--config", str(job), "--dry-run"]) == 2
    assert "no committed version" in caplog.text


def test_factory_bytes_per_vector_matches_the_measured_sizes():
    from pipeline.index.plan import factory_bytes_per_vector as per
    # 392, 24 and 648 B/vector are the sizes measured on the 384-dim MiniLM index (README, recall row)
    assert per("IVF32,SQ8", 384) == 392 and per("IVF32,PQ16", 384) == 24 and per("HNSW32,SQ8", 384) == 648
    assert per("Flat", 768) == 4 * 768 + 8 and per("IVF1024,PQ16x4", 768) == 16
    assert per("IVF16384_HNSW32,SQ8", 768) == 776  # plan-index's Wikipedia figure
    assert per("LSH", 768) is None


def test_a_relative_store_is_refused_inside_a_submitted_job(tmp_path, monkeypatch, caplog):
    import json

    from jobs import index as index_job
    job = tmp_path / "job.yaml"
    job.write_text("store: ./store\nmodel: {layers: 3}\n")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg.zip"}}))
    assert encode_job.main(["--config", str(job), "--dry-run"]) == 2
    assert "relative path" in caplog.text and "s3://" in caplog.text
    idx = tmp_path / "index.yaml"
    idx.write_text("store: store\nfactory: Flat\n")
    assert index_job.main(["--config", str(idx), "--dry-run"]) == 2
    caplog.clear()
    idx.write_text(f"store: {tmp_path / 'none'}\nfactory: Flat\n")  # absolute: accepted, then "no version"
    assert index_job.main(["--config", str(idx), "--dry-run"]) == 2
    assert "no committed version" in caplog.text


def test_run_refuses_an_unbuildable_index_before_encoding(tmp_path, caplog):
    store = tmp_path / "store"
    for factory, msg in (("Bogus,Thing", "could not parse"), ("IVF4096,SQ8", "4096 lists but only 50")):
        caplog.clear()
        assert cli(["run", "--store", str(store), "--limit", "50", "--dpr-model", "bundled:all-minilm-l6-v2",
                    "--index-factory", factory, "--layers", "2", "--dims", "16"]) == 2
        assert msg in caplog.text
    assert _files(store) == []


def _run_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices["run"]


# `precompute run` flags that are not RunConfig fields: where to write, what to print, the dry run's assumptions
NOT_CONFIG = {"--help", "--store", "--storage-options", "--dry-run", "--json", "--summary-json",
              "--gpu-tokens-per-second", "--gpu-tflops", "--gpu-utilisation", "--gpu-price"}


def test_every_job_key_is_a_run_flag_and_every_run_flag_a_job_key():
    from jobs.cli import run_body
    from pipeline.config import run_flags

    flags = {opt for action in _run_parser()._actions for opt in action.option_strings if opt.startswith("--")}
    schema = run_flags()
    assert set(schema.values()) <= flags, sorted(set(schema.values()) - flags)
    assert flags - NOT_CONFIG == set(schema.values()), sorted(flags - NOT_CONFIG - set(schema.values()))
    # and they mean the same thing: defaults, and a value set through either front end
    assert run_config_from_dict(run_body(build_parser().parse_args(["run", "--store", "s"]))) == \
        run_config_from_dict({"store": "s"})
    argv = ["run", "--store", "s", "--dpr-model", "m", "--dpr-normalize", "false", "--train-sample", "5000",
            "--task-cpus", "0.25", "--encoder-cpus", "2", "--torch-threads", "3", "--row-group-size", "64",
            "--max-field-bytes", "4096", "--title-column", "", "--bits", "5.25", "--attention", "packed", "--compile"]
    job = {"store": "s", "dpr": {"model": "m", "normalize": False, "train_sample": 5000},
           "execution": {"task_cpus": 0.25, "encoder_cpus": 2.0, "torch_threads": 3, "row_group_size": 64,
                         "attention": "packed", "compile": True},
           "corpus": {"max_field_bytes": 4096, "title_column": ""}, "compression": {"bits": 5.25}}
    assert run_config_from_dict(run_body(build_parser().parse_args(argv))) == run_config_from_dict(job)
    # each location's options (kept out of equality, like the store's): the same through either front end
    argv = ["run", "--store", "s", "--storage-options", '{"key": "k"}', "--corpus-storage-options", '{"anon": true}',
            "--compressor", "gs://m/c", "--compressor-storage-options", '{"token": "t"}']
    job = {"store": "s", "storage_options": {"key": "k"}, "corpus": {"storage_options": {"anon": True}},
           "compression": {"compressor": "gs://m/c", "storage_options": {"token": "t"}}}
    for cfg in (run_config_from_dict(run_body(build_parser().parse_args(argv))), run_config_from_dict(job)):
        assert (cfg.storage_options, cfg.corpus_storage_options, cfg.compressor_location.options) == (
            {"key": "k"}, {"anon": True}, {"token": "t"})
    assert cli(["run", "--store", "s", "--corpus-storage-options", "[1]"]) == 2


def test_attention_and_compile_settings_are_checked_before_anything_starts():
    with pytest.raises(ConfigError, match="attention='flash' is not one of auto, mask, packed"):
        run_config_from_dict({"store": "s", "execution": {"attention": "flash"}})
    with pytest.raises(ConfigError, match="compile=true needs attention=packed or auto"):
        run_config_from_dict({"store": "s", "execution": {"attention": "mask", "compile": True}})
    with pytest.raises(ConfigError, match="execution.compile: expected bool"):
        run_config_from_dict({"store": "s", "execution": {"compile": "yes"}})


def test_help_names_a_default_for_every_run_flag_with_one():
    import argparse

    for action in _run_parser()._actions:
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings[-1] != "--help":
            assert action.help, f"{action.option_strings} has no help"


def test_run_summary_commit_log_and_validate_give_the_same_bytes(tmp_path, capsys, caplog, tiny_model, sample_tsv):
    import json
    import logging

    from storage import manifest as mf
    from storage.fs import Store

    store, summary = tmp_path / "store", tmp_path / "summary.json"
    caplog.set_level(logging.INFO)
    assert cli(["run", "--store", str(store), "--corpus", str(sample_tsv), "--limit", "200", "--model", tiny_model,
                "--layers", "1", "--dims", "8", "--fit-sample", "64", "--dpr-model", tiny_model, "--dpr-pooling",
                "mean", "--summary-json", str(summary)]) == 0
    run_out = capsys.readouterr().out
    sizes = mf.sizes(mf.load(Store(str(store))))
    assert json.loads(summary.read_text())["sizes"] == sizes.to_dict()
    assert sizes.render() in run_out and sizes.dpr_shards and sizes.index  # summary
    assert sizes.render() in caplog.text  # the commit log
    cli(["validate", "--store", str(store)])  # its tolerance verdict is beside the point here
    assert sizes.render() in capsys.readouterr().out


def test_a_failed_command_leaves_no_store_directory_it_created(tmp_path, caplog):
    fresh = tmp_path / "new" / "store"
    assert cli(["lookup", "--store", str(fresh), "--ids", "1", "--out", str(tmp_path / "o.npz")]) == 1
    assert "no committed version" in caplog.text
    assert not fresh.exists()  # Store() made it; the failure removed it again, being empty
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "note.txt").write_text("a user's file")
    assert cli(["verify", "--store", str(kept)]) == 1
    assert (kept / "note.txt").exists()  # a directory that existed before is never touched
