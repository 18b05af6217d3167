"""Driver-scale benchmark: how much serial work the *driver process* does per million passages.

    python -m benchmarks.scale --sizes 100000 1000000 --label after
    python -m benchmarks.scale --repo /work/before --label before --sizes 100000 1000000 3200000
    python -m benchmarks.scale --report                 # print the tables from reports/scale.json

Why: Ray spreads tokenising, encoding and writing over the cluster, but everything the driver does
(validating the corpus, sampling for the compressor fit, writing input slices, planning, collecting
markers, committing) is serial and grows with the corpus. On a 32M-passage corpus that serial work,
and the driver's memory, decide whether a run is practical, long before the encoders do. This
benchmark measures exactly that: driver CPU seconds, driver RSS and phase timings, at several corpus
sizes, so a linear projection to 32M passages is honest.

What one size does:
  1. builds (and caches by N under --work-dir) a synthetic corpus TSV: N passages of ~100 words drawn
     from the bundled sample's vocabulary, titles from the sample's titles, ids 0..N-1 in a seeded
     shuffled order, written in the same TSV dialect as tests/conftest.py `write_tsv`;
  2. builds (and caches) a tiny random BERT (2 layers x 32 wide) with MiniLM's real tokenizer, the
     same recipe as the `tiny_model` test fixture. It is plumbing only: it says nothing about model
     speed, only about the work around the model;
  3. runs `precompute run` in a child process (`jobs.cli.main` in-process, Ray started locally by the
     CLI) against the checkout named by --repo (PYTHONPATH=<repo>), recording a timeline: a sampler
     thread (time, driver CPU, RSS every 0.2 s) and every log record (time, CPU, RSS, logger, message);
  4. derives wall time, driver CPU (total and per 1M passages), peak RSS, time to the first encoded
     shard, and per-phase wall / driver CPU / peak RSS, with phases cut at the log messages listed in
     PHASE_BOUNDARIES (listed at the end of --help; the current code's messages, and `phase: NAME` for newer code);
  5. merges the result into --json under --label, keyed by N, and prints markdown tables, including
     a projection to 32M passages (CPU: per-1M x 32 and a linear fit; RSS: linear fit over the sizes).

"Driver CPU" is user+system time of the driver process alone (getrusage RUSAGE_SELF, all its threads,
including Ray's core-worker threads); Ray's worker processes are not in it. Nothing is pickled: the
child hands its timeline back as JSON.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import re
import resource
import shlex
import signal
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("benchmark.scale")

THIS_FILE = Path(__file__).resolve()
THIS_REPO = THIS_FILE.parents[1]
SAMPLE_TSV = THIS_REPO / "pipeline" / "sample" / "wiki_passages_2k.tsv"
MODEL_LABEL = "tiny random BERT (2x32), real MiniLM tokenizer: plumbing only, not model speed"
CORPUS_RECIPE = "v2"  # bump when the generator changes, so cached corpora are not reused across recipes
PROJECT_TO = 32_000_000
SAMPLE_EVERY_S = 0.2
# Time to the first encoded shard: the first log record matching SHARD_DONE, stamped when it is logged.
# Fallback for code that only reports it afterwards ("first encoded shard ... after 88.2 s"): that figure,
# counted from the run's first phase boundary (where run() starts its own clock).
SHARD_DONE = re.compile(r"shard \d+ done")
FIRST_SHARD_REPORTED = re.compile(r"first encoded shard .*?after ([\d.]+) s")

CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
             "TOKENIZERS_PARALLELISM": "false"}

# ---------------------------------------------------------------- phase boundaries (extend here)
#
# Each row: (regex searched in the formatted log message, phase it starts, kind).
#   phase None   -> the phase name is the regex's first group (`phase: NAME` from newer code).
#   kind "legacy"   -> the current code's messages; each fires once (its first match). They are ignored
#                      entirely in a run that logs any explicit `phase:` message, so a rewrite that still
#                      logs some old messages is not cut twice.
#   kind "explicit" -> fires on every match (a phase may be re-entered on purpose).
#   kind "always"   -> fires once, whether or not the run has explicit markers.
# A boundary naming the phase already running is a no-op. "startup" runs from t=0 to the first boundary;
# the last phase runs to the child's exit.
PHASE_BOUNDARIES: list[tuple[re.Pattern, str | None, str]] = [
    (re.compile(r"^phase: ([\w-]+)"), None, "explicit"),
    (re.compile(r"pass 1/2: validating corpus"), "validate", "legacy"),
    # Logged at the end of the scan. What follows until the fit message is Ray start, hashing the
    # checkpoint and the fit-sample pass over the whole corpus (the fit message is logged after it).
    (re.compile(r"^corpus .*: \d+ rows read"), "sample-pass", "legacy"),
    (re.compile(r"fitting a PCA compressor"), "fit-sample", "legacy"),
    (re.compile(r"writing \d+ input slices"), "slices", "legacy"),
    (re.compile(r"shard \d+ done"), "encode", "legacy"),
    # The last shard's message ("(640/640 shards"): from here on, collecting markers and the commit.
    (re.compile(r"shard \d+ done: .*\((\d+)/\1 shards"), "commit", "legacy"),
    (re.compile(r"committed version"), "end", "always"),
]


# ================================================================ child: run the CLI, record a timeline

def _rss_bytes() -> int:
    """Current resident set size, from /proc/self/statm (pages)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Timeline:
    """Samples and log events of one child run, all stamped against the same monotonic start."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.samples: list[tuple[float, float, int]] = []
        self.events: list[dict] = []
        self._stop = threading.Event()

    def now(self) -> tuple[float, float, int]:
        return round(time.monotonic() - self.t0, 4), round(_cpu_s(), 4), _rss_bytes()

    def start_sampler(self) -> None:
        def loop():
            while not self._stop.wait(SAMPLE_EVERY_S):
                self.samples.append(self.now())
        self.samples.append(self.now())
        threading.Thread(target=loop, name="scale-sampler", daemon=True).start()

    def stop_sampler(self) -> None:
        self._stop.set()

    def install_log_hook(self) -> None:
        """Record every log record without touching how logging is configured.

        Why a hook on Logger.callHandlers and not a handler: a handler on root before the CLI runs
        would make the CLI's `logging.basicConfig` a no-op (root would already have a handler), so its
        console format and INFO level would be lost, and records of loggers with propagate=False (Ray's)
        would be missed. `Logger.handle` calls `callHandlers` exactly once per record that passed the
        originating logger's level and filters, whatever handlers exist, so wrapping it sees each
        emitted record once and leaves the CLI's configuration (basicConfig, dictConfig, anything)
        alone. Records the CLI's levels drop are not emitted, so are not phase boundaries either.
        """
        original = logging.Logger.callHandlers
        timeline = self

        def call_handlers(logger_self, record):
            t, cpu, rss = timeline.now()
            try:
                msg = record.getMessage()
            except (TypeError, ValueError) as exc:  # a bad format string must not break the measured run
                msg = f"<unformattable log record: {exc}>"
            timeline.events.append({"t": t, "cpu": cpu, "rss": rss, "logger": record.name,
                                    "level": record.levelname, "msg": msg})
            return original(logger_self, record)

        logging.Logger.callHandlers = call_handlers


def _loaded_versions() -> dict:
    """Versions of what the measured code actually imported (read at exit, so nothing extra is loaded)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "ray", "transformers", "pyarrow", "numpy"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", "?")
    return out


def child_main(timeline_path: str, cli_argv: list[str]) -> int:
    """Run `jobs.cli.main(cli_argv)` in this process and dump the timeline as JSON, whatever happens."""
    import traceback

    tl = Timeline()
    tl.start_sampler()
    tl.install_log_hook()
    rc, error = 1, None
    modules = {}
    try:
        from jobs import cli  # imported after t0: import cost is part of start-up, as for a user
        modules = {m: getattr(sys.modules.get(m), "__file__", None) for m in ("jobs.cli",)}
        rc = int(cli.main(cli_argv) or 0)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        error = traceback.format_exc()
        traceback.print_exc()
    tl.stop_sampler()
    t, cpu, rss = tl.now()
    tl.samples.append((t, cpu, rss))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    for m in ("pipeline.flows.run", "pipeline.run", "storage.manifest"):  # the run module, after and before the move
        modules[m] = getattr(sys.modules.get(m), "__file__", None)
    body = {"argv": cli_argv, "events": tl.events, "samples": tl.samples, "modules": modules,
            "versions": _loaded_versions(),
            "exit": {"rc": rc, "error": error, "wall_s": t, "cpu_s": cpu, "rss_end": rss,
                     "peak_rss": ru.ru_maxrss * 1024}}  # ru_maxrss is KiB on Linux
    tmp = f"{timeline_path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(body, fh)
    os.replace(tmp, timeline_path)
    return rc


# ================================================================ parent: inputs

def _read_sample(path: Path) -> tuple[list[str], list[str]]:
    """All words (with repeats, so sampling keeps their frequencies) and the distinct titles."""
    words, titles = [], []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader)
        ti, xi = header.index("title"), header.index("text")
        for row in reader:
            words.extend(row[xi].split())
            titles.append(row[ti])
    return words, sorted(set(titles))


