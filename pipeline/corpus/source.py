"""Read a passage corpus from any fsspec URL, validate and normalise each row, and count every skip.

The encode run plans splits on the driver (`Corpus.plan`: one listing, Parquet footers, a sampled
MiB per text file) and reads them on the workers (`Corpus.read_split`), where every row is checked,
normalised and hashed. `scan` / `batches` are the serial path for dry runs, updates and small tools.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import unicodedata
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import BUNDLED_CORPUS, CorpusConfig, resolve_corpus
from pipeline.corpus.splits import (SourceFile, Split, auto_rows_per_split, estimated_rows, plan_digest,
                             plan_splits)
from storage.errors import UsageError
from storage.fs import Location, redact_url
from storage.shards import input_schema

log = logging.getLogger(__name__)

_EXT_FORMAT = {".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_ID_MAX = 2**63 - 1


class CorpusError(UsageError, ValueError):
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
    """What the serial scan learned: the accepted ids in corpus order, their content hashes, and counts."""
    ids: np.ndarray
    hashes: list[bytes]
    counts: CorpusCounts
    digest: str
    duplicate_ids: set[int] = field(default_factory=set)

    @property
    def n(self) -> int:
        return int(self.ids.size)


_MAP_HINT = ("Map columns with --id-column/--title-column/--text-column (--title-column '' for a corpus "
             "without titles)")


def content_hash(title: str, text: str) -> bytes:
    """16-byte hash of the normalised title and text: what incremental updates diff on."""
    return hashlib.blake2b(f"{title}\x1f{text}".encode(), digest_size=16).digest()


def normalise(value: str) -> str:
    """NFC, whitespace runs to one space, trimmed. str.split() and re's \\s agree on what whitespace is
    (both use Py_UNICODE_ISSPACE), so this equals re.sub(r"\\s+", " ", ...).strip() at a third of the cost."""
    return " ".join(unicodedata.normalize("NFC", value).split())


# ---------------------------------------------------------------- raw readers

_CHUNK = 1 << 20


class Where:
    """Where a row came from, rendered only when a message needs it.

    A worker reading bytes [start, end) of a file does not know its absolute line numbers; it
    counts the lines before its split lazily, and only when it raises an error."""

    __slots__ = ("path", "line", "row", "_base")

    def __init__(self, path: str, line: int | None = None, row: int | None = None, base=None):
        self.path, self.line, self.row, self._base = path, line, row, base

    def __str__(self) -> str:
        if self.row is not None:
            return f"{self.path}:row {self.row}"
        base = self._base() if callable(self._base) else 0
        return f"{self.path}:{base + (self.line or 0)}"


@dataclass
class RawRow:
    id: object
    title: object
    text: object
    where: Where | str
    offset: int = 0  # byte offset of the line (text) or row index (Parquet/HF): where a limit cuts
    problem: str | None = None  # "malformed" or "invalid_utf8" when the reader already knows
    detail: str = ""


def _bad(where, offset: int, detail: str = "", problem: str = "malformed") -> RawRow:
    return RawRow(None, None, None, where, offset, problem, detail)


def _list_files(where: Location, fmt: str) -> tuple[fsspec.AbstractFileSystem, dict[str, dict]]:
    """One listing: every corpus file with its size and version, in path order."""
    url = where.url
    fs, path = fsspec.core.url_to_fs(url, **where.options)
    if any(c in path for c in "*?["):
        found = fs.glob(path, detail=True)
    elif fs.isdir(path):
        found = {p: i for p, i in fs.find(path, detail=True).items() if _format_of(p, "auto", quiet=True)}
    elif fs.exists(path):
        found = {path: fs.info(path)}
    else:
        raise CorpusError(f"corpus not found: {redact_url(url)}")
    found = {p: i for p, i in sorted(found.items()) if i.get("type", "file") == "file"}
    if not found:
        raise CorpusError(f"no corpus files match {redact_url(url)}")
    formats = {_format_of(f, fmt) for f in found}
    if len(formats) != 1:
        raise CorpusError(f"{redact_url(url)} mixes formats {sorted(formats)}; pass one format at a time")
    return fs, found


def file_version(info: dict) -> str:
    """What says a file changed: the store's ETag/generation where it has one, else size + mtime."""
    for key in ("ETag", "etag", "generation", "md5Hash"):
        if info.get(key):
            return f"{key}:{str(info[key]).strip(chr(34))}:{info.get('size')}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created")
    return f"size:{info.get('size')}:mtime:{mtime}"


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


