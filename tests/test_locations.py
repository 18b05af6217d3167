"""Each location gets its own credentials: the corpus on one S3 server, the store on another.

Two moto servers, each in its own process (so they share no state) and behind a loopback proxy
that records every request's Authorization header: what each server was asked, and as whom."""
import json
import re
import sys
from dataclasses import dataclass

import cloudpickle
import pytest

from jobs.cli import main as cli
from pipeline.config import CompressionConfig, ConfigError, CorpusConfig, ModelConfig, RunConfig, run_config_from_dict
from pipeline.flows.run import run
from storage import manifest as mf
from storage.fs import Location, Store
from tests.conftest import first_passages, make_bucket, s3_options, s3_server_process, write_tsv
from tests.flaky_proxy import FlakyProxy

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])

N = 200
KEY_A, SECRET_A = "AKIACORPUSSERVERA000", "corpus-secret-A-never-logged-71c2"
KEY_B, SECRET_B = "AKIASTORESERVERB0000", "store-secret-B-never-logged-9d0e"
# moto checks a HEAD against "s3:HeadObject" (AWS: s3:GetObject covers it), so the public bucket allows both
PUBLIC_READ = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*",
                                                       "Action": ["s3:GetObject", "s3:HeadObject", "s3:ListBucket"],
                                                       "Resource": ["arn:aws:s3:::{b}", "arn:aws:s3:::{b}/*"]}]}
DENY_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:*",
                                                    "Resource": ["arn:aws:s3:::{b}", "arn:aws:s3:::{b}/*"]}]}


@dataclass
class Server:
    endpoint: str  # direct, for setting buckets up
    proxy: FlakyProxy  # what the code under test talks to: it records who asked
    key: str
    secret: str

    def options(self) -> dict:
        return s3_options(self.proxy.url, self.key, self.secret)

    def bucket(self, objects: dict | None = None, policy: dict | None = None) -> str:
        return make_bucket(self.endpoint, self.key, self.secret, objects, policy)

    def access_keys(self) -> set[str]:
        """The access key ids of every request this server got ('' for an unsigned one)."""
        return {(re.search(r"Credential=([^/]+)/", auth) or [None, ""])[1] for _, _, auth in self.proxy.requests}


@pytest.fixture(scope="module")
def servers():
    with s3_server_process() as a_url, s3_server_process() as b_url, \
            FlakyProxy(a_url, 0, 0) as a_proxy, FlakyProxy(b_url, 0, 0) as b_proxy:
        yield Server(a_url, a_proxy, KEY_A, SECRET_A), Server(b_url, b_proxy, KEY_B, SECRET_B)


@pytest.fixture
def corpus_tsv(tmp_path) -> bytes:
    return write_tsv(tmp_path / "c.tsv", first_passages(N)).read_bytes()


def _fresh(*servers: Server) -> None:
    for s in servers:
        s.proxy.requests.clear()


def _no_secret_anywhere(store: Store, log_text: str, *secrets: str) -> None:
    files = store.walk_files()
    assert files
    for f in files:
        data = store.read_bytes(f.path)
        for secret in secrets:
            assert secret.encode() not in data, f.path
    for secret in secrets:
        assert secret not in log_text