def build_corpus(work: Path, n: int, seed: int = 0) -> Path:
    """N synthetic passages in the DPR TSV dialect, cached by recipe, seed and N. ~50 s for 3.2M.

    Vectorised where it matters: a pool of 8-12 word phrases is drawn from the sample's words once,
    and each passage joins 10 random phrases (~100 words), so the per-passage Python work is one
    short join and one csv row. Words keep their sample frequencies (drawn from the word list with
    repeats), so token counts per passage look like real Wikipedia text.
    """
    import numpy as np

    path = work / f"corpus-{CORPUS_RECIPE}-seed{seed}-{n}.tsv"
    if path.exists():
        log.info("corpus cached: %s", path)
        return path
    words, titles = _read_sample(SAMPLE_TSV)
    rng = np.random.default_rng(seed)
    vocab = np.array(words, dtype=object)
    pool_size, per_passage = 1 << 17, 10
    lengths = rng.integers(8, 13, size=pool_size)
    picked = vocab[rng.integers(0, vocab.size, size=int(lengths.sum()))].tolist()
    ends = np.cumsum(lengths).tolist()
    phrases = np.array([" ".join(picked[e - k:e]) for e, k in zip(ends, lengths.tolist())], dtype=object)
    title_arr = np.array(titles, dtype=object)
    ids = rng.permutation(n).tolist()
    t0 = time.perf_counter()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write("id\ttext\ttitle\n")
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        chunk = 50_000
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            parts = phrases[rng.integers(0, pool_size, size=(m, per_passage))].tolist()
            names = title_arr[rng.integers(0, title_arr.size, size=m)].tolist()
            w.writerows(zip(ids[start:start + m], map(" ".join, parts), names))
    os.replace(tmp, path)
    log.info("built %s: %d passages, %.1f MB in %.1f s", path, n, path.stat().st_size / 1e6,
             time.perf_counter() - t0)
    return path