def _compressed(path: str) -> bool:
    return path.lower().endswith((".gz", ".bz2", ".xz", ".zst"))


def _lines(fh, start: int, end: int, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(byte offset, line with its terminator) of every line that begins in [start, end).

    end = -1 reads to the end of the file. A line over `limit` bytes yields None and is skipped,
    never buffered whole (hostile input). Splits meet exactly: the line that straddles a boundary
    belongs to the split where it begins.
    """
    pos, buf = 0, b""
    if start > 0:
        fh.seek(start - 1)
        pos = start - 1
        while True:  # drop the rest of the line that byte start-1 belongs to
            chunk = fh.read(_CHUNK)
            if not chunk:
                return
            nl = chunk.find(b"\n")
            if nl >= 0:
                pos += nl + 1
                buf = chunk[nl + 1:]
                break
            pos += len(chunk)
    i, eof = 0, False  # buf[i] is the byte at file offset pos
    while not (end >= 0 and pos >= end):
        nl = buf.find(b"\n", i)
        if nl >= 0:
            line = buf[i:nl + 1]
            yield pos, (line if len(line) <= limit else None)
            pos += nl + 1 - i
            i = nl + 1
            continue
        if eof:
            if i < len(buf):
                line = buf[i:]
                yield pos, (line if len(line) <= limit else None)
            return
        if len(buf) - i > limit:  # oversized line: skip to its end without holding it
            skipped = len(buf) - i
            while True:
                chunk = fh.read(_CHUNK)
                if not chunk:
                    yield pos, None
                    return
                nl = chunk.find(b"\n")
                if nl >= 0:
                    yield pos, None
                    pos += skipped + nl + 1
                    buf, i = chunk[nl + 1:], 0
                    break
                skipped += len(chunk)
            continue
        chunk = fh.read(_CHUNK)
        eof = not chunk
        buf, i = buf[i:] + chunk, 0


class _Source:
    """The corpus as files: listed and planned on the driver, read split by split on workers."""

    def __init__(self, cfg: CorpusConfig, where: Location):
        self.cfg = cfg
        self.where = where  # the corpus's own options: never the store's
        self.url = where.url
        self._fs = None
        self._hf = None  # the loaded HF dataset, kept for every split this process reads

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._fs = fsspec.core.url_to_fs(self.url, **self.where.options)[0]
        return self._fs

    def _unreadable(self, path: str, exc: BaseException, message: str) -> Exception:
        """Refused credentials name the corpus and its flag; any other failure is `message`, naming the file."""
        return self.where.refused(exc, path) or CorpusError(message)

    # -------------------------------------------------------------- driver side

    def files(self) -> list[SourceFile]:
        """One listing (and a footer per Parquet file): what the split plan is made from."""
        if self.cfg.format == "hf":
            ds = self._hf_dataset()
            return [SourceFile(self.url, 0, _hf_version(ds), "hf", rows=ds.num_rows)]
        fs, found = _list_files(self.where, self.cfg.format)
        self._fs = fs
        out = []
        for path, info in found.items():
            fmt = _format_of(path, self.cfg.format)
            size = int(info.get("size") or 0)
            if fmt == "parquet":
                groups = self._parquet_groups(path)
                out.append(SourceFile(path, size, self._version(info), fmt, sum(groups), row_groups=groups))
            else:
                out.append(SourceFile(path, size, self._version(info), fmt, splittable=not _compressed(path)))
        return self._with_row_estimates(out)

    def _with_row_estimates(self, files: list[SourceFile], sampled: int = 16) -> list[SourceFile]:
        """Rows of each text file from its first MiB (of raw bytes: a compressed file's ratio is
        measured through its codec); files past the first `sampled` use the sampled average."""
        rates = []
        out = []
        for f in files:
            if f.rows is not None or f.size == 0 or len(rates) >= sampled:
                out.append(f)
                continue
            rate = self._rows_per_raw_byte(f.path)
            rates.append(rate)
            out.append(dataclasses.replace(f, est_rows=max(1, round(f.size * rate))))
        mean = sum(rates) / len(rates) if rates else 0.0
        return [dataclasses.replace(f, est_rows=max(1, round(f.size * mean)))
                if f.rows is None and f.est_rows is None and f.size and mean else f for f in out]

    def _rows_per_raw_byte(self, path: str) -> float:
        with self.fs.open(path, "rb") as fh:
            raw = fh.read(_CHUNK)
        data = _decompress_prefix(path, raw)
        return max(1, data.count(b"\n")) / max(1, len(raw))

    @property
    def bundled(self) -> bool:
        """The sample shipped in the package: each node reads its own installed copy."""
        return self.cfg.url == BUNDLED_CORPUS

    def _version(self, info: dict) -> str:
        # Each node unpacks its own copy of the package (a job's working dir), at its own mtime.
        return f"bundled:size:{info.get('size')}" if self.bundled else file_version(info)

    def _local_path(self, split: Split) -> str:
        return self.url if self.bundled else split.path

    def _parquet_groups(self, path: str) -> tuple[int, ...]:
        """Rows per row group, from the footer alone (embedding-reader's `build_pieces` does the same)."""
        try:
            with self.fs.open(path, "rb") as fh:
                pf = pq.ParquetFile(fh)
                self._present(pf.schema_arrow.names, path)
                return tuple(pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups))
        except (pa.ArrowInvalid, OSError) as exc:
            raise self._unreadable(path, exc, f"{path}: not a readable Parquet file ({exc})") from exc

    @staticmethod
    def bytes_per_row(files: list[SourceFile]) -> float:
        """Raw bytes per row over the sampled text files: the fallback that sizes unsampled ones."""
        est = [f for f in files if f.est_rows]
        return sum(f.size for f in est) / sum(f.est_rows for f in est) if est else 1.0

    # -------------------------------------------------------------- worker side

    def _open(self, path: str):
        try:
            return self.fs.open(path, "rb", compression="infer")
        except (OSError, EOFError) as exc:
            raise self._unreadable(path, exc, f"cannot read corpus file {path}: {exc}") from exc

    def check_version(self, split: Split) -> None:
        """Refuse a file that changed since the plan was made: its shards would not match the run id."""
        if split.fmt == "hf":
            now = _hf_version(self._hf_dataset())
            if now != split.version:
                raise CorpusChanged(f"dataset {redact_url(self.url)} changed after the run was planned "
                                    f"({split.version} -> {now}); rerun once it is stable")
            return
        try:
            now = self._version(self.fs.info(self._local_path(split)))
        except FileNotFoundError:
            raise CorpusChanged(f"corpus file {split.path} disappeared after the run was planned; "
                                f"rerun to plan against the current files") from None
        if now != split.version:
            raise CorpusChanged(f"corpus file {split.path} changed after the run was planned "
                                f"({split.version} -> {now}); its passages would not match the run id. "
                                f"Rerun once the corpus is stable")

    def split_rows(self, split: Split) -> Iterator[RawRow]:
        if split.fmt == "hf":
            yield from self._hf_rows(split)
            return
        reader = {"tsv": self._tsv_rows, "jsonl": self._jsonl_rows, "parquet": self._parquet_rows}[split.fmt]
        if self.bundled:
            split = dataclasses.replace(split, path=self.url)
        try:
            with self._open(split.path) as fh:
                yield from reader(fh, split)
        except (OSError, EOFError) as exc:
            raise self._unreadable(split.path, exc, f"cannot read corpus file {split.path}: {exc}") from exc

    def rows(self) -> Iterator[RawRow]:
        """Every row of every file, in order: the serial path (dry runs, updates, small tools)."""
        for f in self.files():
            yield from self.split_rows(whole_file(f))

    def _columns(self) -> tuple[str, str, str]:
        c = self.cfg
        return c.id_column, c.title_column, c.text_column

    def _required(self) -> list[str]:
        """Columns every file must have: the title too, unless the user said there is none (title_column '')."""
        id_c, title_c, text_c = self._columns()
        return [id_c, title_c, text_c] if title_c else [id_c, text_c]

    def _line_base(self, fh_path: str, start: int):
        """Lines before byte `start`, counted once and only if a message needs a line number."""
        cache: list[int] = []

        def base() -> int:
            if not cache:  # the split's first line follows the first newline at or after byte start-1
                n, left = 1, start - 1
                with self._open(fh_path) as fh:
                    while left > 0:
                        chunk = fh.read(min(_CHUNK, left))
                        if not chunk:
                            break
                        n += chunk.count(b"\n")
                        left -= len(chunk)
                cache.append(n)
            return cache[0]

        return base if start > 0 else None

    def _tsv_rows(self, fh, split: Split) -> Iterator[RawRow]:
        path, limit = split.path, 3 * self.cfg.max_field_bytes
        csv.field_size_limit(self.cfg.max_field_bytes)
        header_line = self._first_line(path, limit)  # a fresh handle: zstd streams cannot seek back
        try:
            header = next(csv.reader([header_line.decode("utf-8", "surrogateescape")], delimiter="\t"))
        except (StopIteration, csv.Error) as exc:
            raise CorpusError(f"{path}: unreadable header ({exc})") from exc
        idx = self._header_index(header, path)
        width = len(header)
        base = self._line_base(path, split.start)
        lineno = 1 if split.start == 0 else 0
        start = len(header_line) if split.start == 0 else split.start
        for offset, line in _lines(fh, start, split.end, limit):
            lineno += 1
            where = Where(path, line=lineno, base=base)
            if line is None:
                yield _bad(where, offset, f"line longer than {limit} bytes")
                continue
            if not line.strip(b"\r\n"):
                continue  # blank line
            decoded = line.decode("utf-8", "surrogateescape")
            if '"' in decoded:
                try:
                    row = next(csv.reader([decoded], delimiter="\t"))
                except csv.Error as exc:
                    yield _bad(where, offset, str(exc))
                    continue
            else:
                row = decoded.rstrip("\r\n").split("\t")
            if len(row) != width:
                hint = " (a quoted field spanning lines is not supported)" if '"' in decoded else ""
                yield _bad(where, offset, f"{len(row)} fields, header has {width}{hint}")
                continue
            yield RawRow(row[idx[0]], row[idx[1]] if idx[1] is not None else "", row[idx[2]], where, offset)

    def _first_line(self, path: str, limit: int) -> bytes:
        """The header row, which every split of the file needs to map its columns."""
        with self._open(path) as h:
            for _, line in _lines(h, 0, 1, limit):
                if line is None:
                    raise CorpusError(f"{path}: header line longer than {limit} bytes")
                return line
        raise CorpusError(f"{path}: empty file (expected a header row id<TAB>text<TAB>title)")

    def _header_index(self, header: list[str], path: str) -> tuple[int, int, int]:
        header = [h.strip().lstrip("\ufeff") for h in header]
        missing = [c for c in self._required() if c not in header]
        if missing:
            raise CorpusError(f"{path}: missing column(s) {missing}; header is {header}. " + _MAP_HINT)
        id_c, title_c, text_c = self._columns()
        return header.index(id_c), (header.index(title_c) if title_c else None), header.index(text_c)

    def check_columns(self, files: list[SourceFile]) -> None:
        """On the driver, before anything starts: the first TSV header and first JSONL object name every
        column the run needs (Parquet footers and HF datasets are checked when they are listed)."""
        limit = 3 * self.cfg.max_field_bytes
        for fmt in ("tsv", "jsonl"):
            first = next((f for f in files if f.fmt == fmt and f.size), None)
            if first is None:
                continue
            path = self.url if self.bundled else first.path
            if fmt == "tsv":
                line = self._first_line(path, limit)
                header = next(csv.reader([line.decode("utf-8", "surrogateescape")], delimiter="\t"), [])
                self._header_index(header, first.path)
                continue
            with self._open(path) as fh:
                for _, line in _lines(fh, 0, -1, limit):
                    if line is None or not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        break  # a malformed row: the workers count or report it with its line number
                    missing = [c for c in self._required() if isinstance(obj, dict) and c not in obj]
                    if missing:
                        raise CorpusError(f"{first.path}: the first object has no key(s) {missing}; keys are "
                                          f"{sorted(obj)[:20]}. " + _MAP_HINT)
                    break

    def _jsonl_rows(self, fh, split: Split) -> Iterator[RawRow]:
        path = split.path
        id_c, title_c, text_c = self._columns()
        limit = 3 * self.cfg.max_field_bytes
        base = self._line_base(path, split.start)
        for lineno, (offset, line) in enumerate(_lines(fh, split.start, split.end, limit), start=1):
            where = Where(path, line=lineno, base=base)
            if line is None:
                yield _bad(where, offset, f"line longer than {limit} bytes")
                continue
            if not line.strip():
                continue
            try:
                decoded = line.decode("utf-8")
            except UnicodeDecodeError:
                yield _bad(where, offset, problem="invalid_utf8")
                continue
            try:
                obj = json.loads(decoded)
            except json.JSONDecodeError as exc:
                yield _bad(where, offset, f"invalid JSON ({exc.msg})")
                continue
            if not isinstance(obj, dict):
                yield _bad(where, offset, "expected a JSON object")
                continue
            missing = [c for c in self._required() if c not in obj]
            if missing:
                raise CorpusError(f"{where}: missing key(s) {missing}; keys are {sorted(obj)[:20]}. " + _MAP_HINT)
            yield RawRow(obj[id_c], obj[title_c] if title_c else "", obj[text_c], where, offset)

    def _parquet_rows(self, fh, split: Split) -> Iterator[RawRow]:
        path = split.path
        try:
            pf = pq.ParquetFile(fh)
        except (pa.ArrowInvalid, OSError) as exc:
            raise CorpusError(f"{path}: not a readable Parquet file ({exc})") from exc
        cols = self._present(pf.schema_arrow.names, path)
        end = pf.metadata.num_rows if split.end < 0 else split.end
        groups, first, row = [], None, 0
        for g in range(pf.num_row_groups):  # the row groups that overlap [start, end)
            n = pf.metadata.row_group(g).num_rows
            if row + n > split.start and row < end:
                groups.append(g)
                first = row if first is None else first
            row += n
        if not groups:
            return
        table = pf.read_row_groups(groups, columns=cols)
        table = table.slice(split.start - first, end - split.start)
        yield from self._table_rows(table.to_batches(max_chunksize=4096), path, split.start)

    def _present(self, names: list[str], path: str) -> list[str]:
        missing = [c for c in self._required() if c not in names]
        if missing:
            raise CorpusError(f"{path}: missing column(s) {missing}; columns are {names}. " + _MAP_HINT)
        return self._required()

    def _table_rows(self, batches, path: str, first_row: int = 0) -> Iterator[RawRow]:
        id_c, title_c, text_c = self._columns()
        offset = first_row
        for batch in batches:
            cols = batch.to_pydict()
            n = batch.num_rows
            titles = cols[title_c] if title_c else [""] * n
            for i in range(n):
                yield RawRow(cols[id_c][i], titles[i], cols[text_c][i], Where(path, row=offset + i), offset + i)
            offset += n

    def _hf_dataset(self):
        if self._hf is None:
            self._hf = self._load_hf()
        return self._hf

    def _load_hf(self):
        import datasets  # heavy import, only for this format

        url = self.url
        try:
            if os.path.isdir(url) and (os.path.exists(os.path.join(url, "dataset_info.json"))
                                       or os.path.exists(os.path.join(url, "state.json"))
                                       or os.path.exists(os.path.join(url, "dataset_dict.json"))):
                ds = datasets.load_from_disk(url)  # memory-mapped Arrow: nothing is read yet
            else:
                ds = datasets.load_dataset(url, split=self.cfg.hf_split)
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise CorpusError(f"cannot load Hugging Face dataset {redact_url(url)!r}: {exc}") from exc
        if isinstance(ds, datasets.DatasetDict):
            if self.cfg.hf_split not in ds:
                raise CorpusError(f"{url}: no split {self.cfg.hf_split!r} (have {list(ds)}); pass --hf-split")
            ds = ds[self.cfg.hf_split]
        self._present(ds.column_names, url)
        return ds

    def _hf_rows(self, split: Split) -> Iterator[RawRow]:
        ds = self._hf_dataset()
        cols = self._present(ds.column_names, self.url)
        end = ds.num_rows if split.end < 0 else split.end
        table = ds.select_columns(cols).data.table.slice(split.start, end - split.start)
        yield from self._table_rows(table.to_batches(max_chunksize=4096), self.url, split.start)


def _hf_version(ds) -> str:
    return f"hf:{getattr(ds, '_fingerprint', '')}:{ds.num_rows}"


def _decompress_prefix(path: str, raw: bytes) -> bytes:
    """As much of a compressed file's start as `raw` (its first bytes) decodes to."""
    import bz2
    import lzma
    import zlib

    import zstandard

    name = path.lower()
    decoders = {".gz": lambda: zlib.decompressobj(wbits=47), ".bz2": bz2.BZ2Decompressor,
                ".xz": lzma.LZMADecompressor, ".zst": lambda: zstandard.ZstdDecompressor().decompressobj()}
    for ext, make in decoders.items():
        if name.endswith(ext):
            try:
                return make().decompress(raw)
            except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError, zstandard.ZstdError) as exc:
                raise CorpusError(f"{path}: cannot decompress ({exc})") from exc
    return raw


