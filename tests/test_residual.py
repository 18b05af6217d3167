"""The residual codec: code only what the stored token ids do not already say (issue 28).

Logic on tiny random BERTs (a store through run, lookup, update, compact, answer); the statistics that
make it worth having on the bundled MiniLM (fidelity figures come from `precompute report`)."""
import dataclasses
import json
import shutil
import sys

import cloudpickle
import numpy as np
import pytest
import torch

from jobs.cli import main as cli
from pipeline.codec.state_codec import LinearCodec, ResidualCodec, artifact_kind, codec_for_store, codec_from_bytes
from pipeline.codec.projection import CompressorError
from pipeline.config import (BUNDLED_MODEL, CompressionConfig, ConfigError, CorpusConfig, DprConfig, ExecutionConfig,
                             ModelConfig, RunConfig, run_config_from_dict)
from pipeline.model.encoder import LayeredEncoder, pad_batch
from pipeline.codec.fitting import fit_codec, fit_prediction
from pipeline.serve.state_reader import StateReader
from pipeline.flows.run import run
from pipeline.codec.side_info import SideInfo, StaticEmbedding
from pipeline.model.tokenizer import PairTokenizer
from storage import manifest as mf
from storage.fs import IntegrityError, Store
from tests.conftest import edited_corpus, first_passages, save_tiny_bert, write_tsv

cloudpickle.register_pickle_by_value(sys.modules[__name__])

LAYERS, HIDDEN, MAX_LEN = 2, 32, 96
RESIDUAL_PQ = dict(codec="pq", pq_m=8, opq=True, residual="embeddings")


# ---------------------------------------------------------------- side information, unit

def test_side_info_positions_restart_per_passage_and_segments_follow_the_first_separator():
    side = SideInfo.of([np.array([101, 7, 102, 8, 9, 102]), np.array([101, 5, 102]), np.array([], np.int64)])
    assert side.positions().tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert side.segments(102).tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="lengths add up"):
        SideInfo(np.arange(3), np.array([2]))


@pytest.mark.parametrize("kind", ["bert", "electra", "roberta", "mpnet", "deberta-v2"])
def test_the_tables_reproduce_each_architectures_embedding_layer(kind):
    """fp16 tables + derived segments = the model's own embedding output (ELECTRA's is 16 wide: the ridge
    map takes it to the 32-wide states, absorbing `embeddings_project`)."""
    from tests.test_architectures import ARCHITECTURES

    cls, cfg = ARCHITECTURES[kind]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    side = SideInfo.of([np.array([101, 2023, 2003, 102, 1037, 3231, 102]), np.array([101, 4937, 102])])
    table = StaticEmbedding.from_model(model, 102, kind)
    assert table.check_against(model, side, kind) < 5e-3
    assert table.width == (16 if kind == "electra" else HIDDEN)


def test_an_embedding_layer_it_cannot_recompute_is_refused_in_one_line():
    from transformers import DebertaV2Config, DebertaV2Model

    model = DebertaV2Model(DebertaV2Config(vocab_size=500, hidden_size=32, embedding_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=32))
    with pytest.raises(CompressorError, match="--residual embeddings: tiny .*use --residual none"):
        StaticEmbedding.from_model(model, 2, "tiny")


@pytest.fixture(scope="module")
def fitted(tiny_model):
    """A residual OPQ codec and a residual linear codec on the tiny BERT, and held-out states to code."""
    model = ModelConfig(name=tiny_model, layers=LAYERS)
    rows = first_passages(140)
    titles, texts = [r[2] for r in rows], [r[1] for r in rows]
    pq = fit_codec(model, titles[:100], texts[:100], CompressionConfig(**RESIDUAL_PQ), MAX_LEN, torch.device("cpu"))
    linear = fit_codec(model, titles[:100], texts[:100], CompressionConfig(dims=16, residual="embeddings"), MAX_LEN,
                       torch.device("cpu"))
    t = PairTokenizer(model, MAX_LEN)(titles[100:], texts[100:])
    i, tt, am = pad_batch(t.input_ids, t.token_type_ids, 0, "cpu")
    h = LayeredEncoder(model, torch.device("cpu")).embed_and_lower(i, tt, am)[am.bool()]
    return dict(pq=pq, linear=linear, h=h, side=SideInfo.from_padded(i, am))


