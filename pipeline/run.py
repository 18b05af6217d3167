"""The one place that composes the Ray Data stages and commits the result.

Driver: scan corpus (no writes) -> compressor (load, or fit on a sample as a Ray task) -> plan
deterministic shards, skip those already done -> write input slices -> Ray Data:
tokenise (CPU actors) -> encode (GPU/CPU actor pool) -> pack + write (tasks) -> commit one version.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.compress import Compressor
from pipeline.config import ModelConfig, RunConfig, digest, fingerprint
from pipeline.corpus import Corpus, CorpusScan
from pipeline.encoder import model_revision, pick_device
from pipeline.fit import fit_compressor
from pipeline.stages import (EncodeStage, StageContext, TokenizeStage, WriteStage, input_path, read_marker)
from pipeline.tokenize import model_max_length
from storage import manifest as mf
from storage.fs import Store, sha256_bytes
from storage.shards import SCHEMA_VERSION, write_shard

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    store: str
    version: int
    run_id: str
    committed: bool
    passages_in: int
    written: int
    skipped: dict[str, int]
    truncated: int
    tokens: int
    bytes: int
    shards: int
    shards_resumed: int
    passages_encoded_this_run: int
    wall_seconds: float
    encode_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in self.skipped.items() if v) or "none"
        verb = "committed as" if self.committed else "already committed as"
        return (f"{self.written} passages written of {self.passages_in} read; skipped: {skipped}; "
                f"truncated: {self.truncated}\n"
                f"{self.tokens} tokens, {self.bytes / 1e6:.2f} MB in {self.shards} shards "
                f"({self.shards_resumed} reused from an earlier attempt, "
                f"{self.passages_encoded_this_run} passages encoded now)\n"
                f"{verb} version {self.version} of {self.store} in {self.wall_seconds:.1f} s")


# ---------------------------------------------------------------- Ray plumbing

def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(logging_level=logging.WARNING, include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = False


def _wait_for_free_resources(cpus: float, gpus: int, timeout_s: float = 180.0) -> None:
    """Wait (bounded) while resources the cluster has are still held, e.g. by the actors of an
    earlier failed dataset in this process. Never waits for resources the cluster lacks (an
    autoscaling cluster adds those when the dataset asks)."""
    import gc

    import ray

    total, deadline, said = ray.cluster_resources(), time.time() + timeout_s, False
    if total.get("CPU", 0) < cpus or total.get("GPU", 0) < gpus:
        return
    while time.time() < deadline:
        # Ray Data releases a pool's actors by reference counting; after a failure the references
        # sit in traceback/frame cycles that only the cycle collector frees.
        gc.collect()
        free = ray.available_resources()
        if free.get("CPU", 0) >= cpus and free.get("GPU", 0) >= gpus:
            return
        if not said:
            log.info("waiting for %.1f CPU%s still held by an earlier dataset", cpus, f" + {gpus} GPU" if gpus else "")
            said = True
        time.sleep(1.0)
    log.warning("resources still held after %.0f s; starting anyway", timeout_s)


def cluster_gpus() -> int:
    import ray
    return int(ray.cluster_resources().get("GPU", 0))


# ---------------------------------------------------------------- the run

def _sample_passages(corpus: Corpus, scan: CorpusScan, k: int, seed: int = 0) -> tuple[list[int], list[str], list[str]]:
    rng = np.random.default_rng(seed)
    pick = set(rng.choice(scan.n, size=min(k, scan.n), replace=False).tolist())
    ids, titles, texts = [], [], []
    pos = 0
    for table in corpus.batches(scan, 4096):
        for i, (pid, title, text) in enumerate(zip(table.column("id").to_pylist(), table.column("title").to_pylist(),
                                                   table.column("text").to_pylist())):
            if pos + i in pick:
                ids.append(pid), titles.append(title), texts.append(text)
        pos += table.num_rows
    return ids, titles, texts


def _obtain_compressor(cfg: RunConfig, store: Store, corpus: Corpus, scan: CorpusScan,
                       revision: str, max_length: int) -> tuple[str, str, int]:
    """(store path, sha256, bytes) of the compressor artifact, fitting one if none was given."""
    c = cfg.compression
    if c.compressor:
        import fsspec

        with fsspec.open(c.compressor, "rb") as fh:
            data = fh.read()
        comp = Compressor.from_bytes(data, c.compressor)
        if comp.dims != c.dims:
            raise ValueError(f"--compressor {c.compressor} projects to {comp.dims} dims, but --dims {c.dims}")
        sha = sha256_bytes(data)
        rel = f"artifacts/compressor-{sha[:16]}.safetensors"
    else:
        fit_key = digest({"model": cfg.model.name, "revision": revision, "layers": cfg.model.layers,
                          "dims": c.dims, "corpus": scan.digest, "sample": c.fit_sample, "max_length": max_length})
        rel = f"artifacts/compressor-fit-{fit_key}.safetensors"
        if store.exists(rel):
            data = store.read_bytes(rel)
            Compressor.from_bytes(data, rel)
            log.info("reusing compressor fitted earlier on this corpus: %s", rel)
            return rel, sha256_bytes(data), len(data)
        import ray

        ids, titles, texts = _sample_passages(corpus, scan, c.fit_sample)
        log.info("fitting a PCA compressor %s on %d sampled passages (pass --compressor FILE to skip)",
                 f"-> {c.dims} dims", len(ids))
        gpus = 1 if cluster_gpus() else 0
        remote = ray.remote(num_cpus=cfg.execution.encoder_cpus, num_gpus=gpus)(_fit_task)
        data = ray.get(remote.remote(cfg.model, titles, texts, c.dims, max_length, cfg.execution.device,
                                     cfg.execution.token_budget or 8192, ids))
        sha = sha256_bytes(data)
    if not store.exists(rel) or store.size(rel) != len(data):
        store.write_bytes(rel, data)
    return rel, sha, len(data)


def _fit_task(model, titles, texts, dims, max_length, device, token_budget, ids) -> bytes:
    comp = fit_compressor(model, titles, texts, dims, max_length, pick_device(device), token_budget,
                          metadata={"fit_ids": json.dumps(sorted(ids))})
    return comp.to_bytes()


@dataclass
class Prepared:
    ctx: StageContext
    fingerprint: dict[str, Any]
    max_length: int


def prepare(cfg: RunConfig, store: Store, scan: CorpusScan, compressor: tuple[str, str, int],
            run_dir: str | None, revision: str | None = None) -> Prepared:
    """Fingerprint (model, compressor, quantisation, DPR) and the context every worker gets."""
    max_length = model_max_length(cfg.model)
    revision = revision or model_revision(cfg.model)  # hashing a local checkpoint reads every weight file
    comp_rel, comp_sha, _ = compressor
    fp = fingerprint(cfg.model, revision, cfg.compression, comp_sha, max_length, SCHEMA_VERSION)
    shares = True
    if cfg.dpr is not None:
        from pipeline.dpr import resolve_normalize, resolve_pooling, same_vocabulary
        dpr_model = ModelConfig(name=cfg.dpr.model, revision=cfg.dpr.revision)
        fp["dpr"] = {"model": cfg.dpr.model, "revision": model_revision(dpr_model),
                     "pooling": resolve_pooling(cfg.dpr.model, cfg.dpr.pooling), "dtype": cfg.dpr.dtype,
                     "normalize": resolve_normalize(cfg.dpr.model, cfg.dpr.normalize),
                     "question_model": cfg.dpr.question}
        shares = same_vocabulary(cfg.model.name, cfg.dpr.model)
        log.info("DPR pass: %s (%s pooling), %s", cfg.dpr.model, fp["dpr"]["pooling"],
                 "sharing the input component's token ids" if shares else "own tokenizer")
    ctx = StageContext(store_url=cfg.store, run_dir=run_dir or "", model=cfg.model, compression=cfg.compression,
                       execution=cfg.execution, max_length=max_length, compressor_path=comp_rel,
                       compressor_sha256=comp_sha, fingerprint=fp, dpr=cfg.dpr, dpr_shares_tokens=shares,
                       storage_options=cfg.storage_options)
    return Prepared(ctx, fp, max_length)


def with_run_dir(ctx: StageContext, run_dir: str) -> StageContext:
    import dataclasses
    return dataclasses.replace(ctx, run_dir=run_dir)


def resume_markers(store: Store, run_dir: str, n_shards: int) -> tuple[dict[int, dict], list[int]]:
    """Markers of shards an earlier attempt finished (checksums verified), and the shards still to do."""
    markers = {k: m for k in range(n_shards) if (m := read_marker(store, run_dir, k)) is not None}
    return markers, [k for k in range(n_shards) if k not in markers]


def write_slices(store: Store, corpus: Corpus, scan: CorpusScan, run_dir: str, execution, todo: set[int],
                 keep_ids: set[int] | None = None) -> None:
    """Deterministic input slices: shard k holds accepted rows [k*S, (k+1)*S) (of `keep_ids` only, if given)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    log.info("writing %d input slices", len(todo))
    size = execution.shard_size

    def chunks():
        if keep_ids is None:
            yield from corpus.batches(scan, size)
            return
        wanted = pa.array(sorted(keep_ids), pa.int64())
        buf = None
        for table in corpus.batches(scan, 4096):
            table = table.filter(pc.is_in(table.column("id"), value_set=wanted))
            buf = table if buf is None else pa.concat_tables([buf, table])
            while buf.num_rows >= size:
                yield buf.slice(0, size)
                buf = buf.slice(size)
        if buf is not None and buf.num_rows:
            yield buf

    for k, table in enumerate(chunks()):
        if k in todo:
            write_shard(store, input_path(run_dir, k), table, None, execution.row_group_size)