def build_model(work: Path) -> Path:
    """The `tiny_model` fixture's recipe, 2 layers: a random BERT plus MiniLM's real tokenizer files."""
    out = work / "tiny-bert-2x32"
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    import torch
    from transformers import BertConfig, BertModel

    from pipeline.config import BUNDLED_MODEL, resolve_model

    minilm = Path(resolve_model(BUNDLED_MODEL))
    tmp = work / "tiny-bert-2x32.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=256)
    BertModel(cfg).save_pretrained(tmp)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm / name, tmp / name)
    os.replace(tmp, out)
    log.info("built %s (%s)", out, MODEL_LABEL)
    return out


def cli_argv(corpus: Path, store: Path, model: Path, shard_size: int) -> list[str]:
    return ["run", "--corpus", str(corpus), "--store", str(store), "--model", str(model), "--layers", "1",
            "--dims", "16", "--fit-sample", "512", "--shard-size", str(shard_size)]


# ================================================================ parent: other load on the machine

_CLK = os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores; idle and iowait excluded)."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / _CLK


def _proc_table() -> dict[int, tuple[int, str, float]]:
    """pid -> (ppid, start time, CPU seconds) for every process now alive."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                rest = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        out[int(name)] = (int(rest[1]), rest[19], (int(rest[11]) + int(rest[12])) / _CLK)
    return out


class LoadMonitor:
    """How much CPU *other* processes took while a child ran: this machine is shared, so a run that
    overlapped someone's test suite must be visible as such in the results.

    Every second it adds up the CPU of the child's process tree (driver, raylet, Ray workers; each
    process's last value is kept after it exits) and compares it with the machine's busy time. The
    rest ("foreign") is CPU the run did not use, e.g. another Ray session; a process of the tree that
    exits between two looks loses up to a second, which reads as foreign.
    """

    def __init__(self, root_pid: int, every_s: float = 1.0):
        self.root, self.every = root_pid, every_s
        self.seen: dict[tuple[int, str], float] = {}
        self.busy0, self.t0 = _machine_busy_s(), time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scale-monitor", daemon=True)
        self._thread.start()

    def _look(self) -> None:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        stack = [self.root]
        while stack:
            pid = stack.pop()
            if pid in table:
                self.seen[(pid, table[pid][1])] = table[pid][2]
                stack.extend(children.get(pid, ()))

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._look()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        wall = time.monotonic() - self.t0
        busy = _machine_busy_s() - self.busy0
        tree = sum(self.seen.values())
        foreign = max(0.0, busy - tree)
        return {"tree_cpu_s": round(tree, 1), "machine_busy_s": round(busy, 1), "foreign_cpu_s": round(foreign, 1),
                "foreign_share": round(foreign / (wall * (os.cpu_count() or 1)), 3)}


def wait_quiet(limit_s: float, cores: float = 0.25, window_s: float = 5.0) -> float:
    """Wait (at most limit_s) until the machine is nearly idle before a run; returns busy cores seen."""
    deadline, said = time.monotonic() + limit_s, False
    while True:
        b0 = _machine_busy_s()
        time.sleep(window_s)
        busy = (_machine_busy_s() - b0) / window_s
        if busy <= cores or time.monotonic() >= deadline:
            if busy > cores:
                log.warning("machine still busy (%.2f cores) after waiting %.0f s; running anyway", busy, limit_s)
            return round(busy, 2)
        if not said:
            log.info("waiting for the machine to go quiet: %.2f cores busy (others' work)", busy)
            said = True


# ================================================================ parent: run one size

def run_child(repo: Path, argv: list[str], timeline: Path, cwd: Path,
              timeout_s: float | None) -> tuple[int, list[str], dict]:
    """One size in a fresh process, so peak RSS and CPU are this run's alone.

    The child runs this file by path (not `-m benchmarks.scale`): with PYTHONPATH=<repo> first, a
    checkout without this file (the baseline's worktree) still supplies jobs/pipeline/storage, and
    Ray's workers inherit the same PYTHONPATH. It runs in the work dir, so the measured checkout
    stays untouched.
    """
    env = {**os.environ, **CHILD_ENV, "PYTHONPATH": os.pathsep.join(
        [str(repo)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    cmd = [sys.executable, str(THIS_FILE), "--child", "--timeline", str(timeline), "--", *argv]
    log.info("child: PYTHONPATH=%s %s", repo, shlex.join(cmd))
    proc = subprocess.Popen(cmd, env=env, cwd=str(cwd))
    monitor = LoadMonitor(proc.pid)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log.error("child exceeded %.0f s; interrupting it (Ray shuts down on KeyboardInterrupt)", timeout_s)
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    return rc, cmd, monitor.stop()


def _boundaries(events: list[dict]) -> list[tuple[str, dict]]:
    """(phase, event) for every event that starts a phase, per PHASE_BOUNDARIES' rules."""
    explicit = any(rx.search(e["msg"]) for e in events for rx, _, kind in PHASE_BOUNDARIES if kind == "explicit")
    fired, out, current = set(), [], "startup"
    for e in events:
        for i, (rx, name, kind) in enumerate(PHASE_BOUNDARIES):
            if kind == "legacy" and explicit:
                continue
            if kind != "explicit" and i in fired:
                continue
            m = rx.search(e["msg"])
            if not m:
                continue
            fired.add(i)
            phase = name or m.group(1)
            if phase != current:
                out.append((phase, e))
                current = phase
            break
    return out


def phases(events: list[dict], samples: list, end: dict) -> list[dict]:
    """Per phase: wall, driver CPU and peak RSS (from samples and events inside it), in order."""
    # Start-up's CPU counts from exec (0), so the phases add up to the run's total driver CPU.
    cuts = [("startup", {"t": 0.0, "cpu": 0.0})] + _boundaries(events)
    points = sorted([(s[0], s[2]) for s in samples] + [(e["t"], e["rss"]) for e in events])
    out = []
    for i, (name, ev) in enumerate(cuts):
        t1, c1 = (cuts[i + 1][1]["t"], cuts[i + 1][1]["cpu"]) if i + 1 < len(cuts) else (end["wall_s"], end["cpu_s"])
        rss = [r for t, r in points if ev["t"] <= t <= t1]
        out.append({"phase": name, "start_s": ev["t"], "wall_s": round(t1 - ev["t"], 3),
                    "cpu_s": round(c1 - ev["cpu"], 3), "peak_rss_mb": round(max(rss) / 1e6, 1) if rss else None})
    return out


def summarise(n: int, tl: dict) -> dict:
    """The derived figures of one run (what the tables print and the projection fits)."""
    end = tl["exit"]
    first, source = first_shard(tl["events"])
    return {"passages": n, "ok": end["rc"] == 0 and not end.get("error"), "rc": end["rc"],
            "wall_s": end["wall_s"], "driver_cpu_s": end["cpu_s"],
            "driver_cpu_s_per_1m": round(end["cpu_s"] / (n / 1e6), 2),
            "peak_rss_mb": round(end["peak_rss"] / 1e6, 1), "first_shard_s": first, "first_shard_source": source,
            "phases": phases(tl["events"], tl["samples"], end)}


def first_shard(events: list[dict]) -> tuple[float | None, str | None]:
    """Seconds from the child's start to the first encoded shard, and where the figure came from."""
    hit = next((e["t"] for e in events if SHARD_DONE.search(e["msg"])), None)
    if hit is not None:
        return hit, "logged"
    cuts = _boundaries(events)
    for e in events:
        m = FIRST_SHARD_REPORTED.search(e["msg"])
        if m and cuts:
            return round(cuts[0][1]["t"] + float(m.group(1)), 3), "reported"
    return None, None


def measure(args, n: int, corpus: Path, model: Path) -> dict:
    """Run one size, summarise it, remove its store (unless kept). Returns the record for the JSON."""
    work = Path(args.work_dir)
    store = work / "stores" / f"{args.label}-{n}"
    timeline = work / "timelines" / f"{args.label}-{n}.json"
    timeline.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(store, ignore_errors=True)
    timeline.unlink(missing_ok=True)
    argv = cli_argv(corpus, store, model, args.shard_size)
    busy_before = wait_quiet(args.wait_quiet_s) if args.wait_quiet_s else None
    rc, cmd, load = run_child(Path(args.repo), argv, timeline, work, args.timeout_s)
    load["busy_cores_before"] = busy_before
    if not args.keep_stores:
        shutil.rmtree(store, ignore_errors=True)
    if not timeline.exists():
        log.error("size %d: child exited %d without a timeline", n, rc)
        return {"passages": n, "ok": False, "rc": rc, "child_command": shlex.join(cmd), "error": "no timeline",
                "load": load}
    tl = json.loads(timeline.read_text())
    rec = summarise(n, tl)
    rec.update({"child_command": f"PYTHONPATH={args.repo} {shlex.join(cmd)}", "child_rc": rc, "load": load,
                "error": tl["exit"].get("error"), "versions": tl["versions"], "modules": tl["modules"],
                "events": kept_events(tl["events"])})  # the run's own log records (not Ray's progress chatter)
    log.info("size %d: rc %d, wall %.1f s, driver CPU %.1f s, peak RSS %.0f MB; others used %.0f%% of the "
             "machine meanwhile", n, rec["rc"], rec["wall_s"], rec["driver_cpu_s"], rec["peak_rss_mb"],
             100 * load["foreign_share"])
    return rec


def kept_events(events: list[dict]) -> list[dict]:
    """The log records worth keeping in the results file: the measured code's own, and any warning
    or error. Ray Data's progress and autoscaler lines (thousands a run) stay in the timeline file."""
    return [e for e in events if not e["logger"].startswith("ray") or e["level"] in ("WARNING", "ERROR", "CRITICAL")]


# ================================================================ parent: results file and tables

def machine_info() -> dict:
    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), None)
    return {"nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "memory_gib": round(mem / 2**30, 1) if mem else None, "platform": platform.platform(),
            "python": platform.python_version()}


