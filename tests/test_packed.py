"""The packed (unpadded) forward against the HF layers on padded batches (tiny random models: logic)."""
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, ElectraConfig, ElectraModel

from pipeline.codec.state_codec import LinearCodec
from pipeline.codec.projection import PcaAccumulator
from pipeline.config import ConfigError, ModelConfig
from pipeline.model.encoder import LayeredEncoder, ShardEncoder, pad_flat
from pipeline.model.packed_attention import PackedBatch, PackedLowerLayers, padded_attention, token_index

CPU = torch.device("cpu")


def _lengths_and_tokens(seed: int, n: int, vocab: int = 30522, max_len: int = 100):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len, n)
    lengths[0] = max_len  # one at the limit
    ids = rng.integers(1, vocab, int(lengths.sum()))
    types = (rng.random(int(lengths.sum())) < 0.5).astype(np.int64)
    return lengths, ids, types


def test_token_index_gathers_rows_in_the_order_asked():
    offsets = np.array([0, 3, 3, 7, 8])  # one empty passage
    assert token_index(offsets, np.array([2, 0, 1, 3])).tolist() == [3, 4, 5, 6, 0, 1, 2, 7]
    assert token_index(offsets, np.array([1])).tolist() == []
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 50, 300)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rows = rng.permutation(300)[:120]
    ref = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in rows])
    assert np.array_equal(token_index(offsets, rows), ref)


def test_padded_attention_equals_attention_per_passage():
    torch.manual_seed(0)
    lengths = np.array([5, 1, 9, 3])
    batch = PackedBatch.build(np.zeros(lengths.sum()), np.zeros(lengths.sum()), lengths, CPU)
    q, k, v = (torch.randn(int(lengths.sum()), 2, 8) for _ in range(3))
    got = padded_attention(q, k, v, batch)
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        ref = torch.nn.functional.scaled_dot_product_attention(*(x[s].transpose(0, 1) for x in (q, k, v)))
        torch.testing.assert_close(got[s], ref.transpose(0, 1), rtol=1e-5, atol=1e-6)
        start += n


def _save(model, tmp_path, name):
    out = tmp_path / name
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def electra_small_geometry(tmp_path_factory):
    """ELECTRA whose embeddings (16) are narrower than its layers (32): the up-projection must run."""
    torch.manual_seed(1)
    cfg = ElectraConfig(vocab_size=30522, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                        num_attention_heads=4, intermediate_size=48, max_position_embeddings=128)
    return _save(ElectraModel(cfg), tmp_path_factory.mktemp("electra"), "m")


@pytest.mark.parametrize("which", ["bert", "electra"])
def test_packed_lower_layers_equal_the_masked_hf_forward(tiny_model, electra_small_geometry, which):
    path = tiny_model if which == "bert" else electra_small_geometry
    enc = LayeredEncoder(ModelConfig(name=path, layers=3), CPU)
    assert enc.packed_unsupported is None
    lengths, ids, types = _lengths_and_tokens(0, 7)
    i, t, am = pad_flat(ids, types, lengths, 0, CPU)
    ref = enc.embed_and_lower(i, t, am)[am.bool()]
    packed = PackedLowerLayers(enc.embeddings, enc.embeddings_project, list(enc.layers)[:3], enc.type_vocab_size,
                               "padded")
    got = packed(PackedBatch.build(ids, types, lengths, CPU))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    if which == "electra":  # the up-projection is really there (and was missing before)
        assert enc.embeddings_project is not None


def test_packed_forward_equals_the_full_hf_model(tiny_model):
    """Independent of LayeredEncoder: every layer, against BertModel's own forward, padded."""
    ref_model = BertModel.from_pretrained(tiny_model).eval()
    enc = LayeredEncoder(ModelConfig(name=tiny_model, layers=4), CPU)
    lengths, ids, types = _lengths_and_tokens(3, 5, max_len=60)
    i, t, am = pad_flat(ids, types, lengths, 0, CPU)
    with torch.no_grad():
        ref = ref_model(input_ids=i, token_type_ids=t, attention_mask=am).last_hidden_state[am.bool()]
    packed = PackedLowerLayers(enc.embeddings, None, list(enc.layers), enc.type_vocab_size, "padded")
    torch.testing.assert_close(packed(PackedBatch.build(ids, types, lengths, CPU)), ref, rtol=1e-4, atol=1e-5)


def _codec(hidden: int) -> LinearCodec:
    acc = PcaAccumulator(hidden)
    acc.update(np.random.default_rng(0).standard_normal((400, hidden)))
    return LinearCodec(acc.finish(8))


