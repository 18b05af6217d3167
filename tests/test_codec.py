"""State codecs: one interface for the linear (paper) codec and product quantisation (PQ/OPQ).

Unit tests on synthetic states; a PQ store on the sample through run, lookup, update, compact,
validate (tiny model: logic, not statistics; fidelity figures come from `precompute report`)."""
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import torch

from jobs.cli import main as cli
from pipeline.codec.state_codec import CODECS, CodeLayout, LinearCodec, PQCodec, codec_for_store, codec_from_bytes, planned_layout
from pipeline.codec.projection import CompressorError, PcaAccumulator
from pipeline.config import CompressionConfig, ConfigError, CorpusConfig, ExecutionConfig, ModelConfig, RunConfig
from pipeline.codec.pq_training import PQFit, fit_pq
from pipeline.serve.state_reader import StateReader
from pipeline.flows.run import run
from storage import manifest as mf
from storage.fs import IntegrityError, Store
from tests.conftest import edited_corpus, first_passages, write_tsv

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _correlated_states(n=4000, hidden=48, seed=0) -> np.ndarray:
    """Token-state-like data: a few strong correlated directions plus noise, not axis-aligned."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((hidden, hidden)))[0]
    scales = np.geomspace(4.0, 0.05, hidden)
    return ((rng.standard_normal((n, hidden)) * scales) @ basis.T + 0.3).astype(np.float32)


def _codecs(x: np.ndarray) -> dict[str, object]:
    acc = PcaAccumulator(x.shape[1])
    acc.update(x)
    comp = acc.finish(16)
    return {"linear-int8": LinearCodec(comp, "int8", 8), "linear-5.25": LinearCodec(comp, "int8", 5.25),
            "linear-fp16": LinearCodec(comp, "none"), "pq": fit_pq(x, PQFit(m=12)),
            "opq-projected": fit_pq(x, PQFit(m=8, opq=True, dims=16))}


@pytest.fixture(scope="module")
def codecs():
    x = _correlated_states()
    return x, _codecs(x)


def test_every_codec_round_trips_through_one_interface(codecs):
    """The reader's path, for each codec alike: encode on the device -> bytes in the layout -> decode."""
    x, all_codecs = codecs
    h = torch.from_numpy(x[:300])
    for name, codec in all_codecs.items():
        codes, scales = codec.encoder(torch.device("cpu"), torch.float32)(h)
        layout = codec.layout
        assert codes.dtype == getattr(torch, layout.dtype) and codes.shape == (300, layout.width), name
        assert (scales is not None) == layout.scaled, name
        raw = codes.numpy().tobytes()
        assert len(raw) == layout.nbytes(300), name
        back = layout.view(raw, 300)
        np_states = codec.decode(back, None if scales is None else scales.numpy())
        torch_states = codec.decode_torch(torch.from_numpy(back.copy()), scales).numpy()
        assert np_states.shape == (300, x.shape[1]) and np_states.dtype == np.float32, name
        np.testing.assert_allclose(np_states, torch_states, rtol=1e-4, atol=1e-4, err_msg=name)
        rel = np.linalg.norm(np_states - x[:300]) / np.linalg.norm(x[:300])
        assert rel < 0.5, (name, rel)
        # the artifact reloads to the same codec (same codes, same bytes)
        again = codec_from_bytes(codec.to_bytes(), name, getattr(codec, "quantize", "int8"), getattr(codec, "bits", 8))
        assert again.to_bytes() == codec.to_bytes(), name
        c2, _ = again.encoder(torch.device("cpu"), torch.float32)(h)
        assert torch.equal(c2, codes), name


def test_pq_codes_are_nearest_centroids_and_more_subquantisers_reconstruct_better():
    x = _correlated_states(3000, 48, seed=1)
    errors = {}
    for m in (4, 12, 24):
        codec = fit_pq(x, PQFit(m=m))
        codes, _ = codec.encoder("cpu", torch.float32)(torch.from_numpy(x[:50]))
        # brute force: every sub-space's nearest centroid
        sub = x[:50].reshape(50, m, -1)
        dist = ((sub[:, :, None, :] - codec.centroids[None]) ** 2).sum(-1)
        assert (codes.numpy() == dist.argmin(-1)).mean() > 0.99
        rec = codec.decode(codes.numpy())
        errors[m] = np.linalg.norm(rec - x[:50]) / np.linalg.norm(x[:50])
    assert errors[4] > errors[12] > errors[24]


