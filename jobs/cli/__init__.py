"""`precompute`: the command-line face of the pipeline. Each command parses its flags, calls one
pipeline function and prints; the settings' checks and defaults live in pipeline/ (config, schema,
job_requests, serve/checks), so a YAML job and a Python caller get the same ones.

    encode.py   run, update, fit-compressor, compact      (write a version)
    store.py    lookup, verify, gc, validate               (read a version; no torch)
    index.py    plan-index, index, search, answer          (the DPR index and the reader)
    storage.py  estimate, report, fidelity                 (bytes per token: priced or measured)
    options.py  the option groups and flag parsers they share
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from jobs.cli import encode, index, storage, store
from jobs.cli.encode import cmd_compact, cmd_fit, cmd_run, cmd_update, print_plan, run_and_report, run_body  # noqa: F401
from jobs.cli.index import cmd_answer, cmd_index, cmd_plan_index, cmd_search  # noqa: F401
from jobs.cli.storage import cmd_estimate, cmd_fidelity, cmd_report  # noqa: F401
from jobs.cli.store import EXIT_FAILED, cmd_gc, cmd_lookup, cmd_validate, cmd_verify  # noqa: F401

log = logging.getLogger("precompute")

EXIT_USAGE = 2

# The order `precompute --help` lists them in.
COMMANDS = (encode.add_run, encode.add_fit, storage.add_fidelity, store.add_lookup, store.add_verify, store.add_gc,
            storage.add_estimate, store.add_validate, storage.add_report, index.add_plan_index, index.add_search,
            index.add_answer, encode.add_update, index.add_index, encode.add_compact)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="precompute", description=(
        "Precompute the input component of a decoupled transformer over a passage corpus: encode with the "
        "lower N layers, compress token states, quantise, zstd-pack into versioned Parquet shards."))
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    level = p.add_mutually_exclusive_group()
    level.add_argument("-v", "--verbose", action="store_true",
                       help="debug logging, Ray's own lines, progress bars, and tracebacks with errors")
    level.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only (Ray's too)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return p


def package_version() -> str:
    """The installed distribution's version; from a source checkout that is not installed, pyproject's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("decoupled-precompute")
    except PackageNotFoundError:
        import re
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        return found.group(1) if found else "unknown"


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """One format for every line on stderr, ours and Ray's (pipeline/workers/console routes Ray's
    through it when Ray starts); -q leaves warnings and errors, -v adds DEBUG, Ray's INFO and bars."""
    from pipeline.workers import console

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format=console.LOG_FORMAT, stream=sys.stderr)
    if verbose or quiet:  # also when a host (a test, a notebook) configured logging first
        logging.getLogger().setLevel(level)
    # Notices a user cannot act on: Ray's token auth being on; Ray Data saying its operator table is off
    # (the run logs its own progress; -v turns the table back on)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if not verbose:
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    console.quiet_libraries()
    console.progress_bars(verbose)
    if not sys.stderr.isatty():  # Ray colours the lines it prints itself (where console cannot route them)
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def guarded(action, verbose: bool = False) -> int:
    """Run a command; a product error (also one raised in a Ray worker) is one line and its exit code."""
    from storage.errors import find_product_error, one_line

    try:
        return action()
    except Exception as exc:
        err = find_product_error(exc)
        if err is None:
            raise
        log.error("%s", one_line(err))
        if verbose:
            log.debug("traceback", exc_info=exc)
        return err.exit_code


def run_command(action, store_url: str | None, verbose: bool = False) -> int:
    """`guarded`, and a local store directory the command created is removed again if it fails leaving it empty."""
    fresh = _new_local_dir(store_url)
    rc = 1
    try:
        rc = guarded(action, verbose)
        return rc
    finally:
        if rc != 0 and fresh and os.path.isdir(fresh):
            _remove_if_empty(fresh)


def _new_local_dir(url: str | None) -> str | None:
    """A local store path that does not exist yet: removed again if the command fails leaving it empty."""
    if not url or "://" in url and not url.startswith("file://"):
        return None
    path = os.path.abspath(url.removeprefix("file://"))
    return None if os.path.exists(path) else path


def _remove_if_empty(path: str) -> None:
    for root, _dirs, _files in sorted(os.walk(path), key=lambda t: -len(t[0])):
        try:
            os.rmdir(root)  # only succeeds for an empty directory: files are never removed
        except OSError:
            return


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    return run_command(lambda: args.func(args), getattr(args, "store", None), args.verbose)


def exit_process(rc: int) -> None:
    """End the process once its output is out, without C++ static destructors.

    Under load, pyarrow's thread-pool threads can still be joinable when the interpreter tears
    down, and libstdc++ then aborts ("terminate called without an active exception", SIGABRT)
    after the command already succeeded (apache/arrow#34314; reproduced here: 2 of 100 lookup/verify
    runs under CPU load). Ray is shut down and logs flushed first; then os._exit skips the teardown."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said on it
            pass
    os._exit(rc)


def entry() -> None:
    """The `precompute` console script."""
    exit_process(main())
