"""In-memory FAISS parts and merge, for tests that compare indexes built in pieces with one built whole.

The pipeline builds IVF parts on the workers and merges their lists on disk (`pipeline.index.build`);
these helpers keep the whole exercise in one process."""
from __future__ import annotations

import faiss
import numpy as np

from pipeline.index.faiss_file import from_bytes, to_bytes


def add_part(trained: bytes, ids: np.ndarray, vectors: np.ndarray) -> bytes:
    """One part: the trained empty index plus these vectors."""
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
            ids, vecs = vectors_of(other)
            index.add_with_ids(vecs, ids)
    return index


def vectors_of(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """The ids and reconstructed vectors of an IndexIDMap2."""
    idmap = faiss.downcast_index(index)
    ids = faiss.vector_to_array(idmap.id_map).astype(np.int64)
    vecs = np.vstack([idmap.reconstruct(int(i)) for i in ids]) if ids.size else np.zeros((0, index.d), np.float32)
    return ids, vecs
