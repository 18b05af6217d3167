"""Manifest versions: the only way a reader finds shards.

A version is one JSON object at `_manifests/v00000042.json`, created exclusively, so a version is
either fully visible or absent and two writers cannot both claim the same number.

Format 2 keeps the shard list out of the JSON: it lives in checksummed Parquet segments under
`_shard_tables/`, and a version lists its segments. A commit that extends its parent's shard list
(a run's resume, an update's delta shards) writes one segment with only the shards it adds, so
what a commit writes follows the change, not the store. Format 1 (shards inline) still reads.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from storage.errors import OperationFailed
from storage.fs import AlreadyExists, IntegrityError, Store
from storage.shards import read_rows

log = logging.getLogger(__name__)

MANIFEST_DIR = "_manifests"
FORMAT = "decoupled-precompute/manifest"
FORMAT_VERSION = 2
SHARD_TABLE_DIR = "_shard_tables"
_SEGMENT_KEYS = ("path", "kind", "rows", "bytes", "sha256", "id_min", "id_max")
_NAME = re.compile(r"^v(\d{8})\.json$")


class CommitConflict(OperationFailed, RuntimeError):
    """Another writer committed the version this commit wanted."""


class NoVersion(OperationFailed, LookupError):
    """The store has no committed version (or not the one asked for)."""


class ManifestError(OperationFailed, ValueError):
    """A manifest file is unreadable or not one of ours."""


def version_path(version: int) -> str:
    return f"{MANIFEST_DIR}/v{version:08d}.json"


@dataclass
class Manifest:
    version: int
    parent: int | None
    created_at: str
    run_id: str
    fingerprint: dict[str, Any]
    shards: list[dict[str, Any]]
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    segments: list[dict[str, Any]] = field(default_factory=list)  # format 2: where `shards` was read from

    def shards_of(self, kind: str) -> list[dict[str, Any]]:
        return [s for s in self.shards if s["kind"] == kind]

    def referenced_paths(self) -> set[str]:
        paths = {s["path"] for s in self.shards}
        paths.update(f["path"] for a in self.artifacts.values() for f in artifact_files(a))
        paths.update(seg["path"] for seg in self.segments)
        return paths

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT, "format_version": FORMAT_VERSION if self.segments else 1,
            "version": self.version, "parent": self.parent, "created_at": self.created_at,
            "run_id": self.run_id, "fingerprint": self.fingerprint,
            "artifacts": self.artifacts, "counts": self.counts, "extra": self.extra,
        }
        if self.segments:
            body["shard_table"] = self.segments
        else:
            body["shards"] = self.shards
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Manifest":
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ManifestError(f"{where}: not a {FORMAT} file")
        if body.get("format_version", 0) > FORMAT_VERSION:
            raise ManifestError(f"{where}: format_version {body['format_version']} is newer than "
                                f"this tool understands ({FORMAT_VERSION}); upgrade the package")
        try:
            segments = body.get("shard_table", [])
            return cls(version=int(body["version"]), parent=body["parent"], created_at=body["created_at"],
                       run_id=body["run_id"], fingerprint=body["fingerprint"],
                       shards=body["shards"] if not segments else [],
                       artifacts=body.get("artifacts", {}), counts=body.get("counts", {}),
                       extra=body.get("extra", {}), segments=segments)
        except KeyError as exc:
            raise ManifestError(f"{where}: missing key {exc}") from exc


@dataclass(frozen=True)
class Sizes:
    """A version's bytes in one vocabulary, for the run summary, the commit log, `validate` and the README.

    Units are decimal (KB = 10^3 bytes, MB = 10^6 ...), as object stores bill them."""
    states: int
    states_shards: int
    dpr: int
    dpr_shards: int
    index: int
    other: int  # the compressor, tombstones: small

    @property
    def total(self) -> int:
        return self.states + self.dpr + self.index + self.other

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> "Sizes":
        return cls(d.get("states_bytes", 0), d.get("states_shards", 0), d.get("dpr_bytes", 0), d.get("dpr_shards", 0),
                   d.get("index_bytes", 0), d.get("other_bytes", 0))

    def to_dict(self) -> dict[str, int]:
        return {"states_bytes": self.states, "states_shards": self.states_shards, "dpr_bytes": self.dpr,
                "dpr_shards": self.dpr_shards, "index_bytes": self.index, "other_bytes": self.other,
                "total_bytes": self.total}

    def render(self) -> str:
        from storage.estimate import fmt_size  # the one size renderer: B, KB, MB, GB, TB as the amount needs

        parts = [f"states {fmt_size(self.states)} in {self.states_shards} shards"]
        if self.dpr_shards:
            parts.append(f"DPR embeddings {fmt_size(self.dpr)} in {self.dpr_shards} shards")
        if self.index:
            parts.append(f"FAISS index {fmt_size(self.index)}")
        parts.append(f"other {fmt_size(self.other)}")
        return f"{fmt_size(self.total)} in all: " + ", ".join(parts)


def sizes(manifest: "Manifest") -> Sizes:
    """From the manifest alone: every figure is a sum of the byte counts its checksums cover."""
    states = manifest.shards_of("states")
    dpr = manifest.shards_of("dpr")
    index = sum(f["bytes"] for f in artifact_files(manifest.artifacts["dpr_index"])) \
        if "dpr_index" in manifest.artifacts else 0
    other = sum(f["bytes"] for k, e in manifest.artifacts.items() if k != "dpr_index" for f in artifact_files(e))
    return Sizes(sum(s["bytes"] for s in states), len(states), sum(s["bytes"] for s in dpr), len(dpr), index,
                 other + sum(s["bytes"] for s in manifest.shards if s["kind"] not in ("states", "dpr")))


def artifact_files(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The files an artifact entry stands for: itself, plus any nested {path, sha256, bytes} (an index's lists)."""
    nested = [v for v in entry.values() if isinstance(v, dict) and {"path", "sha256", "bytes"} <= v.keys()]
    return [entry, *nested]


