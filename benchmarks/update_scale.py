"""Update-scale benchmark: does an update cost the change, or the store?

    python -m benchmarks.update_scale --sizes 100000 1000000 3200000 --change 20000 \\
        --before-repo /path/to/checkout-before --label cpu-2core
    python -m benchmarks.update_scale --report

For each store size N (cached under --work-dir):
  1. corpus A: N short synthetic passages (20 words from the bundled sample's vocabulary), ids 1..N;
     corpus B: A with the same absolute change at every N: --change passages edited, --change/2
     deleted, --change/2 new;
  2. store: a real `precompute run` over A's first 2,000 passages (tiny random BERT, real MiniLM
     tokenizer, 1 layer, 16 dims) gives a real compressor, fingerprint and shard schema; the other
     N - 2,000 passages are added as states shards of 10,000 rows whose token states are copies of
     the real rows and whose ids and content hashes are A's. The manifest is written in format 1
     (shards inline), which the code before and after both read;
  3. for each checkout (--before-repo, and this one): a copy of the store, then in child processes
     (each the driver, run from that checkout): `update --dry-run`, `update`, and StateReader.get
     of 10 random ids x 40 (median, p99). Recorded: wall, the driver's CPU seconds and peak RSS
     (VmHWM of the driver itself; Ray's workers are not in it), and the bytes the update's
     commit wrote to `_manifests/` and `_shard_tables/`;
  4. a second update of the same size (back to corpus A), on the store as the first update left it
     (so in the code's own manifest format): wall and commit bytes.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

THIS_REPO = Path(__file__).resolve().parents[1]
RECIPE = "u1"
SEED_ROWS = 2_000
SHARD = 10_000


def _words() -> list[str]:
    with open(THIS_REPO / "pipeline" / "sample" / "wiki_passages_2k.tsv", encoding="utf-8") as fh:
        text = " ".join(r["text"] for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [w for w in text.split() if w.isalpha()][:200_000]


def _passages(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = np.array(_words(), dtype=object)
    return [" ".join(r) for r in vocab[rng.integers(0, vocab.size, size=(n, 20))].tolist()]


def _write_tsv(path: Path, ids, texts, titles) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write("id\ttext\ttitle\n")
        csv.writer(fh, delimiter="\t", lineterminator="\n").writerows(zip(ids, texts, titles))
    os.replace(tmp, path)


def build_corpora(work: Path, n: int, change: int) -> tuple[Path, Path, list[str]]:
    a, b = work / f"a-{RECIPE}-{n}.tsv", work / f"b-{RECIPE}-{n}-{change}.tsv"
    texts = _passages(n, seed=n)
    titles = [f"T{i % 997}" for i in range(1, n + 1)]
    if not a.exists():
        _write_tsv(a, range(1, n + 1), texts, titles)
    if not b.exists():
        rng = np.random.default_rng(1)
        picked = rng.choice(np.arange(SEED_ROWS + 1, n + 1), size=change + change // 2, replace=False)
        edited, deleted = set(picked[:change].tolist()), set(picked[change:].tolist())
        rows = [(i, t + " edited" if i in edited else t, ti) for i, t, ti in zip(range(1, n + 1), texts, titles)
                if i not in deleted]
        rows += [(n + 1 + k, f"brand new passage {k} " + texts[k], "New") for k in range(change // 2)]
        _write_tsv(b, *zip(*rows))
    return a, b, texts


def build_store(work: Path, n: int, a: Path, texts: list[str], model: Path) -> Path:
    """A real 2,000-passage run, inflated to N with copies of its states (format-1 manifest, v2)."""
    import pyarrow as pa

    from pipeline.corpus.rows import content_hash
    from storage import manifest as mf
    from storage.fs import Store
    from storage.shards import read_metadata, read_rows, write_shard

    out = work / f"store-{RECIPE}-{n}"
    if (out / "_manifests" / "v00000002.json").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "jobs.cli", "run", "--store", str(out), "--corpus", str(a), "--limit",
                    str(SEED_ROWS), "--model", str(model), "--layers", "1", "--dims", "16", "--fit-sample", "256",
                    "--shard-size", str(SHARD)], cwd=THIS_REPO, check=True,
                   env={**os.environ, "PYTHONPATH": str(THIS_REPO)}, stdout=subprocess.DEVNULL)
    store = Store(str(out))
    v1 = mf.load(store, 1)
    template = pa.concat_tables([read_rows(store, s["path"]) for s in v1.shards_of("states")])
    metadata = read_metadata(store, v1.shards_of("states")[0]["path"])
    shards = list(v1.shards)
    for k, start in enumerate(range(SEED_ROWS + 1, n + 1, SHARD)):
        ids = np.arange(start, min(n, start + SHARD - 1) + 1, dtype=np.int64)
        t = template.take(pa.array((ids - 1) % template.num_rows))
        hashes = [content_hash(f"T{i % 997}", texts[i - 1]) for i in ids.tolist()]
        t = t.set_column(t.schema.get_field_index("id"), "id", pa.array(ids))
        t = t.set_column(t.schema.get_field_index("content_hash"), "content_hash", pa.array(hashes, pa.binary(16)))
        f = write_shard(store, f"runs/inflated/states/part-{k:05d}.parquet", t.replace_schema_metadata(None),
                        metadata, 128)
        shards.append({**f.to_dict(), "kind": "states"})
    extra = json.loads(json.dumps(v1.extra))
    extra["config"]["corpus"]["limit"] = None  # updates inherit the recorded settings: not the seed run's limit
    m = mf.Manifest(version=2, parent=1, created_at=v1.created_at, run_id="inflated", fingerprint=v1.fingerprint,
                    shards=shards, artifacts=v1.artifacts, extra=extra,
                    counts={**v1.counts, "written": n, "accepted": n, "passages_in": n,
                            "tokens": v1.counts["tokens"] * n // SEED_ROWS})
    store.create_exclusive(mf.version_path(2), m.to_json())  # format 1: no segments
    return out


# ---------------------------------------------------------------- children (each one is a driver)

def child(kind: str, store: str, corpus: str, out: str) -> None:
    import importlib.util  # this file's helper by path: `benchmarks` on PYTHONPATH is the measured checkout's

    spec = importlib.util.spec_from_file_location("bench_proc", THIS_REPO / "benchmarks" / "proc.py")
    proc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(proc)

    t0, c0 = time.perf_counter(), time.process_time()
    result: dict = {}
    if kind == "reader":
        from pipeline.serve.state_reader import StateReader
        from storage.fs import Store

        reader = StateReader(Store(store), verify="size")
        n = int(reader.manifest.counts["written"])
        rng = np.random.default_rng(0)
        reader.get(rng.integers(1, n, 10).tolist())  # first call checks shard sizes
        times = []
        for _ in range(40):
            ids = rng.integers(1, n, 10).tolist()
            s = time.perf_counter()
            reader.get(ids)
            times.append(time.perf_counter() - s)
        result = {"get_ms_median": 1e3 * float(np.median(times)), "get_ms_p99": 1e3 * float(np.percentile(times, 99))}
    else:
        from jobs.cli import main

        args = ["update", "--store", store, "--corpus", corpus] + (["--dry-run"] if kind == "dry-run" else [])
        result = {"rc": main(args)}
    result.update(wall_s=time.perf_counter() - t0, driver_cpu_s=time.process_time() - c0, driver_rss_mb=proc.peak_rss_mb())
    Path(out).write_text(json.dumps(result))


def run_child(repo: Path, kind: str, store: Path, corpus: Path, work: Path) -> dict:
    out = work / f"child-{os.getpid()}.json"
    cmd = [sys.executable, str(THIS_REPO / "benchmarks" / "update_scale.py"), "--child", kind, "--store", str(store),
           "--corpus", str(corpus), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(repo), "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"{kind} in {repo} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def commit_bytes(store: Path, before: set[str]) -> int:
    new = [p for d in ("_manifests", "_shard_tables") for p in (store / d).glob("*") if str(p) not in before]
    return sum(p.stat().st_size for p in new)


def measure(a, n: int, model: Path) -> dict:
    work = Path(a.work_dir)
    corpus_a, corpus_b, texts = build_corpora(work, n, a.change)
    base = build_store(work, n, corpus_a, texts, model)
    del texts
    res = {"n": n, "change": {"edited": a.change, "deleted": a.change // 2, "new": a.change // 2}}
    for label, repo in (("before", Path(a.before_repo)), ("after", THIS_REPO)):
        store = work / f"run-{label}-{n}"
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(base, store)
        r = {"dry_run": run_child(repo, "dry-run", store, corpus_b, work)}
        seen = {str(p) for d in ("_manifests", "_shard_tables") for p in (store / d).glob("*")}
        r["update"] = run_child(repo, "update", store, corpus_b, work)
        r["update"]["commit_bytes"] = commit_bytes(store, seen)
        r["reader"] = run_child(repo, "reader", store, corpus_b, work)
        # a second update of the same size (back to corpus A): the store's manifest is now the code's own format
        seen = {str(p) for d in ("_manifests", "_shard_tables") for p in (store / d).glob("*")}
        r["update2"] = run_child(repo, "update", store, corpus_a, work)
        r["update2"]["commit_bytes"] = commit_bytes(store, seen)
        res[label] = r
        print(f"[{n:,}] {label}: {json.dumps(r)}", flush=True)
        shutil.rmtree(store, ignore_errors=True)
    return res


def render(data: dict) -> str:
    from benchmarks.proc import render_tables

    def rows(n: int, r: dict):
        for code in ("before", "after"):
            x, u2 = r[code], r[code].get("update2")
            yield [f"{n:,}", code, f"{x['dry_run']['wall_s']:.1f}", f"{x['update']['wall_s']:.1f}",
                   f"{x['update']['driver_cpu_s']:.1f}", f"{x['update']['driver_rss_mb']:.0f}",
                   f"{x['update']['commit_bytes']:,}", f"{u2['wall_s']:.1f}" if u2 else "-",
                   f"{u2['commit_bytes']:,}" if u2 else "-", f"{x['reader']['get_ms_median']:.1f}",
                   f"{x['reader']['get_ms_p99']:.1f}"]

    return render_tables(data, ["N:", "code", "dry-run wall s:", "update wall s:", "update driver CPU s:",
                                "update driver RSS MB:", "commit bytes:", "2nd update wall s:", "2nd commit bytes:",
                                "get(10) median ms:", "p99 ms:"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog="See the module docstring for what is measured.")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--change", type=int, default=20_000, help="passages edited (half as many deleted, half new)")
    p.add_argument("--before-repo", help="checkout of the code to compare against (required to measure)")
    p.add_argument("--work-dir", default="/tmp/update-bench")
    p.add_argument("--json", default=str(THIS_REPO / "reports" / "update_scale.json"))
    p.add_argument("--label", default="run")
    p.add_argument("--report", action="store_true", help="print the tables from --json and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a.child, a.store, a.corpus, a.out)
        return 0
    sys.path.insert(0, str(THIS_REPO))  # the parent is this checkout (a child may run another one's code)
    from benchmarks.proc import load_results, measure_sizes
    if a.report:
        print(render(load_results(a.json)))
        return 0
    if not a.before_repo:
        p.error("--before-repo is required to measure (a checkout of the code to compare against)")
    if any(n < SEED_ROWS + 2 * a.change for n in a.sizes):
        p.error(f"--sizes: each must be at least {SEED_ROWS + 2 * a.change:,} for a change of {a.change:,}")
    from benchmarks.scale import build_model
    Path(a.work_dir).mkdir(parents=True, exist_ok=True)
    model = build_model(Path(a.work_dir))
    measure_sizes(a.json, a.label, "benchmarks.update_scale", argv if argv is not None else sys.argv[1:],
                  a.sizes, lambda n: measure(a, n, model), render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