def whole_file(f: SourceFile, index: int = 0) -> Split:
    return Split(index, f.path, f.version, f.fmt, "rows" if f.rows is not None else "bytes", 0, -1)


class CorpusChanged(CorpusError):
    """A corpus file changed between planning and reading."""


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
            return self._malformed(raw.where, raw.detail)
        pid = _parse_id(raw.id)
        if pid is None:
            return self._malformed(raw.where, f"id {str(raw.id)[:40]!r} is not a non-negative integer "
                                              f"(FAISS ids are int64 passage ids)")
        fields = []
        for value in (raw.title, raw.text):
            if value.__class__ is str and len(value) <= c.max_field_bytes and value.isascii():
                fields.append(" ".join(value.split()))  # the common case: ASCII is NFC, and has no surrogates
                continue
            if value is None:
                value = ""
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    return self._bad_utf8(raw.where)
            if not isinstance(value, str):
                return self._malformed(raw.where, f"expected text, got {type(value).__name__}")
            if _has_surrogates(value):
                return self._bad_utf8(raw.where)
            if len(value) > c.max_field_bytes:
                return self._malformed(raw.where, f"field of {len(value)} characters exceeds "
                                       f"--max-field-bytes {c.max_field_bytes}")
            fields.append(normalise(value))
        title, text = fields
        if not text:
            if c.on_empty == "error":
                raise CorpusError(f"{raw.where}: passage {pid} has empty text (policy on_empty=error)")
            self.counts.skipped_empty += 1
            return None
        return pid, title, text

    def _malformed(self, where, detail: str = ""):
        """Count a skip, or raise; the location is rendered only for the message."""
        if self.cfg.on_malformed == "error":
            at = f"{where}: {detail}" if detail else f"{where}"
            raise CorpusError(f"malformed row at {at} (pass --on-malformed skip to count and skip such rows)")
        self.counts.skipped_malformed += 1
        return None

    def _bad_utf8(self, where):
        if self.cfg.on_invalid_utf8 == "error":
            raise CorpusError(f"{where}: invalid UTF-8 (policy on_invalid_utf8=error)")
        self.counts.skipped_invalid_utf8 += 1
        return None


