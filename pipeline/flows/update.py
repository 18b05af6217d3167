"""Incremental reindexing: diff a new corpus against the newest version by content hash.

Only new and changed passages are encoded; changed and deleted ones are tombstoned in the shards
that hold their old rows, so the new version's live set equals the new corpus. Old versions keep
their own manifests and stay readable until gc retires them.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from pipeline.config import RunConfig, digest
from pipeline.corpus.source import Corpus
from pipeline.workers.update_scan import (CorpusIds, SplitDiff, assemble_slices, diff_corpus, hash_array, in_sorted,
                                          parent_rows, plan_slices, shard_rows, superseded)
from storage import manifest as mf
from storage import tombstones
from storage.errors import OperationFailed
from storage.fs import Store


@dataclass
class Diff:
    new: np.ndarray        # ids only in the new corpus
    changed: np.ndarray    # ids in both, content hash differs
    deleted: np.ndarray    # ids only in the old version
    unchanged: np.ndarray

    def counts(self) -> dict[str, int]:
        return {k: int(getattr(self, k).size) for k in ("new", "changed", "deleted", "unchanged")}

    @property
    def to_encode(self) -> np.ndarray:
        return np.union1d(self.new, self.changed)

    @property
    def to_remove(self) -> np.ndarray:
        return np.union1d(self.changed, self.deleted)


def diff(old_ids: np.ndarray, old_hashes, new_ids: np.ndarray, new_hashes) -> Diff:
    """Pure and vectorised: sort by id, intersect, compare fixed-width hashes; no Python object per row.

    At 32M passages the inputs are 2 x 32M x (8 B id + 16 B hash) = 1.5 GB of numpy arrays."""
    old_ids, new_ids = np.asarray(old_ids, dtype=np.int64), np.asarray(new_ids, dtype=np.int64)
    old_h, new_h = hash_array(old_hashes), hash_array(new_hashes)
    o, n = np.argsort(old_ids, kind="stable"), np.argsort(new_ids, kind="stable")
    old_ids, old_h, new_ids, new_h = old_ids[o], old_h[o], new_ids[n], new_h[n]
    common, io, inn = np.intersect1d(old_ids, new_ids, assume_unique=True, return_indices=True)
    differs = old_h[io] != new_h[inn]
    return Diff(new=np.setdiff1d(new_ids, common, assume_unique=True), changed=common[differs],
                deleted=np.setdiff1d(old_ids, common, assume_unique=True), unchanged=common[~differs])


def reusable_shards(want_ids: np.ndarray, want_hashes: np.ndarray,
                    shards: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[bool], np.ndarray]:
    """Pure: which earlier delta shards this update can take whole, and the ids they cover (sorted).

    A shard qualifies when every row (id, content hash) is one this update must encode and no shard
    taken before it holds that row: its codes are then exactly what encoding again would write."""
    order = np.argsort(want_ids, kind="stable")
    ids, hashes = np.asarray(want_ids, np.int64)[order], hash_array(want_hashes)[order]
    claimed = np.zeros(ids.size, bool)
    take = []
    for shard_ids, shard_hashes in shards:
        if ids.size == 0 or shard_ids.size == 0:
            take.append(False)
            continue
        pos = np.minimum(np.searchsorted(ids, shard_ids), ids.size - 1)
        ok = bool(((ids[pos] == shard_ids) & (hashes[pos] == hash_array(shard_hashes)) & ~claimed[pos]).all())
        ok = ok and np.unique(pos).size == pos.size
        if ok:
            claimed[pos] = True
        take.append(ok)
    return take, ids[claimed]


# ---------------------------------------------------------------- orchestration

log = logging.getLogger(__name__)

class FingerprintMismatch(OperationFailed, RuntimeError):
    """The update's model/compressor/quantisation differs from the version it would extend."""


def _comparable(fp: dict) -> dict:
    return {k: v for k, v in fp.items() if k != "dpr"} | {"dpr": {k: v for k, v in (fp.get("dpr") or {}).items()}}


