"""The decoupled reader over a real store: equal to a direct computation, refuses another model, answers."""
import json
import shutil

import numpy as np
import pytest
import torch

from jobs.cli import main as cli
from pipeline.codec.projection import Compressor
from pipeline.config import BUNDLED_MODEL, CompressionConfig, CorpusConfig, DprConfig, ModelConfig, RunConfig
from pipeline.model.encoder import LayeredEncoder, pad_batch
from pipeline.flows.run import run
from pipeline.serve.qa_reader import DecoupledReader, ModelMismatch, RuntimeConfig
from pipeline.model.tokenizer import PairTokenizer
from storage import manifest as mf
from storage.fs import Store
from tests.conftest import first_passages, save_tiny_bert

pytestmark = [pytest.mark.ray]

LAYERS, MAX_LEN, HIDDEN = 2, 96, 32  # HIDDEN: save_tiny_bert's width
QUESTIONS = ["Who is Robert Boulter?", "When did the hurricane reach Florida?",
             "Which temnospondyls lived on land and had claws on their feet?"]


@pytest.fixture(scope="module")
def qa_model(tmp_path_factory, minilm_path) -> str:
    """A 4-layer, 32-wide random BertForQuestionAnswering with MiniLM's tokenizer (logic only)."""
    from transformers import BertForQuestionAnswering

    return save_tiny_bert(BertForQuestionAnswering, tmp_path_factory.mktemp("tiny-qa"), minilm_path, seed=1,
                          max_positions=512)


@pytest.fixture(scope="module")
def identity_store(tmp_path_factory, ray_local, sample_tsv, qa_model, tiny_model) -> str:
    """The QA model's lower 2 layers, projection = identity, no quantisation, a DPR index."""
    tmp = tmp_path_factory.mktemp("identity")
    eye = np.eye(HIDDEN, dtype=np.float32)
    comp = tmp / "identity.safetensors"
    comp.write_bytes(Compressor(eye, np.zeros(HIDDEN, np.float32), eye, np.zeros(HIDDEN, np.float32)).to_bytes())
    cfg = RunConfig(store=str(tmp / "store"), corpus=CorpusConfig(url=str(sample_tsv), limit=120),
                    model=ModelConfig(name=qa_model, layers=LAYERS, max_length=MAX_LEN),
                    compression=CompressionConfig(dims=HIDDEN, compressor=str(comp), quantize="none"),
                    dpr=DprConfig(model=tiny_model, pooling="mean"))
    assert run(cfg).committed
    return cfg.store


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory, ray_local, sample_tsv) -> str:
    """The README's demo store (MiniLM 3 of 6 layers, 384 -> 96, int8, MiniLM DPR index) on 200 passages."""
    cfg = RunConfig(store=str(tmp_path_factory.mktemp("demo") / "store"),
                    corpus=CorpusConfig(url=str(sample_tsv), limit=200),
                    model=ModelConfig(name=BUNDLED_MODEL, layers=3), compression=CompressionConfig(dims=96),
                    dpr=DprConfig(model=BUNDLED_MODEL, pooling="mean"))
    assert run(cfg).committed
    return cfg.store


def _reference(enc: LayeredEncoder, hq: torch.Tensor, hp: torch.Tensor) -> np.ndarray:
    """Concatenate, add the global positions and segments (the input embeddings' own), run the upper layers."""
    x = torch.cat([hq, hp])
    emb = enc.embeddings
    segments = torch.tensor([0] * len(hq) + [1] * len(hp))
    x = x + emb.position_embeddings.weight[:len(x)] + emb.token_type_embeddings.weight[segments]
    ones = torch.ones(1, len(x), dtype=torch.long)
    return enc.run_layers(x[None], ones, LAYERS, enc.total_layers)[0].numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_final_states_equal_a_direct_computation(identity_store, qa_model):
    reader = DecoupledReader(Store(identity_store), RuntimeConfig(device="cpu"))
    rows = {r[0]: r for r in first_passages(120)}
    ids = sorted(np.random.default_rng(3).choice(sorted(rows), 20, replace=False).tolist())
    model = ModelConfig(name=qa_model, layers=LAYERS, max_length=MAX_LEN)
    enc = LayeredEncoder(model, torch.device("cpu"), keep_upper=True)
    pairs = PairTokenizer(model, MAX_LEN)([rows[i][2] for i in ids], [rows[i][1] for i in ids])
    lower = []
    for seq, types in zip(pairs.input_ids, pairs.token_type_ids):
        i, t, am = pad_batch([seq.astype(np.int64)], [types.astype(np.int64)], 0, "cpu")
        lower.append(enc.embed_and_lower(i, t, am)[0])
    errors, unrounded = [], []
    for question in QUESTIONS:
        q = reader.question_ids(question)
        hq = enc.embed_and_lower(*(torch.as_tensor(x)[None] for x in (q, np.zeros_like(q), np.ones_like(q))))[0]
        got = reader.read(question, ids)
        assert [p.id for p in got.passages] == ids and got.best is not None
        in_memory, lengths = reader.cross(reader.lower_question(q), lower)  # the same path, states unrounded
        for k, (p, hp, seq) in enumerate(zip(got.passages, lower, pairs.input_ids)):
            assert p.token_ids.tolist() == seq.tolist() and p.truncated == 0 and p.question_tokens == len(q)
            # the store holds unquantised codes as float16: the reference rounds the same way
            errors.append(_rel(p.states, _reference(enc, hq, hp.half().float())))
            unrounded.append(_rel(in_memory[k, :lengths[k]].numpy(), _reference(enc, hq, hp)))
    assert len(errors) == 60 and max(errors) < 1e-4 and max(unrounded) < 1e-4, (max(errors), max(unrounded))


