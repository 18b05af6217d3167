"""Tokenisation and the input component on a tiny random model (logic, not statistics)."""
import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from pipeline.codec.state_codec import LinearCodec
from pipeline.codec.projection import PcaAccumulator
from pipeline.config import ConfigError, ModelConfig
from pipeline.model.encoder import LayeredEncoder, ShardEncoder, token_budget_batches
from pipeline.model.tokenizer import PairTokenizer, model_max_length
from tests.conftest import first_passages

CPU = torch.device("cpu")


def test_pair_tokenisation_matches_the_fast_tokenizer(tiny_model):
    rows = first_passages(5)
    tok = PairTokenizer(ModelConfig(name=tiny_model, layers=2), 128)
    out = tok([r[2] for r in rows], [r[1] for r in rows])
    ref = AutoTokenizer.from_pretrained(tiny_model)([r[2] for r in rows], [r[1] for r in rows])
    assert [a.tolist() for a in out.input_ids] == ref["input_ids"]
    assert out.input_ids[0].dtype == np.uint16
    assert out.token_type_ids[0][0] == 0 and out.token_type_ids[0][-1] == 1  # title segment, then text


def test_too_long_passages_are_truncated_or_skipped_and_counted(tiny_model):
    long_text = "word " * 400
    model = ModelConfig(name=tiny_model, layers=2)
    assert model_max_length(model) == 128
    t = PairTokenizer(model, 128)(["T", "T"], [long_text, "short"])
    assert t.truncated == 1 and len(t.input_ids[0]) == 128 and t.keep.all()
    s = PairTokenizer(ModelConfig(name=tiny_model, layers=2, on_too_long="skip"), 128)(["T", "T"], [long_text, "short"])
    assert s.skipped_too_long == 1 and s.keep.tolist() == [False, True]
    with pytest.raises(ConfigError, match="exceeds"):
        model_max_length(ModelConfig(name=tiny_model, max_length=1000))


def test_token_budget_batches_cover_every_index_once_within_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, 500)
    batches = token_budget_batches(lengths, 2048)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(500))
    for b in batches:
        assert len(b) * lengths[b].max() <= 2048 or len(b) == 1
    assert token_budget_batches(np.array([5000]), 100)[0].tolist() == [0]  # one over-budget passage alone


def test_layer_loop_equals_the_hf_forward(tiny_model):
    enc = LayeredEncoder(ModelConfig(name=tiny_model, layers=4), CPU)
    ref_model = AutoModel.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    batch = tok(["a title", "b"], ["some passage text here", "x"], padding=True, return_tensors="pt")
    got = enc.embed_and_lower(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    with torch.no_grad():
        ref = ref_model(**batch).last_hidden_state
    m = batch["attention_mask"].bool()
    torch.testing.assert_close(got[m], ref[m], rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="only 4 layers"):
        LayeredEncoder(ModelConfig(name=tiny_model, layers=9), CPU)


@pytest.mark.parametrize("attention", ["mask", "packed"])
def test_shard_encoder_stores_only_real_tokens_and_is_padding_invariant(tiny_model, attention):
    model = ModelConfig(name=tiny_model, layers=2)
    rows = first_passages(6)
    tok = PairTokenizer(model, 128)([r[2] for r in rows], [r[1][: 40 * (i + 1)] for i, r in enumerate(rows)])
    acc = PcaAccumulator(32)
    acc.update(np.random.default_rng(0).standard_normal((200, 32)))
    comp = acc.finish(8)
    together = ShardEncoder(model, LinearCodec(comp), 100_000, CPU, attention=attention).encode(
        tok.input_ids, tok.token_type_ids)
    alone = ShardEncoder(model, LinearCodec(comp), 1, CPU, attention=attention).encode(
        tok.input_ids, tok.token_type_ids)  # batch of 1
    for i, ids in enumerate(tok.input_ids):
        assert together.codes[i].shape == (len(ids), 8)
        assert np.abs(together.codes[i].astype(int) - alone.codes[i].astype(int)).max() <= 1
    assert together.tokens == sum(len(x) for x in tok.input_ids)
    if attention == "mask":
        assert together.padded_tokens > together.tokens  # one batch, dynamic padding to its own longest
    else:
        assert together.padded_tokens == together.tokens  # packed: no padding computed
    assert alone.padded_tokens == alone.tokens  # batches of one: no padding at all
    unq = ShardEncoder(model, LinearCodec(comp, "none"), 4096, CPU, attention=attention).encode(
        tok.input_ids, tok.token_type_ids)
    assert unq.scales is None and unq.codes[0].dtype == np.float16
