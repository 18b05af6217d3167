"""The model facts a run needs are read once, on the driver (`pipeline.model.spec`), and the
--compressor file is decoded once: counted, not assumed (tests/load_counter.py)."""
import pickle
from pathlib import Path

import pytest

from pipeline.config import BUNDLED_MODEL, CompressionConfig, DprConfig, ModelConfig, RunConfig
from pipeline.model.spec import resolve_spec
from tests.conftest import first_passages
from tests.load_counter import counting, two_runs


def _cfg(tmp_path, tiny_model, **compression) -> RunConfig:
    return RunConfig(store=str(tmp_path / "store"), model=ModelConfig(name=tiny_model, layers=1),
                     compression=CompressionConfig(dims=8, **compression),
                     dpr=DprConfig(model=BUNDLED_MODEL))


def _codec_file(tmp_path, tiny_model) -> Path:
    import torch

    from pipeline.codec.fitting import fit_codec

    rows = first_passages(32)
    codec = fit_codec(ModelConfig(name=tiny_model, layers=1), [r[2] for r in rows], [r[1] for r in rows],
                      CompressionConfig(dims=8), 128, torch.device("cpu"))
    path = tmp_path / "codec.safetensors"
    path.write_bytes(codec.to_bytes())
    return path


def test_spec_holds_the_facts_the_run_derived_one_by_one(tmp_path, tiny_model):
    """The values the spec resolves are the ones each helper computed before it existed."""
    from pipeline.model.dpr import resolve_normalize, resolve_pooling
    from pipeline.model.encoder import model_revision
    from pipeline.model.tokenizer import model_max_length

    cfg = _cfg(tmp_path, tiny_model)
    spec = resolve_spec(cfg)
    assert (spec.max_length, spec.revision, spec.hidden, spec.checkpoint.depth) == \
        (model_max_length(cfg.model), model_revision(cfg.model), 32, 4)
    dpr_model = ModelConfig(name=BUNDLED_MODEL)
    assert spec.dpr.fingerprint(cfg.dpr) == {
        "model": BUNDLED_MODEL, "revision": model_revision(dpr_model), "pooling": resolve_pooling(BUNDLED_MODEL, "auto"),
        "dtype": "float16", "normalize": resolve_normalize(BUNDLED_MODEL, None), "question_model": BUNDLED_MODEL}
    assert spec.dpr.shares_tokens and spec.dpr.checkpoint.embedding_width == 384  # same tokenizer files
    again = pickle.loads(pickle.dumps(spec))  # what a worker receives inside its StageContext
    assert again == spec and again.checkpoint.hf_config.hidden_size == 32


def test_preflight_reads_each_config_once_and_decodes_the_compressor_once(tmp_path, tiny_model):
    from pipeline.flows.preflight import preflight_run
    from storage.fs import sha256_bytes

    path = _codec_file(tmp_path, tiny_model)
    cfg = _cfg(tmp_path, tiny_model, compressor=str(path))
    with counting() as counts:
        checked = preflight_run(cfg)
    tiny, minilm = Path(tiny_model).name, "model"
    assert counts[("config", tiny)] == counts[("config", minilm)] == 1, counts
    assert counts[("AutoTokenizer", tiny)] == counts[("AutoTokenizer", minilm)] == 1, counts  # vocabularies compared
    assert counts[("codec_decode", "")] == 1, counts
    assert checked.compressor.sha256 == sha256_bytes(path.read_bytes()) and checked.spec.dpr.shares_tokens


@pytest.mark.ray
def test_one_run_reads_each_model_config_once_in_the_driver(tmp_path, tiny_model, sample_tsv):
    """The issue's count: before the spec, 4 config reads of the model in a plain run and 5 (+3 of the
    DPR model, 3 decodes of --compressor) with DPR; now one read per model and one decode."""
    tiny = Path(tiny_model).name
    counts = two_runs(tmp_path, tiny_model, sample_tsv)
    assert counts["plain"] == {f"AutoConfig:{tiny}": 1, f"config:{tiny}": 1, "codec_decode": 1}, counts
    assert counts["dpr+compressor"] == {
        f"AutoConfig:{tiny}": 1, f"config:{tiny}": 1, f"AutoTokenizer:{tiny}": 1,
        "AutoConfig:model": 1, "config:model": 1, "AutoTokenizer:model": 1, "codec_decode": 1}, counts