def list_versions(store: Store) -> list[int]:
    versions = []
    for info in store.list(MANIFEST_DIR):
        m = _NAME.match(info.path.rsplit("/", 1)[-1])
        if m:
            versions.append(int(m.group(1)))
    return sorted(versions)


def latest_version(store: Store) -> int | None:
    versions = list_versions(store)
    return versions[-1] if versions else None


def load(store: Store, version: int | None = None) -> Manifest:
    if version is None:
        version = latest_version(store)
        if version is None:
            raise NoVersion(f"{store.display_url} has no committed version yet; run `precompute run` first")
    path = version_path(version)
    try:
        data = store.read_bytes(path)
    except FileNotFoundError as exc:
        have = list_versions(store)
        raise NoVersion(f"{store.display_url} has no version {version} (committed: {have or 'none'})") from exc
    manifest = Manifest.from_json(data, path)
    if manifest.version != version:
        raise ManifestError(f"{path}: says it is version {manifest.version}")
    if manifest.segments:
        manifest.shards = [s for seg in manifest.segments for s in _read_segment(store, seg)]
    return manifest


def _write_segment(store: Store, rel: str, shards: list[dict]) -> dict:
    import pyarrow as pa

    from storage.fs import sha256_bytes
    from storage.shards import encode_parquet

    cols = {k: [s[k] for s in shards] for k in _SEGMENT_KEYS}
    extra = [json.dumps({k: v for k, v in s.items() if k not in _SEGMENT_KEYS}, sort_keys=True) for s in shards]
    table = pa.table({**{k: pa.array(v, pa.string() if k in ("path", "kind", "sha256") else pa.int64())
                         for k, v in cols.items()}, "extra": pa.array(extra, pa.string())})
    data = encode_parquet(table, None, 65536, uncompressed_columns=())
    store.write_bytes(rel, data)
    return {"path": rel, "sha256": sha256_bytes(data), "bytes": len(data), "rows": len(shards)}


def _read_segment(store: Store, seg: dict) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(store.read_verified(seg)))
    cols = {k: table.column(k).to_pylist() for k in (*_SEGMENT_KEYS, "extra")}
    return [{**{k: cols[k][i] for k in _SEGMENT_KEYS}, **json.loads(cols["extra"][i])} for i in range(table.num_rows)]


