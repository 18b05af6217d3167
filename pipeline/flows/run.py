"""The run: plan on the driver, read/encode/write on the workers, commit once.

Driver: one listing -> split plan -> compressor (load, or fit on a sample drawn from a bounded
number of splits, as Ray tasks) -> finished splits from one listing -> Ray Data: prepare (read,
check, hash, tokenise) -> encode -> ShardSink, whose completion runs the commit: duplicate ids
across splits (a shuffle on the workers), counts, FAISS index, one manifest version.
What the driver holds grows with the number of splits, not of passages.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.codec.state_codec import Codec, codec_from_bytes
from pipeline.config import RunConfig, digest, fingerprint
from pipeline.corpus.rows import CorpusCounts, CorpusError
from pipeline.corpus.source import Corpus, CorpusPlan
from pipeline.corpus.duplicates import Duplicates, find_corpus_duplicates, find_duplicates
from pipeline.workers.dataflow import cluster_gpus, encode_splits, init_ray
from pipeline.model.encoder import pick_device
from pipeline.model.spec import ModelSpec
from pipeline.codec.fitting import fit_codec
from pipeline.corpus.fit_sample import fit_sample_task, merge_fit_samples
from pipeline.index.build import build_index
from pipeline.flows.commit import Draft, Totals, commit_version, newest
from pipeline.flows.preflight import GivenCodec, check_compressor, preflight_run, read_given_codec
from pipeline.workers.sink import finished_markers
from pipeline.corpus.splits import sample_splits
from pipeline.workers.steps import EncodeStage, StageContext, load_codec
from storage import manifest as mf
from storage.errors import PrecomputeError, find_cause
from storage.fs import AccessRefused, Store, sha256_bytes
from storage.layout import shard_of
from storage.shard_marker import ShardMarker, shard_entries
from storage.shards import SCHEMA_VERSION

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
    sizes: dict[str, int] = field(default_factory=dict)  # mf.Sizes.to_dict(): the vocabulary validate uses

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in self.skipped.items() if v) or "none"
        verb = "committed as" if self.committed else "already committed as"
        return (f"{self.written} passages written of {self.passages_in} read; skipped: {skipped}; "
                f"truncated: {self.truncated}\n"
                f"{self.tokens} tokens; {mf.Sizes.from_dict(self.sizes).render()}\n"
                f"{self.shards} states shards ({self.shards_resumed} reused from an earlier attempt, "
                f"{self.passages_encoded_this_run} passages encoded now)\n"
                f"{verb} version {self.version} of {self.store} in {self.wall_seconds:.1f} s\n"
                f"staging: none (the corpus is read in place by the workers); files of interrupted "
                f"attempts that no version references are left to `precompute gc`")


# ---------------------------------------------------------------- compressor

def _fit_sample(cfg: RunConfig, plan: CorpusPlan) -> tuple[list[int], list[str], list[str]]:
    """`fit_sample` passages from a bounded set of splits spread over the corpus, chosen by a
    fixed hash of their ids: the same sample on every rerun, at a cost that does not grow with N."""
    import ray

    picks = sample_splits(len(plan.splits))
    task = ray.remote(num_cpus=cfg.execution.task_cpus)(fit_sample_task)
    try:
        parts = ray.get([task.remote(cfg.corpus, cfg.corpus_storage_options, plan.splits[k].to_dict(),
                                     cfg.compression.fit_sample) for k in picks])
    except Exception as exc:
        cause = find_cause(exc, (CorpusError, AccessRefused), follow_context=True)
        if cause is not None:  # a bad row in a sampled split: the same one-line error as anywhere else
            raise cause from None
        raise
    sample = merge_fit_samples(parts, cfg.compression.fit_sample)
    if not sample[0]:
        counts = {k: sum(p["counts"][k] for p in parts) for k in parts[0]["counts"]} if parts else {}
        where = "" if len(picks) == len(plan.splits) else f" in the {len(picks)} sampled splits of {len(plan.splits)}"
        raise CorpusError(f"{corpus_label(cfg)}: no usable passages{where} ({counts})")
    return sample


def corpus_label(cfg: RunConfig) -> str:
    return Corpus(cfg.corpus, cfg.corpus_storage_options).display_url


def _obtain_compressor(cfg: RunConfig, store: Store, plan: CorpusPlan, spec: ModelSpec,
                       given: GivenCodec | None = None) -> tuple[tuple[str, str, int], Codec]:
    """(store path, sha256, bytes) of the codec artifact, fitting one if none was given, and the codec.

    `given`: the --compressor file as preflight read, decoded and checked it (never read again here)."""
    c = cfg.compression
    if c.compressor:
        if given is None:  # a caller that skipped preflight
            given = read_given_codec(cfg, None)
        data, sha, codec = given.data, given.sha256, given.codec
        rel = f"artifacts/compressor-{sha[:16]}.safetensors"
    else:
        fit_key = digest({"model": cfg.model.name, "revision": spec.revision, "layers": cfg.model.layers,
                          "dims": c.dims, "corpus": plan.digest, "sample": c.fit_sample, "max_length": spec.max_length,
                          **({"codec": c.codec, "pq_m": c.pq_m, "opq": c.opq} if c.codec != "linear" else {}),
                          **({"residual": c.residual} if c.residual != "none" else {})})
        rel = f"artifacts/compressor-fit-{fit_key}.safetensors"
        if store.exists(rel):
            data = store.read_bytes(rel)
            codec = codec_from_bytes(data, rel, c.quantize, c.bits)
            log.info("reusing the codec fitted earlier on this corpus: %s", rel)
            return (rel, sha256_bytes(data), len(data)), codec
        import ray

        ids, titles, texts = _fit_sample(cfg, plan)
        log.info("fitting a %s codec%s on %d sampled passages (pass --compressor FILE to skip)",
                 "PCA" if c.codec == "linear" else c.codec.upper(),
                 "" if c.residual == "none" else f" (residual: {c.residual})", len(ids))
        gpus = 1 if cluster_gpus() else 0
        remote = ray.remote(num_cpus=cfg.execution.encoder_cpus, num_gpus=gpus)(_fit_task)
        data = ray.get(remote.remote(spec.model, titles, texts, c, spec.max_length, cfg.execution.device,
                                     cfg.execution.token_budget or 8192, ids))
        sha = sha256_bytes(data)
        codec = codec_from_bytes(data, rel, c.quantize, c.bits)
    if not store.exists(rel) or store.size(rel) != len(data):
        store.write_bytes(rel, data)
    return (rel, sha, len(data)), codec


def _fit_task(model, titles, texts, compression, max_length, device, token_budget, ids) -> bytes:
    codec = fit_codec(model, titles, texts, compression, max_length, pick_device(device), token_budget,
                      metadata={"fit_ids": json.dumps(sorted(ids))})
    return codec.to_bytes()


@dataclass
class Prepared:
    ctx: StageContext
    fingerprint: dict[str, Any]
    max_length: int


def prepare(cfg: RunConfig, spec: ModelSpec, store: Store, compressor: tuple[str, str, int], run_dir: str | None,
            codec: Codec | None = None) -> Prepared:
    """Fingerprint (model, compressor, quantisation, DPR) and the context every worker gets.

    `codec`: the compressor as the driver decoded it already; None (an update) loads and checks it here."""
    comp_rel, comp_sha, _ = compressor
    if codec is None:
        codec = load_codec(store, comp_rel, comp_sha, cfg.compression)
        check_compressor(codec, comp_rel, cfg.compression, None)  # an update's flags must match its parent's codec
    fp = fingerprint(cfg.model, spec.revision, cfg.compression, codec.fingerprint_fields(), comp_sha, spec.max_length,
                     SCHEMA_VERSION)
    if cfg.dpr is not None:
        fp["dpr"] = spec.dpr.fingerprint(cfg.dpr)
        log.info("DPR pass: %s (%s pooling), %s", cfg.dpr.model, fp["dpr"]["pooling"],
                 "sharing the input component's token ids" if spec.dpr.shares_tokens else "own tokenizer")
    ctx = StageContext(store_url=cfg.store, run_dir=run_dir or "", spec=spec, compression=cfg.compression,
                       execution=cfg.execution, compressor_path=comp_rel, compressor_sha256=comp_sha, fingerprint=fp,
                       scaled_codes=codec.layout.scaled, dpr=cfg.dpr, storage_options=cfg.storage_options)
    return Prepared(ctx, fp, spec.max_length)


def check_index_config(cfg: RunConfig, width: int, n_passages: int) -> None:
    """A factory FAISS cannot build over `width`-wide vectors fails now, not after every passage was encoded."""
    if cfg.dpr is None:
        return
    from pipeline.index import faiss_file as fx

    fx.check_factory(cfg.dpr.index_factory, width, n_passages, cfg.dpr.train_sample)


# ---------------------------------------------------------------- the run

def run(cfg: RunConfig, encode_stage: type = EncodeStage) -> RunSummary:
    """Encode and commit. `encode_stage` exists so tests can inject a worker that dies mid-run."""
    t_start = time.perf_counter()
    checked = preflight_run(cfg)
    spec = checked.spec  # every model fact below comes from here: no config is read again on the driver
    corpus = Corpus(cfg.corpus, cfg.corpus_storage_options)
    log.info("phase: plan (listing %s)", corpus.display_url)
    plan = corpus.plan(cfg.execution.shard_size)
    if spec.dpr is not None:
        check_index_config(cfg, spec.dpr.checkpoint.embedding_width, plan.estimated_rows)
    store = Store(cfg.store, cfg.storage_options)  # a local store's directory appears only now
    init_ray(cfg.execution.ray_address)
    if cfg.corpus.on_duplicate == "error":
        check_unique_ids(cfg, plan)
    log.info("phase: fit-sample")
    compressor, codec = _obtain_compressor(cfg, store, plan, spec, checked.compressor)
    prep = prepare(cfg, spec, store, compressor, None, codec)
    # what the shards' codes depend on; --on-duplicate is applied at the commit (`Corpus.policy`)
    policy = {"on_too_long": cfg.model.on_too_long, "rows_per_split": plan.rows_per_split}
    run_id = digest({"fingerprint": prep.fingerprint, "corpus": plan.digest, "policy": policy})
    ctx = dataclasses.replace(prep.ctx, run_dir=f"runs/{run_id}", corpus=cfg.corpus,
                              corpus_storage_options=cfg.corpus_storage_options)

    n = len(plan.splits)
    resumed = finished_markers(store, cfg.storage_options, ctx.run_dir, n, cfg.execution.task_cpus)
    pending = [k for k in range(n) if k not in resumed]
    log.info("run %s: %d splits of ~%d passages; %d already done, %d to encode", run_id, n, plan.rows_per_split,
             len(resumed), len(pending))
    commit = _Commit(cfg, store, plan, ctx, run_id, resumed, compressor, t_start)
    if not pending:
        return commit([])
    log.info("phase: encode")
    with ProgressWatch(store, ctx.run_dir, set(resumed), len(pending), plan.rows_per_split, t_start,
                       total_rows=plan.estimated_rows) as watch:
        commit.progress = watch  # the final count is said from the markers, before the commit's own lines
        _, summary = encode_splits(ctx, [plan.splits[k].to_dict() for k in pending], encode_stage,
                                   on_complete=commit)
    if summary is None:
        raise RuntimeError("the write finished without a commit; rerun to retry (finished splits are reused)")
    return summary


def check_unique_ids(cfg: RunConfig, plan: CorpusPlan) -> None:
    """Repeated ids fail the run before the compressor is fitted or any split encoded: one pass over the ids
    of every split on the workers (no hashing or tokenising), a small share of what encoding costs."""
    t0 = time.perf_counter()
    dup = find_corpus_duplicates(cfg.corpus, cfg.corpus_storage_options, plan.splits, cfg.execution.task_cpus)
    if dup.count:
        raise CorpusError(f"{corpus_label(cfg)}: {dup.count} duplicate passage id(s), e.g. "
                          f"{dup.examples}; ids must be unique, or pass --on-duplicate keep-first to keep the first "
                          f"copy of each. Found before encoding: nothing was encoded or committed")
    log.info("checked: passage ids are unique across %d split(s) (%.1f s)", len(plan.splits),
             time.perf_counter() - t0)


class ProgressWatch:
    """A line a person can read while shards are encoded: shards done of total, passages/s, ETA.

    One listing of the run's markers a second until the first shard of this attempt lands (the
    time a user waits before the run shows it works), then one every `every_s`, logged when the
    count moved. A listing, never a request per shard."""

    def __init__(self, store: Store, run_dir: str, already: set[int], total: int, rows_per_shard: int,
                 t_start: float, every_s: float = 10.0, total_rows: int | None = None):
        import threading

        self.store, self.prefix, self.already, self.t_start = store, f"{run_dir}/states", already, t_start
        self.total, self.rows_per_shard, self.every_s = total, rows_per_shard, every_s
        self.total_rows = total_rows  # the plan's estimate: the last split is usually short
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._shown = 0
        self._finished = False
        self._thread = threading.Thread(target=self._watch, name="progress-watch", daemon=True)

    def __enter__(self) -> "ProgressWatch":
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if exc_type is None and not self._finished and not self._thread.is_alive():
            self._check()  # the last shards may land between two listings: the final count is always said

    def finish(self, markers: list[ShardMarker]) -> None:
        """The last line, from the markers this attempt wrote (real passage counts, not the plan's
        estimate): said once every shard is written and before the commit logs anything."""
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            self._finished = True
            done = len({m.shard for m in markers} - self.already)
            passages = sum(m.passages_in for m in markers if m.shard not in self.already)
            if done and self._shown == 0:
                log.info("first encoded shard after %.1f s", time.perf_counter() - self.t_start)
            log.info("%s", progress_line(self.total, self.total, passages, time.perf_counter() - self._t0,
                                         exact=True))

    def _watch(self) -> None:
        while not self._stop.wait(1.0 if self._shown == 0 else self.every_s):
            self._check()

    def _check(self) -> None:
        with self._lock:
            if self._finished:
                return
            try:
                done = {shard_of(f.path) for f in self.store.list(self.prefix) if f.path.endswith(".done.json")}
            except (OSError, ValueError, PrecomputeError) as exc:  # a flaky listing only delays this message
                log.debug("progress watch: listing failed (%s)", exc)
                return
            self._report(len(done - self.already))

    def _report(self, new: int) -> None:
        if new == self._shown:
            return
        if self._shown == 0:
            log.info("first encoded shard after %.1f s", time.perf_counter() - self.t_start)
        self._shown = new
        passages = new * self.rows_per_shard
        if self.total_rows:
            passages = min(passages, self.total_rows)
        log.info("%s", progress_line(new, self.total, passages, time.perf_counter() - self._t0))


def progress_line(done: int, total: int, passages: int, seconds: float, exact: bool = False) -> str:
    """Pure: 'encoded 3/16 shards (~3,000 passages, 120 passages/s), ETA 1m 48s'; `exact`: counted, not
    estimated (the last line: 'encoded 16/16 shards (15,872 passages, 131 passages/s) in 2m 01s')."""
    rate = passages / seconds if seconds > 0 else 0.0
    if exact:
        return (f"encoded {done}/{total} shards ({passages:,} passages, {rate:,.0f} passages/s) in "
                f"{int(seconds // 60)}m {int(seconds % 60):02d}s")
    left = (total - done) * (passages / done) / rate if done and rate else None
    eta = "ETA unknown" if left is None else f"ETA {int(left // 60)}m {int(left % 60):02d}s"
    return f"encoded {done}/{total} shards (~{passages:,} passages, {rate:,.0f} passages/s), {eta}"


@dataclass
class _Commit:
    """Runs once, on the driver, when the sink has every marker (`ShardSink.on_write_complete`)."""
    cfg: RunConfig
    store: Store
    plan: CorpusPlan
    ctx: StageContext
    run_id: str
    resumed: dict[int, ShardMarker]
    compressor: tuple[str, str, int]
    t_start: float
    progress: ProgressWatch | None = None

    def __call__(self, new_markers: list[ShardMarker]) -> RunSummary:
        cfg, store, ctx = self.cfg, self.store, self.ctx
        if self.progress is not None:
            self.progress.finish(new_markers)
        markers = dict(self.resumed)
        markers.update({m.shard: m for m in new_markers})
        n = len(self.plan.splits)
        missing = [k for k in range(n) if k not in markers]
        if missing:  # splits that kept no passage wrote their marker while being read
            markers.update(finished_markers(store, cfg.storage_options, ctx.run_dir, n, cfg.execution.task_cpus,
                                            only=missing))
            missing = [k for k in range(n) if k not in markers]
        if missing:
            raise RuntimeError(f"splits {missing[:10]} produced no output; rerun to retry them")
        ordered = [markers[k] for k in range(n)]
        dup = Duplicates()
        if cfg.corpus.on_duplicate == "error":
            repeats = sum((m.read or {}).get("skipped_duplicate", 0) for m in ordered)
            if repeats:  # splits written earlier under keep-first; `check_unique_ids` normally says this first
                raise CorpusError(f"{corpus_label(cfg)}: {repeats} repeated passage id(s) were dropped inside "
                                  f"splits; ids must be unique, or pass --on-duplicate keep-first. Nothing was "
                                  f"committed; a rerun with that flag reuses every encoded shard")
        else:  # keep-first: the later copies across splits are tombstoned
            log.info("phase: dedupe")
            dup = find_duplicates(cfg.store, cfg.storage_options,
                                  [(m.shard, m.path, list(m.too_long_ids or ())) for m in ordered
                                   if m.path or m.too_long_ids], cfg.execution.task_cpus)
        log.info("phase: commit")
        return self._commit(ordered, dup, sum(m.passages_in for m in new_markers))

    def _commit(self, ordered: list[ShardMarker], dup: Duplicates, encoded_now: int) -> RunSummary:
        cfg, store, ctx = self.cfg, self.store, self.ctx
        comp_rel, comp_sha, comp_bytes = self.compressor
        shards = shard_entries(ordered)
        read = _read_counts(ordered)
        read["skipped_duplicate"] += dup.dropped
        read["accepted"] -= dup.dropped
        if read["accepted"] <= 0:
            raise CorpusError(f"{corpus_label(cfg)}: no usable passages ({read})")
        by_shard = {m.shard: m for m in ordered}
        # A later copy that was also too long was never stored: it counts as a duplicate, not as too long.
        unstored_losers = sum(int(np.isin(ids, list(by_shard[k].too_long_ids or ())).sum())
                              for k, ids in dup.losers.items())
        total = Totals.of(ordered)
        too_long = total.skipped_too_long - unstored_losers
        written = total.rows - (dup.dropped - unstored_losers)
        if written != read["accepted"] - too_long:
            raise RuntimeError(f"shards hold {written} passages, expected {read['accepted'] - too_long}; "
                               f"not committing")
        skipped = {k.removeprefix("skipped_"): v for k, v in read.items() if k.startswith("skipped_")}
        skipped["too_long"] = too_long
        counts = {"passages_in": read["rows_read"], "accepted": read["accepted"], "written": written,
                  "skipped": skipped, "truncated": total.truncated, "tokens": total.tokens - dup.loser_tokens,
                  "raw_code_bytes": total.raw_code_bytes}
        artifacts = {"compressor": {"path": comp_rel, "sha256": comp_sha, "bytes": comp_bytes}}
        dead: dict[str, set[int]] = {}
        for split, ids in dup.losers.items():  # keep-first: a later split's copy of an id is tombstoned
            for f in by_shard[split].files():
                dead[f.path] = set(ids.tolist())
        if cfg.dpr is not None:
            log.info("phase: index")
            artifacts["dpr_index"] = build_index(cfg, store, ctx.run_dir, [s for s in shards if s["kind"] == "dpr"],
                                                 dead)
        h = hashlib.sha256()
        for m in ordered:
            h.update(str(m.digest).encode())
        extra = {"config": cfg.public_dict(), "corpus_digest": h.hexdigest()[:32], "plan_digest": self.plan.digest,
                 "timing": total.timing()}
        if cfg.dpr is not None:
            extra["dpr"] = ctx.fingerprint["dpr"]
        done = commit_version(store, Draft(run_id=self.run_id, fingerprint=ctx.fingerprint, shards=shards,
                                           counts=counts, extra=extra, artifacts=artifacts, dead=dead,
                                           run_dir=ctx.run_dir, parent=newest(store)))
        if not done.committed:
            log.info("version %d already holds this exact run; nothing new to commit", done.manifest.version)
        size = mf.sizes(done.manifest)
        return RunSummary(
            store=store.display_url, version=done.manifest.version, run_id=self.run_id, committed=done.committed,
            passages_in=read["rows_read"], written=written, skipped=skipped, truncated=counts["truncated"],
            tokens=counts["tokens"], bytes=size.total, shards=size.states_shards, sizes=size.to_dict(),
            shards_resumed=len(self.resumed), passages_encoded_this_run=encoded_now,
            wall_seconds=time.perf_counter() - self.t_start, encode_seconds=total.encode_seconds)


def _read_counts(ordered: list[ShardMarker]) -> dict[str, int]:
    keys = [f.name for f in dataclasses.fields(CorpusCounts)]
    return {k: int(sum((m.read or {}).get(k, 0) for m in ordered)) for k in keys}