def shard_entries(ordered: list[dict]) -> list[dict]:
    keys = ("path", "kind", "rows", "bytes", "sha256", "id_min", "id_max")
    shards = [{k: m[k] for k in keys} for m in ordered]
    shards += [{**{k: m["dpr"][k] for k in keys if k != "kind"}, "kind": "dpr"} for m in ordered if m.get("dpr")]
    return shards


def run(cfg: RunConfig, encode_stage: type = EncodeStage) -> RunSummary:
    """Encode and commit. `encode_stage` exists so tests can inject a worker that dies mid-run."""
    t_start = time.perf_counter()
    store = Store(cfg.store, cfg.storage_options)
    corpus = Corpus(cfg.corpus, cfg.storage_options)
    log.info("pass 1/2: validating corpus %s", corpus.display_url)
    scan = corpus.scan()
    check_index_config(cfg, scan.n)
    init_ray(cfg.execution.ray_address)
    max_length = model_max_length(cfg.model)
    revision = model_revision(cfg.model)
    compressor = _obtain_compressor(cfg, store, corpus, scan, revision, max_length)
    prep = prepare(cfg, store, scan, compressor, None, revision)
    policy = {"on_too_long": cfg.model.on_too_long, "shard_size": cfg.execution.shard_size}
    run_id = digest({"fingerprint": prep.fingerprint, "corpus": scan.digest, "policy": policy})
    ctx = with_run_dir(prep.ctx, f"runs/{run_id}")

    n_shards = math.ceil(scan.n / cfg.execution.shard_size)
    markers, pending = resume_markers(store, ctx.run_dir, n_shards)
    log.info("run %s: %d passages in %d shards; %d already done, %d to encode", run_id, scan.n, n_shards,
             n_shards - len(pending), len(pending))
    if pending:
        log.info("pass 2/2")
        write_slices(store, corpus, scan, ctx.run_dir, cfg.execution, set(pending))
        markers.update(encode_shards(ctx, pending, encode_stage))

    encoded_now = sum(markers[k]["passages_in"] for k in pending)
    comp_rel, comp_sha, comp_bytes = compressor
    return _commit(cfg, store, scan, ctx, run_id, markers, n_shards, comp_rel, comp_sha, comp_bytes, t_start,
                   encoded_now, n_shards - len(pending))