def _segments_for(store: Store, parent: int | None, shards: list[dict], tag: str,
                  parent_manifest: Manifest | None = None) -> list[dict]:
    """The parent's segments plus one with the shards this commit adds, when it extends the parent's list."""
    prior: list[dict] = []
    rest = shards
    if parent is not None:
        pm = parent_manifest if parent_manifest is not None and parent_manifest.version == parent else None
        if pm is None:
            try:
                pm = load(store, parent)
            except NoVersion:
                pm = None
        # whole entries, not paths: a shard rewritten at the same path must not keep its old checksum
        if pm is not None and pm.segments and shards[:len(pm.shards)] == pm.shards:
            prior, rest = list(pm.segments), shards[len(pm.shards):]
    if not rest and prior:
        return prior
    return prior + [_write_segment(store, f"{SHARD_TABLE_DIR}/{tag}.parquet", rest)]


def commit(store: Store, parent: int | None, *, run_id: str, fingerprint: dict, shards: list[dict],
           artifacts: dict | None = None, counts: dict | None = None, extra: dict | None = None,
           parent_manifest: Manifest | None = None) -> Manifest:
    """Create version parent+1 exclusively; raise CommitConflict if another writer got there first.

    `parent_manifest`: the parent as the caller already loaded it, so the commit need not read it again."""
    ids = [s["path"] for s in shards]
    if len(set(ids)) != len(ids):
        raise ValueError("a version cannot list the same shard twice")
    import uuid

    segments = _segments_for(store, parent, shards, f"v{(parent or 0) + 1:08d}-{uuid.uuid4().hex[:12]}",
                             parent_manifest)
    manifest = Manifest(
        version=(parent or 0) + 1, parent=parent,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        run_id=run_id, fingerprint=fingerprint, shards=shards, artifacts=artifacts or {},
        counts=counts or {}, extra=extra or {}, segments=segments,
    )
    payload = manifest.to_json()
    try:
        store.create_exclusive(version_path(manifest.version), payload)
    except AlreadyExists as exc:
        # A retried PUT whose first response was lost finds its own object: that is a success.
        if _read_or_none(store, version_path(manifest.version)) == payload:
            log.info("version %d was already written by this commit (retried request)", manifest.version)
            return manifest
        raise CommitConflict(
            f"version {manifest.version} of {store.display_url} was committed by another writer while "
            f"this one was based on version {parent}; nothing of this commit is visible. Rerun: finished "
            f"shards are reused, and the new commit is based on the newest version."
        ) from exc
    log.info("committed version %d of %s: %s", manifest.version, store.display_url, sizes(manifest).render())
    return manifest


def _read_or_none(store: Store, rel: str) -> bytes | None:
    try:
        return store.read_bytes(rel)
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------- verify

@dataclass
class VerifyReport:
    version: int
    checked_files: int = 0
    rows: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(store: Store, manifest: Manifest, check_ids: bool = True, threads: int = 8) -> VerifyReport:
    """Every referenced file exists with its recorded size and sha256; ids unique; counts add up.

    Files are hashed by a pool of threads (hashlib and the store's reads release the GIL), so a
    store of thousands of shards is checked at the storage's bandwidth, not one file at a time."""
    from concurrent.futures import ThreadPoolExecutor

    report = VerifyReport(version=manifest.version)
    entries = (list(manifest.shards) + [f for a in manifest.artifacts.values() for f in artifact_files(a)]
               + list(manifest.segments))
    report.checked_files = len(entries)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for problem in pool.map(lambda e: _check_file(store, e), entries):
            if problem:
                report.problems.append(problem)
    if check_ids and not report.problems:
        _check_ids(store, manifest, report)
    return report


def _check_file(store: Store, entry: dict) -> str | None:
    """The problem with one referenced file, worded as a reader refusing it would say it, or None."""
    try:
        store.check_file(entry)
    except IntegrityError as exc:
        return str(exc)
    return None


