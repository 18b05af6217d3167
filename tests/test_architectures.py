"""Every accepted architecture stores the model's own states, or is refused before any work.

The reference is always the model's own HF forward (`output_hidden_states=True`), never this
project's layer runner: MPNet's relative position bias was once dropped by running bare layers,
and a test that ran the same wrong code on both sides could not see it. Tiny random models with
MiniLM's tokenizer: arithmetic only."""
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf

from jobs.cli import main as cli
from pipeline.codec.projection import Compressor
from pipeline.config import CompressionConfig, ConfigError, CorpusConfig, ModelConfig, RunConfig
from pipeline.model.encoder import InputComponent, LayeredEncoder
from pipeline.serve.state_reader import StateReader
from pipeline.flows.run import run
from pipeline.serve.qa_reader import DecoupledReader, RuntimeConfig
from pipeline.model.tokenizer import PairTokenizer
from storage.fs import Store
from tests.conftest import first_passages

LAYERS, HIDDEN, MAX_LEN, PASSAGES = 2, 32, 96, 24
# initializer_range 0.3, not 0.02: at a random init's scale the layers barely move their input, and a
# dropped position bias changed MPNet's states by 0.6% (0.744 mean cosine at 0.3, as on real weights).
SMALL = dict(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=2,
             intermediate_size=64, initializer_range=0.3)
ARCHITECTURES = {
    "bert": (tf.BertModel, tf.BertConfig(**SMALL, max_position_embeddings=512)),
    "electra": (tf.ElectraModel, tf.ElectraConfig(**SMALL, embedding_size=16, max_position_embeddings=512)),
    "roberta": (tf.RobertaModel, tf.RobertaConfig(**SMALL, max_position_embeddings=514)),
    "mpnet": (tf.MPNetModel, tf.MPNetConfig(**SMALL, max_position_embeddings=514)),
    # DeBERTa-v3's layout: relative attention, no absolute positions in the input, a convolution after layer 1
    "deberta-v2": (tf.DebertaV2Model, tf.DebertaV2Config(
        **SMALL, max_position_embeddings=512, relative_attention=True, position_buckets=32,
        pos_att_type=["p2c", "c2p"], position_biased_input=False, conv_kernel_size=3, type_vocab_size=0)),
}
# Refused by `answer` with one line: no absolute position table of the states' width to re-encode
# [question; passage] with.
NO_RUNTIME = {"deberta-v2": "no absolute position embeddings", "electra": "16-wide position embeddings"}


def save_model(kind: str, out: Path, minilm_path: str, model_class=None, config=None) -> str:
    torch.manual_seed(7)
    cls, cfg = ARCHITECTURES[kind] if model_class is None else (model_class, config)
    cls(cfg).save_pretrained(out)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(minilm_path) / name, out / name)
    return str(out)


@pytest.fixture(scope="module")
def models(tmp_path_factory, minilm_path) -> dict[str, str]:
    return {k: save_model(k, tmp_path_factory.mktemp(k), minilm_path) for k in ARCHITECTURES}


def own_forward(path: str, ids: np.ndarray, types: np.ndarray) -> tuple[torch.Tensor, ...]:
    """The model's own forward on one passage alone: (embeddings, layer 1, ..., layer L)."""
    model = tf.AutoModel.from_pretrained(path).eval()
    kwargs = {"input_ids": torch.as_tensor(ids, dtype=torch.long)[None]}
    if (getattr(model.config, "type_vocab_size", 0) or 0) > 1:
        kwargs["token_type_ids"] = torch.as_tensor(types, dtype=torch.long)[None]
    with torch.no_grad():
        return tuple(h[0] for h in model(**kwargs, output_hidden_states=True).hidden_states)


def tokenized(path: str, n: int):
    rows = first_passages(n)
    pairs = PairTokenizer(ModelConfig(name=path, layers=LAYERS), MAX_LEN)([r[2] for r in rows], [r[1] for r in rows])
    return rows, pairs


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_the_input_component_and_the_upper_layers_are_the_models_own(models, kind):
    path = models[kind]
    lower = InputComponent(ModelConfig(name=path, layers=LAYERS), torch.device("cpu"))
    upper = LayeredEncoder(ModelConfig(name=path, layers=LAYERS), torch.device("cpu"), keep_upper=True)
    _, pairs = tokenized(path, 6)
    ids = [s.astype(np.int64) for s in pairs.input_ids]
    types = [t.astype(np.int64) for t in pairs.token_type_ids]
    lengths = np.array([len(s) for s in ids])
    got, _ = lower(np.concatenate(ids), np.concatenate(types), lengths)  # one batch: padding or packing in play
    got = torch.split(got, lengths.tolist())
    for k, (i, t) in enumerate(zip(ids, types)):
        ref = own_forward(path, i, t)
        assert rel(got[k], ref[LAYERS]) < 1e-5, kind
        ones = torch.ones(1, len(i), dtype=torch.long)
        top = upper.run_layers(ref[LAYERS][None], ones, LAYERS, upper.total_layers)[0]
        assert rel(top, ref[-1]) < 1e-5, kind