def test_corpus_and_store_on_two_servers_each_see_only_their_own_key(ray_local, servers, corpus_tsv, tiny_model,
                                                                     caplog, capsys):
    a, b = servers
    corpus = f"s3://{a.bucket({'c.tsv': corpus_tsv})}/c.tsv"
    store = f"s3://{b.bucket()}/store"
    _fresh(a, b)
    assert cli(["run", "--corpus", corpus, "--corpus-storage-options", json.dumps(a.options()),
                "--store", store, "--storage-options", json.dumps(b.options()), "--limit", str(N),
                "--model", tiny_model, "--layers", "1", "--dims", "8", "--fit-sample", "64", "--shard-size", "50",
                "--dpr-model", tiny_model, "--dpr-pooling", "mean"]) == 0
    reads = [(m, p) for m, p, _ in a.proxy.requests if m == "GET" and "c.tsv" in p]
    assert len(reads) >= 4, reads  # the plan on the driver and the workers' splits all read server A
    assert a.access_keys() == {KEY_A}
    assert b.access_keys() == {KEY_B}
    assert not any(KEY_B in auth for *_, auth in a.proxy.requests)
    assert not any(KEY_A in auth for *_, auth in b.proxy.requests)

    args = ["--store", store, "--storage-options", json.dumps(b.options())]
    assert cli(["verify", *args]) == 0
    capsys.readouterr()
    assert cli(["search", *args, "Who is Robert Boulter?", "-k", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3
    assert a.access_keys() == {KEY_A}  # verify and search never touched the corpus's server
    written = Store(store, b.options())
    assert mf.load(written).counts["accepted"] == N
    _no_secret_anywhere(written, caplog.text, SECRET_A, SECRET_B)


def test_a_public_corpus_is_read_anonymously_while_the_store_uses_its_credentials(ray_local, servers, corpus_tsv,
                                                                                 tiny_model, capsys):
    a, b = servers
    corpus = f"s3://{a.bucket({'c.tsv': corpus_tsv}, PUBLIC_READ)}/c.tsv"
    store = f"s3://{b.bucket()}/store"
    anon = {"anon": True, "endpoint_url": a.proxy.url}
    _fresh(a, b)
    cfg = RunConfig(store=store, storage_options=b.options(), corpus_storage_options=anon,
                    corpus=CorpusConfig(url=corpus, limit=N), model=ModelConfig(name=tiny_model, layers=1),
                    compression=CompressionConfig(dims=8, fit_sample=64))
    summary = run(cfg)
    assert summary.written == N
    assert a.proxy.requests and a.access_keys() == {""}  # every corpus request unsigned
    assert b.access_keys() == {KEY_B}
    # `update` takes the corpus's own options too: the same corpus, nothing to do
    capsys.readouterr()
    assert cli(["update", "--store", store, "--storage-options", json.dumps(b.options()), "--corpus", corpus,
                "--corpus-storage-options", json.dumps(anon), "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["update"]["counts"] == {"new": 0, "changed": 0, "deleted": 0,
                                                                         "unchanged": N}
    assert a.access_keys() == {""} and b.access_keys() == {KEY_B}


def _one_line(caplog, expected: str) -> None:
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [expected], errors
    assert "Traceback" not in caplog.text and "botocore" not in caplog.text


def test_a_refused_location_is_named_in_one_line(servers, corpus_tsv, tiny_model, caplog):
    a, b = servers
    denied = a.bucket({"c.tsv": corpus_tsv, "codec.safetensors": b"x"}, DENY_ALL)
    store = f"s3://{b.bucket()}/store"
    base = ["--store", store, "--storage-options", json.dumps(b.options()), "--model", tiny_model,
            "--layers", "1", "--dims", "8"]
    corpus = ["--corpus", f"s3://{denied}/c.tsv", "--corpus-storage-options", json.dumps(a.options())]
    for extra in ([], ["--dry-run"]):
        caplog.clear()
        assert cli(["run", *base, *corpus, *extra]) == 2
        _one_line(caplog, f"corpus: access denied for s3://{denied}/c.tsv (check --corpus-storage-options)")
    caplog.clear()
    assert cli(["run", *base, "--compressor", f"s3://{denied}/codec.safetensors",
                "--compressor-storage-options", json.dumps(a.options())]) == 2
    _one_line(caplog, f"compressor: access denied for s3://{denied}/codec.safetensors "
                      f"(check --compressor-storage-options)")
    assert Store(store, b.options()).walk_files() == []  # nothing written
    assert SECRET_A not in caplog.text and SECRET_B not in caplog.text


def test_options_belong_to_one_location_each():
    body = {"store": "s3://bucket/store", "storage_options": {"key": "store-key"},
            "corpus": {"url": "s3://public/corpus.tsv", "storage_options": {"anon": True}},
            "compression": {"compressor": "s3://bucket/store/artifacts/c.safetensors"}}
    cfg = run_config_from_dict(body)
    assert cfg.corpus_storage_options == {"anon": True}
    assert cfg.compressor_location.options == {"key": "store-key"}  # under the store's URL: the store's
    elsewhere = {**body, "compression": {"compressor": "s3://bucket/store-other/c.safetensors"}}
    assert run_config_from_dict(elsewhere).compressor_location.options == {}  # a sibling prefix is not "under"
    own = {**body, "compression": {"compressor": "gs://m/c.safetensors", "storage_options": {"token": "anon"}}}
    assert run_config_from_dict(own).compressor_location.options == {"token": "anon"}
    assert run_config_from_dict({"store": "s"}).corpus_storage_options == {}
    recorded = json.dumps(cfg.public_dict())
    assert "store-key" not in recorded and "anon" not in recorded and "storage_options" not in recorded
    assert "store-key" not in repr(cfg) and "store-key" not in repr(cfg.compressor_location)
    for bad in ({"corpus": {"storage_options": "anon"}}, {"compression": {"storage_options": [1]}}):
        with pytest.raises(ConfigError, match=r"\.storage_options: must be a mapping"):
            run_config_from_dict({"store": "s", **bad})
    with pytest.raises(ConfigError, match="corpus.storag_options: unknown key .*storage_options"):
        run_config_from_dict({"store": "s", "corpus": {"storag_options": {}}})
    assert Location("corpus", "s3://u:p@b/x", {"secret": "s"}).refused(PermissionError("Forbidden")).args == (
        "corpus: access denied for s3://b/x (check --corpus-storage-options)",)
    assert "check the file permissions" in str(Location("corpus", "/data/c.tsv").refused(PermissionError()))
    assert Location("store", "s3://b/x").refused(ValueError("not a refusal")) is None
