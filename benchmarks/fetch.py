"""Fetch latency of `StateReader.get` for K random ids, from a local store and from S3 (moto on loopback).

    python -m benchmarks.fetch                        # store: the demo settings on the bundled sample
    python -m benchmarks.fetch --report               # the markdown table from reports/fetch_latency.json

The store is written by the real pipeline (MiniLM lower 3, 384 -> 96, int8, row groups of 128), then
`precompute compact` rewrites it as new versions with other row-group sizes (same shards, same content),
so each layout is read the same way. Per call: wall time (median, p99), requests and bytes read. Local:
read syscalls and bytes from /proc/self/io. S3: HTTP requests and response bytes counted by a hook on
s3fs's own botocore client. Loopback has no network latency: on real S3 each sequential request adds a
round trip, so the request count is the figure that carries over.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.proc import start_benchmark
from benchmarks.runtime import sample_rows
from pipeline.config import BUNDLED_CORPUS, BUNDLED_MODEL, CompressionConfig, CorpusConfig, ModelConfig, RunConfig
from pipeline.serve.state_reader import StateReader
from storage.fs import Store

log = logging.getLogger("benchmark")

OUT = Path("reports/fetch_latency.json")


def local_io() -> tuple[int, int]:
    """(read syscalls, bytes read) of this process so far, page cache included."""
    with open("/proc/self/io") as fh:
        fields = dict(line.split(": ") for line in fh.read().splitlines())
    return int(fields["syscr"]), int(fields["rchar"])


class S3Counter:
    """HTTP requests and response body bytes through one s3fs filesystem's botocore client."""

    def __init__(self, fs):
        self.requests = 0
        self.bytes = 0
        fs.connect()
        events = fs.s3.meta.events
        events.register("before-send.s3", self._sent)
        events.register("after-call.s3.GetObject", self._received)  # not HeadObject: its ContentLength is the object size

    def _sent(self, **_):
        self.requests += 1

    def _received(self, parsed=None, **_):
        self.bytes += int((parsed or {}).get("ContentLength") or 0)

    def read(self) -> tuple[int, int]:
        return self.requests, self.bytes


def build(tmp: Path, row_groups: list[int]) -> tuple[str, dict[int, int]]:
    """The demo store on the bundled sample, then one compacted version per row-group size."""
    from pipeline.flows.compact import compact
    from pipeline.flows.run import run

    url = str(tmp / "store")
    cfg = RunConfig(store=url, corpus=CorpusConfig(url=BUNDLED_CORPUS),
                    model=ModelConfig(name=BUNDLED_MODEL, layers=3), compression=CompressionConfig(dims=96))
    run(cfg)
    versions = {rg: compact(Store(url), shard_size=1000, row_group_size=rg).version for rg in row_groups}
    import ray

    if ray.is_initialized():
        ray.shutdown()
    return url, versions


def upload(local: str, bucket: str, endpoint: str) -> tuple[str, dict]:
    import boto3
    import fsspec

    key, secret = "AKIABENCHONLY000KEY", "bench-secret-not-real"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    opts = {"key": key, "secret": secret, "endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"}}
    fs = fsspec.filesystem("s3", **opts)
    fs.put(local.rstrip("/") + "/", f"{bucket}/store", recursive=True)
    return f"s3://{bucket}/store", opts


def needed_bytes(reader: StateReader, ids) -> int:
    """The fetched passages' own stored bytes (codes, token ids, scales): what an ideal read would move."""
    return sum(e.codes.nbytes + e.token_ids.size * 2 + (0 if e.scales is None else e.scales.nbytes)
               for e in reader.get_encoded(ids).values())


def measure(url: str, opts: dict, version: int, k: int, calls: int, counter) -> dict:
    reader = StateReader(Store(url, opts), version, verify="size")
    ids = reader.ids()
    rng = np.random.default_rng(0)
    picks = [rng.choice(ids, k, replace=False).tolist() for _ in range(calls + 1)]
    reader.get(picks[0])  # warm-up: the per-reader shard size checks happen once, here
    times, reqs, nbytes = [], [], []
    for pick in picks[1:]:
        r0, b0 = counter()
        t0 = time.perf_counter()
        got = reader.get(pick)
        times.append((time.perf_counter() - t0) * 1e3)
        r1, b1 = counter()
        if len(got) != k:
            raise RuntimeError(f"asked for {k} passages, got {len(got)}")
        reqs.append(r1 - r0)
        nbytes.append(b1 - b0)
    shards = reader.manifest.shards_of("states")
    return {"version": version, "median_ms": float(np.median(times)), "p99_ms": float(np.percentile(times, 99)),
            "requests_per_call": float(np.median(reqs)), "bytes_per_call": float(np.median(nbytes)),
            "needed_bytes_per_call": needed_bytes(reader, picks[1]),
            "shards": len(shards), "state_bytes": sum(s["bytes"] for s in shards)}


def render(data: dict) -> str:
    lines = [f"{data['machine']}; K = {data['k']} random ids per call, {data['calls']} calls", "",
             "| store | row group (passages) | median ms | p99 ms | requests / call | MB read / call | "
             "passages' own bytes | states on disk MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['where']} | {r['row_group']} | {r['median_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['requests_per_call']:.0f} | {r['bytes_per_call'] / 1e6:.2f} | "
                     f"{r['needed_bytes_per_call'] / 1e3:.0f} kB | {r['state_bytes'] / 1e6:.1f} |")
    return "\n".join(lines)


def _without_store(argv: list[str]) -> list[str]:
    out = list(argv)
    if "--store" in out:
        i = out.index("--store")
        del out[i:i + 2]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--row-groups", default="128,32,8", help="row-group sizes to compare (passages)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--report", action="store_true")
    p.add_argument("--store", default=None, help="measure this built store (versions 2.. = --row-groups, in order); "
                   "the build runs the measurement this way, in a fresh process without Ray")
    a = p.parse_args(argv)
    if a.report:
        print(render(json.loads(Path(a.out).read_text())))
        return 0
    start_benchmark()
    sample_rows()  # the bundled corpus is present (fails early otherwise)
    row_groups = [int(x) for x in a.row_groups.split(",")]
    if a.store is None:
        import subprocess

        local, _ = build(Path(tempfile.mkdtemp(prefix="bench-fetch-")), row_groups)
        return subprocess.call([sys.executable, "-m", "benchmarks.fetch", "--store", local, *(argv or sys.argv[1:])])
    local, versions = a.store, {rg: 2 + i for i, rg in enumerate(row_groups)}
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        s3_url, opts = upload(local, "bench-fetch", f"http://127.0.0.1:{port}")
        counter = S3Counter(Store(s3_url, opts).fs)
        rows = []
        for rg, version in versions.items():
            for where, url, o, count in (("local", local, {}, local_io), ("s3 (moto, loopback)", s3_url, opts,
                                                                          counter.read)):
                r = measure(url, o, version, a.k, a.calls, count)
                rows.append({"where": where, "row_group": rg, **r})
                log.info("%s", rows[-1])
    finally:
        server.stop()
    data = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "k": a.k, "calls": a.calls,
            "command": " ".join(["python -m benchmarks.fetch",
                                 *_without_store(argv if argv is not None else sys.argv[1:])]),
            "rows": rows}
    Path(a.out).write_text(json.dumps(data, indent=1))
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