@pytest.fixture(scope="module")
def stores(tmp_path_factory, ray_local, sample_tsv, models) -> dict[str, str]:
    """Each model's lower 2 layers, identity projection, float16 values: a store that should hold
    hidden_states[2] rounded to float16."""
    tmp = tmp_path_factory.mktemp("arch-stores")
    eye = np.eye(HIDDEN, dtype=np.float32)
    comp = tmp / "identity.safetensors"
    comp.write_bytes(Compressor(eye, np.zeros(HIDDEN, np.float32), eye, np.zeros(HIDDEN, np.float32)).to_bytes())
    out = {}
    for kind, path in models.items():
        cfg = RunConfig(store=str(tmp / kind), corpus=CorpusConfig(url=str(sample_tsv), limit=PASSAGES),
                        model=ModelConfig(name=path, layers=LAYERS, max_length=MAX_LEN),
                        compression=CompressionConfig(dims=HIDDEN, compressor=str(comp), quantize="none"))
        assert run(cfg).committed, kind
        out[kind] = cfg.store
    return out


@pytest.mark.ray
@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_stored_states_are_the_models_own_hidden_states(stores, models, kind):
    rows, pairs = tokenized(models[kind], PASSAGES)
    got = StateReader(Store(stores[kind])).get([r[0] for r in rows])
    assert len(got) == PASSAGES
    errors = []
    for r, ids, types in zip(rows, pairs.input_ids, pairs.token_type_ids):
        stored = got[r[0]]
        assert stored.token_ids.tolist() == ids.tolist()
        ref = own_forward(models[kind], ids, types)[LAYERS].numpy()
        errors.append(rel(stored.states, ref))
    assert max(errors) < 2e-3, (kind, max(errors))  # float16 storage: ~5e-4 per value


def reference_final_states(enc: LayeredEncoder, hq: torch.Tensor, hp: torch.Tensor) -> np.ndarray:
    """[question; passage] with the input embeddings' own position (and segment) tables added, then the
    upper layers, checked against the model's own forward when `enc` was built."""
    emb = enc.embeddings
    x = torch.cat([hq, hp])
    pad = getattr(emb, "padding_idx", None)  # RoBERTa and MPNet number positions from padding_idx + 1
    start = pad + 1 if pad is not None else 0
    x = x + emb.position_embeddings.weight[start:start + len(x)]
    table = getattr(emb, "token_type_embeddings", None)
    if table is not None:
        segment = 1 if table.weight.shape[0] > 1 else 0
        x = x + table.weight[torch.tensor([0] * len(hq) + [segment] * len(hp))]
    ones = torch.ones(1, len(x), dtype=torch.long)
    return enc.run_layers(x[None], ones, LAYERS, enc.total_layers)[0].numpy()


@pytest.mark.ray
@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_the_runtime_computes_the_reference_or_refuses_in_one_line(stores, models, kind, caplog):
    if kind in NO_RUNTIME:
        with pytest.raises(ConfigError, match=NO_RUNTIME[kind]):
            DecoupledReader(Store(stores[kind]), RuntimeConfig(device="cpu"))
        return
    reader = DecoupledReader(Store(stores[kind]), RuntimeConfig(device="cpu"))
    enc = LayeredEncoder(ModelConfig(name=models[kind], layers=LAYERS), torch.device("cpu"), keep_upper=True)
    ids = [r[0] for r in first_passages(5)]
    q = reader.question_ids("Who is Robert Boulter?")
    hq = own_forward(models[kind], q, np.zeros_like(q))[LAYERS]
    _, out, lengths, nq = reader.final_states_for_ids(q, ids)
    stored = reader.states.get(ids)
    for k, pid in enumerate(ids):
        hp = torch.as_tensor(stored[pid].states)
        ref = reference_final_states(enc, hq, hp)
        assert rel(out[k, :lengths[k]].numpy(), ref) < 1e-4, kind


def test_a_model_whose_states_cannot_be_reproduced_is_refused_before_ray(tmp_path, minilm_path, sample_tsv, caplog):
    """ModernBERT normalises after its last layer: a cut forward is not its hidden_states[N]."""
    cfg = tf.ModernBertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=512, pad_token_id=0, bos_token_id=101,
                              eos_token_id=102, cls_token_id=101, sep_token_id=102, global_attn_every_n_layers=2,
                              local_attention=16)
    path = save_model("", tmp_path / "modernbert", minilm_path, tf.ModernBertModel, cfg)
    caplog.set_level(logging.INFO)
    store = tmp_path / "store"
    code = cli(["run", "--corpus", str(sample_tsv), "--store", str(store), "--model", path, "--layers", "2",
                "--dims", "8", "--limit", "20"])
    assert code == 2
    refusal = [r.getMessage() for r in caplog.records if "refused before any work" in r.getMessage()]
    assert len(refusal) == 1 and "ModernBertModel" in refusal[0] and "\n" not in refusal[0]
    assert not store.exists()  # nothing written
    assert not any("phase: plan" in r.getMessage() for r in caplog.records)  # refused before the corpus or Ray


def test_the_guard_catches_a_dropped_position_bias(models, monkeypatch):
    """Today's bug, reintroduced: MPNet's layers run bare (no relative position bias) must be refused."""
    def bare_layers(self, input_ids, token_type_ids, attention_mask):
        h = self.embeddings(input_ids=input_ids)
        mask = torch.zeros(attention_mask.shape, dtype=h.dtype).masked_fill_(attention_mask == 0, -1e9)[:, None, None]
        for layer in self.layers[:self.n_lower]:
            h = layer(h, attention_mask=mask)[0]
        return h

    monkeypatch.setattr(LayeredEncoder, "embed_and_lower", bare_layers)
    with pytest.raises(ConfigError, match=r"MPNetModel .*refused before any work.*hidden_states\[2\]"):
        LayeredEncoder(ModelConfig(name=models["mpnet"], layers=LAYERS), torch.device("cpu"))