def test_decode_is_encodes_reconstruction_in_torch_and_numpy(fitted):
    h, side = fitted["h"], fitted["side"]
    for name in ("pq", "linear"):
        codec = fitted[name]
        assert isinstance(codec, ResidualCodec) and codec.residual == "embeddings"
        codes, scales = codec.encoder("cpu", torch.float32)(h, side)
        rec = codec.decode_torch(codes, scales, side)
        via_numpy = codec.decode(codes.numpy(), None if scales is None else scales.numpy(), side)
        np.testing.assert_allclose(rec.numpy(), via_numpy, rtol=1e-4, atol=1e-4)
        # decode = the inner codec's reconstruction of (h - p) plus p, exactly what the encoder coded
        p = codec.prediction.predict(side)
        inner = codec.inner.decode(codes.numpy(), None if scales is None else scales.numpy())
        np.testing.assert_allclose(via_numpy, inner + p, rtol=1e-5, atol=1e-5)
        # the artifact round trips byte for byte and decodes the same
        data = codec.to_bytes()
        again = codec_from_bytes(data, "x")
        assert again.to_bytes() == data and artifact_kind(data) == f"{codec.kind}+residual"
        np.testing.assert_array_equal(again.decode(codes.numpy(), None if scales is None else scales.numpy(), side),
                                      via_numpy)
        with pytest.raises(CompressorError, match="needs the token ids"):
            codec.decode(codes.numpy(), None if scales is None else scales.numpy())


def test_a_lossless_residual_codec_returns_the_models_own_states(tiny_model):
    """The prediction added back at decode is the one taken off at encode: with a full-width float16 inner
    codec, decode returns the model's own hidden_states[N] (its HF forward), not a shifted copy."""
    from transformers import AutoModel

    model = ModelConfig(name=tiny_model, layers=LAYERS)
    rows = first_passages(120)
    titles, texts = [r[2] for r in rows], [r[1] for r in rows]
    codec = fit_codec(model, titles[:100], texts[:100],
                      CompressionConfig(dims=HIDDEN, quantize="none", residual="embeddings"), MAX_LEN, torch.device("cpu"))
    hf = AutoModel.from_pretrained(tiny_model).eval()
    encode = codec.encoder("cpu", torch.float32)
    t = PairTokenizer(model, MAX_LEN)(titles[100:], texts[100:])
    for ids, types in zip(t.input_ids, t.token_type_ids):
        with torch.no_grad():
            ref = hf(input_ids=torch.as_tensor(ids, dtype=torch.long)[None],
                     token_type_ids=torch.as_tensor(types, dtype=torch.long)[None],
                     output_hidden_states=True).hidden_states[LAYERS][0]
        side = SideInfo.of([np.asarray(ids, np.int64)])
        codes, scales = encode(ref, side)
        got = codec.decode(codes.numpy(), scales, side)
        assert np.linalg.norm(got - ref.numpy()) / np.linalg.norm(ref.numpy()) < 2e-3


def test_the_fingerprint_names_the_residual_only_when_there_is_one(fitted):
    fields = fitted["pq"].fingerprint_fields()
    assert fields["residual"] == "embeddings" and fields["pq_m"] == 8
    assert "residual" not in fitted["linear"].inner.fingerprint_fields()  # plain codecs: keys as before
    plain = codec_from_bytes(fitted["linear"].inner.to_bytes(), "plain")
    assert isinstance(plain, LinearCodec) and plain.residual == "none"
    with pytest.raises(CompressorError, match="residual=embeddings, but the store's fingerprint records residual=none"):
        codec_for_store(fitted["pq"].to_bytes(), "x", {"codec": "pq"})


def test_minilm_static_embedding_explains_most_of_the_lower_layers(minilm_path):
    """The statistic the codec rests on (bundled MiniLM, lower 3 layers, 120 real passages): the prediction
    leaves well under half the states' energy, and OPQ at 8 B/token reconstructs the states far better on
    the residual than on the states themselves (held-out passages)."""
    from pipeline.codec.state_codec import ResidualCodec
    from pipeline.codec.pq_training import PQFit, fit_pq

    model = ModelConfig(name=BUNDLED_MODEL, layers=3)
    rows = first_passages(160)
    t = PairTokenizer(model, 256)([r[2] for r in rows], [r[1] for r in rows])
    enc = LayeredEncoder(model, torch.device("cpu"))
    batches = []
    for part in (slice(0, 120), slice(120, 160)):
        i, tt, am = pad_batch(t.input_ids[part], t.token_type_ids[part], 0, "cpu")
        batches.append((enc.embed_and_lower(i, tt, am)[am.bool()].numpy(), SideInfo.from_padded(i, am)))
    (h_fit, s_fit), (h_test, s_test) = batches
    prediction, stats, (residual,) = fit_prediction(enc.model, [s_fit], [h_fit], 102, "minilm")
    assert float(stats["residual_energy_share"]) < 0.4
    raw = fit_pq(h_fit, PQFit(m=8, opq=True, opq_iterations=4, kmeans_iterations=8))
    res = ResidualCodec(fit_pq(residual, PQFit(m=8, opq=True, opq_iterations=4, kmeans_iterations=8)), prediction)
    err = {}
    for name, codec in (("raw", raw), ("residual", res)):
        codes, _ = codec.encoder("cpu", torch.float32)(torch.from_numpy(h_test), s_test)
        err[name] = np.linalg.norm(codec.decode(codes.numpy(), None, s_test) - h_test) / np.linalg.norm(h_test)
    assert err["residual"] < 0.75 * err["raw"], err