def test_opq_rotation_is_orthonormal_and_beats_plain_pq_on_correlated_states():
    x = _correlated_states(4000, 48, seed=2)
    plain, rotated = fit_pq(x, PQFit(m=6)), fit_pq(x, PQFit(m=6, opq=True))
    r = rotated.rotation
    np.testing.assert_allclose(r @ r.T, np.eye(48), atol=1e-4)

    def err(c):
        codes, _ = c.encoder("cpu", torch.float32)(torch.from_numpy(x))
        return np.linalg.norm(c.decode(codes.numpy()) - x) / np.linalg.norm(x)
    assert err(rotated) < 0.95 * err(plain)


def test_fit_is_deterministic_and_the_artifact_hash_follows_the_codebook():
    x = _correlated_states(2000, 24, seed=3)
    a, b = fit_pq(x, PQFit(m=6, seed=7)), fit_pq(x, PQFit(m=6, seed=7))
    assert a.to_bytes() == b.to_bytes()
    c = fit_pq(x, PQFit(m=6, seed=8))
    assert c.to_bytes() != a.to_bytes()
    assert a.fingerprint_fields() == {"codec": "pq", "dims": 24, "quantize": "pq", "bits": 8, "pq_m": 6, "opq": False}


def test_bad_codec_files_and_settings_are_refused_with_a_reason():
    x = _correlated_states(2000, 24)
    data = fit_pq(x, PQFit(m=6)).to_bytes()
    with pytest.raises(CompressorError, match="not a safetensors"):
        codec_from_bytes(b"\x00" * 40, "junk")
    with pytest.raises(CompressorError, match="not a safetensors"):
        codec_from_bytes(data[: len(data) // 2], "truncated")
    from safetensors.numpy import save
    with pytest.raises(CompressorError, match=r"pq.centroids of shape \[m, 256, dsub\]"):
        codec_from_bytes(save({"pq.centroids": np.zeros((4, 16, 6), np.float32)}, metadata={"codec": "pq"}), "f")
    with pytest.raises(CompressorError, match="NaN"):
        codec_from_bytes(save({"pq.centroids": np.full((4, 256, 6), np.nan, np.float32)}, metadata={"codec": "pq"}), "f")
    with pytest.raises(CompressorError, match="opq.rotation"):
        codec_from_bytes(save({"pq.centroids": np.zeros((4, 256, 6), np.float32),
                               "opq.rotation": np.eye(5, dtype=np.float32)}, metadata={"codec": "pq"}), "f")
    with pytest.raises(CompressorError, match="divisor"):
        fit_pq(x, PQFit(m=5))
    with pytest.raises(CompressorError, match="at least 256 token states"):
        fit_pq(x[:100], PQFit(m=6))
    with pytest.raises(CompressorError, match="fingerprint records linear"):
        codec_for_store(data, "f", {"quantize": "int8", "bits": 8})
    with pytest.raises(ConfigError, match="pq_m=5 must be a positive divisor of dims=96"):
        CompressionConfig(codec="pq", dims=96, pq_m=5)
    with pytest.raises(ConfigError, match="codec='opq' is not one of"):
        CompressionConfig(codec="opq")
    assert CompressionConfig().dims == 192 and CompressionConfig(codec="pq").dims is None


def test_layouts_feed_the_storage_model_without_naming_a_codec():
    assert planned_layout("pq", 384, pq_m=32).estimate_fields() == {"dims": 32, "bits": 8, "scale_bytes": 0.0}
    assert planned_layout("linear", 96, "int8").estimate_fields(5.25) == {"dims": 96, "bits": 5.25, "scale_bytes": 2.0}
    assert planned_layout("linear", 96, "none").estimate_fields() == {"dims": 96, "bits": 16, "scale_bytes": 0.0}
    assert CodeLayout("uint8", 32, False).nbytes(10) == 320 and set(CODECS) == {"linear", "pq"}


def test_readers_and_validate_never_branch_on_a_codec():
    """Decoding and byte accounting go through the interface: no codec class or kind named there."""
    root = Path(__file__).resolve().parents[1]
    for rel in ("pipeline/serve/state_reader.py", "storage/footprint.py", "pipeline/model/encoder.py", "pipeline/workers/sink.py"):
        text = (root / rel).read_text()
        for word in ("PQCodec", "LinearCodec", '"pq"', "'pq'", "dequantize", "Compressor"):
            assert word not in text, (rel, word)


# ---------------------------------------------------------------- a PQ store, end to end

def _pq_cfg(store, corpus, tiny_model, compressor=None, opq=True):
    return RunConfig(store=str(store), corpus=CorpusConfig(url=str(corpus)), model=ModelConfig(name=tiny_model, layers=2),
                     compression=CompressionConfig(codec="pq", pq_m=16, opq=opq, fit_sample=64, compressor=compressor),
                     execution=ExecutionConfig(shard_size=200))


@pytest.fixture(scope="module")
def pq_store(ray_local, tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("pq")
    rows = first_passages(600)
    a = write_tsv(tmp / "a.tsv", rows)
    changed = {r[0] for r in rows[10:20]}
    deleted = {r[0] for r in rows[30:35]}
    b = edited_corpus(tmp / "b.tsv", rows, changed, deleted, 5, 50_000, "product quantisation")
    summary = run(_pq_cfg(tmp / "store", a, tiny_model))
    return dict(tmp=tmp, a=a, b=b, store=Store(str(tmp / "store")), summary=summary, changed=changed,
                deleted=deleted, tiny_model=tiny_model)


def _direct_states(tiny_model, pids):
    """The input component's states for these passages, computed here without the pipeline."""
    from pipeline.model.encoder import LayeredEncoder, pad_batch
    from pipeline.model.tokenizer import PairTokenizer

    model = ModelConfig(name=tiny_model, layers=2)
    rows = {r[0]: r for r in first_passages(600)}
    tok = PairTokenizer(model, 128)([rows[p][2] for p in pids], [rows[p][1] for p in pids])
    enc = LayeredEncoder(model, torch.device("cpu"))
    out = {}
    for pid, ids, types in zip(pids, tok.input_ids, tok.token_type_ids):
        i, t, am = pad_batch([ids], [types], 0, "cpu")
        out[pid] = enc.embed_and_lower(i, t, am)[0].numpy()
    return out


def test_pq_store_holds_uint8_codes_and_reads_back_what_the_codec_reconstructs(pq_store):
    store = pq_store["store"]
    m = mf.load(store)
    fp = m.fingerprint
    assert fp["codec"] == "pq" and fp["pq_m"] == 16 and fp["opq"] is True and fp["dims"] == 32
    reader = StateReader(store)
    assert isinstance(reader.codec, PQCodec) and reader.codec.rotation is not None
    pids = [1, 7, 250, 599]
    got, enc = reader.get(pids), reader.get_encoded(pids)
    direct = _direct_states(pq_store["tiny_model"], pids)
    encode = reader.codec.encoder("cpu", torch.float32)
    for pid in pids:
        assert enc[pid].codes.dtype == np.uint8 and enc[pid].codes.shape == (len(enc[pid].token_ids), 16)
        assert enc[pid].scales is None
        codes, _ = encode(torch.from_numpy(direct[pid]))
        assert (codes.numpy() == enc[pid].codes).mean() > 0.98  # same codes as a direct encode
        np.testing.assert_allclose(got[pid].states, reader.codec.decode(enc[pid].codes), rtol=1e-6)
    # raw uint8 codes (a PQ store's default is no zstd: its codes do not compress), no scales
    from storage.footprint import measure
    assert fp["zstd_level"] == 0
    footprint = measure(store, m)
    split = footprint.split()
    assert split["scales"] < 0.01 * split["codes"]
    assert footprint.raw_codes == footprint.tokens * 16  # exactly M bytes per token, before Parquet's own encoding


def test_pq_store_lookup_cli_and_validate_within_two_percent(pq_store, tmp_path, capsys):
    store = pq_store["store"]
    out = tmp_path / "s.npz"
    assert cli(["lookup", "--store", store.url, "--ids", "3,17", "--out", str(out)]) == 0
    z = np.load(out)
    assert z["states_17"].shape[1] == 32 and z["token_ids_17"].size == z["states_17"].shape[0]
    capsys.readouterr()
    assert cli(["validate", "--store", store.url, "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert abs(v["relative_error"]) <= 0.02 and v["estimated"]["scales"] == 0
    # the estimate command, given the measured tokens/passage and zstd ratio, prices the same bytes
    assert cli(["estimate", "--codec", "pq", "--pq-m", "16", "--hidden", "32", "--passages", str(v["target_passages"]),
                "--tokens-per-passage", str(v["tokens_per_passage"]), "--zstd-ratio", str(v["zstd_ratio"]),
                "--dpr-dim", "0", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert abs(e["states_bytes_per_token"] - v["estimated_per_token"]) / v["estimated_per_token"] < 1e-6
    assert e["components_bytes"]["scales"] == 0


def test_resume_with_a_different_codebook_reuses_nothing(pq_store):
    tmp = pq_store["tmp"]
    store = pq_store["store"]
    first = mf.load(store)
    # a codebook fitted with other settings (plain PQ): a different sha256, so a different fingerprint
    other = tmp / "other.safetensors"
    x = np.concatenate([s.states for s in StateReader(store).get(range(1, 60)).values()])
    other.write_bytes(fit_pq(x, PQFit(m=16, seed=99)).to_bytes())
    again = run(_pq_cfg(tmp / "store", pq_store["a"], pq_store["tiny_model"], compressor=str(other), opq=False))
    assert again.committed and again.shards_resumed == 0 and again.passages_encoded_this_run == 600
    second = mf.load(store)
    assert second.fingerprint["compressor_sha256"] != first.fingerprint["compressor_sha256"]
    assert second.fingerprint["opq"] is False
    assert StateReader(store, first.version).codec.rotation is not None  # each version decodes with its own codec
    assert StateReader(store, second.version).codec.rotation is None
    # a codebook of another size is refused before anything runs
    with pytest.raises(ConfigError, match="pass --pq-m 16"):
        run(RunConfig(store=str(tmp / "store2"), corpus=CorpusConfig(url=str(pq_store["a"])),
                      model=ModelConfig(name=pq_store["tiny_model"], layers=2),
                      compression=CompressionConfig(codec="pq", pq_m=4, compressor=str(other))))


def test_pq_store_updates_and_compacts(pq_store):
    from pipeline.flows.compact import compact
    from pipeline.flows.update import run_update

    store = pq_store["store"]
    versions = mf.list_versions(store)
    other = dataclasses.replace(_pq_cfg(pq_store["tmp"] / "store", pq_store["b"], pq_store["tiny_model"]),
                                compression=CompressionConfig(codec="pq", pq_m=8, fit_sample=64))
    with pytest.raises(ConfigError, match="pass --pq-m 16"):  # another codebook size never extends this version
        run_update(other)
    assert mf.list_versions(store) == versions
    summary = run_update(_pq_cfg(pq_store["tmp"] / "store", pq_store["b"], pq_store["tiny_model"], opq=False))
    assert summary.counts == {"new": 5, "changed": 10, "deleted": 5, "unchanged": 585}
    after = mf.load(store)
    reader = StateReader(store)
    ids = reader.ids()
    assert ids.size == 600 and not set(pq_store["deleted"]) & set(ids.tolist())
    probe = sorted(pq_store["changed"])[:3] + [50_000, 50_004, 1, 599]
    before = reader.get(probe)
    assert sorted(before) == sorted(probe)
    compact(store, shard_size=1000)
    compacted = StateReader(store)
    assert np.array_equal(compacted.ids(), ids) and mf.load(store).version == after.version + 1
    for pid, s in compacted.get(probe).items():
        assert np.array_equal(s.states, before[pid].states)


def test_fit_and_fidelity_cli_and_dry_run_price_a_pq_codec(pq_store, tmp_path, capsys):
    tiny, corpus = pq_store["tiny_model"], str(pq_store["a"])
    out = tmp_path / "pq.safetensors"
    assert cli(["fit-compressor", "--corpus", corpus, "--model", tiny, "--layers", "2", "--codec", "pq", "--pq-m", "8",
                "--opq", "--sample", "60", "--out", str(out)]) == 0
    assert "OPQ 32 dims, 8 sub-quantisers" in capsys.readouterr().out
    assert cli(["fidelity", "--corpus", corpus, "--model", tiny, "--layers", "2", "--compressor", str(out),
                "--sample", "20", "--json", str(tmp_path / "f.json")]) == 0
    rows = json.loads((tmp_path / "f.json").read_text())
    assert len(rows) == 1 and rows[0]["bytes_per_token_raw"] == 8 and 0 < rows[0]["token_cosine"] <= 1
    plans = {}
    for codec in (["--codec", "linear", "--dims", "8"], ["--codec", "pq", "--pq-m", "8"]):
        capsys.readouterr()
        assert cli(["run", "--store", str(tmp_path / "never"), "--corpus", corpus, "--model", tiny, "--layers", "2",
                    *codec, "--dry-run", "--json"]) == 0
        plans[codec[1]] = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "never").exists()
    assert "pq codec: 8 x uint8" in plans["pq"]["storage_basis"]
    assert plans["pq"]["storage_bytes"] < plans["linear"]["storage_bytes"]


def test_a_corrupted_codebook_is_refused_by_checksum(pq_store, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(pq_store["store"].url, copy)
    store = Store(str(copy))
    art = mf.load(store).artifacts["compressor"]
    path = copy / art["path"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # same size, one flipped bit inside a centroid
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="checksum"):
        StateReader(store)
    assert cli(["lookup", "--store", str(copy), "--ids", "3", "--out", str(tmp_path / "x.npz")]) != 0
    assert not (tmp_path / "x.npz").exists()
