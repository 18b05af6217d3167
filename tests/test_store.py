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