@dataclass
class UpdatePlan:
    parent: int
    diff: Diff
    tokens_per_passage: float
    encode_tokens_per_s: float | None
    bytes_per_passage: float
    scan_seconds: float = 0.0  # this plan's pass over parent and corpus: an update makes the same pass again

    def encode_seconds(self) -> float | None:
        c = self.diff.counts()
        tokens = (c["new"] + c["changed"]) * self.tokens_per_passage
        return tokens / self.encode_tokens_per_s if self.encode_tokens_per_s else None

    def to_dict(self) -> dict:
        return {"parent": self.parent, "counts": self.diff.counts(), "tokens_per_passage": self.tokens_per_passage,
                "encode_tokens_per_s": self.encode_tokens_per_s, "bytes_per_passage": self.bytes_per_passage,
                "scan_seconds": round(self.scan_seconds, 2), "encode_seconds": self.encode_seconds()}

    def render(self) -> str:
        c = self.diff.counts()
        n = c["new"] + c["changed"]
        tokens = n * self.tokens_per_passage
        eta = f"{tokens / self.encode_tokens_per_s:,.0f} s of encoder time" if self.encode_tokens_per_s else "unknown"
        delta = (c["new"] - c["deleted"]) * self.bytes_per_passage
        enc = self.encode_seconds()
        took = (f"~{self.scan_seconds + enc:,.0f} s plus start-up: the same scan ({self.scan_seconds:,.1f} s just now) "
                f"and ~{enc:,.0f} s of encoding" if enc is not None else
                f"the same scan ({self.scan_seconds:,.1f} s just now) plus encoding at a rate this store has not "
                f"recorded yet")
        return (f"update against version {self.parent}: new {c['new']}, changed {c['changed']}, deleted "
                f"{c['deleted']}, unchanged {c['unchanged']}\n"
                f"to encode: {n} passages (~{tokens:,.0f} tokens, ~{eta} at the last run's rate)\n"
                f"an update on this cluster would take {took}\n"
                f"live storage delta: {delta / 1e6:+,.2f} MB; written: {n * self.bytes_per_passage / 1e6:,.2f} MB "
                f"of delta shards (superseded rows are tombstoned, reclaimed by `precompute compact` + gc)")


def plan_update(store: Store, corpus: Corpus, execution,
                stage_dir: str | None = None) -> tuple[mf.Manifest, CorpusIds, list[SplitDiff], UpdatePlan]:
    """One pass on the workers: the parent's ids and hashes, then every split compared with them (and the
    rows to encode staged under `stage_dir`, when given); the driver sets the id arrays against each other."""
    from pipeline.workers.dataflow import init_ray

    manifest = mf.load(store)
    corpus_plan = corpus.plan(execution.shard_size)  # before Ray: an empty file or a missing column fails first
    init_ray(execution.ray_address)
    t0 = time.perf_counter()
    old_ids, old_hashes = parent_rows(store, manifest.shards_of("states"), tombstones.of_version(store, manifest),
                                      execution.task_cpus)
    scan, parts = diff_corpus(corpus, execution.shard_size, old_ids, old_hashes, store if stage_dir else None,
                              stage_dir, execution.row_group_size, execution.task_cpus, corpus_plan)
    del old_hashes
    changed = np.sort(np.concatenate([p.changed for p in parts])) if parts else np.empty(0, np.int64)
    old_ids.sort()
    kept = in_sorted(scan.ids, old_ids)  # scan.ids is sorted and unique
    d = Diff(new=np.sort(np.concatenate([p.new for p in parts])) if parts else np.empty(0, np.int64),
             changed=changed, deleted=old_ids[~kept],
             unchanged=np.setdiff1d(old_ids[kept], changed, assume_unique=True))
    log.info("diff against version %d in %.1f s: %s", manifest.version, time.perf_counter() - t0, d.counts())
    counts = manifest.counts
    tps = counts.get("tokens", 0) / max(counts.get("written", 1), 1)
    timing = manifest.extra.get("timing") or {}
    rate = timing["tokens"] / timing["encode_seconds"] if timing.get("encode_seconds") else None
    bpp = sum(s["bytes"] for s in manifest.shards) / max(counts.get("written", 1), 1)
    return manifest, scan, parts, UpdatePlan(manifest.version, d, tps, rate, bpp, time.perf_counter() - t0)


