"""FAISS indexes over DPR passage embeddings, with ids = passage ids (removable for incremental updates).

The primitives the build tasks use (`pipeline.index.build`: factory checks, training, IVF parts
merged on disk) and the read side: `load_checked` opens a committed index (base, delta and
hidden ids as a `LiveIndex`) only after every file of it matches the manifest's size and sha256.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import faiss
import numpy as np

from pipeline.index import plan as index_plan
from pipeline.config import ConfigError
from storage.fs import IntegrityError, Store

log = logging.getLogger(__name__)


IndexIntegrityError = IntegrityError  # the index file is missing or does not match its checksum


def gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def new_index(factory: str, dim: int) -> faiss.Index:
    """An empty index that accepts passage ids and can remove them."""
    try:
        base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1].split(": ", 1)[-1] if str(exc).strip() else "unknown"
        raise ConfigError(f"invalid index factory {factory!r} for {dim}-dim vectors: {reason}") from exc
    if isinstance(faiss.try_extract_index_ivf(base), faiss.IndexIVF):
        return base  # IVF lists carry ids and support remove_ids
    return faiss.IndexIDMap2(base)


def _check_lists(ivf, n_train: int) -> None:
    if ivf is not None and ivf.nlist > n_train:
        raise ConfigError(f"index has {ivf.nlist} lists but only {n_train} training vectors; lower nlist "
                          f"(precompute plan-index proposes one)")


def check_factory(factory: str, dim: int, n_vectors: int, train_sample: int) -> None:
    """Fail before any encoding or Ray work if this factory cannot be built over these vectors."""
    ivf = faiss.try_extract_index_ivf(new_index(factory, dim))
    if ivf is None:
        refusal = index_plan.whole_index_refusal(factory, n_vectors, dim)
        if refusal:
            raise ConfigError(refusal)
    _check_lists(ivf, index_plan.train_size(ivf.nlist if ivf is not None else None, n_vectors, train_sample))


def train(index: faiss.Index, sample: np.ndarray) -> faiss.Index:
    if index.is_trained:
        return index
    if len(sample) == 0:
        raise ValueError("no vectors to train the index on")
    x = np.ascontiguousarray(sample, dtype=np.float32)
    ivf = faiss.try_extract_index_ivf(index)
    _check_lists(ivf, len(x))
    if gpu_count() and ivf is not None:
        # Train the coarse quantizer's k-means on the GPU, as faiss' own benchmarks do.
        clustering = faiss.Clustering(ivf.d, ivf.nlist)
        gpu_q = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
        clustering.train(x, gpu_q)
        ivf.quantizer.train(x)
        ivf.quantizer.reset()
        ivf.quantizer.add(faiss.vector_to_array(clustering.centroids).reshape(ivf.nlist, ivf.d))
        ivf.quantizer.is_trained = True
    index.train(x)
    return index


def to_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def from_bytes(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def index_ids(index) -> np.ndarray:
    """Every passage id the index holds (to check it against the manifest)."""
    if isinstance(index, LiveIndex):
        return index.ids()
    idx = faiss.downcast_index(index)
    if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return np.sort(faiss.vector_to_array(idx.id_map).astype(np.int64))
    ivf = faiss.extract_index_ivf(index)
    invlists = ivf.invlists
    out = []
    for lst in range(ivf.nlist):
        n = invlists.list_size(lst)
        if n:
            out.append(faiss.rev_swig_ptr(invlists.get_ids(lst), n).copy())
    return np.sort(np.concatenate(out)) if out else np.empty(0, np.int64)


def set_nprobe(index, nprobe: int) -> None:
    if isinstance(index, LiveIndex):
        return index.set_nprobe(nprobe)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = max(1, min(nprobe, ivf.nlist))
    hnsw = faiss.downcast_index(index.index) if hasattr(index, "index") else None
    if hnsw is not None and hasattr(hnsw, "hnsw"):
        hnsw.hnsw.efSearch = max(hnsw.hnsw.efSearch, 4 * nprobe)


ONDISK = "ivf-ondisk"  # entry["format"]: header + on-disk inverted lists (+ delta, removed ids)


def is_ivf(index: faiss.Index) -> bool:
    return isinstance(faiss.try_extract_index_ivf(index), faiss.IndexIVF)


def factory_nlist(factory: str, dim: int) -> int | None:
    """The number of inverted lists a factory has, or None if it has none (Flat, HNSW...)."""
    ivf = faiss.try_extract_index_ivf(new_index(factory, dim))
    return int(ivf.nlist) if ivf is not None else None


def merge_ondisk(trained: faiss.Index, part_paths: list[str], lists_path: str) -> faiss.Index:
    """Merge the inverted lists of IVF part files into one on-disk file; the parts are mmapped, not loaded.

    The returned index holds only the header (quantizer, codec); its lists live in `lists_path`."""
    from faiss.contrib.ondisk import merge_ondisk as _merge

    _merge(trained, part_paths, lists_path)
    return trained


def read_ondisk(header_path: str) -> faiss.Index:
    """Open a merged index whose lists file sits next to the header, memory-mapped.

    faiss printf()s the relocated lists path on stdout, which is the CLI's output: it goes to stderr."""
    import ctypes
    import sys

    libc = ctypes.CDLL(None)
    with _STDOUT_SWAP:  # fd 1 is process-wide: one swap at a time
        sys.stdout.flush()
        libc.fflush(None)  # what was already buffered goes where it was meant to
        saved = os.dup(1)
        try:
            os.dup2(2, 1)
            return faiss.read_index(header_path, faiss.IO_FLAG_ONDISK_SAME_DIR)
        finally:
            libc.fflush(None)  # faiss' line, before fd 1 is the real stdout again
            os.dup2(saved, 1)
            os.close(saved)