def test_a_model_other_than_the_stores_is_refused(identity_store, tiny_model, caplog):
    with pytest.raises(ModelMismatch, match="not the one this store was built with"):
        DecoupledReader(Store(identity_store), RuntimeConfig(model=tiny_model, device="cpu"))
    assert cli(["answer", "--store", identity_store, "--model", tiny_model, "who?"]) == 2
    assert "not the one this store was built with" in caplog.text


def test_batched_torch_decode_matches_the_readers_numpy_decode(demo_store):
    reader = DecoupledReader(Store(demo_store), RuntimeConfig(device="cpu"))
    ids = [5, 17, 42, 160]
    encoded = reader.states.get_encoded(ids)
    assert {e.codes.dtype for e in encoded.values()} == {np.dtype(np.int8)}
    decoded = reader.decode([encoded[i] for i in ids])
    plain = reader.states.get(ids)
    for i, states in zip(ids, decoded):
        assert states.shape == (len(encoded[i].token_ids), 384)
        np.testing.assert_allclose(states.numpy(), plain[i].states, rtol=1e-5, atol=1e-5)


def test_answer_on_the_demo_store_returns_passages(demo_store, capsys):
    assert cli(["answer", "--store", demo_store, "Who is Robert Boulter?", "-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["passages"]) == 3 and out["best"] is None  # MiniLM has no QA head
    assert out["passages"][0]["title"] == "Robert Boulter"  # the bundled DPR index finds him
    assert all(p["span"] is None and p["text"] and p["tokens"] > 10 for p in out["passages"])
    assert cli(["answer", "--store", demo_store, "Who is Robert Boulter?", "-k", "2"]) == 0
    assert "no QA head" in capsys.readouterr().out


def test_answer_with_a_qa_checkpoint_gives_spans_inside_the_passage_text(identity_store, capsys):
    assert cli(["answer", "--store", identity_store, "Who is Robert Boulter?", "-k", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["passages"]) == 5
    for p in out["passages"]:
        s = p["span"]
        assert 0 <= s["start"] < s["end"] <= len(p["text"]) and p["text"][s["start"]:s["end"]] == s["text"]
    best = max(out["passages"], key=lambda p: p["span"]["score"])
    assert out["best"] == best["id"]


def test_answer_refuses_bad_input_in_one_line(demo_store, tmp_path, caplog):
    for argv, code, msg in ((["", "-k", "3"], 2, "empty question"), (["q", "-k", "0"], 2, "k=0"),
                            (["q", "-k", "100000"], 2, "k=100000")):
        caplog.clear()
        assert cli(["answer", "--store", demo_store, *argv]) == code
        assert msg in caplog.text
    caplog.clear()
    assert cli(["answer", "--store", str(tmp_path / "none"), "q"]) == 1
    assert "no committed version" in caplog.text
    no_index = tmp_path / "no-index"
    shutil.copytree(demo_store, no_index)
    store = Store(str(no_index))
    m = mf.load(store)
    mf.commit(store, m.version, run_id=m.run_id, fingerprint=m.fingerprint, shards=m.shards,
              artifacts={k: v for k, v in m.artifacts.items() if k != "dpr_index"}, counts=m.counts, extra=m.extra)
    caplog.clear()
    assert cli(["answer", "--store", str(no_index), "q"]) == 1
    assert "has no DPR index" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_asking_for_a_gpu_that_is_not_there_is_a_usage_error(demo_store):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="no GPU"):
        DecoupledReader(Store(demo_store), RuntimeConfig(device="cuda"))
