"""The reader's runtime path, end to end: question -> DPR top-k -> titles (and stored token states)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.index import faiss_file as fx
from pipeline.model.dpr import Embedder
from pipeline.model.encoder import pick_device
from pipeline.schema import ConfigError
from pipeline.serve.checks import MAX_SEARCH_K, check_device, check_k, check_question
from pipeline.serve.state_reader import PassageStates, StateReader
from storage import manifest as mf
from storage.errors import OperationFailed
from storage.fs import Store
from storage import tombstones
from storage.shards import read_rows


class NoIndex(OperationFailed, LookupError):
    """The version has no DPR index (the run had no --dpr-model)."""


@dataclass
class Hit:
    id: int
    score: float
    title: str | None
    states: PassageStates | None = None


class Searcher:
    def __init__(self, store: Store, version: int | None = None, device: str = "auto", nprobe: int | None = None):
        check_device(device)
        self.store = store
        self.manifest = mf.load(store, version)
        entry = self.manifest.artifacts.get("dpr_index")
        if entry is None:
            raise NoIndex(f"version {self.manifest.version} has no DPR index; run with --dpr-model to build one")
        self.index = fx.load_checked(store, entry)
        fx.set_nprobe(self.index, nprobe or entry.get("nprobe", 16))
        dpr = self.manifest.extra["dpr"]
        self.encoder = Embedder(dpr["question_model"], None, dpr["pooling"], pick_device(device), role="question",
                                normalize=dpr.get("normalize", False))
        if self.encoder.dim != entry["dim"]:
            raise ValueError(f"question encoder gives {self.encoder.dim} dims, index holds {entry['dim']}")
        self._dpr_shards = self.manifest.shards_of("dpr")
        self._dead = tombstones.of_version(store, self.manifest)
        self._reader: StateReader | None = None

    def titles(self, ids: list[int]) -> dict[int, str]:
        wanted = np.asarray(ids, dtype=np.int64)
        out: dict[int, str] = {}
        for s in self._dpr_shards:
            mine = wanted[(wanted >= s["id_min"]) & (wanted <= s["id_max"])]
            if mine.size:
                t = read_rows(self.store, s["path"], mine, columns=["id", "title"])
                dead = self._dead.get(s["path"], ())
                out.update((i, title) for i, title in zip(t.column("id").to_pylist(), t.column("title").to_pylist())
                           if i not in dead)
        return out

    def search(self, questions: list[str], k: int = 10, with_states: bool = False) -> list[list[Hit]]:
        """Top k per question; a bad question or k is the same ConfigError the CLI reports."""
        if not questions:
            raise ConfigError("no questions: pass at least one question text")
        questions, k = [check_question(q) for q in questions], check_k(k, MAX_SEARCH_K)
        q = self.encoder.embed_questions(questions)
        scores, ids = self.index.search(np.ascontiguousarray(q, dtype=np.float32), k)
        flat = sorted({int(i) for row in ids for i in row if i >= 0})
        titles = self.titles(flat)
        states: dict[int, PassageStates] = {}
        if with_states and flat:
            if self._reader is None:
                self._reader = StateReader(self.store, self.manifest.version)
            states = self._reader.get(flat)
        return [[Hit(int(i), float(sc), titles.get(int(i)), states.get(int(i)))
                 for sc, i in zip(srow, irow) if i >= 0] for srow, irow in zip(scores, ids)]