_STDOUT_SWAP = threading.Lock()


class LiveIndex:
    """A committed index as search sees it: the base, minus ids removed since it was built, plus a delta.

    The delta is a small index over the passages added or changed by updates (the same trained
    quantizer and codec, so scores compare); `compact` folds both into a new base."""

    def __init__(self, base: faiss.Index, delta: faiss.Index | None = None, removed: np.ndarray | None = None):
        self.base, self.delta = base, delta
        self.removed = np.unique(np.asarray(removed if removed is not None else [], dtype=np.int64))
        self.d = base.d
        ivf = faiss.try_extract_index_ivf(base)
        self._nprobe = ivf.nprobe if ivf is not None else 1
        self._ntotal: int | None = None
        self._selector = None
        if self.removed.size:
            self._batch = faiss.IDSelectorBatch(self.removed)
            self._selector = faiss.IDSelectorNot(self._batch)

    @property
    def ntotal(self) -> int:
        if self._ntotal is None:
            self._ntotal = int(self.ids().size)
        return self._ntotal

    def set_nprobe(self, nprobe: int) -> None:
        for idx in (self.base, self.delta):
            if idx is not None:
                set_nprobe(idx, nprobe)
        ivf = faiss.try_extract_index_ivf(self.base)
        self._nprobe = ivf.nprobe if ivf is not None else nprobe

    def _params(self):
        if self._selector is None:
            return None
        if is_ivf(self.base):
            return faiss.SearchParametersIVF(sel=self._selector, nprobe=self._nprobe)
        return faiss.SearchParameters(sel=self._selector)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        scores, ids = self.base.search(q, k, params=self._params())
        if self.delta is None or self.delta.ntotal == 0:
            return scores, ids
        ds, di = self.delta.search(q, k)
        scores, ids = np.hstack([scores, ds]), np.hstack([ids, di])
        scores = np.where(ids >= 0, scores, -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        missing = -np.finfo(np.float32).max  # what faiss itself returns for an empty slot
        return np.where(ids >= 0, scores, missing).astype(np.float32), ids

    def ids(self) -> np.ndarray:
        base = index_ids(self.base)
        if self.removed.size:
            base = base[~np.isin(base, self.removed)]
        delta = index_ids(self.delta) if self.delta is not None else np.empty(0, np.int64)
        return np.sort(np.concatenate([base, delta]))


def removed_ids(store: Store, entry: dict | None) -> np.ndarray:
    """The ids an update hid from the base index (checked against the manifest), sorted."""
    if entry is None:
        return np.empty(0, np.int64)
    import io
    return np.load(io.BytesIO(store.read_verified(entry)), allow_pickle=False)


def load_checked(store: Store, entry: dict, cache_dir: str | None = None) -> LiveIndex:
    """Open a committed index only after every file of it matches the manifest's size and sha256.

    A whole index is deserialised; an on-disk one is memory-mapped where it lies (a local store) or
    from a verified copy in `cache_dir` (an object store), so search does not load its lists."""
    if entry.get("format") != ONDISK:
        return LiveIndex(from_bytes(store.read_verified(entry)))
    header = _local_verified(store, entry, cache_dir)
    lists = _local_verified(store, entry["lists"], cache_dir, beside=header)
    if os.path.dirname(lists) != os.path.dirname(header):
        raise IndexIntegrityError(f"{entry['path']}: its lists file must sit in the same directory")
    base = read_ondisk(header)
    delta = from_bytes(store.read_verified(entry["delta"])) if "delta" in entry else None
    return LiveIndex(base, delta, removed_ids(store, entry.get("removed")))


def _local_verified(store: Store, entry: dict, cache_dir: str | None, beside: str | None = None) -> str:
    """A local path holding entry's file, checked against its sha256 (hashing streams, nothing is loaded)."""
    local = store.local_path(entry["path"])
    if local is not None:
        store.check_file(entry)
        return local
    root = os.path.dirname(beside) if beside else os.path.join(cache_dir or _default_cache(), entry["sha256"][:24])
    os.makedirs(root, mode=0o700, exist_ok=True)
    target = os.path.join(root, entry["path"].rsplit("/", 1)[-1])
    if os.path.exists(target) and os.path.getsize(target) == entry["bytes"] \
            and Store(root).sha256(os.path.basename(target)) == entry["sha256"]:
        return target  # a verified copy from an earlier open
    log.info("copying %s (%.1f MB) to %s", entry["path"], entry["bytes"] / 1e6, target)
    store.download_verified(entry, target)
    return target


def _default_cache() -> str:
    return os.environ.get("PRECOMPUTE_INDEX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                      "decoupled-precompute", "index")


@dataclass
class Recall:
    k: int
    recall: float
    queries: int


def recall_at_k(exact: faiss.Index, approx: faiss.Index, queries: np.ndarray, k: int = 10) -> Recall:
    """Fraction of the exact top-k that the approximate index also returns in its top-k."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    _, truth = exact.search(q, k)
    _, got = approx.search(q, k)
    hits = sum(len(set(t[t >= 0]) & set(g[g >= 0])) for t, g in zip(truth, got))
    return Recall(k, hits / max(1, (truth >= 0).sum()), len(q))