def check_index_config(cfg: RunConfig, n_passages: int) -> None:
    """A factory FAISS cannot build fails now, not after every passage has been encoded."""
    if cfg.dpr is None:
        return
    from pipeline import index as fx
    from pipeline.dpr import embedding_dim

    fx.check_factory(cfg.dpr.index_factory, embedding_dim(cfg.dpr.model, cfg.dpr.revision), n_passages,
                     cfg.dpr.train_sample)


def encode_shards(ctx: StageContext, pending: list[int], encode_stage: type | None = None) -> dict[int, dict]:
    import ray

    init_ray(ctx.execution.ray_address)
    encode_stage = encode_stage or EncodeStage
    ex = ctx.execution
    gpus = cluster_gpus() if ex.device != "cpu" else 0
    n_enc = ex.num_encoders or max(1, gpus)
    _wait_for_free_resources(ex.encoder_cpus + 2 * ex.task_cpus, 1 if gpus else 0)
    ds = ray.data.from_items([{"shard": k} for k in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(TokenizeStage, fn_constructor_kwargs={"ctx": ctx}, batch_size=1,
                        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n_enc),
                        num_cpus=ex.task_cpus)
    ds = ds.map_batches(encode_stage, fn_constructor_kwargs={"ctx": ctx}, batch_size=1, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=n_enc), num_cpus=ex.encoder_cpus,
                        num_gpus=1 if gpus else 0)  # Ray Data restarts dead actors and retries their shards
    ds = ds.map_batches(WriteStage, fn_constructor_kwargs={"ctx": ctx}, batch_size=1, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n_enc), num_cpus=ex.task_cpus)
    done: dict[int, dict] = {}
    t0 = time.perf_counter()
    try:
        for row in ds.iter_rows():
            marker = json.loads(row["marker"])
            done[int(row["shard"])] = marker
            elapsed = time.perf_counter() - t0
            log.info("shard %d done: %d passages, %d tokens, %.2f MB (%d/%d shards, %.0f s)", marker["shard"],
                     marker["rows"], marker["tokens"], marker["bytes"] / 1e6, len(done), len(pending), elapsed)
    except BaseException:
        del ds  # see _wait_for_free_resources: a failed execution's actors die with their last reference
        raise
    missing = sorted(set(pending) - set(done))
    if missing:
        raise RuntimeError(f"shards {missing} produced no output; rerun to retry them")
    return done