def test_encode_flat_keeps_input_order_and_reads_sliced_offsets(tiny_model):
    model = ModelConfig(name=tiny_model, layers=2)
    lengths, ids, types = _lengths_and_tokens(5, 40, max_len=90)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    packed = ShardEncoder(model, _codec(32), 512, CPU, attention="packed")
    masked = ShardEncoder(model, _codec(32), 512, CPU, attention="mask")
    a, b = packed.encode_flat(ids, types, offsets), masked.encode_flat(ids, types, offsets)
    assert np.array_equal(a.offsets, offsets) and a.codes.shape == (int(lengths.sum()), 8)
    assert np.abs(a.codes.astype(int) - b.codes.astype(int)).max() <= 1
    assert a.padded_tokens == a.tokens < b.padded_tokens
    # passage by passage, each alone: the same codes in the same place
    for r in (0, 17, 39):
        one = packed.encode_flat(ids[offsets[r]:offsets[r + 1]], types[offsets[r]:offsets[r + 1]], [0, lengths[r]])
        assert np.abs(one.codes.astype(int) - a.codes[offsets[r]:offsets[r + 1]].astype(int)).max() <= 1
    # a slice of rows 10..19 whose offsets do not start at 0 (as an Arrow slice hands them)
    sliced = packed.encode_flat(ids, types, offsets[10:21])
    assert np.array_equal(sliced.codes, a.codes[offsets[10]:offsets[20]])
    assert np.array_equal(sliced.offsets, offsets[10:21] - offsets[10])
    assert packed.encode_flat(ids[:0], types[:0], [0]).codes.shape[0] == 0


def test_attention_choice_is_checked(tiny_model, tmp_path):
    model = ModelConfig(name=tiny_model, layers=2)
    with pytest.raises(ConfigError, match="attention='flash'"):
        ShardEncoder(model, _codec(32), 512, CPU, attention="flash")
    with pytest.raises(ConfigError, match="compile needs the packed"):
        ShardEncoder(model, _codec(32), 512, CPU, attention="mask", compile=True)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, position_embedding_type="relative_key")
    rel = _save(BertModel(cfg), tmp_path, "rel")
    with pytest.raises(ConfigError, match="absolute positions"):
        ShardEncoder(ModelConfig(name=rel, layers=2), _codec(32), 512, CPU, attention="packed")
    assert ShardEncoder(ModelConfig(name=rel, layers=2), _codec(32), 512, CPU).attention == "mask"  # auto


def test_compiled_packed_layers_equal_eager_without_recompiling(tiny_model):
    """torch.compile (inductor on CPU here) with a symbolic token count: same states, one compile."""
    import torch._dynamo

    torch._dynamo.reset()
    enc = LayeredEncoder(ModelConfig(name=tiny_model, layers=2), CPU)
    layers = list(enc.layers)[:2]
    eager = PackedLowerLayers(enc.embeddings, None, layers, enc.type_vocab_size, "padded")
    compiled = PackedLowerLayers(enc.embeddings, None, layers, enc.type_vocab_size, "padded", compile=True)
    from torch._dynamo.utils import counters
    counters.clear()
    for seed, n in ((0, 9), (1, 4), (2, 13)):  # three different token counts
        lengths, ids, types = _lengths_and_tokens(seed, n, max_len=50)
        batch = PackedBatch.build(ids, types, lengths, CPU)
        torch.testing.assert_close(compiled(batch), eager(batch), rtol=1e-4, atol=1e-5)
    frames = counters["stats"]["unique_graphs"]
    assert 0 < frames <= 2 * len(layers) + 2, frames  # each compiled function once (a dynamic-shape retrace at most)


def test_arrow_list_columns_round_trip_without_per_row_objects():
    import pyarrow as pa

    from pipeline.workers.steps import binary_column, flat_lists, list_column

    col = pa.chunked_array([pa.array([[1, 2], [3]], pa.list_(pa.uint16())),
                            pa.array([[], [4, 5, 6]], pa.list_(pa.uint16()))])
    values, offsets = flat_lists(col, np.int64)
    assert [values[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == [[1, 2], [3], [], [4, 5, 6]]
    sliced = pa.chunked_array([pa.array([[9], [1, 2], [3, 4, 5]], pa.list_(pa.uint16())).slice(1)])
    values, offsets = flat_lists(sliced, np.int64)
    assert offsets.tolist() == [0, 2, 5] and values.tolist() == [1, 2, 3, 4, 5]  # rebased to the slice
    codes = np.arange(12, dtype=np.int8).reshape(6, 2)  # 6 tokens x 2 bytes
    rows = binary_column(codes, np.array([2, 0, 8, 2]))
    assert rows.to_pylist() == [bytes([0, 1]), b"", bytes(range(2, 10)), bytes([10, 11])]
    scales = np.arange(6, dtype=np.float16)
    lists = list_column(scales, np.array([1, 0, 4, 1]), np.array([True, False, True, True]), pa.float16())
    assert lists.to_pylist() == [[0.0], None, [1.0, 2.0, 3.0, 4.0], [5.0]]
    assert list_column(None, np.array([1, 2]), np.array([True, True]), pa.float16()).null_count == 2
