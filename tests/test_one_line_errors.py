"""Every error a user can cause is one line (issue 30): an unreachable, denied or throttling store or
corpus, a TSV whose header holds a stray carriage return or binary data, a missing fsspec backend, a flag out
of range, an empty corpus file. Each names the location or file and what fixes it, never a traceback."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from jobs.cli import main as cli
from pipeline.config import RunConfig, run_config_from_dict
from pipeline.corpus.rows import CorpusError
from storage.errors import OperationFailed, UsageError, find_product_error
from storage.fs import Location
from tests.conftest import S3_SECRET, make_bucket, s3_options, s3_server_process, write_tsv
from tests.flaky_proxy import FlakyProxy

REPO = Path(__file__).resolve().parents[1]

# Runs the CLI with ray.init refused: a run that meets a bad corpus must say so before Ray starts.
NO_RAY = ("import sys, ray\n"
          "def refused(*a, **k):\n"
          "    raise RuntimeError('ray.init was called: the corpus was not checked before Ray started')\n"
          "ray.init = refused\n"
          "from jobs.cli import main\n"
          "sys.exit(main(sys.argv[1:]))\n")


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_EC2_METADATA_DISABLED": "true", "OPENBLAS_NUM_THREADS": "1"}
    for k in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(k, None)
    return {**env, **extra}


def _precompute(args: list[str], env: dict | None = None, no_ray: bool = False, timeout: int = 240):
    head = [sys.executable, "-c", NO_RAY] if no_ray else [sys.executable, "-m", "jobs.cli"]
    return subprocess.run([*head, *args], cwd=REPO, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)


def _one_error_line(p: subprocess.CompletedProcess) -> str:
    """The one ERROR line of a failed command; no traceback anywhere."""
    assert p.returncode != 0, p.stdout[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, p.stderr[-3000:]
    return errors[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on leaving: a connection to it is refused


# ---------------------------------------------------------------- 1. unreachable, denied, throttled


def test_every_store_command_names_an_unreachable_endpoint_in_one_line(tmp_path, sample_tsv):
    port = _closed_port()
    opts = json.dumps(s3_options(f"http://127.0.0.1:{port}"))
    store = ["--store", "s3://bucket/store", "--storage-options", opts]
    commands = {
        "verify": ["verify", *store],
        "lookup": ["lookup", *store, "--ids", "1", "--out", str(tmp_path / "o.npz")],
        "update": ["update", *store, "--corpus", str(sample_tsv)],
        "gc": ["gc", *store],
        "search": ["search", "who wrote it", *store, "--device", "cpu"],
    }
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        done = dict(zip(commands, pool.map(_precompute, commands.values())))
    for name, p in done.items():
        line = _one_error_line(p)
        assert p.returncode == 2, (name, line)
        assert f"store: cannot reach s3://bucket/store at http://127.0.0.1:{port}" in line, (name, line)
        assert "check endpoint_url in --storage-options" in line, (name, line)
        assert S3_SECRET not in p.stderr + p.stdout, name
    assert not (tmp_path / "o.npz").exists()


def test_an_unreachable_corpus_names_its_own_flag(tmp_path):
    port = _closed_port()
    p = _precompute(["run", "--store", str(tmp_path / "store"), "--corpus", "s3://bucket/c.tsv",
                     "--corpus-storage-options", json.dumps(s3_options(f"http://127.0.0.1:{port}")), "--dry-run"])
    line = _one_error_line(p)
    assert p.returncode == 2
    assert f"corpus: cannot reach s3://bucket/c.tsv at http://127.0.0.1:{port}" in line, line
    assert "--corpus-storage-options" in line and S3_SECRET not in p.stderr


DENY_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:*",
                                                    "Resource": ["arn:aws:s3:::{b}", "arn:aws:s3:::{b}/*"]}]}


def test_a_store_that_denies_access_or_keeps_throttling_is_one_line(s3_server, caplog):
    with s3_server_process() as server:  # a server of its own: moto checks bucket policies there
        denied = make_bucket(server, objects={"store/_manifests/v00000001.json": b"{}"}, policy=DENY_ALL)
        assert cli(["lookup", "--store", f"s3://{denied}/store", "--storage-options", json.dumps(s3_options(server)),
                    "--ids", "1", "--out", os.devnull]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"store: access denied for s3://{denied}/store (check --storage-options)"], errors
    caplog.clear()
    bucket = make_bucket(s3_server)
    with FlakyProxy(s3_server, drop_request_every=1, drop_response_every=0) as proxy:  # every request: 503 SlowDown
        slow = {**s3_options(proxy.url), "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}}
        assert cli(["gc", "--store", f"s3://{bucket}/store", "--storage-options", json.dumps(slow)]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(f"store: s3://{bucket}/store: the service kept throttling"), errors
    assert "--storage-options" in errors[0] and "Traceback" not in caplog.text


def test_backend_failures_are_recognised_wherever_they_are_raised():
    from botocore.exceptions import ClientError, EndpointConnectionError
    from s3fs.errors import translate_boto_error

    from storage.fs import Throttled, Unreachable

    where = Location("corpus", "s3://user:pw@b/c.tsv", {"endpoint_url": "http://h.example:9000"})
    slow = ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."}}, "GetObject")
    as_s3fs = translate_boto_error(slow)  # OSError(EBUSY) caused by the ClientError
    err = where.refused(as_s3fs)
    assert isinstance(err, Throttled) and err.exit_code == 1 and isinstance(err, OperationFailed)
    assert "--corpus-storage-options" in str(err) and "pw" not in str(err)
    down = where.refused(EndpointConnectionError(endpoint_url="http://h.example:9000/b"))
    assert isinstance(down, Unreachable) and "at http://h.example:9000" in str(down)
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed")
    assert isinstance(where.refused(refused), Unreachable)
    assert isinstance(where.refused(socket.gaierror(-2, "Name or service not known")), Unreachable)
    assert where.refused(FileNotFoundError("c.tsv")) is None and where.refused(OSError(errno.EBUSY, "busy")) is None
    # not named by any location on its way out (a read inside a stream): still one line, still no credentials
    raw = EndpointConnectionError(endpoint_url="http://u:secret@h.example:9000/b?list-type=2")
    err = find_product_error(raw)
    assert isinstance(err, UsageError) and "cannot reach http://h.example:9000/b:" in str(err)
    assert "secret" not in str(err) and "--storage-options" in str(err)
    assert find_product_error(ValueError("a bug")) is None


# ---------------------------------------------------------------- 2. a stray carriage return, binary data


@pytest.mark.parametrize("content,expected", [
    (b"id\ttext\r\ttitle\n1\tsome text\tT\n", "carriage return"),
    (b"\x1f\x8b\x08\x00\r\x00\x00\tid\n\x00\x01\x02\n", "binary data"),  # gzip bytes under a .tsv name
])
def test_a_tsv_header_with_a_stray_cr_or_binary_data_is_one_line_before_ray(tmp_path, tiny_model, content, expected):
    corpus = tmp_path / "c.tsv"
    corpus.write_bytes(content)
    store = tmp_path / "store"
    p = _precompute(["run", "--store", str(store), "--corpus", str(corpus), "--model", tiny_model, "--layers", "1",
                     "--dims", "8"], no_ray=True)
    line = _one_error_line(p)
    assert p.returncode == 2, line
    assert str(corpus) in line and expected in line, line
    assert not store.exists()


def test_a_stray_cr_in_a_row_is_worded_for_the_user(tmp_path):
    corpus = tmp_path / "c.tsv"
    corpus.write_bytes(b'id\ttext\ttitle\n1\tsome "quoted\rtext\tT\n')
    from pipeline.config import CorpusConfig
    from pipeline.corpus.source import Corpus

    with pytest.raises(CorpusError, match=r"c.tsv:2: a carriage return \(\\r\) inside an unquoted field") as info:
        Corpus(CorpusConfig(url=str(corpus))).scan()
    assert "universal-newline" not in str(info.value)


# ---------------------------------------------------------------- 3. a backend that is not installed


def test_a_missing_s3fs_names_the_extra_that_installs_it(tmp_path):
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    (blocker / "s3fs.py").write_text("raise ImportError('s3fs is blocked for this test')\n")
    env = _env(PYTHONPATH=f"{blocker}{os.pathsep}{REPO}")
    for args, role in ((["verify", "--store", "s3://b/x"], "store"),
                       (["run", "--store", str(tmp_path / "s"), "--corpus", "s3://b/c.tsv", "--dry-run"], "corpus")):
        p = _precompute(args, env)
        line = _one_error_line(p)
        assert p.returncode == 2
        assert f"{role} s3://b/" in line and "pip install 'decoupled-precompute[s3]'" in line, line


# ---------------------------------------------------------------- 4. flags, not config fields


@pytest.mark.parametrize("flags,said", [
    (["--layers", "0"], "--layers 0: the input component needs at least one layer"),
    (["--dims", "0"], "--dims 0 must be positive"),
    (["--shard-size", "0"], "--shard-size 0 must be positive"),
    (["--fit-sample", "1"], "--fit-sample 1: at least 2 passages"),
    (["--bits", "9"], "--bits 9: codes are stored in int8"),
    (["--codec", "pq", "--dims", "96", "--pq-m", "5"], "--pq-m 5 must be a positive divisor of --dims 96"),
    (["--attention", "mask", "--compile"], "--compile needs --attention packed or auto"),
])
def test_run_names_the_flag_not_the_config_field(tmp_path, caplog, flags, said):
    assert cli(["run", "--store", str(tmp_path / "s"), *flags]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(said), errors
    assert "model." not in errors[0] and "compression." not in errors[0] and "execution." not in errors[0]


def test_layers_flag_on_the_command_line(tmp_path):
    p = _precompute(["run", "--store", str(tmp_path / "s"), "--layers", "0"])
    line = _one_error_line(p)
    assert p.returncode == 2 and "--layers 0" in line and "model.layers" not in line, line


def test_job_files_and_updates_name_what_their_user_wrote():
    with pytest.raises(UsageError, match=r"^model\.layers=0: the input component"):
        run_config_from_dict({"store": "s", "model": {"layers": 0}})
    with pytest.raises(UsageError, match=r"^execution\.token_budget=0 must be positive"):
        run_config_from_dict({"store": "s", "execution": {"token_budget": 0}})
    from pipeline.job_requests import inherit_config

    parent = RunConfig(store="s").public_dict()
    for flags, said in ((True, "--layers 0:"), (False, "layers=0:")):
        with pytest.raises(UsageError) as info:
            inherit_config(json.loads(json.dumps(parent)), 1, {"store": "s", "corpus": "c", "layers": 0}, flags)
        assert str(info.value).startswith(said), str(info.value)


# ---------------------------------------------------------------- 5. an empty corpus file


def test_an_empty_corpus_file_fails_before_ray_starts(tmp_path, tiny_model):
    corpus = tmp_path / "empty.tsv"
    corpus.write_bytes(b"")
    store = tmp_path / "store"
    for extra in ([], ["--dry-run"]):
        p = _precompute(["run", "--store", str(store), "--corpus", str(corpus), "--model", tiny_model, "--layers", "1",
                         "--dims", "8", *extra], no_ray=True)
        line = _one_error_line(p)
        assert p.returncode == 2, line
        assert f"{corpus}: empty file" in line and "ray.init" not in p.stderr, line
        assert not store.exists()


def test_an_update_checks_its_corpus_files_before_anything_starts(tmp_path, monkeypatch):
    from pipeline.config import CorpusConfig, ExecutionConfig
    from pipeline.corpus.source import Corpus
    from pipeline.flows.update import plan_update
    from pipeline.workers import dataflow
    from storage import manifest as mf
    from storage.fs import Store

    def no_ray(*_a, **_k):
        raise AssertionError("Ray was started before the corpus was checked")

    monkeypatch.setattr(dataflow, "init_ray", no_ray)
    monkeypatch.setattr(mf, "load", lambda store, version=None: object())
    corpus = tmp_path / "empty.tsv"
    corpus.write_bytes(b"")
    with pytest.raises(CorpusError, match=f"{corpus}: empty file"):
        plan_update(Store(str(tmp_path / "store")), Corpus(CorpusConfig(url=str(corpus))), ExecutionConfig())


def test_empty_files_beside_files_with_passages_are_skipped_and_counted(tmp_path, caplog):
    from pipeline.config import CorpusConfig
    from pipeline.corpus.source import Corpus

    write_tsv(tmp_path / "a.tsv", [(1, "some text", "T"), (2, "more text", "U")])
    (tmp_path / "b.tsv").write_bytes(b"")
    (tmp_path / "c.tsv").write_bytes(b"")
    corpus = Corpus(CorpusConfig(url=str(tmp_path)))
    assert [os.path.basename(f.path) for f in corpus.plan(None).files] == ["a.tsv"]
    assert "skipped 2 empty file(s) of 3" in caplog.text
    assert corpus.scan().n == 2
    (tmp_path / "a.tsv").write_bytes(b"")
    with pytest.raises(CorpusError, match="all 3 corpus files are empty"):
        corpus.plan(None)