def _commit(cfg, store, scan, ctx, run_id, markers, n_shards, comp_rel, comp_sha, comp_bytes, t_start,
            encoded_now, resumed) -> RunSummary:
    ordered = [markers[k] for k in range(n_shards)]
    shards = shard_entries(ordered)
    too_long = sum(m["skipped_too_long"] for m in ordered)
    written = sum(m["rows"] for m in ordered)
    if written != scan.n - too_long:
        raise RuntimeError(f"shards hold {written} passages, expected {scan.n - too_long}; not committing")
    skipped = {k.removeprefix("skipped_"): v for k, v in scan.counts.to_dict().items() if k.startswith("skipped_")}
    skipped["too_long"] = too_long
    counts = {"passages_in": scan.counts.rows_read, "accepted": scan.counts.accepted, "written": written,
              "skipped": skipped, "truncated": sum(m["truncated"] for m in ordered),
              "tokens": sum(m["tokens"] for m in ordered), "raw_code_bytes": sum(m["raw_code_bytes"] for m in ordered)}
    artifacts = {"compressor": {"path": comp_rel, "sha256": comp_sha, "bytes": comp_bytes}}
    if cfg.dpr is not None:
        artifacts["dpr_index"] = build_index(cfg, store, ctx.run_dir, [s for s in shards if s["kind"] == "dpr"])
    # Timing is kept apart from counts: counts are content and must match across reruns.
    extra = {"config": cfg.public_dict(), "corpus_digest": scan.digest,
             "timing": {"encode_seconds": sum(m["encode_seconds"] for m in ordered), "tokens": counts["tokens"]}}
    if cfg.dpr is not None:
        extra["dpr"] = ctx.fingerprint["dpr"]
    latest = mf.latest_version(store)
    committed = True
    if latest is not None and (prev := mf.load(store, latest)).run_id == run_id and prev.shards == shards:
        manifest = prev
        committed = False
        log.info("version %d already holds this exact run; nothing new to commit", latest)
    else:
        manifest = mf.commit(store, latest, run_id=run_id, fingerprint=ctx.fingerprint, shards=shards,
                             artifacts=artifacts, counts=counts,
                             extra=extra)
    written_bytes = sum(s["bytes"] for s in shards) + sum(a["bytes"] for a in artifacts.values())
    return RunSummary(
        store=store.display_url, version=manifest.version, run_id=run_id, committed=committed,
        passages_in=scan.counts.rows_read, written=written, skipped=skipped, truncated=counts["truncated"],
        tokens=counts["tokens"], bytes=written_bytes, shards=len(ordered),
        shards_resumed=resumed, passages_encoded_this_run=encoded_now,
        wall_seconds=time.perf_counter() - t_start,
        encode_seconds=sum(m["encode_seconds"] for m in ordered))


