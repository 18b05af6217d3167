"""The reading side: token ids and decoded [n_tokens x hidden] states for given passage ids.

Opens one manifest version (never lists shards), picks shards by id range and row groups by
Parquet statistics, and refuses any file whose size or checksum disagrees with the manifest.
Decoding goes through the store's codec (`pipeline.codec.state_codec`): nothing here knows how codes are made.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.codec.state_codec import Codec, codec_for_store
from pipeline.codec.zstd_frames import Packer
from pipeline.codec.side_info import SideInfo
from storage import manifest as mf
from storage.fs import IntegrityError, Store  # noqa: F401  (IntegrityError re-exported)
from storage import tombstones
from storage.shards import read_rows

log = logging.getLogger(__name__)


@dataclass
class EncodedPassage:
    """One passage as stored: token ids and its codes in the codec's layout, not yet decoded."""
    id: int
    token_ids: np.ndarray       # [n_tokens] int64
    codes: np.ndarray           # [n_tokens, width]
    scales: np.ndarray | None   # [n_tokens] float16, for a scaled layout

    @property
    def side(self) -> SideInfo:
        """What the decoder knows besides the codes: this passage's token ids."""
        return SideInfo(self.token_ids, np.array([self.token_ids.size], np.int64))


@dataclass
class PassageStates:
    id: int
    token_ids: np.ndarray   # [n_tokens]
    states: np.ndarray      # [n_tokens, hidden] float32


class StateReader:
    def __init__(self, store: Store, version: int | None = None, verify: str = "checksum"):
        """verify: 'checksum' hashes each shard on first use (once per reader); 'size' only compares sizes."""
        if verify not in ("checksum", "size"):
            raise ValueError("verify must be 'checksum' or 'size'")
        self.store = store
        self.verify = verify
        self.manifest = mf.load(store, version)
        self.version = self.manifest.version
        art = self.manifest.artifacts.get("compressor")
        if art is None:
            raise IntegrityError(f"version {self.version} records no compressor artifact")
        fp = self.manifest.fingerprint
        self.codec: Codec = codec_for_store(store.read_verified(art), art["path"], fp)
        self.layout = self.codec.layout
        self.packer = Packer(int(fp.get("zstd_level", 3)))
        self._checked: set[str] = set()
        self._shards = self.manifest.shards_of("states")
        self._dead = tombstones.of_version(store, self.manifest)
        self._lo = np.array([s["id_min"] for s in self._shards], dtype=np.int64)
        self._hi = np.array([s["id_max"] for s in self._shards], dtype=np.int64)
        self._by_lo = np.argsort(self._lo, kind="stable")
        self._lo_sorted = self._lo[self._by_lo]

    def _candidates(self, wanted: np.ndarray) -> np.ndarray:
        """Shards whose id range holds a wanted id: a binary search over ranges sorted by id_min.

        Base shards' ranges do not overlap; delta shards' do, so candidates are those with
        id_min <= id (a prefix of the sorted order) and id_max >= id (checked vectorised)."""
        if wanted.size == 0 or not self._shards:
            return np.empty(0, np.int64)
        ends = np.searchsorted(self._lo_sorted, wanted, side="right")
        hits = [self._by_lo[:e][self._hi[self._by_lo[:e]] >= w] for w, e in zip(wanted, ends)]
        return np.unique(np.concatenate(hits)) if hits else np.empty(0, np.int64)

    def _check_shard(self, shard: dict) -> None:
        path = shard["path"]
        if path in self._checked:
            return
        self.store.check_file(shard, checksum=self.verify == "checksum")
        self._checked.add(path)

    def ids(self) -> np.ndarray:
        parts = []
        for s in self._shards:
            ids = read_rows(self.store, s["path"], columns=["id"]).column("id").to_numpy()
            dead = self._dead.get(s["path"])
            parts.append(ids[~np.isin(ids, dead)] if dead is not None else ids)
        return np.sort(np.concatenate(parts)) if parts else np.empty(0, np.int64)

    def get(self, passage_ids) -> dict[int, PassageStates]:
        """States for each id present in this version; absent ids are simply not in the result."""
        return {pid: PassageStates(pid, e.token_ids, self.codec.decode(e.codes, e.scales, e.side))
                for pid, e in self.get_encoded(passage_ids).items()}

    def get_encoded(self, passage_ids) -> dict[int, EncodedPassage]:
        """Stored codes for each id present in this version, unpacked but not decoded (a caller may decode
        them in one batch on its own device with `codec.decode_torch`, passing `SideInfo.of` their token ids)."""
        wanted = np.unique(np.asarray(list(passage_ids), dtype=np.int64))
        found: dict[int, EncodedPassage] = {}
        for k in self._candidates(wanted):
            shard = self._shards[k]
            mine = wanted[(wanted >= self._lo[k]) & (wanted <= self._hi[k])]
            self._check_shard(shard)
            table = read_rows(self.store, shard["path"], mine,
                              columns=["id", "n_tokens", "token_ids", "scales", "codes"])
            dead = self._dead.get(shard["path"])
            if dead is not None:
                table = table.filter(pc.invert(pc.is_in(table.column("id"), value_set=pa.array(dead, pa.int64()))))
            for row in table.to_pylist():
                found[row["id"]] = self._unpack(row)
        return found

    def _unpack(self, row: dict) -> EncodedPassage:
        n = row["n_tokens"]
        token_ids = np.asarray(row["token_ids"], dtype=np.int64)
        if token_ids.size != n:
            raise IntegrityError(f"passage {row['id']}: {token_ids.size} token ids, n_tokens says {n}")
        codes = self.layout.view(self.packer.unpack(row["codes"], self.layout.nbytes(n)), n)
        scales = None
        if self.layout.scaled:
            scales = np.asarray(row["scales"] if row["scales"] is not None else [], dtype=np.float16)
            if scales.size != n:
                raise IntegrityError(f"passage {row['id']}: {scales.size} scales for {n} tokens")
        return EncodedPassage(id=row["id"], token_ids=token_ids, codes=codes, scales=scales)