# ---------------------------------------------------------------- a residual store, end to end

@pytest.fixture(scope="module")
def qa_model(tmp_path_factory, minilm_path) -> str:
    from transformers import BertForQuestionAnswering

    return save_tiny_bert(BertForQuestionAnswering, tmp_path_factory.mktemp("tiny-qa-res"), minilm_path, seed=1,
                          max_positions=512)


def _cfg(store, corpus, model, **compression):
    return RunConfig(store=str(store), corpus=CorpusConfig(url=str(corpus)),
                     model=ModelConfig(name=model, layers=LAYERS, max_length=MAX_LEN),
                     compression=CompressionConfig(fit_sample=64, **{**RESIDUAL_PQ, **compression}),
                     execution=ExecutionConfig(shard_size=1000))


@pytest.fixture(scope="module")
def res_store(ray_local, tmp_path_factory, qa_model, tiny_model):
    tmp = tmp_path_factory.mktemp("residual")
    rows = first_passages(240)
    a = write_tsv(tmp / "a.tsv", rows)
    changed = {r[0] for r in rows[10:15]}
    deleted = {r[0] for r in rows[30:33]}
    b = edited_corpus(tmp / "b.tsv", rows, changed, deleted, 4, 60_000, "side information")
    cfg = dataclasses.replace(_cfg(tmp / "store", a, qa_model), dpr=DprConfig(model=tiny_model, pooling="mean"))
    summary = run(cfg)
    return dict(tmp=tmp, a=a, b=b, cfg=cfg, store=Store(cfg.store), summary=summary, changed=changed,
                deleted=deleted, model=qa_model)


