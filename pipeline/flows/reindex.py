"""Rebuild the FAISS index of the newest version from its stored DPR embeddings, as a new version.

For a different factory (after `precompute plan-index`), a retrain after many in-place updates, or
a store whose index was never built. Shards and token states are untouched: the new version lists
the same shards and tombstones with a new `dpr_index` artifact, committed once by the driver.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pipeline.index import faiss_file as fx
from pipeline.config import ConfigError, digest
from pipeline.flows.commit import Draft, commit_version
from pipeline.index.plan import factory_bytes_per_vector
from pipeline.flows.job_cost import JobPlan
from storage import manifest as mf
from storage import tombstones
from storage.fs import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReindexConfig:
    store: str
    factory: str
    train_sample: int = 100_000
    nprobe: int = 16
    task_cpus: float = 0.5
    ray_address: str | None = None
    storage_options: dict | None = None

    def __post_init__(self):
        if not self.factory.strip():
            raise ConfigError("factory: required (a FAISS index_factory string, e.g. IVF4096,SQ8)")
        if self.train_sample < 1 or self.nprobe < 1 or self.task_cpus <= 0:
            raise ConfigError("train_sample, nprobe and task_cpus must be positive")


@dataclass
class ReindexSummary:
    store: str
    version: int
    parent: int
    factory: str
    ntotal: int
    bytes: int
    wall_seconds: float

    def render(self) -> str:
        return (f"version {self.version} (parent {self.parent}) of {self.store}: FAISS {self.factory} over "
                f"{self.ntotal:,} vectors, {self.bytes / 1e6:,.2f} MB, in {self.wall_seconds:.1f} s")


def _parent(store: Store) -> tuple[mf.Manifest, list[dict], dict[str, set[int]]]:
    if mf.latest_version(store) is None:
        raise ConfigError(f"{store.display_url} has no committed version; run the encode job first")
    parent = mf.load(store)
    dpr = parent.shards_of("dpr")
    if not dpr:
        raise ConfigError(f"version {parent.version} of {store.display_url} has no DPR embeddings; encode with a "
                          f"`dpr:` section (or --dpr-model) to get them")
    return parent, dpr, tombstones.of_version(store, parent)


def plan_reindex(cfg: ReindexConfig) -> JobPlan:
    store = Store(cfg.store, cfg.storage_options or {})
    return _plan(cfg, store, *_parent(store))


def _plan(cfg: ReindexConfig, store: Store, parent: mf.Manifest, dpr: list[dict],
          dead: dict[str, set[int]]) -> JobPlan:
    """The plan, after checking the factory can be built over the live vectors."""
    paths = {s["path"] for s in dpr}
    live = sum(s["rows"] for s in dpr) - sum(len(ids) for path, ids in dead.items() if path in paths)
    from pipeline.index.build import stored_embedding_width

    dim = stored_embedding_width(store, dpr[0]["path"])
    fx.check_factory(cfg.factory, dim, live, cfg.train_sample)
    per = factory_bytes_per_vector(cfg.factory, dim)
    if per is None:
        storage, basis = 0.0, f"{cfg.factory!r} is not in the byte model; the real size is logged after the build"
    else:
        storage, basis = live * per, f"{per:g} B/vector for {cfg.factory} at {dim} dims, plus the coarse quantizer"
    return JobPlan(job="index", passages=live, shards=len(dpr), tokens=0.0, gpu_hours=0.0,
                   gpu_hours_basis="no model runs: FAISS trains in one Ray task (on a GPU worker when the "
                                   "cluster has one and faiss-gpu is installed), adds and merges in CPU tasks",
                   storage_bytes=storage, storage_basis=basis,
                   notes=(f"based on version {parent.version}; train on {min(cfg.train_sample, live):,} vectors",))


def reindex(cfg: ReindexConfig) -> ReindexSummary:
    from pipeline.workers.dataflow import init_ray
    from pipeline.index.build import IndexSpec, build_index_from

    t0 = time.perf_counter()
    store = Store(cfg.store, cfg.storage_options or {})
    parent, dpr, dead = _parent(store)
    _plan(cfg, store, parent, dpr, dead)  # checks the factory against the live vectors before Ray starts
    init_ray(cfg.ray_address)
    spec = IndexSpec(cfg.store, cfg.storage_options or {}, cfg.factory, cfg.train_sample, cfg.nprobe, cfg.task_cpus)
    run_id = digest({"parent": parent.version, "factory": cfg.factory, "train_sample": cfg.train_sample})
    entry = build_index_from(spec, store, f"runs/index-{run_id}", dpr, dead)
    draft = Draft.on_top_of(parent, f"index-{run_id}", {"reindex_of": parent.version},
                            artifacts={**parent.artifacts, "dpr_index": entry})
    manifest = commit_version(store, draft).manifest
    return ReindexSummary(store=store.display_url, version=manifest.version, parent=parent.version,
                          factory=cfg.factory, ntotal=entry["ntotal"],
                          bytes=sum(f["bytes"] for f in mf.artifact_files(entry)),
                          wall_seconds=time.perf_counter() - t0)