@dataclass
class UpdateSummary:
    store: str
    version: int
    parent: int
    counts: dict[str, int]
    passages_encoded_this_run: int
    shards_resumed: int
    index_action: str
    wall_seconds: float

    def render(self) -> str:
        c = self.counts
        return (f"version {self.version} (parent {self.parent}) of {self.store}: new {c['new']}, changed {c['changed']}, "
                f"deleted {c['deleted']}, unchanged {c['unchanged']}; encoded {self.passages_encoded_this_run} "
                f"passages ({self.shards_resumed} delta shards reused); index: {self.index_action}; "
                f"{self.wall_seconds:.1f} s")


def run_update(cfg: RunConfig, rebuild_fraction: float = 0.2, encode_stage: type | None = None) -> UpdateSummary:
    """Encode only new and changed passages, tombstone the rest, commit one version on top of the newest."""
    import dataclasses

    from pipeline.flows import run as runner
    from pipeline.flows.commit import Draft, Totals, commit_version
    from pipeline.workers.dataflow import encode_splits
    from pipeline.flows.preflight import check_states
    from pipeline.model.spec import resolve_spec
    from pipeline.workers.sink import finished_markers
    from storage.shard_marker import shard_entries

    t0 = time.perf_counter()
    spec = resolve_spec(cfg)  # every model fact the update needs, each config read once
    check_states(spec, cfg.execution.attention)  # before Ray starts: a model computed wrongly is refused
    store = Store(cfg.store, cfg.storage_options)
    corpus = Corpus(cfg.corpus, cfg.corpus_storage_options)
    stage_key = {"parent": mf.latest_version(store), "corpus": dataclasses.asdict(cfg.corpus),
                 "size": cfg.execution.shard_size}
    stage_dir = f"runs/update-stage-{digest(stage_key)}"  # rows to encode, staged while the corpus is compared
    parent, scan, parts, plan = plan_update(store, corpus, cfg.execution, stage_dir)
    comp = parent.artifacts["compressor"]
    prep = runner.prepare(cfg, spec, store, (comp["path"], comp["sha256"], comp["bytes"]), run_dir=None)
    want, have = _comparable(prep.fingerprint), _comparable(parent.fingerprint)
    if want != have:
        keys = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise FingerprintMismatch(
            f"version {parent.version} was encoded with a different {', '.join(keys)} "
            f"({', '.join(f'{k}: {have.get(k)!r} -> {want.get(k)!r}' for k in keys)}). Old and new states are never "
            f"mixed in one version: run `precompute run` for a full recompute into a new version instead.")
    d = plan.diff
    # Named by what the delta's codes depend on (model, codec, corpus, sharding) and then the parent: an
    # attempt on another parent (one that lost a race to commit) is a sibling whose shards are reused below.
    content_id = digest({"fingerprint": prep.fingerprint, "corpus": scan.digest,
                         "shard_size": cfg.execution.shard_size, "on_too_long": cfg.model.on_too_long})
    encode = d.to_encode
    n_delta = int(encode.size)
    earlier, drop = _earlier_attempts(store, cfg, parent, content_id, parts, scan.drop)
    # The slices below depend on which earlier shards are taken: a resume reuses this directory's own
    # shards by index only when that set is the same (else another directory, and a fresh slicing)
    run_id = f"{content_id}-v{parent.version}" + (
        f"-r{digest(sorted(m.file.path for m in earlier))[:8]}" if earlier else "")
    ctx = dataclasses.replace(prep.ctx, run_dir=f"runs/update-{run_id}")
    # rows each split contributes once later duplicates and reused rows are dropped (what assembly will write)
    slices = plan_slices([p.new.size + p.changed.size - _size(drop.get(p.index)) + _size(scan.drop.get(p.index))
                          if p.staged else 0 for p in parts], cfg.execution.shard_size or 10_000)
    n_shards = len(slices)
    markers = finished_markers(store, cfg.storage_options, ctx.run_dir, n_shards, cfg.execution.task_cpus)
    pending = [k for k in range(n_shards) if k not in markers]
    log.info("update %s on version %d: %s; %d delta shards to write, %d already done, %d reused from an earlier "
             "attempt", run_id, parent.version, d.counts(), n_shards, n_shards - len(pending), len(earlier))
    if pending:
        assemble_slices(store, parts, drop, ctx.run_dir, slices, pending, cfg.execution.row_group_size,
                        cfg.execution.task_cpus)
        log.info("phase: encode")
        with runner.ProgressWatch(store, ctx.run_dir, set(markers), len(pending), cfg.execution.shard_size or 10_000,
                                  t0, total_rows=n_delta) as watch:
            done, _ = encode_splits(ctx, [{"index": k} for k in pending], encode_stage)
            watch.finish(done)
        markers.update({m.shard: m for m in done})
        missing = [k for k in pending if k not in markers]
        if missing:
            raise RuntimeError(f"delta shards {missing[:10]} produced no output; rerun to retry them")
    ordered = earlier + [markers[k] for k in range(n_shards)]
    stored = sum(m.rows for m in ordered) + sum(m.skipped_too_long for m in ordered)
    if stored != n_delta:
        raise RuntimeError(f"delta shards hold {stored} passages, expected {n_delta}; not committing "
                           f"(rerun: the update plans its delta again)")
    delta_shards = shard_entries(ordered)

    # tombstones: the old rows of changed and deleted ids, in the shards that hold them
    dead = tombstones.of_version(store, parent)
    for path, ids in superseded(store, parent.shards, dead, d.to_remove, cfg.execution.task_cpus).items():
        dead[path] = np.union1d(dead.get(path, np.empty(0, np.int64)), ids)
    artifacts = {"compressor": comp}
    shards = list(parent.shards) + delta_shards
    total = Totals.of(ordered)
    live = d.unchanged.size + n_delta - total.skipped_too_long
    index_action = "none"
    if "dpr_index" in parent.artifacts:
        artifacts["dpr_index"], index_action = _update_index(cfg, store, ctx.run_dir, parent, d,
                                                             [s for s in delta_shards if s["kind"] == "dpr"],
                                                             shards, dead, rebuild_fraction)
    counts = {"passages_in": scan.counts.rows_read, "accepted": scan.counts.accepted, "written": int(live),
              "tokens": parent.counts.get("tokens", 0) + total.tokens,
              "raw_code_bytes": parent.counts.get("raw_code_bytes", 0) + total.raw_code_bytes,
              "skipped": {k.removeprefix("skipped_"): v for k, v in scan.counts.to_dict().items()
                          if k.startswith("skipped_")} | {"too_long": total.skipped_too_long},
              "update": d.counts(), "encoded_this_version": n_delta}
    note = {"corpus_digest": scan.digest, "update_of": parent.version}
    if ordered:
        note["timing"] = total.timing()
    _still_there(store, earlier)
    manifest = commit_version(store, Draft.on_top_of(parent, f"update-{run_id}", note, shards=shards,
                                                     artifacts=artifacts, counts=counts, dead=dead,
                                                     run_dir=ctx.run_dir)).manifest
    return UpdateSummary(store=store.display_url, version=manifest.version, parent=parent.version, counts=d.counts(),
                         passages_encoded_this_run=sum(markers[k].passages_in for k in pending),
                         shards_resumed=n_shards - len(pending) + len(earlier), index_action=index_action,
                         wall_seconds=time.perf_counter() - t0)


