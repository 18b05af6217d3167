"""A passage corpus read from any fsspec URL: planned into splits, read and checked, counted.

The encode run plans splits on the driver (`Corpus.plan`: one listing, Parquet footers, a sampled
MiB per text file) and reads them on the workers (`Corpus.read_split`), where every row is checked,
normalised and hashed. `scan` / `batches` are the serial path for dry runs, updates and small tools.
Formats are read in `formats`, files listed in `files`, rows checked in `rows`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.config import CorpusConfig, resolve_corpus
from pipeline.corpus.files import CorpusFiles, whole_file
from pipeline.corpus.rows import CorpusCounts, CorpusError, RowValidator, content_hash
from pipeline.corpus.splits import Split, SourceFile, auto_rows_per_split, estimated_rows, plan_digest, plan_splits
from storage.fs import Location, redact_url
from storage.shards import input_schema

log = logging.getLogger(__name__)


@dataclass
class CorpusScan:
    """What the serial scan learned: the accepted ids in corpus order, their content hashes, and counts."""
    ids: np.ndarray
    hashes: list[bytes]
    counts: CorpusCounts
    digest: str
    duplicate_ids: set[int] = field(default_factory=set)

    @property
    def n(self) -> int:
        return int(self.ids.size)


@dataclass
class SplitRead:
    """One split after the worker checked it: its accepted rows as columns, and its counts."""
    table: pa.Table          # split, id, content_hash, title, text (corpus order, duplicates within it removed)
    counts: CorpusCounts
    digest: str              # sha256 of ids + content hashes, for the corpus digest at commit
    duplicate_ids: np.ndarray  # ids that appeared more than once inside this split


def split_table_schema() -> pa.Schema:
    return pa.schema([pa.field("split", pa.int32(), nullable=False), *input_schema()])


@dataclass
class CorpusPlan:
    """The split plan and where it came from: made on the driver from one listing."""
    files: list[SourceFile]
    splits: list[Split]
    rows_per_split: int
    estimated_rows: int
    digest: str


class Corpus:
    def __init__(self, cfg: CorpusConfig, storage_options: dict | None = None):
        """`storage_options`: the corpus's own fsspec options (--corpus-storage-options), never the store's."""
        self.cfg = cfg
        self.storage_options = storage_options or {}
        self.where = Location("corpus", resolve_corpus(cfg.url), self.storage_options)
        self.display_url = redact_url(cfg.url)

    def _source(self) -> CorpusFiles:
        """One source per Corpus: a worker reading many splits lists, opens and loads things once."""
        if getattr(self, "_src", None) is None:
            self._src = CorpusFiles(self.cfg, self.where)
        return self._src

    # -------------------------------------------------------------- planning (driver)

    def plan(self, rows_per_split: int | None) -> CorpusPlan:
        """Splits from one listing (plus Parquet footers); with `limit`, a serial read of that prefix only."""
        source = self._source()
        with self.where.refusals_named():
            files = source.files()
            source.check_columns(files)
            bpr = source.bytes_per_row(files)
            est = estimated_rows(files, bpr)
            if self.cfg.limit is not None:
                est = min(est, self.cfg.limit)
            rows = rows_per_split or auto_rows_per_split(est)
            if self.cfg.limit is not None:
                splits = self._limited_splits(source, files, rows)
            else:
                splits = plan_splits(files, rows, bpr)
        digest = plan_digest(splits, self.policy())
        log.info("corpus %s: %d file(s), ~%d passages, %d splits of ~%d passages", self.display_url, len(files),
                 est, len(splits), rows)
        return CorpusPlan(files, splits, rows, est, digest)

    def policy(self) -> dict:
        """Everything besides the bytes that decides which rows a split accepts.

        Not --on-duplicate: a split's rows are the same under either policy whenever it is written at all
        (`error` fails a split holding a repeat), and across splits the policy only decides which copy is
        live, at the commit. A rerun with another policy reuses every encoded shard."""
        c = dataclasses.asdict(self.cfg)
        c.pop("url", None)
        c.pop("on_duplicate", None)
        return c

    def _limited_splits(self, source: CorpusFiles, files: list[SourceFile], rows_per_split: int) -> list[Split]:
        """The first `limit` accepted rows, cut every `rows_per_split` accepted rows. A smoke-test
        path: it reads serially, and its cost grows with the limit, not with the corpus."""
        validate = RowValidator(self.cfg, CorpusCounts())
        splits: list[Split] = []
        accepted = 0
        for f in files:
            unit = "rows" if f.rows is not None else "bytes"
            begin, in_split, seen = None, 0, 0
            for raw in source.split_rows(whole_file(f)):
                if begin is not None and (in_split == rows_per_split or accepted >= self.cfg.limit):
                    splits.append(Split(len(splits), f.path, f.version, f.fmt, unit, begin, raw.offset))
                    begin, in_split, seen = None, 0, 0
                if accepted >= self.cfg.limit:
                    break
                if begin is None:
                    begin = raw.offset
                seen += 1
                if validate(raw) is not None:
                    accepted += 1
                    in_split += 1
            if begin is not None:
                splits.append(Split(len(splits), f.path, f.version, f.fmt, unit, begin, -1))
            if accepted >= self.cfg.limit:
                break
        if not splits:
            raise CorpusError(f"{self.display_url}: no usable passages")
        return splits

    # -------------------------------------------------------------- reading (workers)

    def read_split(self, split: Split) -> SplitRead:
        """Read, check, normalise and hash one split; duplicates inside it follow --on-duplicate."""
        with self.where.refusals_named(split.path):
            return self._read_split(self._source(), split)

    def _read_split(self, source: CorpusFiles, split: Split) -> SplitRead:
        source.check_version(split)
        counts = CorpusCounts()
        validate = RowValidator(self.cfg, counts)
        ids: list[int] = []
        hashes: list[bytes] = []
        titles: list[str] = []
        texts: list[str] = []
        for raw in source.split_rows(split):
            row = validate(raw)
            if row is None:
                continue
            pid, title, text = row
            ids.append(pid)
            hashes.append(content_hash(title, text))
            titles.append(title)
            texts.append(text)
        source.check_version(split)  # changed while it was being read
        arr = np.asarray(ids, dtype=np.int64)
        keep = _first_occurrence_mask(arr)
        dupes = np.unique(arr[~keep])
        if dupes.size and self.cfg.on_duplicate == "error":
            raise CorpusError(f"{split.path}: {dupes.size} duplicate passage id(s), e.g. {dupes[:5].tolist()}; "
                              f"ids must be unique (or pass --on-duplicate keep-first)")
        counts.skipped_duplicate = int((~keep).sum())
        counts.accepted = int(keep.sum())
        idx = np.flatnonzero(keep)
        hash_col = pa.array(hashes, pa.binary(16)).take(pa.array(idx))
        table = pa.Table.from_arrays(
            [pa.array(np.full(idx.size, split.index, np.int32)), pa.array(arr[idx]), hash_col,
             pa.array(titles, pa.string()).take(pa.array(idx)), pa.array(texts, pa.string()).take(pa.array(idx))],
            schema=split_table_schema())
        h = hashlib.sha256(arr[idx].tobytes())
        h.update(hash_col.buffers()[1].to_pybytes() if idx.size else b"")
        return SplitRead(table, counts, h.hexdigest(), dupes)

    def split_ids(self, split: Split) -> np.ndarray:
        """The ids one split accepts, in file order, repeats included: the duplicate check before encoding
        reads this much of every split (no hashing, no table, no tokenising)."""
        validate = RowValidator(self.cfg, CorpusCounts())
        with self.where.refusals_named(split.path):
            source = self._source()
            source.check_version(split)
            ids = [row[0] for raw in source.split_rows(split) if (row := validate(raw)) is not None]
        return np.asarray(ids, dtype=np.int64)

    # -------------------------------------------------------------- the serial path

    def _validated(self, counts: CorpusCounts) -> Iterator[tuple[int, str, str]]:
        validate = RowValidator(self.cfg, counts)
        with self.where.refusals_named():
            for raw in CorpusFiles(self.cfg, self.where).rows():
                row = validate(raw)
                if row is not None:
                    yield row

    def scan(self) -> CorpusScan:
        """Validate every row in one process, write nothing: for dry runs, updates and small tools.

        The encode run does not use it: it reads splits on the workers (`plan` + `read_split`)."""
        counts = CorpusCounts()
        ids: list[int] = []
        hashes: list[bytes] = []
        for pid, title, text in self._validated(counts):
            ids.append(pid)
            hashes.append(content_hash(title, text))
            if self.cfg.limit is not None and len(ids) >= self.cfg.limit:
                break
        arr = np.asarray(ids, dtype=np.int64)
        uniq, cnt = np.unique(arr, return_counts=True)
        dupes = uniq[cnt > 1]
        if dupes.size and self.cfg.on_duplicate == "error":
            raise CorpusError(f"{self.display_url}: {dupes.size} duplicate passage id(s), e.g. "
                              f"{dupes[:5].tolist()}; ids must be unique (or pass --on-duplicate keep-first)")
        if dupes.size:
            keep = _first_occurrence_mask(arr)
            counts.skipped_duplicate = int((~keep).sum())
            arr = arr[keep]
            hashes = [h for h, k in zip(hashes, keep) if k]
        counts.accepted = int(arr.size)
        if arr.size == 0:
            raise CorpusError(f"{self.display_url}: no usable passages ({counts.to_dict()})")
        h = hashlib.sha256()
        h.update(arr.tobytes())
        for x in hashes:
            h.update(x)
        log.info("corpus %s: %d rows read, %d accepted, skipped %s", self.display_url, counts.rows_read,
                 counts.accepted, {k: v for k, v in counts.to_dict().items() if k.startswith("skipped") and v})
        return CorpusScan(ids=arr, hashes=hashes, counts=counts, digest=h.hexdigest()[:32],
                          duplicate_ids=set(dupes.tolist()))

    def batches(self, scan: CorpusScan, rows_per_batch: int) -> Iterator[pa.Table]:
        """The accepted rows of `scan`, in corpus order, as tables of `input_schema`."""
        seen_dupes: set[int] = set()
        buf: dict[str, list] = {"id": [], "content_hash": [], "title": [], "text": []}
        emitted = 0
        for pid, title, text in self._validated(CorpusCounts()):
            if emitted + len(buf["id"]) >= scan.n:
                break
            if pid in scan.duplicate_ids:
                if pid in seen_dupes:
                    continue
                seen_dupes.add(pid)
            buf["id"].append(pid)
            buf["content_hash"].append(content_hash(title, text))
            buf["title"].append(title)
            buf["text"].append(text)
            if len(buf["id"]) == rows_per_batch:
                emitted += len(buf["id"])
                yield pa.Table.from_pydict(buf, schema=input_schema())
                buf = {k: [] for k in buf}
        if buf["id"]:
            yield pa.Table.from_pydict(buf, schema=input_schema())


def _first_occurrence_mask(ids: np.ndarray) -> np.ndarray:
    _, first = np.unique(ids, return_index=True)
    mask = np.zeros(ids.size, dtype=bool)
    mask[first] = True
    return mask
