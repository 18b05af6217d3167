"""A split's completion marker: the JSON record a worker writes once the split's shards are in the store.

The driver reads markers to commit and to resume, so their fields are listed here once, in the
storage layer (which never imports the pipeline). The JSON keeps the keys and values the workers
have always written, so stores and half-finished runs from before still read and resume.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from storage.errors import OperationFailed
from storage.fs import Store
from storage.layout import marker_path
from storage.shards import ShardFile

KIND = "states"  # a marker stands for its split's state shard (and the DPR shard beside it)
_NO_FILE = {"path": None, "rows": 0, "bytes": 0, "sha256": None, "id_min": 0, "id_max": -1}
_INTS = ("rows", "bytes", "id_min", "id_max")


class MarkerError(OperationFailed, ValueError):
    """A marker file is unreadable or not a shard marker (torn, foreign, or from an unknown format)."""


@dataclass(frozen=True)
class ShardMarker:
    """What a finished split holds and what it cost; `None` in an optional field means the key is absent.

    Absent keys: a split that kept no passage has no `too_long_ids` or `attention` and is the only one
    with `read_seconds`; markers written before the packed encoder have no `attention`, older ones no
    `too_long_ids`, `read` or `digest`."""
    shard: int
    file: ShardFile | None  # None: the split kept no passage, so no state shard was written
    passages_in: int
    truncated: int
    skipped_too_long: int
    tokens: int
    padded_tokens: int
    encode_seconds: float
    raw_code_bytes: int
    write_seconds: float
    finished_at: float
    dpr: ShardFile | None = None
    too_long_ids: tuple[int, ...] | None = None  # accepted but not stored: the duplicate check needs them
    attention: str | None = None
    read: dict[str, int] | None = None  # the split's CorpusCounts, as a dict
    digest: str = ""
    read_seconds: float | None = None

    @property
    def path(self) -> str | None:
        return self.file.path if self.file else None

    @property
    def rows(self) -> int:
        return self.file.rows if self.file else 0

    def files(self) -> list[ShardFile]:
        """The files this split wrote (state shard, DPR shard), for the resume's size check."""
        return [f for f in (self.file, self.dpr) if f is not None]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in the order the sink has always written them."""
        out: dict[str, Any] = {**(self.file.to_dict() if self.file else _NO_FILE), "kind": KIND, "shard": self.shard,
                               "dpr": self.dpr.to_dict() if self.dpr else None, "passages_in": self.passages_in,
                               "truncated": self.truncated, "skipped_too_long": self.skipped_too_long}
        if self.too_long_ids is not None:
            out["too_long_ids"] = list(self.too_long_ids)
        out.update(tokens=self.tokens, padded_tokens=self.padded_tokens, encode_seconds=self.encode_seconds)
        if self.attention is not None:
            out["attention"] = self.attention
        out["raw_code_bytes"] = self.raw_code_bytes
        if self.read is not None:
            out["read"] = self.read
        out.update(digest=self.digest, write_seconds=self.write_seconds, finished_at=self.finished_at)
        if self.read_seconds is not None:
            out["read_seconds"] = self.read_seconds
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str = "shard marker") -> "ShardMarker":
        """Parse a marker as any version of the sink or ingest wrote it; MarkerError says what is wrong."""
        if not isinstance(d, dict):
            raise MarkerError(f"{where}: not a JSON object")
        if d.get("kind") != KIND:
            raise MarkerError(f"{where}: kind {d.get('kind')!r}, expected {KIND!r}")
        try:
            counts = {f.name: _CHECKS[f.type](d[f.name], f.name) for f in fields(cls) if f.type in _CHECKS}
            too_long, read, seconds = d.get("too_long_ids"), d.get("read"), d.get("read_seconds")
            if read is not None and not isinstance(read, dict):
                raise TypeError(f"read is {read!r}, not an object")
            return cls(**counts, file=_file(d, f"{where}: state shard"),
                       dpr=_file(d["dpr"], f"{where}: DPR shard") if d.get("dpr") is not None else None,
                       too_long_ids=tuple(_int(i, "too_long_ids") for i in too_long) if too_long is not None else None,
                       attention=d.get("attention"), read=read, digest=d.get("digest", ""),
                       read_seconds=_num(seconds, "read_seconds") if seconds is not None else None)
        except KeyError as exc:
            raise MarkerError(f"{where}: missing key {exc}") from exc
        except TypeError as exc:
            raise MarkerError(f"{where}: {exc}") from exc

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "ShardMarker":
        try:
            return cls.from_dict(json.loads(data), where)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:  # a MarkerError is neither: it passes through
            raise MarkerError(f"{where}: not valid JSON ({exc})") from exc

    def write(self, store: Store, run_dir: str) -> None:
        """After the split's shards: a marker in the store proves they are complete."""
        store.write_bytes(marker_path(run_dir, self.shard), self.to_json())


def _int(v: Any, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{key} is {v!r}, not an integer")
    return v


def _num(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{key} is {v!r}, not a number")
    return v


_CHECKS = {"int": _int, "float": _num}  # by annotation: every count and timing is required


def _file(d: Any, where: str) -> ShardFile | None:
    """A shard file's fields (in a marker or its `dpr` entry); the empty split's placeholder is None."""
    if not isinstance(d, dict):
        raise MarkerError(f"{where}: not a JSON object")
    if d.get("path") is None:
        return None
    if not isinstance(d["path"], str) or not isinstance(d.get("sha256"), str):
        raise MarkerError(f"{where}: path and sha256 must be strings")
    try:
        return ShardFile(path=d["path"], sha256=d["sha256"], **{k: _int(d[k], k) for k in _INTS})
    except KeyError as exc:
        raise MarkerError(f"{where}: missing key {exc}") from exc
    except TypeError as exc:
        raise MarkerError(f"{where}: {exc}") from exc


def shard_entries(markers: list[ShardMarker]) -> list[dict]:
    """Manifest entries for the markers, states then DPR; a split that kept nothing has no file."""
    return ([m.file.entry("states") for m in markers if m.file]
            + [m.dpr.entry("dpr") for m in markers if m.dpr])


def read_finished(store_url: str, storage_options: dict, paths: list[str],
                  sizes: dict[str, int]) -> list[ShardMarker]:
    """Markers of a group of splits whose files the listing shows with their recorded sizes (a Ray task).

    A size check against the listing is enough to reuse a split; `verify` does the sha256. A torn or
    foreign marker is skipped, so its split is done again."""
    store = Store(store_url, storage_options)
    out = []
    for p in paths:
        try:
            marker = ShardMarker.from_json(store.read_bytes(p), p)
        except (FileNotFoundError, MarkerError):
            continue
        if all(sizes.get(f.path) == f.bytes for f in marker.files()):
            out.append(marker)
    return out
