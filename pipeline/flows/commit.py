"""Committing a version, the same way for every workflow (run, update, compact, reindex).

A workflow decides what its version holds (shards, counts, artifacts) and hands it over as a `Draft`;
this module writes what the version still needs (its tombstone file), leaves the store alone when
the newest version already is this one, and commits exclusively on top of the parent.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable

from storage import manifest as mf
from storage import tombstones
from storage.fs import Store
from storage.shard_marker import ShardMarker

TOMBSTONES_FILE = "tombstones.parquet"  # under the run's directory


@dataclass
class Draft:
    """A version as a workflow assembled it, not yet committed."""
    run_id: str
    fingerprint: dict[str, Any]
    shards: list[dict[str, Any]]
    counts: dict[str, Any]
    extra: dict[str, Any]
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    parent: mf.Manifest | None = None  # the version this one extends (None: the store's first)
    dead: dict[str, Iterable[int]] = field(default_factory=dict)  # {shard path: ids} to tombstone; none: no file
    run_dir: str = ""  # where the tombstone file goes

    @classmethod
    def on_top_of(cls, parent: mf.Manifest, run_id: str, note: dict[str, Any], **changes: Any) -> "Draft":
        """A version derived from `parent`: its fingerprint, shards, artifacts and counts unless `changes`
        replaces them, and its extra plus `note` (where this version came from)."""
        base = cls(run_id=run_id, fingerprint=parent.fingerprint, shards=list(parent.shards), counts=parent.counts,
                   extra={**parent.extra, **note}, artifacts=dict(parent.artifacts), parent=parent)
        return dataclasses.replace(base, **changes)


@dataclass(frozen=True)
class Committed:
    manifest: mf.Manifest
    committed: bool  # False: the newest version already held exactly this run; nothing was written


@dataclass(frozen=True)
class Totals:
    """Sums over split markers: what a version's counts and timing record of the splits encoded."""
    rows: int
    passages_in: int
    truncated: int
    skipped_too_long: int
    tokens: int
    raw_code_bytes: int
    encode_seconds: float

    @classmethod
    def of(cls, markers: list[ShardMarker]) -> "Totals":
        return cls(**{f.name: sum(getattr(m, f.name) for m in markers) for f in dataclasses.fields(cls)})

    def timing(self) -> dict[str, Any]:
        """Kept apart from counts: counts are content and must match across reruns, timing never does."""
        return {"encode_seconds": self.encode_seconds, "tokens": self.tokens}


def newest(store: Store) -> mf.Manifest | None:
    """The version a new run builds on; read just before committing, so a long run races no one for long."""
    latest = mf.latest_version(store)
    return mf.load(store, latest) if latest is not None else None


def commit_version(store: Store, draft: Draft) -> Committed:
    """Write the draft's tombstones and commit it as the parent's successor (CommitConflict if beaten to it)."""
    artifacts = dict(draft.artifacts)
    if draft.dead:
        artifacts["tombstones"] = tombstones.write(store, f"{draft.run_dir}/{TOMBSTONES_FILE}", draft.dead)
    parent = draft.parent
    if parent is not None and parent.run_id == draft.run_id and parent.shards == draft.shards:
        return Committed(parent, committed=False)
    manifest = mf.commit(store, parent.version if parent is not None else None, run_id=draft.run_id,
                         fingerprint=draft.fingerprint, shards=draft.shards, artifacts=artifacts,
                         counts=draft.counts, extra=draft.extra, parent_manifest=parent)
    return Committed(manifest, committed=True)
