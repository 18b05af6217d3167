"""Manifest versions, exclusive commits, verify, gc: local filesystem and S3 (moto server) alike."""
import threading

import boto3
import pyarrow as pa
import pytest
from botocore.exceptions import ClientError

from storage import manifest as mf
from storage.fs import AlreadyExists, Store, redact_url
from storage.shards import input_schema, read_rows, write_shard


def _shard(store: Store, path: str, ids) -> dict:
    t = pa.table({"id": pa.array(ids, pa.int64()), "content_hash": pa.array([b"x" * 16] * len(ids), pa.binary(16)),
                  "title": ["t"] * len(ids), "text": [f"p{i}" for i in ids]}, schema=input_schema())
    return {**write_shard(store, path, t, {"k": "v"}, row_group_size=4).to_dict(), "kind": "states"}


def _version(store: Store, parent=None, run="r1", ranges=((0, 10), (10, 25))) -> mf.Manifest:
    shards = [_shard(store, f"runs/{run}/states/part-{i:05d}.parquet", list(range(a, b))) for i, (a, b) in enumerate(ranges)]
    return mf.commit(store, parent, run_id=run, fingerprint={"m": 1}, shards=shards,
                     counts={"written": sum(b - a for a, b in ranges)})


def test_s3_server_refuses_a_second_if_none_match_put(s3_server, s3_bucket):
    """Canary: the commit protocol depends on this."""
    url, opts = s3_bucket
    bucket = url.split("/")[2]
    s3 = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id=opts["key"],
                      aws_secret_access_key=opts["secret"], region_name="us-east-1")
    s3.put_object(Bucket=bucket, Key="k", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as exc:
        s3.put_object(Bucket=bucket, Key="k", Body=b"2", IfNoneMatch="*")
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"1"


def test_exclusive_create_and_version_listing(any_store):
    store = Store(*any_store)
    store.create_exclusive("a/x.json", b"one")
    with pytest.raises(AlreadyExists):
        store.create_exclusive("a/x.json", b"two")
    assert store.read_bytes("a/x.json") == b"one"
    with pytest.raises(mf.NoVersion, match="no committed version"):
        mf.load(store)
    m1 = _version(store)
    m2 = _version(store, parent=1, run="r2")
    assert mf.list_versions(store) == [1, 2] and mf.load(store).run_id == "r2" and m2.parent == 1
    assert mf.load(store, 1).shards == m1.shards
    with pytest.raises(mf.NoVersion, match="no version 7"):
        mf.load(store, 7)


@pytest.mark.parametrize("rounds", [12])
def test_eight_committers_on_one_parent_exactly_one_wins(any_store, rounds):
    store = Store(*any_store)
    base = _version(store)
    shards = base.shards
    for r in range(rounds):
        parent = mf.latest_version(store)
        barrier = threading.Barrier(8)
        results: list = [None] * 8

        def attempt(i):
            barrier.wait()
            try:
                results[i] = mf.commit(store, parent, run_id=f"w{i}", fingerprint={}, shards=shards)
            except mf.CommitConflict as exc:
                results[i] = exc

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        wins = [x for x in results if isinstance(x, mf.Manifest)]
        losses = [x for x in results if isinstance(x, mf.CommitConflict)]
        assert len(wins) == 1 and len(losses) == 7, f"round {r}: {results}"
        assert "committed by another writer" in str(losses[0])
        assert mf.load(store).run_id == wins[0].run_id and mf.latest_version(store) == parent + 1


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "missing"])
def test_verify_names_the_damaged_file_and_the_reader_refuses_it(any_store, damage):
    from pipeline.serve.state_reader import IntegrityError, StateReader

    store = Store(*any_store)
    m = _version(store)
    assert mf.verify(store, m).ok
    victim = m.shards[1]["path"]
    data = store.read_bytes(victim)
    if damage == "truncate":
        store.write_bytes(victim, data[: len(data) // 2])
    elif damage == "corrupt":
        store.write_bytes(victim, data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        store.remove(victim)
    report = mf.verify(store, m)
    assert not report.ok and any(victim in p for p in report.problems), report.problems
    from jobs.cli import main as cli
    args = ["verify", "--store", store.url]
    if any_store[1]:
        import json
        args += ["--storage-options", json.dumps(any_store[1])]
    assert cli(args) == 1
    reader = StateReader.__new__(StateReader)  # exercise only the per-shard integrity check
    reader.store, reader.verify, reader._checked = store, "checksum", set()
    with pytest.raises(IntegrityError, match=victim.split("/")[-1]):
        reader._check_shard(m.shards[1])


def test_verify_catches_duplicate_ids_across_shards(tmp_path):
    store = Store(str(tmp_path))
    m = _version(store, ranges=((0, 10), (5, 12)))
    report = mf.verify(store, m)
    assert any("duplicate ids" in p for p in report.problems)


def test_row_group_pruned_reads(tmp_path):
    store = Store(str(tmp_path))
    s = _shard(store, "x.parquet", list(range(100)))
    assert read_rows(store, s["path"], [3, 50, 99, 1000]).column("id").to_pylist() == [3, 50, 99]
    assert read_rows(store, s["path"], []).num_rows == 0


def test_gc_removes_only_unreferenced_files(any_store):
    store = Store(*any_store)
    _version(store, run="r1")
    _version(store, parent=1, run="r2")
    store.write_bytes("runs/dead/states/part-00000.parquet", b"orphan of a failed run")
    store.write_bytes("runs/r1/input/part-00000.parquet", b"staging input")
    dry = mf.collect_garbage(store, dry_run=True, min_age_s=0)
    assert sorted(dry.removed) == ["runs/dead/states/part-00000.parquet", "runs/r1/input/part-00000.parquet"]
    assert store.exists("runs/dead/states/part-00000.parquet")  # dry run removed nothing
    young = mf.collect_garbage(store, dry_run=True)  # default grace period protects fresh files
    assert young.removed == []
    mf.collect_garbage(store, min_age_s=0)
    assert not store.exists("runs/dead/states/part-00000.parquet")
    assert mf.verify(store, mf.load(store, 1)).ok and mf.verify(store, mf.load(store, 2)).ok
    r = mf.collect_garbage(store, keep_last=1, min_age_s=0)
    assert r.kept_versions == [2] and mf.list_versions(store) == [2]
    assert not any(p.startswith("runs/r1/states") for p in (f.path for f in store.walk_files()))
    assert mf.verify(store, mf.load(store)).ok


def test_urls_are_redacted_and_paths_cannot_escape(tmp_path):
    assert redact_url("s3://AKIA:secret@bucket/p") == "s3://bucket/p"
    store = Store(str(tmp_path))
    with pytest.raises(ValueError, match="escapes"):
        store.full("../etc/passwd")
    with pytest.raises(ValueError, match="empty"):
        Store("  ")


def test_manifest_from_a_foreign_or_future_file_is_refused(tmp_path):
    store = Store(str(tmp_path))
    store.write_bytes("_manifests/v00000001.json", b"{not json")
    with pytest.raises(mf.ManifestError, match="not valid JSON"):
        mf.load(store)
    store.write_bytes("_manifests/v00000001.json", b'{"format": "decoupled-precompute/manifest", "format_version": 99}')
    with pytest.raises(mf.ManifestError, match="newer"):
        mf.load(store)


def test_a_commit_writes_only_the_shards_it_adds_and_old_versions_still_read(any_store):
    import json

    from storage.fs import IntegrityError
    store = Store(*any_store)
    v1 = _version(store, run="r1", ranges=[(k * 10, k * 10 + 10) for k in range(40)])
    assert len(v1.segments) == 1 and v1.segments[0]["rows"] == 40
    added = [_shard(store, "runs/u/states/part-00000.parquet", [1000, 1001])]
    v2 = mf.commit(store, 1, run_id="u", fingerprint={"m": 1}, shards=list(v1.shards) + added)
    assert [s["rows"] for s in v2.segments] == [40, 1]  # the parent's segment by reference, one new row
    loaded = mf.load(store, 2)
    assert [s["path"] for s in loaded.shards] == [s["path"] for s in v1.shards + added]
    assert loaded.shards[-1] == {**added[0]}
    manifest_bytes = store.size(mf.version_path(2))
    assert b'"shards"' not in store.read_bytes(mf.version_path(2)) and manifest_bytes < 4000
    assert mf.verify(store, loaded).ok and loaded.referenced_paths() >= {seg["path"] for seg in v2.segments}
    # a shard rewritten at the same path (a rerun) is a different entry: the parent's table is not reused
    rewritten = [{**v1.shards[0], "sha256": "f" * 64}, *v1.shards[1:]]
    v2b = mf.commit(store, 2, run_id="rerun", fingerprint={"m": 1}, shards=rewritten)
    assert [s["rows"] for s in v2b.segments] == [40] and mf.load(store, 3).shards[0]["sha256"] == "f" * 64
    # a rewrite (compact) starts a fresh table
    v3 = mf.commit(store, 3, run_id="c", fingerprint={"m": 1}, shards=added)
    assert [s["rows"] for s in v3.segments] == [1]
    # format 1 (shards inline), as earlier releases wrote it, still reads
    legacy = json.loads(store.read_bytes(mf.version_path(1)))
    legacy.pop("shard_table")
    legacy.update(format_version=1, shards=v1.shards, version=5, parent=4)
    store.write_bytes(mf.version_path(5), json.dumps(legacy).encode())
    assert [s["path"] for s in mf.load(store, 5).shards] == [s["path"] for s in v1.shards]
    # a damaged segment is refused by checksum
    store.write_bytes(v2.segments[1]["path"], b"PAR1 damaged")
    with pytest.raises(IntegrityError):
        mf.load(store, 2)


def test_commit_bytes_follow_the_change_not_the_store(tmp_path):
    import hashlib
    store = Store(str(tmp_path))
    big = [{"path": f"runs/r/states/part-{k:05d}.parquet", "kind": "states", "rows": 10_000, "bytes": 3 << 20,
            "sha256": hashlib.sha256(str(k).encode()).hexdigest(), "id_min": k * 10_000, "id_max": k * 10_000 + 9_999} for k in range(3_200)]
    v1 = mf.commit(store, None, run_id="r", fingerprint={}, shards=big)
    delta = [{**big[0], "path": f"runs/u/states/part-{k:05d}.parquet"} for k in range(3)]
    v2 = mf.commit(store, 1, run_id="u", fingerprint={}, shards=big + delta)
    written_v1 = v1.segments[0]["bytes"] + store.size(mf.version_path(1))
    written_v2 = v2.segments[1]["bytes"] + store.size(mf.version_path(2))
    assert written_v2 * 20 < written_v1, (written_v1, written_v2)  # 3 shards added to 3,200
    assert len(mf.load(store, 2).shards) == 3_203


# ---------------------------------------------------------------- shard markers

# What the sink writes for a split (keys in its order), and what ingest writes for a split that kept nothing.
_SINK_MARKER = {"path": "runs/r/states/part-00003.parquet", "rows": 2, "bytes": 900, "sha256": "ab" * 32, "id_min": 5,
                "id_max": 9, "kind": "states", "shard": 3,
                "dpr": {"path": "runs/r/dpr/part-00003.parquet", "rows": 2, "bytes": 400, "sha256": "cd" * 32,
                        "id_min": 5, "id_max": 9},
                "passages_in": 3, "truncated": 1, "skipped_too_long": 1, "too_long_ids": [7], "tokens": 80,
                "padded_tokens": 96, "encode_seconds": 0.25, "attention": "varlen", "raw_code_bytes": 1234,
                "read": {"rows_read": 4, "accepted": 3, "skipped_empty": 1}, "digest": "f00d", "write_seconds": 0.5,
                "finished_at": 1.7e9}
_EMPTY_MARKER = {"kind": "states", "shard": 4, "path": None, "rows": 0, "bytes": 0, "sha256": None, "id_min": 0,
                 "id_max": -1, "dpr": None, "truncated": 0, "skipped_too_long": 0, "tokens": 0, "padded_tokens": 0,
                 "encode_seconds": 0.0, "raw_code_bytes": 0, "write_seconds": 0.0, "finished_at": 1.7e9,
                 "read": {"rows_read": 2, "accepted": 0, "skipped_empty": 2}, "digest": "", "passages_in": 0,
                 "read_seconds": 0.01}


def test_shard_markers_round_trip_with_the_bytes_and_keys_written_before():
    import json

    from storage.shard_marker import ShardMarker, shard_entries

    m = ShardMarker.from_dict(_SINK_MARKER)
    assert m.to_json() == json.dumps(_SINK_MARKER).encode()  # byte for byte: old runs resume, new ones read alike
    assert ShardMarker.from_dict(m.to_dict()) == m and m.rows == 2 and m.too_long_ids == (7,)
    empty = ShardMarker.from_dict(_EMPTY_MARKER)
    assert empty.to_dict() == _EMPTY_MARKER and empty.file is None and empty.path is None and empty.rows == 0
    assert "too_long_ids" not in empty.to_dict() and "attention" not in empty.to_dict()
    legacy = {k: v for k, v in _SINK_MARKER.items() if k not in ("too_long_ids", "read", "digest", "attention")}
    old = ShardMarker.from_dict(legacy)  # written before the split plan (and the packed encoder)
    assert old.too_long_ids is None and old.read is None and old.digest == "" and old.attention is None
    assert shard_entries([m, empty]) == [
        {k: _SINK_MARKER[k] for k in ("path", "kind", "rows", "bytes", "sha256", "id_min", "id_max")},
        {**_SINK_MARKER["dpr"], "kind": "dpr"}]


@pytest.mark.parametrize("bad, says", [
    ([1, 2], "not a JSON object"),
    ({**_SINK_MARKER, "kind": "dpr"}, "kind 'dpr'"),
    ({k: v for k, v in _SINK_MARKER.items() if k != "tokens"}, "missing key 'tokens'"),
    ({**_SINK_MARKER, "rows": "2"}, "rows is '2', not an integer"),
    ({**_SINK_MARKER, "dpr": {"path": "x.parquet", "rows": 1}}, "DPR shard: path and sha256 must be strings"),
    ({**_SINK_MARKER, "read": [1]}, "read is [1], not an object"),
])
def test_a_malformed_marker_is_one_clear_error(bad, says):
    import re

    from storage.errors import OperationFailed
    from storage.shard_marker import MarkerError, ShardMarker

    with pytest.raises(MarkerError, match=r"^runs/x\.done\.json: .*" + re.escape(says)) as exc:
        ShardMarker.from_dict(bad, "runs/x.done.json")
    assert isinstance(exc.value, OperationFailed)
    with pytest.raises(MarkerError, match="not valid JSON"):
        ShardMarker.from_json(b'{"kind": "sta', "runs/x.done.json")


def test_resume_reads_only_intact_markers_and_never_loads_torch(tmp_path):
    import json
    import subprocess
    import sys

    from storage.layout import marker_path, shard_of
    from storage.shard_marker import ShardMarker, read_finished

    store = Store(str(tmp_path / "s"))
    good = ShardMarker.from_dict(_SINK_MARKER)
    good.write(store, "runs/r")
    store.write_bytes(marker_path("runs/r", 5), b'{"kind": "states", "sha')  # torn: the split is redone
    store.write_bytes(marker_path("runs/r", 6), json.dumps({**_SINK_MARKER, "shard": 6}).encode())
    paths = [marker_path("runs/r", k) for k in (3, 5, 6)]
    sizes = {_SINK_MARKER["path"]: 900, _SINK_MARKER["dpr"]["path"]: 400}  # as listed (shard 6 names the same files)
    assert [m.shard for m in read_finished(store.url, {}, paths, sizes)] == [3, 6]
    assert read_finished(store.url, {}, paths[:1], {**sizes, _SINK_MARKER["path"]: 899}) == []  # a torn shard
    assert shard_of(paths[0]) == 3
    probe = "import sys, storage.shard_marker, storage.layout, pipeline.flows.commit; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


def test_commit_version_writes_tombstones_and_skips_a_version_that_is_already_newest(tmp_path):
    from pipeline.flows.commit import Draft, commit_version, newest
    from storage import tombstones

    store = Store(str(tmp_path / "s"))
    assert newest(store) is None
    shards = [_shard(store, "runs/r/states/part-00000.parquet", [1, 2, 3])]
    draft = Draft(run_id="r", fingerprint={"m": 1}, shards=shards, counts={"written": 2}, extra={"e": 1},
                  dead={shards[0]["path"]: {2}}, run_dir="runs/r")
    first = commit_version(store, draft)
    assert first.committed and first.manifest.version == 1 and first.manifest.parent is None
    assert tombstones.of_version(store, first.manifest)[shards[0]["path"]].tolist() == [2]
    again = commit_version(store, Draft(**{**draft.__dict__, "parent": newest(store)}))
    assert not again.committed and again.manifest.version == 1 and mf.list_versions(store) == [1]
    derived = Draft.on_top_of(again.manifest, "compact-x", {"compacted_from": 1}, counts={"written": 3})
    second = commit_version(store, derived)
    assert second.manifest.version == 2 and second.manifest.extra == {"e": 1, "compacted_from": 1}
    assert second.manifest.artifacts == first.manifest.artifacts and second.manifest.shards == shards