def _parse_id(value) -> int | None:
    if value.__class__ is str and value.isascii() and value.isdigit() and len(value) <= 19:  # the common case
        v = int(value)
        return v if v <= _ID_MAX else None
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


# ---------------------------------------------------------------- splits (the scale path)

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

    def _source(self) -> _Source:
        """One source per Corpus: a worker reading many splits lists, opens and loads things once."""
        if getattr(self, "_src", None) is None:
            self._src = _Source(self.cfg, self.where)
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
        """Everything besides the bytes that decides which rows a split accepts."""
        c = dataclasses.asdict(self.cfg)
        c.pop("url", None)
        return c

    def _limited_splits(self, source: _Source, files: list[SourceFile], rows_per_split: int) -> list[Split]:
        """The first `limit` accepted rows, cut every `rows_per_split` accepted rows. A smoke-test
        path: it reads serially, and its cost grows with the limit, not with the corpus."""
        validate = _Validator(self.cfg, CorpusCounts())
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

    def _read_split(self, source: _Source, split: Split) -> SplitRead:
        source.check_version(split)
        counts = CorpusCounts()
        validate = _Validator(self.cfg, counts)
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

    # -------------------------------------------------------------- the serial path

    def _validated(self, counts: CorpusCounts) -> Iterator[tuple[int, str, str]]:
        validate = _Validator(self.cfg, counts)
        with self.where.refusals_named():
            for raw in _Source(self.cfg, self.where).rows():
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
