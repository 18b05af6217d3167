"""Commands that read a store version: verify, gc, lookup, validate. None of them loads torch."""
from __future__ import annotations

import json
import logging

from jobs.cli import options as o
from pipeline.schema import ConfigError

log = logging.getLogger("precompute")

EXIT_FAILED = 1
EXIT_MISSING = 3  # lookup: some ids are not in the version


def parse_ids(raw: str) -> list[int]:
    out = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or len(part) > 19:
            raise ConfigError(f"--ids: {part[:30]!r} is not a passage id (non-negative integer)")
        out.append(int(part))
    if not out:
        raise ConfigError("--ids is empty: pass e.g. --ids 3,17,42")
    if len(out) > 100_000:
        raise ConfigError("--ids: more than 100,000 ids in one lookup; split the request")
    return out


def cmd_lookup(a) -> int:
    from pipeline.serve.state_reader import StateReader

    ids = parse_ids(a.ids)
    reader = StateReader(o.store(a), a.version)
    found = reader.get(ids)
    missing = sorted(set(ids) - set(found))
    arrays = {}
    for pid, ps in found.items():
        arrays[f"token_ids_{pid}"] = ps.token_ids
        arrays[f"states_{pid}"] = ps.states
    absent = f"not in this version: {missing[:20]}{' …' if len(missing) > 20 else ''}"
    if not found:  # nothing to write: an existing --out is left as it was, not replaced by an empty file
        print(f"version {reader.version}: none of the {len(ids)} id(s) found, {a.out} not written; {absent}")
        return EXIT_MISSING
    o.write_npz(a.out, arrays)  # atomic: complete or absent (storage.fs.write_url)
    print(f"version {reader.version}: wrote {len(found)} passage(s) to {a.out}" + (f"; {absent}" if missing else ""))
    return 0 if not missing else EXIT_MISSING


def cmd_verify(a) -> int:
    from storage import manifest as mf

    store = o.store(a)
    m = mf.load(store, a.version)
    report = mf.verify(store, m)
    if report.ok:
        print(f"version {m.version} OK: {report.checked_files} files match their checksums, "
              f"{report.rows} passages, ids unique")
        return 0
    for p in report.problems:
        print(f"FAIL {p}")
    print(f"version {m.version}: {len(report.problems)} problem(s)")
    return EXIT_FAILED


def cmd_gc(a) -> int:
    from storage import manifest as mf

    from storage.estimate import fmt_size

    r = mf.collect_garbage(o.store(a), keep_last=a.keep_last, dry_run=a.dry_run, min_age_s=a.min_age)
    verb = "would remove" if r.dry_run else "removed"
    for p in r.removed:
        log.info("%s %s", verb, p)
    for p in r.held_back:
        log.info("held back by --min-age: %s", p)
    held = (f"; held back by --min-age {r.min_age_s:g} s (younger, a run may still be writing them): "
            f"{len(r.held_back)} file(s), {fmt_size(r.bytes_held_back)}" if r.held_back else "")
    if a.json:
        print(json.dumps({"kept_versions": r.kept_versions, "dry_run": r.dry_run, "removed": r.removed,
                          "bytes_removed": r.bytes_removed, "held_back": r.held_back,
                          "bytes_held_back": r.bytes_held_back, "min_age_s": r.min_age_s}, indent=1))
        return 0
    print(f"kept versions {r.kept_versions or 'none'}; {verb} {len(r.removed)} file(s), {fmt_size(r.bytes_removed)}"
          + held)
    return 0


def cmd_validate(a) -> int:
    return validate_and_report(o.store(a), a.version, a.target_passages, a.tolerance, a.json)


