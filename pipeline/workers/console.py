"""What the driver and the workers print: one log format, Ray's own lines in it, library chatter off.

Light on purpose (no torch, no Ray at import): the CLI configures logging with it before any command
runs. The worker half runs as Ray's `worker_process_setup_hook`; the driver half re-emits what the
workers print through the driver's own logging, so every line on the console has one format.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import tempfile

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A worker's records as its stderr carries them to the driver, which parses them back into records
WORKER_FORMAT = "%(levelname)s %(name)s: %(message)s"
WORKER_LEVEL_ENV = "PRECOMPUTE_WORKER_LOG_LEVEL"
PROGRESS_BARS_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"  # read by huggingface_hub and transformers at import
# INFO lines a user cannot act on (connection pools, the credential chain saying where it found keys, ...)
CHATTY_LIBRARIES = ("urllib3", "botocore", "aiobotocore", "boto3", "s3transfer", "s3fs", "gcsfs", "fsspec",
                    "filelock", "httpx", "transformers", "huggingface_hub", "faiss", "faiss.loader")

_WORKER_RECORD = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.\-]+): (.*)$")
_RAY_PYTHON = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+\t(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ -- (.*)$")  # Ray's own
_NATIVE = re.compile(r"^\[\d{4}-[\d\- :,]+ ([DIWEF]) \d+ \d+\] (.*)$")  # Ray's C++ "[date time E pid tid] msg"
_NATIVE_LEVELS = {"D": logging.DEBUG, "I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR,
                  "F": logging.CRITICAL}


def verbose() -> bool:
    """-v: the driver logs at DEBUG (the CLI's one switch, read where the CLI cannot pass it)."""
    return logging.getLogger().isEnabledFor(logging.DEBUG)


def quiet_libraries() -> None:
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def progress_bars(on: bool) -> None:
    """transformers' and huggingface_hub's bars ("Loading weights" on every model load): a log in a
    file or a pipe is not a terminal, and a bar there is a line of carriage returns."""
    if on:
        return
    os.environ.setdefault(PROGRESS_BARS_ENV, "1")
    if "transformers" in sys.modules:  # imported before this ran: the env var was read already
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


# ---------------------------------------------------------------- workers

def setup_worker() -> None:
    """Ray's `worker_process_setup_hook`: the driver's level, a format the driver parses, no bars."""
    level = os.environ.get(WORKER_LEVEL_ENV, "WARNING")
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(WORKER_FORMAT))
    root.handlers = [handler]
    root.setLevel(level)
    quiet_libraries()  # progress bars: the runtime env's PROGRESS_BARS_ENV, read when transformers loads


def worker_runtime_env(on_driver_verbose: bool) -> dict:
    """The runtime env that carries the driver's console settings to its workers (also on a remote
    cluster, whose workers do not inherit the driver's environment). Keys a submitted job already
    sets are left to it: Ray refuses to merge a job's runtime env with a driver's on the same key."""
    import json

    env = {WORKER_LEVEL_ENV: "INFO" if on_driver_verbose else "WARNING"}
    if not on_driver_verbose:
        env[PROGRESS_BARS_ENV] = "1"
    out: dict = {"worker_process_setup_hook": "pipeline.workers.console.setup_worker"}
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    if "worker_process_setup_hook" in job:
        del out["worker_process_setup_hook"]
    env = {k: v for k, v in env.items() if k not in (job.get("env_vars") or {})}
    if env:
        out["env_vars"] = env
    return out


# ---------------------------------------------------------------- the driver

class _ToRoot(logging.Handler):
    """Ray's own records, handed to the root logger's handlers: our format and stream, Ray's files untouched."""

    def emit(self, record: logging.LogRecord) -> None:
        for handler in logging.getLogger().handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def route_ray_loggers(level: int) -> None:
    """Ray's and Ray Data's console handlers (tab-separated, their own format) give way to ours at
    `level`; their session log files keep everything."""
    for name in ("ray", "ray.data"):
        logger = logging.getLogger(name)
        for handler in logger.handlers[:]:
            if isinstance(handler, (logging.StreamHandler, _ToRoot)) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        to_root = _ToRoot()
        to_root.setLevel(level)
        logger.addHandler(to_root)
        logger.propagate = False