def git_commit(repo: Path) -> dict:
    def git(*a):
        return subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"schema": 1, "about": __doc__.split("\n\n")[0], "labels": {}}


def save_results(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _fmt(x, nd=1) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares (slope, intercept); None with fewer than two distinct x."""
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def _others(run: dict) -> float | None:
    """Percent of the machine's CPU that other processes used during the run (None: not recorded)."""
    share = (run.get("load") or {}).get("foreign_share")
    return None if share is None else 100 * share


def render(data: dict) -> str:
    """Markdown: the per-run table, the per-phase detail, and the projection to 32M passages."""
    lines = ["| label | passages | wall s | driver CPU s | CPU s / 1M | peak RSS MB | first shard s | others % | "
             "driver CPU s by phase |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    detail = ["| label | passages | phase | start s | wall s | driver CPU s | peak RSS MB |",
              "|---|---:|---|---:|---:|---:|---:|"]
    proj = ["| label | sizes | CPU s / 1M (largest N) | CPU s @32M (x32) | CPU s @32M (fit) | "
            "RSS MB per 1M (fit) | RSS MB @32M (fit) |", "|---|---|---:|---:|---:|---:|---:|"]
    for label, entry in data["labels"].items():
        runs = [r for _, r in sorted(entry["runs"].items(), key=lambda kv: int(kv[0]))]
        for r in runs:
            if not r.get("ok"):
                lines.append(f"| {label} | {r['passages']:,} | FAILED (rc {r.get('rc')}) | | | | | | |")
                continue
            by_phase = " · ".join(f"{p['phase']} {p['cpu_s']:.1f}" for p in r["phases"])
            lines.append(f"| {label} | {r['passages']:,} | {_fmt(r['wall_s'])} | {_fmt(r['driver_cpu_s'])} | "
                         f"{_fmt(r['driver_cpu_s_per_1m'])} | {_fmt(r['peak_rss_mb'], 0)} | "
                         f"{_fmt(r['first_shard_s'])} | {_fmt(_others(r), 0)} | {by_phase} |")
            for p in r["phases"]:
                detail.append(f"| {label} | {r['passages']:,} | {p['phase']} | {_fmt(p['start_s'])} | "
                              f"{_fmt(p['wall_s'])} | {_fmt(p['cpu_s'])} | {_fmt(p['peak_rss_mb'], 0)} |")
        ok = [r for r in runs if r.get("ok")]
        if ok:
            xs = [r["passages"] / 1e6 for r in ok]
            cpu_fit = _fit(xs, [r["driver_cpu_s"] for r in ok])
            rss_fit = _fit(xs, [r["peak_rss_mb"] for r in ok])
            per_m = ok[-1]["driver_cpu_s_per_1m"]
            m = PROJECT_TO / 1e6
            sizes = ", ".join(f"{r['passages']:,}" for r in ok)
            proj.append(f"| {label} | {sizes} | {_fmt(per_m)} | "
                        f"{_fmt(per_m * m, 0)} | {_fmt(cpu_fit and cpu_fit[0] * m + cpu_fit[1], 0)} | "
                        f"{_fmt(rss_fit and rss_fit[0])} | {_fmt(rss_fit and rss_fit[0] * m + rss_fit[1], 0)} |")
    models = {e.get("model") for e in data["labels"].values()}
    head = (f"Model: {', '.join(sorted(m for m in models if m))}. Driver CPU = the driver process only. "
            "others % = share of the machine's CPU used by processes outside the run (shared machine; "
            "high values inflate wall times, less so driver CPU).")
    return "\n".join([head, "", *lines, "", *detail, "", f"Projection to {PROJECT_TO:,} passages "
                      "(CPU fit and RSS fit: least squares over the label's sizes):", "", *proj])


# ================================================================ CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scale", description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Phase boundaries (log messages, first table row that matches wins; legacy rows fire once and "
               "are ignored when a run logs any explicit 'phase: NAME'; see PHASE_BOUNDARIES in this file): "
               + "; ".join(f"{rx.pattern!r} -> {name or 'group 1'} ({kind})" for rx, name, kind in PHASE_BOUNDARIES))
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000],
                   help="corpus sizes in passages, one child run each (default: 100000 1000000)")
    p.add_argument("--label", default="after", help="name of this set of runs in the JSON, e.g. before/after")
    p.add_argument("--repo", default=str(THIS_REPO),
                   help="checkout whose code is measured (put first on PYTHONPATH); default: this checkout")
    p.add_argument("--json", default="reports/scale.json", help="results file, merged by label and size")
    p.add_argument("--work-dir", default="/tmp/scale-bench",
                   help="cached corpora and model, stores (deleted after each run) and raw timelines")
    p.add_argument("--shard-size", type=int, default=5000, help="passages per shard (default 5000)")
    p.add_argument("--seed", type=int, default=0,
                   help="corpus generator seed (default 0; the cache is keyed by recipe, seed and N)")
    p.add_argument("--timeout-s", type=float, default=None, help="interrupt a child after this many seconds")
    p.add_argument("--wait-quiet-s", type=float, default=0,
                   help="before each size, wait up to this long for other processes to leave the CPUs nearly "
                        "idle (<0.25 cores busy); the machine may be shared. Either way each run records the CPU "
                        "others used meanwhile ('others %%' in the table)")
    p.add_argument("--keep-stores", action="store_true", help="do not delete each run's store")
    p.add_argument("--report", action="store_true", help="print the tables from --json; run nothing")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--timeline", default=None, help=argparse.SUPPRESS)
    p.add_argument("cli_argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        rest = args.cli_argv[1:] if args.cli_argv[:1] == ["--"] else args.cli_argv
        return child_main(args.timeline, rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = Path(args.json)
    if args.report:
        print(render(load_results(path)))
        return 0
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(work)
    repo = Path(args.repo).resolve()
    args.repo = str(repo)
    failed = 0
    for n in args.sizes:
        corpus = build_corpus(work, n, args.seed)
        rec = measure(args, n, corpus, model)
        failed += not rec.get("ok")
        data = load_results(path)  # reread: another label may have been merged meanwhile
        entry = data["labels"].setdefault(args.label, {"runs": {}})
        entry.update({"repo": str(repo), **git_commit(repo), "machine": machine_info(), "model": MODEL_LABEL,
                      "command": shlex.join([sys.executable, "-m", "benchmarks.scale", *sys.argv[1:]]),
                      "corpus": f"synthetic {CORPUS_RECIPE}: 10 phrases of 8-12 words (~100) from the bundled "
                                f"sample's words, seed {args.seed}", "versions": rec.get("versions")})
        entry["runs"][str(n)] = {**rec, "commit": entry["commit"]}
        save_results(path, data)
    print(render(load_results(path)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
