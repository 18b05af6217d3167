"""One object store rooted at a URL, and the fsspec rules the rest share: atomic writes, the
size/sha256 check against a manifest entry, a file's version key, where credentials are refused.

Only this module and the corpus readers (`pipeline.corpus.files`, `.formats`) talk to fsspec.
Paths handed to and returned from `Store` are relative to the root, with '/' separators, so a
manifest written on S3 reads the same when the store is mirrored to a local directory.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import posixpath
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import fsspec

from storage.errors import (OPTION_FLAGS, OperationFailed, PrecomputeError, UsageError, backend_failure,
                            endpoint_named, throttle_hint, unreachable_reason)

log = logging.getLogger(__name__)

_HASH_CHUNK = 8 << 20


class IntegrityError(OperationFailed, RuntimeError):
    """A file a manifest references is missing, truncated or altered; it is refused, never used."""


class AlreadyExists(FileExistsError):
    """An exclusive create found the object already there (someone else committed first)."""


def missing_file(path: str) -> IntegrityError:
    return IntegrityError(f"{path}: missing from the store")


def check_entry(entry: dict, size: int, sha256: str | None = None) -> None:
    """Raise IntegrityError unless the file's size (and sha256, when given) match its manifest entry:
    one wording for readers refusing a file and for `verify` listing it."""
    path = entry["path"]
    if "bytes" in entry and size != entry["bytes"]:
        raise IntegrityError(f"{path}: size differs from the manifest ({size} bytes, the manifest says "
                             f"{entry['bytes']})")
    if sha256 is not None and sha256 != entry["sha256"]:
        raise IntegrityError(f"{path}: checksum differs from the manifest (sha256 {sha256[:16]}…, "
                             f"the manifest says {entry['sha256'][:16]}…)")


# How fsspec backends (local, s3fs, gcsfs, adlfs...) name a file's version and its last change.
_VERSION_KEYS = ("ETag", "etag", "generation", "md5Hash")
_MODIFIED_KEYS = ("mtime", "LastModified", "updated", "created")


def version_key(info: dict) -> str:
    """What says a file changed, from an fsspec info dict: its ETag/generation where the backend has
    one, else size + modification time."""
    for key in _VERSION_KEYS:
        if info.get(key):
            return f"{key}:{str(info[key]).strip(chr(34))}:{info.get('size')}"
    mtime = next((info[key] for key in _MODIFIED_KEYS if info.get(key)), info.get(_MODIFIED_KEYS[-1]))
    return f"size:{info.get('size')}:mtime:{mtime}"


@contextmanager
def _atomic_local(target: str, publish: Callable[[str, str], None] = os.replace) -> Iterator[IO[bytes]]:
    """A local file that readers see complete or not at all: written to a temp name beside `target`,
    fsynced, then published (renamed; hard-linked for an exclusive create). The temp never stays."""
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    tmp = f"{target}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        publish(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def _object_upload(fs, path: str) -> Iterator[IO[bytes]]:
    """An object-store write that appears only when it completes: on failure the upload is aborted."""
    out = fs.open(path, "wb")
    try:
        yield out
    except BaseException:
        if hasattr(out, "discard"):
            out.discard()  # fsspec: abort the multipart upload instead of completing a partial object
        else:
            out.close()
        raise
    out.close()


def _put(fs, path: str, data: bytes, local: bool) -> None:
    """A whole object that readers never see half done (temp + fsync + rename locally; one PUT elsewhere)."""
    if local:
        with _atomic_local(path) as fh:
            fh.write(data)
    else:
        fs.pipe_file(path, data)


def _copy_hashing(src: IO[bytes], out: IO[bytes] | None = None) -> tuple[int, str]:
    """Stream `src` (into `out` when given), hashing as it goes: (bytes, sha256 hex)."""
    digest, n = hashlib.sha256(), 0
    while chunk := src.read(_HASH_CHUNK):
        digest.update(chunk)
        if out is not None:
            out.write(chunk)
        n += len(chunk)
    return n, digest.hexdigest()


def check_writable(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Before any work: can this process write under `url`? Creates nothing that stays.

    Local: the nearest existing directory must be writable (nothing is created). Object store: one
    small probe object is written and deleted, which exercises credentials, bucket and permissions."""
    if not url or not str(url).strip():
        raise UsageError("store URL is empty: pass --store PATH or s3://bucket/prefix")
    shown = redact_url(str(url))
    where = Location("store", str(url), dict(storage_options or {}))
    fs, root = where.filesystem(str(url).rstrip("/"))
    if "file" in _protocols(fs):
        path = os.path.abspath(root)
        while not os.path.exists(path):
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            raise UsageError(f"store {shown}: {path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"store {shown}: no permission to write in {path}")
        return
    probe = f"{root.rstrip('/')}/_probe/write-check-{uuid.uuid4().hex}"
    try:
        fs.pipe_file(probe, b"probe")
    except Exception as exc:  # noqa: BLE001 - every backend raises its own types; all mean "cannot write here"
        if _no_credentials(exc):
            hint = ("no credentials found: set them in the environment (e.g. AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY), a profile, or an instance role")
        elif (backend_failure(exc) or ("denied",))[0] != "denied":
            raise where.refused(exc) from exc  # unreachable, or throttled past retries: said the same everywhere
        elif isinstance(exc, PermissionError) or backend_failure(exc):
            hint = "permission denied: the credentials cannot write under this prefix"
        elif isinstance(exc, FileNotFoundError):
            hint = "the bucket does not exist"
        else:
            hint = f"{type(exc).__name__}: {_scrub(str(exc), url)}"
        raise UsageError(f"store {shown} is not writable: {hint} (check {OPTION_FLAGS['store']})") from exc
    try:
        fs.rm(probe)
    except OSError as exc:  # write-only credentials (or a WORM bucket) can still run; the probe stays
        log.warning("store %s: could not delete the write probe %s (%s); it is harmless", shown,
                    redact_url(probe), type(exc).__name__)


def _scrub(text: str, url: str) -> str:
    """The first line of a backend's message, without the URL's credentials if it repeats them."""
    first = text.splitlines()[0][:300] if text else "no detail"
    return first.replace(str(url), redact_url(str(url))) if url else first


def read_url(where: Location, limit: int = 1 << 30) -> bytes:
    """A whole small file outside any store (a compressor given by URL), with its own location's options."""
    shown = where.display_url
    with where.refusals_named():
        try:
            fs, path = where.filesystem()
            size = fs.size(path)
            if size is not None and size > limit:
                raise UsageError(f"{where.role}: {shown} is {size:,} bytes, more than the {limit:,} expected")
            return fs.cat_file(path)
        except FileNotFoundError as exc:
            raise UsageError(f"{where.role}: {shown}: no such file") from exc
        except PermissionError:
            raise  # named by refusals_named
        except (OSError, ValueError, TypeError) as exc:
            raise UsageError(f"{where.role}: {shown}: cannot read it "
                             f"({type(exc).__name__}: {_scrub(str(exc), where.url)})") from exc


def write_url(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """A whole small file outside any store (a tool's output): complete or absent, never half written."""
    fs, path = filesystem(str(url), storage_options, "output")
    try:
        _put(fs, path, data, "file" in _protocols(fs))
    except (OSError, TypeError, ValueError) as exc:
        raise UsageError(f"cannot write {redact_url(str(url))} ({type(exc).__name__}: {_scrub(str(exc), url)})") from exc


def redact_url(url: str) -> str:
    """Strip user:password@ from a URL so it can be logged or stored in a manifest."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        parts = parts._replace(netloc=host)
    return urlunsplit(parts)


# fsspec backends a plain install lacks, and the extra of this package that brings each.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def filesystem(url: str, options: dict[str, Any] | None = None, role: str = "store"):
    """fsspec's (filesystem, path) for `url`; a backend that is not installed, or options it does not take,
    are one line naming the location (and the extra that installs the backend)."""
    shown = redact_url(str(url))
    try:
        return fsspec.core.url_to_fs(str(url), **(options or {}))
    except ImportError as exc:
        proto = str(url).split("://", 1)[0].lower() if "://" in str(url) else "file"
        extra = _EXTRAS.get(proto)
        how = (f"pip install 'decoupled-precompute[{extra}]'" if extra
               else f"install the fsspec backend for {proto}:// ({exc})")
        raise UsageError(f"{role} {shown}: {proto}:// URLs need a package that is not installed: {how}") from exc
    except (ValueError, TypeError) as exc:
        flag = OPTION_FLAGS.get(role)
        raise UsageError(f"{role} {shown}: cannot open it ({type(exc).__name__}: {_scrub(str(exc), str(url))})"
                         + (f" (check {flag})" if flag else "")) from exc


_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError", "DefaultCredentialsError")


def _no_credentials(exc: BaseException) -> bool:
    return type(exc).__name__ in _NO_CREDENTIALS


class AccessRefused(UsageError):
    """A backend said no to a location: refused its credentials (or found none), could not be reached, or kept
    throttling it. One line naming the location and its flag; the run's driver re-raises it from a worker too."""


class Unreachable(AccessRefused):
    """A location's endpoint does not answer (refused, timed out, no DNS): most often a wrong endpoint_url."""


class Throttled(AccessRefused, OperationFailed):
    """The service kept answering "slow down" after the client's retries: the settings were fine, the work
    could not complete now."""
    exit_code = 1


@dataclass(frozen=True)
class Location:
    """One place a run reads or writes (the store, the corpus, a compressor file) with the fsspec options
    for it alone, so one location's credentials are never handed to another's filesystem.

    The options never appear in a repr, a log line or a message; errors name the role, the URL
    (without user:password@) and the flag that holds the options."""
    role: str
    url: str
    options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.role not in OPTION_FLAGS:
            raise ValueError(f"unknown location role {self.role!r}")
        if not isinstance(self.options, dict):
            raise UsageError(f"{self.role}: {OPTION_FLAGS[self.role]} must be a mapping of fsspec options")

    def __repr__(self) -> str:
        return f"Location({self.role}, {self.display_url!r})"

    @property
    def display_url(self) -> str:
        return redact_url(str(self.url))

    def filesystem(self, url: str | None = None):
        """fsspec's (filesystem, path) for `url` (default: this location's), with this location's options alone."""
        return filesystem(url or self.url, self.options, self.role)

    @property
    def endpoint(self) -> str | None:
        """The endpoint_url the options name (redacted), if any."""
        opts = self.options
        raw = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
        return redact_url(str(raw)) if raw else None

    def refused(self, exc: BaseException, url: str | None = None) -> AccessRefused | None:
        """The backend's "no" (no credentials, access denied, unreachable, throttled past its retries) as one
        line naming this location and the flag that holds its options, else None."""
        shown = redact_url(str(url or self.url))
        flag = OPTION_FLAGS[self.role]
        if _no_credentials(exc):
            return AccessRefused(f"{self.role}: no credentials found for {shown} (check {flag}, the environment, "
                                 f"a profile or an instance role; {{\"anon\": true}} for a public bucket)")
        kind, culprit = backend_failure(exc) or (None, exc)
        if kind == "unreachable":
            at = self.endpoint or endpoint_named(culprit)
            return Unreachable(f"{self.role}: cannot reach {shown}{f' at {at}' if at else ''}: "
                               f"{unreachable_reason(culprit)} ({type(culprit).__name__}); check endpoint_url in "
                               f"{flag}, and that the service is up")
        if kind == "throttled":
            return Throttled(f"{self.role}: {shown}: the service kept throttling requests after retries "
                             f"({type(culprit).__name__}); {throttle_hint(flag)}")
        if isinstance(exc, PermissionError) or kind == "denied":
            local = "://" not in shown or shown.startswith("file://")
            return AccessRefused(f"{self.role}: access denied for {shown} "
                                 f"({'check the file permissions' if local else f'check {flag}'})")
        return None

    @contextmanager
    def refusals_named(self, url: str | None = None) -> Iterator[None]:
        """Inside: a refusal by the backend becomes this location's one-line error; anything else passes."""
        try:
            yield
        except PrecomputeError:
            raise
        except Exception as exc:  # noqa: BLE001 - botocore/gcsfs raise their own types; only refusals are rewritten
            err = self.refused(exc, url)
            if err is None:
                raise
            raise err from exc


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int


def _named(method):
    """A Store method whose backend refusals (no credentials, access denied, unreachable, throttled) become
    one line naming the store and --storage-options, whichever command or worker called it."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self.where.refusals_named():
            return method(self, *args, **kwargs)
    return call


class Store:
    """A directory or bucket prefix reached through fsspec."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        if not url or not str(url).strip():
            raise ValueError("store URL is empty: pass --store PATH or s3://bucket/prefix")
        self.url = str(url).rstrip("/")
        self.storage_options = dict(storage_options or {})  # for workers to open the same store; never logged
        self.where = Location("store", self.url, self.storage_options)
        self.fs, root = self.where.filesystem()
        self.root = root.rstrip("/")
        self.is_local = "file" in _protocols(self.fs)
        if self.is_local:
            os.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:  # never includes storage_options (credentials)
        return f"Store({redact_url(self.url)!r})"

    @property
    def display_url(self) -> str:
        return redact_url(self.url)

    def full(self, rel: str) -> str:
        rel = rel.lstrip("/")
        if ".." in rel.split("/"):
            raise ValueError(f"path escapes the store root: {rel!r}")
        return posixpath.join(self.root, rel) if rel else self.root

    @_named
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.full(rel))

    @_named
    def size(self, rel: str) -> int:
        return int(self.fs.size(self.full(rel)))

    @_named
    def open(self, rel: str, mode: str = "rb"):
        return self.fs.open(self.full(rel), mode)

    @_named
    def open_ranges(self, rel: str):
        """For reads of a few byte ranges (Parquet footers and row groups): no read-ahead on remote
        stores, where s3fs would otherwise fetch a 50 MB block (the whole shard) for each range."""
        if self.is_local:
            return self.open(rel)
        return self.fs.open(self.full(rel), "rb", cache_type="none")

    @_named
    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.full(rel))

    def makedirs(self, rel: str) -> None:
        if self.is_local:
            os.makedirs(self.full(rel), exist_ok=True)

    @_named
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Whole-object write that readers never see half done (temp + rename locally; one PUT on S3)."""
        _put(self.fs, self.full(rel), data, self.is_local)

    @_named
    def create_exclusive(self, rel: str, data: bytes) -> None:
        """Create `rel` only if absent; raise AlreadyExists otherwise.

        Local: the content is written to a temp file and hard-linked into place (link fails with
        EEXIST), so the object appears complete or not at all. Object stores: fsspec's 'xb' mode,
        which s3fs maps to a PUT with If-None-Match: *.
        """
        target = self.full(rel)
        if self.is_local:
            try:
                with _atomic_local(target, publish=os.link) as fh:
                    fh.write(data)
            except FileExistsError as exc:
                raise AlreadyExists(rel) from exc
            return
        try:
            with self.fs.open(target, "xb") as fh:
                fh.write(data)
        except FileExistsError as exc:
            raise AlreadyExists(rel) from exc
        except OSError as exc:  # some backends surface 412 as a generic OSError
            if "412" in str(exc) or "PreconditionFailed" in str(exc):
                raise AlreadyExists(rel) from exc
            raise

    def _entries(self, rel_dir: str) -> list[dict]:
        """One fresh listing of what is directly under `rel_dir` (none if it does not exist)."""
        base = self.full(rel_dir)
        self.fs.invalidate_cache(base)
        try:
            return self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return []
        finally:
            self.fs.invalidate_cache(base)  # see walk_files

    @_named
    def list(self, rel_dir: str) -> list[FileInfo]:
        """Files directly under `rel_dir` (empty if it does not exist)."""
        return sorted((FileInfo(self.relative(e["name"]), int(e.get("size") or 0)) for e in self._entries(rel_dir)
                       if e.get("type") == "file"), key=lambda f: f.path)

    @_named
    def list_dirs(self, rel_dir: str) -> list[str]:
        """Directories directly under `rel_dir` (relative paths, sorted; empty if it does not exist): one listing."""
        return sorted(self.relative(e["name"]) for e in self._entries(rel_dir) if e.get("type") == "directory")

    @_named
    def walk_files(self, rel_dir: str = "") -> list[FileInfo]:
        base = self.full(rel_dir)
        # A listing is always fresh and leaves nothing cached: s3fs keeps listings in a per-process
        # directory cache, and a directory listed while workers (other processes) were still writing
        # into it would later make their files look missing to this process (size, open, exists).
        self.fs.invalidate_cache(base)
        try:
            if not self.fs.exists(base):
                return []
            found = self.fs.find(base, detail=True)
        finally:
            self.fs.invalidate_cache(base)
        return sorted(
            (FileInfo(self.relative(name), int(info.get("size") or 0)) for name, info in found.items()
             if info.get("type") == "file"),
            key=lambda f: f.path,
        )

    def relative(self, full_path: str) -> str:
        full_path = self.fs._strip_protocol(full_path)
        root = self.fs._strip_protocol(self.root).rstrip("/")
        if not full_path.startswith(root):
            raise ValueError(f"{full_path!r} is not under the store root {root!r}")
        return full_path[len(root):].lstrip("/")

    @_named
    def remove(self, rel: str) -> None:
        self.fs.rm_file(self.full(rel))

    @_named
    def read_verified(self, entry: dict) -> bytes:
        """The whole object at entry['path'], only if its size and sha256 match the entry."""
        try:
            data = self.read_bytes(entry["path"])
        except FileNotFoundError as exc:
            raise missing_file(entry["path"]) from exc
        check_entry(entry, len(data), sha256_bytes(data))
        return data

    def local_path(self, rel: str) -> str | None:
        """The file's path on this machine when the store is a local directory (to mmap it), else None."""
        return self.full(rel) if self.is_local else None

    @_named
    def upload_file(self, local_path: str, rel: str) -> dict:
        """Stream a local file into the store, hashing as it goes: {path, sha256, bytes}.

        Nothing the size of the file is held in memory; readers never see it half written (temp +
        rename locally; on S3 a multipart upload only appears when it completes)."""
        target = self.full(rel)
        with (_atomic_local(target) if self.is_local else _object_upload(self.fs, target)) as out, \
                open(local_path, "rb") as src:
            n, sha = _copy_hashing(src, out)
        return {"path": rel, "sha256": sha, "bytes": n}

    @_named
    def check_file(self, entry: dict, checksum: bool = True) -> None:
        """Raise IntegrityError unless the file at entry['path'] has the entry's size and (when
        `checksum`) sha256; the hash is streamed, and skipped when the size already differs."""
        try:
            size = self.size(entry["path"])
        except FileNotFoundError as exc:
            raise missing_file(entry["path"]) from exc
        check_entry(entry, size)
        if checksum:
            check_entry(entry, size, self.sha256(entry["path"]))

    @_named
    def download_verified(self, entry: dict, local_path: str) -> None:
        """Stream entry['path'] to local_path, which appears only if size and sha256 match the entry."""
        try:
            src = self.open(entry["path"], "rb")
        except FileNotFoundError as exc:
            raise missing_file(entry["path"]) from exc
        with src, _atomic_local(local_path) as out:
            check_entry(entry, *_copy_hashing(src, out))

    @_named
    def sha256(self, rel: str) -> str:
        with self.open(rel, "rb") as fh:
            return _copy_hashing(fh)[1]


def _protocols(fs) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
