"""A corpus row from raw to accepted: where it came from, how it is checked and normalised, and
what every skip is counted as. The errors a corpus raises live here too, since every reader raises them."""
from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.config import CorpusConfig
from storage.errors import UsageError

_ID_MAX = 2**63 - 1


class CorpusError(UsageError, ValueError):
    """The corpus cannot be used as given; the message names the file (and line) and the fix."""


class CorpusChanged(CorpusError):
    """A corpus file changed between planning and reading."""


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


def content_hash(title: str, text: str) -> bytes:
    """16-byte hash of the normalised title and text: what incremental updates diff on."""
    return hashlib.blake2b(f"{title}\x1f{text}".encode(), digest_size=16).digest()


def normalise(value: str) -> str:
    """NFC, whitespace runs to one space, trimmed. str.split() and re's \\s agree on what whitespace is
    (both use Py_UNICODE_ISSPACE), so this equals re.sub(r"\\s+", " ", ...).strip() at a third of the cost."""
    return " ".join(unicodedata.normalize("NFC", value).split())


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


def bad_row(where, offset: int, detail: str = "", problem: str = "malformed") -> RawRow:
    """A row the reader could not parse; the validator counts it or raises, per the policy."""
    return RawRow(None, None, None, where, offset, problem, detail)


class RowValidator:
    """Checks and normalises raw rows, counting each skip in `counts` (or raising, per the policy)."""

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
