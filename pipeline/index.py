"""FAISS index over DPR passage embeddings, with ids = passage ids (removable for incremental updates).

Training uses a sample; adding is split per shard (each part is the trained empty index plus one
shard's vectors) so parts can be built in parallel and merged. An index file is loaded only after
its sha256 matches the manifest.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np

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
    _check_lists(faiss.try_extract_index_ivf(new_index(factory, dim)), min(n_vectors, train_sample))


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


def add_part(trained: bytes, ids: np.ndarray, vectors: np.ndarray) -> bytes:
    """One shard's part: the trained empty index plus that shard's vectors (a Ray task's work)."""
    index = from_bytes(trained)
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    return to_bytes(index)


def merge(trained: bytes, parts: list[bytes]) -> faiss.Index:
    index = from_bytes(trained)
    for part in parts:
        other = from_bytes(part)
        try:
            index.merge_from(other, 0)
        except RuntimeError:
            # Indexes without merge support (HNSW): re-add the part's vectors.
            ids, vecs = _vectors_of(other)
            index.add_with_ids(vecs, ids)
    return index


def _vectors_of(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    idmap = faiss.downcast_index(index)
    ids = faiss.vector_to_array(idmap.id_map).astype(np.int64)
    vecs = np.vstack([idmap.reconstruct(int(i)) for i in ids]) if ids.size else np.zeros((0, index.d), np.float32)
    return ids, vecs


def index_ids(index: faiss.Index) -> np.ndarray:
    """Every passage id the index holds (to check it against the manifest)."""
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


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = max(1, min(nprobe, ivf.nlist))
    hnsw = faiss.downcast_index(index.index) if hasattr(index, "index") else None
    if hnsw is not None and hasattr(hnsw, "hnsw"):
        hnsw.hnsw.efSearch = max(hnsw.hnsw.efSearch, 4 * nprobe)


def load_checked(store: Store, entry: dict) -> faiss.Index:
    """Deserialise only after the bytes match the manifest's size and sha256."""
    return from_bytes(store.read_verified(entry))


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