def _size(a: np.ndarray | None) -> int:
    return 0 if a is None else int(a.size)


def _still_there(store: Store, earlier: list) -> None:
    """Reused shards are old and unreferenced until this commit: a `gc` meanwhile may have removed them."""
    if not earlier:
        return
    dirs = sorted({"/".join(m.file.path.split("/")[:2]) for m in earlier})
    listed = {f.path: f.size for d in dirs for f in store.walk_files(d)}
    gone = [f.path for m in earlier for f in m.files() if listed.get(f.path) != f.bytes]
    if gone:
        raise OperationFailed(f"{len(gone)} reused delta file(s) changed or disappeared while this update ran "
                              f"(a `precompute gc`?), e.g. {gone[0]}; nothing was committed: rerun the update")


def _earlier_attempts(store: Store, cfg: RunConfig, parent: mf.Manifest, content_id: str,
                      parts: list[SplitDiff], later_copies: dict[int, np.ndarray]):
    """Finished delta shards of uncommitted attempts at this same update on another parent (an update that
    lost the race to commit, rerun): the ones this update can take whole, and per split the ids to leave
    out of assembly (those shards' rows plus the later copies of duplicate ids).

    One listing of runs/, then the candidates' markers and id/hash columns: the cost follows the delta."""
    from pipeline.workers.sink import finished_markers

    drop = {k: v for k, v in later_copies.items()}
    mine = f"update-{content_id}-v{parent.version}"  # this parent's own attempts resume by shard index instead
    referenced = {p.split("/")[1] for p in parent.referenced_paths() if p.startswith("runs/")}
    siblings = [d for d in (x.split("/")[-1] for x in store.list_dirs("runs"))
                if d.startswith(f"update-{content_id}-v") and d != mine and not d.startswith(mine + "-")
                and d not in referenced]
    found = [m for d in siblings
             for _, m in sorted(finished_markers(store, cfg.storage_options, f"runs/{d}", None,
                                                 cfg.execution.task_cpus).items())]
    found = [m for m in found if m.file is not None and not m.too_long_ids]
    if not found:
        return [], drop
    want = [(p.encode_ids, p.encode_hashes, later_copies.get(p.index)) for p in parts if p.encode_ids is not None]
    ids = np.concatenate([i[~np.isin(i, x)] if x is not None else i for i, _, x in want]) if want else np.empty(0, np.int64)
    hashes = np.concatenate([h[~np.isin(i, x)] if x is not None else h for i, h, x in want]) if want else np.empty(0, "S16")
    rows = shard_rows(store, [m.file.path for m in found], cfg.execution.task_cpus)
    take, covered = reusable_shards(ids, hashes, rows)
    earlier = [m for m, ok in zip(found, take) if ok]
    for p in parts:
        if p.encode_ids is not None and covered.size:
            hit = p.encode_ids[in_sorted(covered, p.encode_ids)]
            if hit.size:
                drop[p.index] = np.union1d(drop.get(p.index, np.empty(0, np.int64)), hit)
    if earlier:
        log.info("reusing %d delta shard(s) (%d passages) encoded by an earlier attempt at this update (%s)",
                 len(earlier), int(covered.size), ", ".join(sorted({m.file.path.split("/")[1] for m in earlier})))
    return earlier, drop


