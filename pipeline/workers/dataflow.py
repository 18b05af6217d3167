"""The Ray Data flow for encoding splits: prepare (read, check, tokenise) -> encode -> ShardSink.

One split is one block from start to end: block shaping is switched off for this dataset, so Ray
never cuts or merges a split between stages, and the sink checks the row count it receives.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

from pipeline.corpus.rows import CorpusError
from pipeline.workers import console
from pipeline.workers.ingest import PrepareStage
from pipeline.workers.sink import ShardSink
from pipeline.workers.steps import EncodeStage, StageContext
from storage.errors import find_cause
from storage.fs import AccessRefused
from storage.shard_marker import ShardMarker

log = logging.getLogger(__name__)


def init_ray(address: str | None) -> None:
    """Start (or join) Ray with the driver's console settings: Ray's lines in our log format at
    WARNING (INFO with -v), the workers' output re-emitted through our logging, and no notice that
    does not apply. A Ray someone else started (a test, a notebook) is left as it is."""
    import ray
    import ray.data

    if ray.is_initialized():
        return
    loud = console.verbose()
    level = logging.INFO if loud else logging.WARNING
    console.route_ray_loggers(level)  # before ray.init, which logs that it started a local instance
    kwargs = dict(logging_level=level, runtime_env=console.worker_runtime_env(loud))
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(include_dashboard=False, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = False
    console.route_ray_loggers(level)
    console.route_worker_output()
    console.absorb_restart_notice()


def cluster_gpus() -> int:
    import ray
    return int(ray.cluster_resources().get("GPU", 0))


def encode_splits(ctx: StageContext, splits: list[dict], encode_stage: type | None = None,
                  on_complete: Callable[[list[ShardMarker]], Any] | None = None) -> tuple[list[ShardMarker], Any]:
    """Encode `splits` and write their shards; returns (the markers written now, on_complete's result)."""
    import ray

    init_ray(ctx.execution.ray_address)
    encode_stage = encode_stage or EncodeStage
    ex = ctx.execution
    gpus = cluster_gpus() if ex.device != "cpu" else 0
    n_enc = ex.num_encoders or max(1, gpus)
    data_ctx = ray.data.DataContext.get_current()
    saved = data_ctx.target_max_block_size, data_ctx.raise_original_map_exception, data_ctx.enable_progress_bars
    data_ctx.target_max_block_size = None  # one split = one block, end to end
    data_ctx.raise_original_map_exception = True  # a CorpusError from a worker stays a CorpusError
    # Ray Data's operator table reads "0/?" until a block finishes: the run logs its own shard progress;
    # with -v the table is back
    data_ctx.enable_progress_bars = logging.getLogger().isEnabledFor(logging.DEBUG)
    wait_for_free_cpu()
    try:
        ds = ray.data.from_items([{"split_json": json.dumps(s)} for s in splits], override_num_blocks=len(splits))
        ds = ds.map_batches(PrepareStage, fn_constructor_kwargs={"ctx": ctx}, batch_size=1, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=prepare_actors(ex, n_enc)),
                            num_cpus=ex.task_cpus)
        # Ray Data restarts dead actors and retries their splits.
        ds = ds.map_batches(encode_stage, fn_constructor_kwargs={"ctx": ctx}, batch_size=None,
                            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=n_enc),
                            num_cpus=ex.encoder_cpus, num_gpus=1 if gpus else 0)
        sink = ShardSink(ctx, on_complete)
        ds.write_datasink(sink, ray_remote_args={"num_cpus": ex.task_cpus})
    except Exception as exc:
        cause = find_cause(exc, (CorpusError, AccessRefused), follow_context=True)
        if cause is not None:  # a bad corpus row (or refused credentials) found by a worker: one line, as on the driver
            raise cause from None
        raise
    finally:
        data_ctx.target_max_block_size, data_ctx.raise_original_map_exception, data_ctx.enable_progress_bars = saved
    return sink.markers, sink.result


def wait_for_free_cpu(timeout_s: float = 5.0) -> bool:
    """Ray Data warns that a Dataset "will hang" if the cluster shows no free CPU when it starts. Right
    after tasks end (an update's assembly tasks, just before its encode), Ray's resource view still
    counts them for a moment (~0.1 s, longer on a busy node): wait for it to catch up, so the check
    sees the CPUs they freed. A cluster that stays full past `timeout_s` still gets Ray's warning."""
    import ray

    deadline = time.monotonic() + timeout_s
    while not ray.available_resources().get("CPU"):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def prepare_actors(ex, n_encoders: int) -> int:
    """Readers/tokenisers the cluster's CPUs allow next to the encoders and one write task: reading
    and checking the corpus scales with the cluster, not with the number of GPUs."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    spare = cpus - n_encoders * ex.encoder_cpus - ex.task_cpus
    return max(1, int(spare // ex.task_cpus))
