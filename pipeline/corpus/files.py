"""The corpus as files: one listing with sizes and versions, row estimates for the split plan, and
the check that a file did not change between planning and reading."""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.corpus.formats import CHUNK, FormatReader
from pipeline.corpus.rows import CorpusChanged, CorpusError, RawRow
from pipeline.corpus.splits import SourceFile, Split
from storage.fs import Location, redact_url, version_key

log = logging.getLogger(__name__)

_EXT_FORMAT = {".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


def _list_files(where: Location, fmt: str) -> tuple[fsspec.AbstractFileSystem, dict[str, dict]]:
    """One listing: every corpus file with its size and version, in path order."""
    url = where.url
    fs, path = where.filesystem()
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
    return fs, _without_empty_files(found, url, formats.pop())


_EXPECTED = {"tsv": "a header row id<TAB>text<TAB>title", "jsonl": "one JSON object per line",
             "parquet": "a Parquet file"}


def _without_empty_files(found: dict[str, dict], url: str, fmt: str) -> dict[str, dict]:
    """Zero-byte files, dealt with on the driver before anything starts (the workers would meet them only
    after Ray and the model are up). A zero-byte file holds no passages (a TSV not even its header):
    when every file is empty it is an error naming one; beside files that hold data it is skipped, and
    the skips are counted in the log (a partitioned dump often has empty part files)."""
    empty = [p for p, info in found.items() if not int(info.get("size") or 0)]
    if not empty:
        return found
    expected = _EXPECTED.get(fmt, "passages")
    if len(empty) == len(found):
        if len(empty) == 1:
            raise CorpusError(f"{redact_url(empty[0])}: empty file (0 bytes; expected {expected})")
        raise CorpusError(f"{redact_url(url)}: all {len(empty)} corpus files are empty (0 bytes; expected "
                          f"{expected}), e.g. {redact_url(empty[0])}")
    log.warning("corpus %s: skipped %d empty file(s) of %d (0 bytes, no passages): %s%s", redact_url(url),
                len(empty), len(found), ", ".join(redact_url(p) for p in empty[:5]), " …" if len(empty) > 5 else "")
    skipped = set(empty)
    return {p: info for p, info in found.items() if p not in skipped}


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


class CorpusFiles(FormatReader):
    """Listed and planned on the driver; read split by split on the workers (by `FormatReader`)."""

    # -------------------------------------------------------------- driver side (planning)

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
            raw = fh.read(CHUNK)
        data = _decompress_prefix(path, raw)
        return max(1, data.count(b"\n")) / max(1, len(raw))

    def _version(self, info: dict) -> str:
        # Each node unpacks its own copy of the package (a job's working dir), at its own mtime.
        return f"bundled:size:{info.get('size')}" if self.bundled else version_key(info)

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

    def _local_path(self, split: Split) -> str:
        return self.url if self.bundled else split.path

    def rows(self) -> Iterator[RawRow]:
        """Every row of every file, in order: the serial path (dry runs, updates, small tools)."""
        for f in self.files():
            yield from self.split_rows(whole_file(f))

