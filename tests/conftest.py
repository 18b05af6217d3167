"""Shared fixtures: the real sample corpus, the real MiniLM checkpoint, a tiny random model, Ray."""
from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # boto never asks a metadata service for credentials

REPO = Path(__file__).resolve().parents[1]
SAMPLE_TSV = REPO / "pipeline" / "sample" / "wiki_passages_2k.tsv"


@pytest.fixture(scope="session")
def sample_tsv() -> Path:
    return SAMPLE_TSV


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from pipeline.config import BUNDLED_MODEL, resolve_model
    return resolve_model(BUNDLED_MODEL)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, minilm_path) -> str:
    """A 4-layer, 32-wide random BERT with MiniLM's real tokenizer: fast logic tests only."""
    from transformers import BertModel

    return save_tiny_bert(BertModel, tmp_path_factory.mktemp("tiny-bert"), minilm_path, seed=0, max_positions=128)


def save_tiny_bert(model_class, out: Path, minilm_path: str, seed: int, max_positions: int) -> str:
    """A 4-layer, 32-wide random `model_class` (a BERT) saved with MiniLM's tokenizer files."""
    import torch
    from transformers import BertConfig

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=max_positions)
    model_class(cfg).save_pretrained(out)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(minilm_path) / name, out / name)
    return str(out)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the whole session (starting one costs ~6 s here)."""
    import ray

    if ray.is_initialized():  # a CLI test ran `precompute run` in this process, which starts Ray itself
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def write_tsv(path: Path, rows: list[tuple], header: str = "id\ttext\ttitle") -> Path:
    """DPR-style TSV: tab-separated, csv quoting where a field needs it (as psgs_w100.tsv)."""
    import csv
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(header + "\n")
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        for r in rows:
            w.writerow([str(x) for x in r])
    return path


def first_passages(n: int, tsv: Path = SAMPLE_TSV) -> list[tuple[int, str, str]]:
    import csv
    out = []
    with open(tsv, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t")
        next(reader)
        for row in reader:
            out.append((int(row[0]), row[1], row[2]))
            if len(out) == n:
                break
    return out


def edited_corpus(path: Path, rows: list[tuple], changed: set[int], deleted: set[int], new: int, first_id: int,
                  topic: str) -> Path:
    """`rows` as a later crawl: `changed` ids get a revised text, `deleted` ids are gone, `new` passages added."""
    out = [(pid, text + " Revised ." if pid in changed else text, title)
           for pid, text, title in rows if pid not in deleted]
    out += [(first_id + k, f"A new passage number {k} about {topic} .", "New") for k in range(new)]
    return write_tsv(path, out)


# ---------------------------------------------------------------- S3 (moto's server on loopback)

@pytest.fixture(scope="session")
def s3_server():
    """moto's real S3 HTTP server on 127.0.0.1, reached through s3fs (as s3fs's own tests do)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server_process():
    """moto's S3 server in a process of its own: two of them share no buckets (one process's are global)."""
    import socket
    import subprocess
    import sys

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):  # it listens after its imports: a few seconds on a busy machine
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        else:
            raise RuntimeError("moto server did not start listening")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


S3_KEY, S3_SECRET = "AKIATESTONLY0000KEY", "test-secret-never-logged-3fa9c"


def s3_options(endpoint: str, key: str = S3_KEY, secret: str = S3_SECRET) -> dict:
    return {"key": key, "secret": secret, "endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"}}


def make_bucket(endpoint: str, key: str = S3_KEY, secret: str = S3_SECRET, objects: dict | None = None,
                policy: dict | None = None) -> str:
    """A fresh bucket on the server at `endpoint`, made with boto3 as `key`, holding `objects` (name -> bytes),
    under a bucket `policy` whose "{b}" stands for the bucket's name."""
    import json
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                          region_name="us-east-1")
    client.create_bucket(Bucket=name)
    for obj, body in (objects or {}).items():
        client.put_object(Bucket=name, Key=obj, Body=body)
    if policy is not None:
        client.put_bucket_policy(Bucket=name, Policy=json.dumps(policy).replace("{b}", name))
    return name


@pytest.fixture
def s3_bucket(s3_server, request):
    return f"s3://{make_bucket(s3_server)}/store", s3_options(s3_server)


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path):
    """(url, storage_options) for a local directory and for a bucket on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "store"), {}
    return request.getfixturevalue("s3_bucket")