def _check_ids(store: Store, manifest: Manifest, report: VerifyReport) -> None:
    from storage import tombstones

    dead = tombstones.of_version(store, manifest)
    by_kind: dict[str, list[np.ndarray]] = {}
    for shard in manifest.shards:
        try:
            ids = read_rows(store, shard["path"], columns=["id"]).column("id").to_numpy()
        except Exception as exc:  # noqa: BLE001 - any unreadable shard is reported, not raised
            report.problems.append(f"unreadable shard: {shard['path']} ({type(exc).__name__}: {exc})")
            continue
        if ids.size != shard["rows"]:
            report.problems.append(f"row count mismatch: {shard['path']} has {ids.size} rows, "
                                   f"manifest says {shard['rows']}")
        if ids.size and (ids.min() < shard["id_min"] or ids.max() > shard["id_max"]):
            report.problems.append(f"id range mismatch: {shard['path']}")
        gone = dead.get(shard["path"])
        by_kind.setdefault(shard["kind"], []).append(ids[~np.isin(ids, gone)] if gone is not None else ids)
    for kind, parts in by_kind.items():
        ids = np.concatenate(parts) if parts else np.empty(0, np.int64)
        uniq, counts = np.unique(ids, return_counts=True)
        dupes = uniq[counts > 1]
        if dupes.size:
            report.problems.append(f"duplicate ids in {kind} shards: {dupes[:10].tolist()}"
                                   f"{' …' if dupes.size > 10 else ''} ({dupes.size} in all)")
        if kind == "states":
            report.rows = int(ids.size)
            expected = manifest.counts.get("written")
            if expected is not None and expected != ids.size:
                report.problems.append(f"count mismatch: {ids.size} passages in shards, "
                                       f"manifest counts say {expected} written")


# ---------------------------------------------------------------- gc

@dataclass
class GcReport:
    kept_versions: list[int]
    removed: list[str]
    bytes_removed: int
    dry_run: bool
    held_back: list[str] = field(default_factory=list)  # unreferenced, but younger than min_age_s: left alone
    bytes_held_back: int = 0
    min_age_s: float = 0.0


def collect_garbage(store: Store, keep_last: int | None = None, dry_run: bool = False,
                    min_age_s: float = 3600.0) -> GcReport:
    """Remove files no kept version references.

    keep_last=None keeps every version (removes only orphans: failed runs, staging, temp files);
    keep_last=K also retires versions older than the newest K. Files younger than `min_age_s`
    are left alone because they may belong to a run that has not committed yet.
    """
    versions = list_versions(store)
    if keep_last is not None:
        if keep_last < 1:
            raise ValueError("--keep-last must be at least 1")
        kept = versions[-keep_last:]
    else:
        kept = versions
    referenced: set[str] = set()
    for v in kept:
        referenced |= load(store, v).referenced_paths()
    referenced |= {version_path(v) for v in kept}
    retired = [version_path(v) for v in versions if v not in kept]
    now = time.time()
    removed, nbytes, held, held_bytes = [], 0, [], 0
    for info in store.walk_files():
        if info.path in referenced:
            continue
        is_manifest = info.path.startswith(MANIFEST_DIR + "/")
        if is_manifest and info.path not in retired:
            continue  # never touch a version file we did not decide to retire
        if not is_manifest and min_age_s > 0 and now - _mtime(store, info.path) < min_age_s:
            held.append(info.path)  # reported: a dry run's "0 files" must not hide them
            held_bytes += info.size
            continue
        removed.append(info.path)
        nbytes += info.size
    # Retired version files go first, so no new reader opens a version whose data is leaving;
    # a crash part-way leaves only orphans, which the next gc removes.
    removed.sort(key=lambda p: not p.startswith(MANIFEST_DIR + "/"))
    if not dry_run:
        for path in removed:
            store.remove(path)
    return GcReport(kept_versions=kept, removed=removed, bytes_removed=nbytes, dry_run=dry_run, held_back=held,
                    bytes_held_back=held_bytes, min_age_s=min_age_s)


def _mtime(store: Store, rel: str) -> float:
    info = store.fs.info(store.full(rel))
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        try:
            return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
    return 0.0