# ---------------------------------------------------------------- FAISS index

def _read_embeddings(store_url: str, storage_options: dict, path: str,
                     dead: frozenset[int] = frozenset()) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 vectors) of one DPR shard, without the rows tombstoned in it."""
    from storage.shards import read_rows

    t = read_rows(Store(store_url, storage_options), path, columns=["id", "embedding"])
    emb = t.column("embedding").combine_chunks()
    dim = emb.type.list_size
    vecs = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    ids = t.column("id").to_numpy()
    if dead:
        keep = ~np.isin(ids, np.fromiter(dead, dtype=np.int64))
        ids, vecs = ids[keep], vecs[keep]
    return ids, vecs


def _index_part_task(store_url: str, storage_options: dict, path: str, trained: bytes,
                     dead: frozenset[int]) -> tuple[bytes, int]:
    from pipeline import index as fx

    ids, vecs = _read_embeddings(store_url, storage_options, path, dead)
    return fx.add_part(trained, ids, vecs), len(ids)


@dataclass(frozen=True)
class IndexSpec:
    """What to build and where the embeddings are; the same for a run, an update rebuild or a reindex."""
    store_url: str
    storage_options: dict
    factory: str
    train_sample: int
    nprobe: int
    task_cpus: float = 0.5


def build_index(cfg: RunConfig, store: Store, run_dir: str, dpr_shards: list[dict]) -> dict:
    spec = IndexSpec(cfg.store, cfg.storage_options, cfg.dpr.index_factory, cfg.dpr.train_sample, cfg.dpr.nprobe,
                     cfg.execution.task_cpus)
    return build_index_from(spec, store, run_dir, dpr_shards)


def build_index_from(spec: IndexSpec, store: Store, run_dir: str, dpr_shards: list[dict],
                     dead: dict[str, set[int]] | None = None) -> dict:
    """Train on a sample, add shard by shard as Ray tasks, merge; reuse a verified earlier build."""
    import ray

    from pipeline import index as fx

    dead = dead or {}
    rel = f"{run_dir}/index/dpr-{digest(spec.factory, 8)}.faiss"
    marker_rel = rel + ".done.json"
    if store.exists(marker_rel):
        entry = json.loads(store.read_bytes(marker_rel))
        if store.exists(rel) and store.size(rel) == entry["bytes"] and store.sha256(rel) == entry["sha256"]:
            log.info("reusing the FAISS index built by an earlier attempt: %s", rel)
            return entry
    t0 = time.perf_counter()
    sample = []
    have = 0
    for shard in dpr_shards:
        _, vecs = _read_embeddings(spec.store_url, spec.storage_options, shard["path"],
                                   frozenset(dead.get(shard["path"], ())))
        sample.append(vecs)
        have += len(vecs)
        if have >= spec.train_sample:
            break
    train_x = np.concatenate(sample)[: spec.train_sample]
    dim = train_x.shape[1]
    log.info("training FAISS %s on %d vectors; adding %d shards as Ray tasks", spec.factory, len(train_x),
             len(dpr_shards))
    index = fx.train(fx.new_index(spec.factory, dim), train_x)
    trained = fx.to_bytes(index)
    task = ray.remote(num_cpus=spec.task_cpus)(_index_part_task)
    results = ray.get([task.remote(spec.store_url, spec.storage_options, s["path"], trained,
                                   frozenset(dead.get(s["path"], ()))) for s in dpr_shards])
    merged = fx.merge(trained, [part for part, _ in results])
    expected = sum(n for _, n in results)
    if merged.ntotal != expected:
        raise RuntimeError(f"index holds {merged.ntotal} vectors, DPR shards hold {expected} live rows; "
                           f"not committing")
    data = fx.to_bytes(merged)
    store.write_bytes(rel, data)
    entry = {"path": rel, "sha256": sha256_bytes(data), "bytes": len(data), "factory": spec.factory, "dim": dim,
             "ntotal": int(merged.ntotal), "metric": "inner_product", "nprobe": spec.nprobe,
             "faiss_gpu": bool(fx.gpu_count())}
    store.write_bytes(marker_rel, json.dumps(entry).encode())
    log.info("built FAISS %s over %d vectors (%d dims) in %.1f s: %.1f MB", spec.factory, merged.ntotal, dim,
             time.perf_counter() - t0, len(data) / 1e6)
    return entry