def _direct(model: str, pids: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    rows = {r[0]: r for r in first_passages(240)}
    m = ModelConfig(name=model, layers=LAYERS, max_length=MAX_LEN)
    t = PairTokenizer(m, MAX_LEN)([rows[p][2] for p in pids], [rows[p][1] for p in pids])
    enc = LayeredEncoder(m, torch.device("cpu"))
    out = {}
    for pid, ids, types in zip(pids, t.input_ids, t.token_type_ids):
        i, tt, am = pad_batch([ids], [types], 0, "cpu")
        out[pid] = (ids.astype(np.int64), enc.embed_and_lower(i, tt, am)[0].numpy())
    return out


def test_the_store_records_the_residual_and_lookup_returns_what_the_codec_reconstructs(res_store, tmp_path):
    store = res_store["store"]
    m = mf.load(store)
    fp = m.fingerprint
    assert fp["residual"] == "embeddings" and fp["codec"] == "pq" and fp["pq_m"] == 8
    assert fp["compressor_sha256"] == m.artifacts["compressor"]["sha256"]
    reader = StateReader(store)
    assert isinstance(reader.codec, ResidualCodec)
    pids = [1, 7, 150, 239]
    got, enc = reader.get(pids), reader.get_encoded(pids)
    encode = reader.codec.encoder("cpu", torch.float32)
    for pid, (ids, h) in _direct(res_store["model"], pids).items():
        assert np.array_equal(enc[pid].token_ids, ids) and enc[pid].codes.shape == (ids.size, 8)
        codes, _ = encode(torch.from_numpy(h), SideInfo.of([ids]))
        assert (codes.numpy() == enc[pid].codes).mean() > 0.98  # the pipeline coded what a direct encode codes
        np.testing.assert_allclose(got[pid].states, reader.codec.decode(enc[pid].codes, None, SideInfo.of([ids])),
                                   rtol=1e-6)
    out = tmp_path / "s.npz"
    assert cli(["lookup", "--store", store.url, "--ids", "3,17", "--out", str(out)]) == 0
    z = np.load(out)
    assert z["states_17"].shape == (z["token_ids_17"].size, HIDDEN)
    np.testing.assert_allclose(z["states_17"], reader.get([17])[17].states, rtol=1e-6)


def test_validate_prices_a_residual_store_within_two_percent(res_store, capsys):
    capsys.readouterr()
    assert cli(["validate", "--store", res_store["store"].url, "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert abs(v["relative_error"]) <= 0.02 and v["estimated"]["scales"] == 0


def test_answer_decodes_through_the_codec(res_store, capsys):
    capsys.readouterr()
    assert cli(["answer", "--store", res_store["store"].url, "Who is Robert Boulter?", "-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["passages"]) == 3 and all(p["span"] is not None for p in out["passages"])
    from pipeline.serve.qa_reader import DecoupledReader, RuntimeConfig

    reader = DecoupledReader(res_store["store"], RuntimeConfig(device="cpu"))
    ids = [5, 17, 42]
    encoded = reader.states.get_encoded(ids)
    plain = reader.states.get(ids)
    for i, states in zip(ids, reader.decode([encoded[i] for i in ids])):
        np.testing.assert_allclose(states.float().numpy(), plain[i].states, rtol=1e-4, atol=1e-4)


def test_another_artifact_is_refused_or_starts_a_new_lineage(res_store, tmp_path):
    tmp = tmp_path
    shutil.copytree(res_store["store"].url, tmp / "store")
    store = Store(str(tmp / "store"))
    first = mf.load(store)
    # a residual artifact fitted with other settings: another sha256, so a new fingerprint that reuses nothing
    other = tmp / "other.safetensors"
    rows = first_passages(120)
    codec = fit_codec(ModelConfig(name=res_store["model"], layers=LAYERS, max_length=MAX_LEN), [r[2] for r in rows],
                      [r[1] for r in rows], CompressionConfig(**{**RESIDUAL_PQ, "opq": False}), MAX_LEN,
                      torch.device("cpu"))
    other.write_bytes(codec.to_bytes())
    again = run(_cfg(tmp / "store", res_store["a"], res_store["model"], opq=False, compressor=str(other)))
    assert again.committed and again.shards_resumed == 0 and again.passages_encoded_this_run == 240
    second = mf.load(store)
    assert second.fingerprint["compressor_sha256"] != first.fingerprint["compressor_sha256"]
    assert StateReader(store, first.version).codec.inner.rotation is not None  # each version its own codec
    # a residual artifact under --residual none (and a plain one under --residual embeddings) is refused
    with pytest.raises(ConfigError, match="pass --residual embeddings"):
        run(_cfg(tmp / "store3", res_store["a"], res_store["model"], opq=False, residual="none",
                 compressor=str(other)))
    assert not (tmp / "store3").exists() or not mf.list_versions(Store(str(tmp / "store3")))


def test_update_keeps_the_parents_codec_and_compact_keeps_the_states(res_store, tmp_path):
    from pipeline.flows.compact import compact
    from pipeline.flows.update import run_update

    copy = tmp_path / "store"
    shutil.copytree(res_store["store"].url, copy)
    store = Store(str(copy))
    before_versions = mf.list_versions(store)
    wrong = _cfg(copy, res_store["b"], res_store["model"], residual="none")
    with pytest.raises(ConfigError, match="pass --residual embeddings"):  # the parent's codec is never swapped
        run_update(wrong)
    assert mf.list_versions(store) == before_versions
    parent = mf.load(store)
    summary = run_update(dataclasses.replace(res_store["cfg"], store=str(copy), corpus=CorpusConfig(url=str(res_store["b"]))))
    assert summary.counts == {"new": 4, "changed": 5, "deleted": 3, "unchanged": 232}
    after = mf.load(store)
    assert after.artifacts["compressor"] == parent.artifacts["compressor"]
    assert after.fingerprint["residual"] == "embeddings"
    probe = sorted(res_store["changed"])[:2] + [60_000, 60_003, 1, 239]
    got = StateReader(store).get(probe)
    assert sorted(got) == sorted(probe)
    compact(store, shard_size=1000)
    for pid, s in StateReader(store).get(probe).items():
        assert np.array_equal(s.states, got[pid].states)


def test_a_corrupted_artifact_is_refused_by_checksum(res_store, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(res_store["store"].url, copy)
    art = mf.load(Store(str(copy))).artifacts["compressor"]
    path = copy / art["path"]
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x20  # same size, one bit inside the embedding tables or the map
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="checksum"):
        StateReader(Store(str(copy)))
    assert cli(["lookup", "--store", str(copy), "--ids", "3", "--out", str(tmp_path / "x.npz")]) != 0
    assert not (tmp_path / "x.npz").exists()


def test_a_store_written_without_a_residual_reads_as_before(ray_local, tmp_path, tiny_model):
    rows = first_passages(80)
    corpus = write_tsv(tmp_path / "c.tsv", rows)
    cfg = RunConfig(store=str(tmp_path / "plain"), corpus=CorpusConfig(url=str(corpus)),
                    model=ModelConfig(name=tiny_model, layers=LAYERS), compression=CompressionConfig(dims=16, fit_sample=40))
    assert run(cfg).committed
    fp = mf.load(Store(cfg.store)).fingerprint
    assert "residual" not in fp  # a store of today's codecs keeps today's fingerprint keys
    assert set(fp) == {"model", "model_revision", "layers", "max_length", "compressor_sha256", "dims", "quantize",
                       "bits", "zstd_level", "schema_version"}
    reader = StateReader(Store(cfg.store))
    assert isinstance(reader.codec, LinearCodec) and reader.codec.residual == "none"
    e = reader.get_encoded([3])[3]
    np.testing.assert_array_equal(reader.get([3])[3].states, reader.codec.decode(e.codes, e.scales))


def test_bad_residual_values_are_refused(tmp_path, capsys, tiny_model):
    with pytest.raises(SystemExit) as exc:
        cli(["run", "--store", str(tmp_path / "s"), "--residual", "tokens"])
    assert exc.value.code == 2
    with pytest.raises(ConfigError, match="residual='tokens' is not one of none, embeddings"):
        run_config_from_dict({"store": str(tmp_path / "s"), "compression": {"residual": "tokens"}})
    base = ["report", "--model", tiny_model, "--layers", "2", "--pq-m", "", "--dims", "8", "--bits", "8",
            "--fit-sample", "8", "--sample", "4", "--out-dir", str(tmp_path / "r")]
    assert cli([*base, "--residual-pq-m", "5"]) == 2
    assert cli([*base, "--residual-linear", "16"]) == 2
    assert cli([*base, "--residual-linear", "64:8"]) == 2
    assert not (tmp_path / "r").exists()


def test_report_prices_the_residual_families_against_the_reference(tmp_path, capsys, tiny_model):
    """Logic only (tiny random model): each residual family is in the table, the JSON and the comparison."""
    assert cli(["report", "--model", tiny_model, "--layers", "2", "--pq-m", "8", "--dims", "8", "--bits", "8,16",
                "--fit-sample", "40", "--sample", "10", "--residual-pq-m", "4,8", "--residual-linear", "8:8,4:5.25",
                "--reference", "8:8", "--device", "cpu", "--out-dir", str(tmp_path / "r")]) == 0
    points = json.loads((tmp_path / "r" / "rate_distortion.json").read_text())
    families = {p["family"] for p in points}
    assert {"linear", "opq", "residual-opq", "residual-linear"} <= families
    res = [p for p in points if p["family"] == "residual-opq"]
    assert sorted(p["bytes_per_token"] for p in res) == [4, 8]
    assert all(p["all_in_bytes_per_token"] > p["bytes_per_token"] + 2 for p in points)
    md = (tmp_path / "r" / "rate_distortion.md").read_text()
    assert "| residual-opq |" in md and "| residual-linear |" in md and "cheapest at or above" in md
    assert (tmp_path / "r" / "rate_distortion.png").stat().st_size > 1000


def test_fit_compressor_and_fidelity_cli_take_the_residual(tmp_path, capsys, tiny_model, sample_tsv):
    out = tmp_path / "res.safetensors"
    assert cli(["fit-compressor", "--corpus", str(sample_tsv), "--model", tiny_model, "--layers", "2", "--codec", "pq",
                "--pq-m", "8", "--residual", "embeddings", "--sample", "40", "--out", str(out)]) == 0
    assert "on the residual after the static-embedding prediction" in capsys.readouterr().out
    assert artifact_kind(out.read_bytes()) == "pq+residual"
    assert cli(["fidelity", "--corpus", str(sample_tsv), "--model", tiny_model, "--layers", "2", "--compressor",
                str(out), "--sample", "10", "--json", str(tmp_path / "f.json")]) == 0
    rows = json.loads((tmp_path / "f.json").read_text())
    assert len(rows) == 1 and rows[0]["bytes_per_token_raw"] == 8 and 0 < rows[0]["token_cosine"] <= 1