def validate_and_report(store, version: int | None, target_passages: int, tolerance: float, as_json: bool) -> int:
    """Bytes written vs the estimate (`precompute validate`, and `jobs.storage` with a store)."""
    from pipeline.codec.state_codec import codec_for_store
    from storage import manifest as mf
    from storage.estimate import fmt_bytes, fmt_size
    from storage.footprint import measure, validate

    m = mf.load(store, version)
    fp = measure(store, m)
    if target_passages < 1 or not 0 < tolerance < 1:
        raise ConfigError("--target-passages must be positive and --tolerance in (0, 1)")
    art = m.artifacts["compressor"]
    codec = codec_for_store(store.read_verified(art), art["path"], m.fingerprint)
    try:
        v = validate(fp, codec.layout.estimate_fields(float(m.fingerprint.get("bits", 8))), target_passages,
                     tolerance)
    except ValueError as exc:
        raise ConfigError(f"version {m.version}: {exc}") from exc
    if as_json:
        print(json.dumps({**v.__dict__, "ok": v.ok, "live_passages": fp.live, "stored_passages": fp.passages,
                          "tombstoned_passages": fp.tombstoned, "target_total_bytes": v.target_total}, indent=1))
    else:
        held = f" ({fp.passages:,} stored, {fp.tombstoned:,} tombstoned)" if fp.tombstoned else ""
        print(f"version {m.version}: {fp.live:,} live passages{held}, {fp.tokens:,} tokens stored "
              f"({v.tokens_per_passage:.1f}/passage); {mf.sizes(m).render()}")
        print(f"the states shards ({fp.file_bytes:,} bytes) against the estimate for {codec.describe()}; measured "
              f"zstd ratio on codes {v.zstd_ratio:.3f}")
        print(f"{'component':<12} {'measured B/token':>17} {'estimate B/token':>17}")
        for k in ("codes", "scales", "token_ids", "per_passage", "container"):
            print(f"{k:<12} {v.measured.get(k, 0):17.3f} {v.estimated.get(k, 0):17.3f}")
        print(f"{'total':<12} {v.measured_per_token:17.3f} {v.estimated_per_token:17.3f}   "
              f"difference {v.relative_error:+.2%} (tolerance {v.tolerance:.0%})")
        lo, hi = v.target_interval
        parts = ", ".join(f"{k} {fmt_size(b)}" for k, b in v.target_components.items())
        print(f"\nExtrapolated to {v.target_passages:,} passages like these, every component: "
              f"{fmt_bytes(v.target_total)} ({parts}; the DPR shards per stored row, the index by its factory, "
              f"the codec file as it is)")
        print(f"  of which the states shards: {fmt_bytes(v.target_bytes)} (95% interval {fmt_size(lo, True)}-"
              f"{fmt_size(hi, True)}, sampling only); at the paper's 150 tokens/passage: "
              f"{fmt_bytes(v.target_bytes_at_150)} of states")
    if not v.ok:
        log.error("measured bytes per token differ from the estimate by %.2f%% (> %.0f%%)",
                  100 * v.relative_error, 100 * v.tolerance)
        return EXIT_FAILED
    return 0


# validate's defaults, shared with jobs.storage
TARGET_PASSAGES, TOLERANCE = 32_000_000, 0.02


def add_lookup(sub) -> None:
    lk = o.command(sub, "lookup", cmd_lookup, "token ids + decompressed states for passage ids, as .npz",
                   sections=(o.add_store,))
    lk.add_argument("--ids", required=True, help="comma-separated passage ids, e.g. 3,17,42")
    lk.add_argument("--version", type=int, default=None, help="store version (default: newest)")
    lk.add_argument("--out", required=True, help="output .npz (arrays token_ids_<id>, states_<id>)")


def add_verify(sub) -> None:
    v = o.command(sub, "verify", cmd_verify, "check every file of a version against its checksum; ids unique",
                  sections=(o.add_store,))
    v.add_argument("--version", type=int, default=None)


def add_gc(sub) -> None:
    gc = o.command(sub, "gc", cmd_gc, "remove files no kept version references", sections=(o.add_store,))
    gc.add_argument("--dry-run", action="store_true")
    gc.add_argument("--keep-last", type=int, default=None, help="keep only the newest K versions (default: all)")
    gc.add_argument("--min-age", type=float, default=3600.0,
                    help="leave unreferenced files younger than this many seconds (a run may still be writing); "
                    "they are reported as held back")
    gc.add_argument("--json", action="store_true", help="the report as JSON: removed and held-back files, bytes")


def add_validate(sub) -> None:
    va = o.command(sub, "validate", cmd_validate, "bytes actually written vs the estimate; extrapolate to a target corpus",
                   sections=(o.add_store,))
    va.add_argument("--version", type=int, default=None)
    va.add_argument("--target-passages", type=int, default=TARGET_PASSAGES)
    va.add_argument("--tolerance", type=float, default=TOLERANCE, help="allowed relative difference (default 2%%)")
    va.add_argument("--json", action="store_true")
