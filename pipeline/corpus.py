"""Read a passage corpus from any fsspec URL, validate and normalise each row, and count every skip.

Two passes over the source: `scan` validates everything and writes nothing (duplicate ids are
found here, before any output exists); `batches` streams the same validated rows for encoding.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import CorpusConfig, resolve_corpus
from storage.fs import redact_url
from storage.shards import input_schema

log = logging.getLogger(__name__)

_WS = re.compile(r"\s+")
_EXT_FORMAT = {".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_ID_MAX = 2**63 - 1


class CorpusError(ValueError):
    """The corpus cannot be used as given; the message names the file (and line) and the fix."""


@dataclass
class CorpusCounts:
    rows_read: int = 0
    accepted: int = 0
    skipped_empty: int = 0
    skipped_invalid_utf8: int = 0
    skipped_malformed: int = 0
    skipped_duplicate: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class CorpusScan:
    """What pass 1 learned: the accepted ids in corpus order, their content hashes, and counts."""
    ids: np.ndarray
    hashes: list[bytes]
    counts: CorpusCounts
    digest: str
    duplicate_ids: set[int] = field(default_factory=set)

    @property
    def n(self) -> int:
        return int(self.ids.size)


def content_hash(title: str, text: str) -> bytes:
    """16-byte hash of the normalised title and text: what incremental updates diff on."""
    return hashlib.blake2b(f"{title}\x1f{text}".encode(), digest_size=16).digest()


def normalise(value: str) -> str:
    return _WS.sub(" ", unicodedata.normalize("NFC", value)).strip()


# ---------------------------------------------------------------- raw readers

@dataclass
class RawRow:
    id: object
    title: object
    text: object
    where: str  # "file:line" for messages
    problem: str | None = None  # "malformed" or "invalid_utf8" when the reader already knows


def _bad(where: str, problem: str = "malformed") -> RawRow:
    return RawRow(None, None, None, where, problem)


def _expand(url: str, fmt: str, storage_options: dict) -> tuple[fsspec.AbstractFileSystem, list[str], str]:
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    if any(c in path for c in "*?["):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = sorted(p for p in fs.find(path) if _format_of(p, "auto", quiet=True))
    elif fs.exists(path):
        files = [path]
    else:
        raise CorpusError(f"corpus not found: {redact_url(url)}")
    if not files:
        raise CorpusError(f"no corpus files match {redact_url(url)}")
    formats = {_format_of(f, fmt) for f in files}
    if len(formats) != 1:
        raise CorpusError(f"{redact_url(url)} mixes formats {sorted(formats)}; pass one format at a time")
    return fs, files, formats.pop()


def _format_of(path: str, fmt: str, quiet: bool = False) -> str | None:
    if fmt != "auto":
        return fmt
    name = path.lower()
    for comp in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(comp):
            name = name[: -len(comp)]
    ext = os.path.splitext(name)[1]
    if ext in _EXT_FORMAT:
        return _EXT_FORMAT[ext]
    if quiet:
        return None
    raise CorpusError(f"cannot tell the format of {path!r} from its extension; pass --format tsv|jsonl|parquet|hf")


class _Source:
    def __init__(self, cfg: CorpusConfig, storage_options: dict):
        self.cfg = cfg
        self.storage_options = storage_options
        self.url = resolve_corpus(cfg.url)

    def rows(self) -> Iterator[RawRow]:
        if self.cfg.format == "hf":
            yield from self._hf_rows()
            return
        fs, files, fmt = _expand(self.url, self.cfg.format, self.storage_options)
        reader = {"tsv": self._tsv_rows, "jsonl": self._jsonl_rows, "parquet": self._parquet_rows}[fmt]
        for path in files:
            try:
                with fs.open(path, "rb", compression="infer") as fh:
                    yield from reader(fh, path)
            except (OSError, EOFError) as exc:
                raise CorpusError(f"cannot read corpus file {path}: {exc}") from exc

    def _columns(self) -> tuple[str, str, str]:
        c = self.cfg
        return c.id_column, c.title_column, c.text_column

    def _tsv_rows(self, fh, path: str) -> Iterator[RawRow]:
        csv.field_size_limit(self.cfg.max_field_bytes)
        text = io.TextIOWrapper(fh, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.reader(text, delimiter="\t")
        try:
            header = next(reader)
        except StopIteration:
            raise CorpusError(f"{path}: empty file (expected a header row id<TAB>text<TAB>title)") from None
        except csv.Error as exc:
            raise CorpusError(f"{path}: unreadable header ({exc})") from exc
        idx = self._header_index(header, path)
        width = len(header)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield _bad(f"{path}:{reader.line_num}: {exc}")
                continue
            where = f"{path}:{reader.line_num}"
            if not row:
                continue  # blank line
            if len(row) != width:
                yield _bad(f"{where}: {len(row)} fields, header has {width}")
                continue
            yield RawRow(row[idx[0]], row[idx[1]], row[idx[2]], where)

    def _header_index(self, header: list[str], path: str) -> tuple[int, int, int]:
        header = [h.strip().lstrip("\ufeff") for h in header]
        missing = [c for c in self._columns() if c not in header]
        if missing:
            raise CorpusError(f"{path}: missing column(s) {missing}; header is {header}. "
                              f"Map columns with --id-column/--title-column/--text-column")
        return tuple(header.index(c) for c in self._columns())  # type: ignore[return-value]

    def _jsonl_rows(self, fh, path: str) -> Iterator[RawRow]:
        id_c, title_c, text_c = self._columns()
        limit = 3 * self.cfg.max_field_bytes
        for lineno, line in enumerate(_bounded_lines(fh, limit), start=1):
            where = f"{path}:{lineno}"
            if line is None:
                yield _bad(f"{where}: line longer than {limit} bytes")
                continue
            if not line.strip():
                continue
            try:
                decoded = line.decode("utf-8")
            except UnicodeDecodeError:
                yield _bad(where, "invalid_utf8")
                continue
            try:
                obj = json.loads(decoded)
            except json.JSONDecodeError as exc:
                yield _bad(f"{where}: invalid JSON ({exc.msg})")
                continue
            if not isinstance(obj, dict):
                yield _bad(f"{where}: expected a JSON object")
                continue
            missing = [c for c in (id_c, text_c) if c not in obj]
            if missing:
                raise CorpusError(f"{where}: missing key(s) {missing}; map them with --id-column/--text-column")
            yield RawRow(obj[id_c], obj.get(title_c, ""), obj[text_c], where)

    def _parquet_rows(self, fh, path: str) -> Iterator[RawRow]:
        try:
            pf = pq.ParquetFile(fh)
        except (pa.ArrowInvalid, OSError) as exc:
            raise CorpusError(f"{path}: not a readable Parquet file ({exc})") from exc
        yield from self._table_rows(pf.schema_arrow.names, pf.iter_batches(batch_size=4096,
                                    columns=self._present(pf.schema_arrow.names, path)), path)

    def _present(self, names: list[str], path: str) -> list[str]:
        id_c, title_c, text_c = self._columns()
        missing = [c for c in (id_c, text_c) if c not in names]
        if missing:
            raise CorpusError(f"{path}: missing column(s) {missing}; columns are {names}. "
                              f"Map columns with --id-column/--title-column/--text-column")
        return [c for c in (id_c, title_c, text_c) if c in names]

    def _table_rows(self, names, batches, path: str) -> Iterator[RawRow]:
        id_c, title_c, text_c = self._columns()
        offset = 0
        for batch in batches:
            cols = batch.to_pydict()
            n = batch.num_rows
            titles = cols.get(title_c, [""] * n)
            for i in range(n):
                yield RawRow(cols[id_c][i], titles[i], cols[text_c][i], f"{path}:row {offset + i}")
            offset += n

    def _hf_rows(self) -> Iterator[RawRow]:
        import datasets  # heavy import, only for this format

        url = self.url
        try:
            if os.path.isdir(url) and (os.path.exists(os.path.join(url, "dataset_info.json"))
                                       or os.path.exists(os.path.join(url, "state.json"))
                                       or os.path.exists(os.path.join(url, "dataset_dict.json"))):
                ds = datasets.load_from_disk(url)
            else:
                ds = datasets.load_dataset(url, split=self.cfg.hf_split)
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise CorpusError(f"cannot load Hugging Face dataset {redact_url(url)!r}: {exc}") from exc
        if isinstance(ds, datasets.DatasetDict):
            if self.cfg.hf_split not in ds:
                raise CorpusError(f"{url}: no split {self.cfg.hf_split!r} (have {list(ds)}); pass --hf-split")
            ds = ds[self.cfg.hf_split]
        cols = self._present(ds.column_names, url)
        table = ds.select_columns(cols).data.table
        yield from self._table_rows(cols, table.to_batches(max_chunksize=4096), url)


def _bounded_lines(fh, limit: int) -> Iterator[bytes | None]:
    """Lines of a binary stream; a line over `limit` bytes yields None and is skipped, not buffered."""
    buf = b""
    oversized = False
    while True:
        chunk = fh.read(1 << 20)
        if not chunk:
            break
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > limit:
                    oversized, buf = True, b""
                break
            line, buf = buf[:nl], buf[nl + 1:]
            if oversized or len(line) > limit:
                oversized = False
                yield None
            else:
                yield line
    if oversized:
        yield None
    elif buf:
        yield buf


# ---------------------------------------------------------------- validation

class _Validator:
    def __init__(self, cfg: CorpusConfig, counts: CorpusCounts):
        self.cfg = cfg
        self.counts = counts

    def __call__(self, raw: RawRow) -> tuple[int, str, str] | None:
        """Return (id, title, text) normalised, or None after counting a skip (or raise)."""
        c = self.cfg
        self.counts.rows_read += 1
        if raw.problem == "invalid_utf8":
            return self._bad_utf8(raw.where)
        if raw.problem is not None:
            return self._malformed(raw.where)
        pid = _parse_id(raw.id)
        if pid is None:
            return self._malformed(f"{raw.where}: id {str(raw.id)[:40]!r} is not a non-negative integer "
                                   f"(FAISS ids are int64 passage ids)")
        fields = []
        for value in (raw.title, raw.text):
            if value is None:
                value = ""
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    return self._bad_utf8(raw.where)
            if not isinstance(value, str):
                return self._malformed(f"{raw.where}: expected text, got {type(value).__name__}")
            if _has_surrogates(value):
                return self._bad_utf8(raw.where)
            if len(value) > c.max_field_bytes:
                return self._malformed(f"{raw.where}: field of {len(value)} characters exceeds "
                                       f"--max-field-bytes {c.max_field_bytes}")
            fields.append(normalise(value))
        title, text = fields
        if not text:
            if c.on_empty == "error":
                raise CorpusError(f"{raw.where}: passage {pid} has empty text (policy on_empty=error)")
            self.counts.skipped_empty += 1
            return None
        return pid, title, text

    def _malformed(self, where: str):
        if self.cfg.on_malformed == "error":
            raise CorpusError(f"malformed row at {where} (pass --on-malformed skip to count and skip such rows)")
        self.counts.skipped_malformed += 1
        return None

    def _bad_utf8(self, where: str):
        if self.cfg.on_invalid_utf8 == "error":
            raise CorpusError(f"{where}: invalid UTF-8 (policy on_invalid_utf8=error)")
        self.counts.skipped_invalid_utf8 += 1
        return None


def _parse_id(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        v = int(value)
    elif isinstance(value, float) and value.is_integer():
        v = int(value)
    elif isinstance(value, (str, bytes)):
        s = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        s = s.strip()
        if not s.isascii() or not s.isdigit() or len(s) > 19:
            return None
        v = int(s)
    else:
        return None
    return v if 0 <= v <= _ID_MAX else None


def _has_surrogates(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# ---------------------------------------------------------------- the two passes

class Corpus:
    def __init__(self, cfg: CorpusConfig, storage_options: dict | None = None):
        self.cfg = cfg
        self.storage_options = storage_options or {}
        self.display_url = redact_url(cfg.url)

    def _validated(self, counts: CorpusCounts) -> Iterator[tuple[int, str, str]]:
        validate = _Validator(self.cfg, counts)
        for raw in _Source(self.cfg, self.storage_options).rows():
            row = validate(raw)
            if row is not None:
                yield row

    def scan(self) -> CorpusScan:
        """Pass 1: validate every row, find duplicate ids, write nothing."""
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
        """Pass 2: the accepted rows, in corpus order, as tables of `input_schema`."""
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