def emit_worker_lines(data: dict) -> None:
    """A batch of lines a worker (or the raylet) printed, as records in the driver's format.

    A worker's own records come as WORKER_FORMAT and keep their logger and level; Ray's Python and C++
    lines keep their level; anything else (prints, the rest of a traceback) follows the record before it, or is
    a line of `ray.worker`: WARNING when the worker wrote it to stderr (a crash dump, a C++ abort, a Python
    warning: what says why an actor died), INFO (shown with -v) when it printed it to stdout."""
    pid = data.get("pid")
    who = data.get("actor_name") or data.get("task_name") or ("raylet" if pid == "raylet" else "worker")
    where = f"{who} pid={pid}" if pid not in ("raylet", "autoscaler") else str(pid)
    if data.get("ip") and data.get("ip") != data.get("localhost"):
        where += f" on {data['ip']}"
    current = (logging.getLogger("ray.worker"), logging.WARNING if data.get("is_err") else logging.INFO)
    for line in data.get("lines", ()):
        line = line.rstrip()
        if not line:
            continue
        if (m := _WORKER_RECORD.match(line)) is not None:
            current = (logging.getLogger(m.group(2)), logging.getLevelName(m.group(1)))
            message = m.group(3)
        elif (m := _RAY_PYTHON.match(line)) is not None:
            name = "ray.autoscaler" if pid == "autoscaler" else "ray.worker"
            current = (logging.getLogger(name), logging.getLevelName(m.group(1)))
            message = m.group(2)
        elif (m := _NATIVE.match(line)) is not None:
            current = (logging.getLogger("ray.core"), _NATIVE_LEVELS[m.group(1)])
            message = m.group(2)
        elif pid == "autoscaler":
            level = logging.WARNING if ("Warning:" in line or "Error:" in line) else logging.INFO
            current = (logging.getLogger("ray.autoscaler"), level)
            message = line
        else:
            message = line
        logger, level = current
        logger.log(level, "%s [%s]", message, where)


def route_worker_output() -> bool:
    """Workers' stdout and stderr, which Ray prints on the driver with its own prefix (and colour),
    through `emit_worker_lines` instead. Ray offers no public hook for this: when its dispatcher is
    not where it was (ray 2.55-2.60), Ray prints them itself, without colour (RAY_COLOR_PREFIX=0)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    if not all(hasattr(dispatcher, a) for a in ("add_handler", "remove_handler")):
        return False
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", emit_worker_lines)  # the name ray.shutdown removes
    return True


def absorb_restart_notice() -> None:
    """Take Ray's once-per-process notice that an actor with constructor arguments in the object store
    and max_restarts > 0 may fail to restart (ray-project/ray#53727), and log it at DEBUG.

    Every Ray Data actor pool qualifies: Ray Data passes each pool actor its map function and
    context as ObjectRefs that the driver put and holds for the pool's lifetime, so they are lost only
    with the driver's node, and the notice (written by Ray's C++ core worker straight to fd 2, at
    ERROR) does not apply. One throwaway actor, created while fd 2 points at a file, takes it here;
    anything else written in that moment goes back to stderr."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=1)
    class _Probe:
        def __init__(self, arg):
            pass

    arg = ray.put(None)
    with tempfile.TemporaryFile() as caught:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            probe = _Probe.remote(arg)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        text = caught.read().decode("utf-8", "replace")
    ray.kill(probe)
    log = logging.getLogger("ray.core")
    for line in text.splitlines():
        if "max_restarts" in line and "object store" in line:
            log.debug("%s (Ray Data's own pool arguments; it does not apply)", line)
        elif line.strip():
            sys.stderr.write(line + "\n")