def _update_index(cfg, store: Store, run_dir: str, parent: mf.Manifest, d: Diff, delta_dpr: list[dict],
                  all_shards: list[dict], dead: dict[str, set[int]], rebuild_fraction: float) -> tuple[dict, str]:
    """A delta over the on-disk base (cost follows the change); rebuilt on the workers past `rebuild_fraction`.

    A whole (Flat/HNSW) index is small by construction (WHOLE_INDEX_MAX_VECTORS) and is rebuilt."""
    from pipeline.index import faiss_file as fx
    from pipeline.index.build import IndexSpec, build_index_from, update_delta

    entry = parent.artifacts["dpr_index"]
    spec = IndexSpec(cfg.store, cfg.storage_options, entry["factory"], cfg.dpr.train_sample if cfg.dpr else 100_000,
                     entry.get("nprobe", 16), cfg.execution.task_cpus)
    # what the delta would hold since the last compact, not only this update: the delta stays bounded
    touched = d.changed.size + d.new.size + d.deleted.size
    pending = (entry.get("delta") or {}).get("ntotal", 0) + (entry.get("removed") or {}).get("count", 0)
    base = max(d.unchanged.size + d.changed.size + d.deleted.size, 1)
    share = (touched + pending) / base
    dpr = [x for x in all_shards if x["kind"] == "dpr"]
    if share > rebuild_fraction or entry.get("format") != fx.ONDISK:
        new = build_index_from(spec, store, run_dir, dpr, dead)
        if share > rebuild_fraction:
            why = (f"{touched} changed now + {pending} in the delta since the last compact = {share:.1%} of "
                   f"{base} > {rebuild_fraction:.0%}")
        elif fx.factory_nlist(entry["factory"], entry["dim"]) is None:
            why = f"a whole {entry['factory']} index is rebuilt on update"
        else:
            why = "the parent's index predates on-disk lists; rebuilt once in the new format"
        return new, f"rebuilt and retrained on the workers ({why})"
    live = sum(x["rows"] for x in dpr) - sum(len(dead.get(x["path"], ())) for x in dpr)
    new = update_delta(spec, store, run_dir, entry, d.to_remove, delta_dpr, live)
    action = (f"delta: {d.to_remove.size} ids hidden from the base, {sum(x['rows'] for x in delta_dpr)} added "
              f"(delta holds {new['delta']['ntotal']}, {new['removed']['count']} hidden; compact folds them in)")
    log.info("index %s", action)
    return new, action
