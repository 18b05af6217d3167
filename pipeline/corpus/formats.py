"""Rows of one split of a corpus file, by format: TSV, JSONL, Parquet and Hugging Face datasets.

Text files are read by byte range (a split is [start, end) of a file, cut at line boundaries), so
workers read their own splits without reading the rest; every reader yields `RawRow`s that the
validator (`pipeline.corpus.rows`) checks.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import BUNDLED_CORPUS, CorpusConfig
from pipeline.corpus.rows import CorpusError, RawRow, Where, bad_row
from pipeline.corpus.splits import SourceFile, Split
from storage.fs import Location, redact_url

CHUNK = 1 << 20

_MAP_HINT = ("Map columns with --id-column/--title-column/--text-column (--title-column '' for a corpus "
             "without titles)")


def csv_problem(exc: csv.Error) -> str:
    """The csv module's complaint in the user's terms: its "universal-newline mode" advice is about Python."""
    text = str(exc)
    if "new-line character" in text:
        return "a carriage return (\\r) inside an unquoted field"
    if "NUL" in text:
        return "a NUL byte (binary data)"
    return text


def parse_header(line: bytes, path: str) -> list[str]:
    """A TSV file's first line as its column names, or a CorpusError naming the file and what to fix: a stray
    carriage return or binary data there would otherwise surface as the csv module's traceback."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise CorpusError(f"{path}: the header line is binary data ({'NUL bytes' if text else 'not UTF-8'}), not a "
                          f"UTF-8 TSV header: is the file UTF-16, compressed without a .gz/.zst extension, or in "
                          f"another format? Save it as UTF-8 text, or pass --format jsonl|parquet")
    if "\r" in text.rstrip("\r\n"):
        raise CorpusError(f"{path}: the header line holds a carriage return (\\r) before its end (old Mac or "
                          f"mixed line endings): convert the file to LF line endings (e.g. dos2unix) and rerun")
    try:
        return next(csv.reader([text], delimiter="\t"))
    except StopIteration:
        raise CorpusError(f"{path}: empty header line (expected a header row id<TAB>text<TAB>title)") from None
    except csv.Error as exc:
        raise CorpusError(f"{path}: unreadable header line ({csv_problem(exc)}); expected tab-separated column "
                          f"names such as id<TAB>text<TAB>title") from exc


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
            chunk = fh.read(CHUNK)
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
                chunk = fh.read(CHUNK)
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
        chunk = fh.read(CHUNK)
        eof = not chunk
        buf, i = buf[i:] + chunk, 0


class FormatReader:
    """Reads a corpus's splits, whatever their format; `CorpusFiles` adds the listing and the plan."""

    def __init__(self, cfg: CorpusConfig, where: Location):
        self.cfg = cfg
        self.where = where  # the corpus's own options: never the store's
        self.url = where.url
        self._fs = None
        self._hf = None  # the loaded HF dataset, kept for every split this process reads

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._fs = self.where.filesystem()[0]
        return self._fs

    def _unreadable(self, path: str, exc: BaseException, message: str) -> Exception:
        """Refused credentials name the corpus and its flag; any other failure is `message`, naming the file."""
        return self.where.refused(exc, path) or CorpusError(message)

    @property
    def bundled(self) -> bool:
        """The sample shipped in the package: each node reads its own installed copy."""
        return self.cfg.url == BUNDLED_CORPUS

    def _open(self, path: str):
        try:
            return self.fs.open(path, "rb", compression="infer")
        except (OSError, EOFError) as exc:
            raise self._unreadable(path, exc, f"cannot read corpus file {path}: {exc}") from exc

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
                        chunk = fh.read(min(CHUNK, left))
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
        header = parse_header(header_line, path)
        idx = self._header_index(header, path)
        width = len(header)
        base = self._line_base(path, split.start)
        lineno = 1 if split.start == 0 else 0
        start = len(header_line) if split.start == 0 else split.start
        for offset, line in _lines(fh, start, split.end, limit):
            lineno += 1
            where = Where(path, line=lineno, base=base)
            if line is None:
                yield bad_row(where, offset, f"line longer than {limit} bytes")
                continue
            if not line.strip(b"\r\n"):
                continue  # blank line
            decoded = line.decode("utf-8", "surrogateescape")
            if '"' in decoded:
                try:
                    row = next(csv.reader([decoded], delimiter="\t"))
                except csv.Error as exc:
                    yield bad_row(where, offset, csv_problem(exc))
                    continue
            else:
                row = decoded.rstrip("\r\n").split("\t")
            if len(row) != width:
                hint = " (a quoted field spanning lines is not supported)" if '"' in decoded else ""
                yield bad_row(where, offset, f"{len(row)} fields, header has {width}{hint}")
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
                self._header_index(parse_header(self._first_line(path, limit), first.path), first.path)
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
                yield bad_row(where, offset, f"line longer than {limit} bytes")
                continue
            if not line.strip():
                continue
            try:
                decoded = line.decode("utf-8")
            except UnicodeDecodeError:
                yield bad_row(where, offset, problem="invalid_utf8")
                continue
            try:
                obj = json.loads(decoded)
            except json.JSONDecodeError as exc:
                yield bad_row(where, offset, f"invalid JSON ({exc.msg})")
                continue
            if not isinstance(obj, dict):
                yield bad_row(where, offset, "expected a JSON object")
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
