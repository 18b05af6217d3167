"""Where a run's files live in the store: one place for the names the workers write and the driver lists.

Kept apart from the encode steps (which import torch) so that the driver's resume, the marker reader
and the update's slicing name paths without loading a model library."""
from __future__ import annotations


def input_path(run_dir: str, shard: int) -> str:
    return f"{run_dir}/input/part-{shard:05d}.parquet"


def state_path(run_dir: str, shard: int) -> str:
    return f"{run_dir}/states/part-{shard:05d}.parquet"


def dpr_path(run_dir: str, shard: int) -> str:
    return f"{run_dir}/dpr/part-{shard:05d}.parquet"


def marker_path(run_dir: str, shard: int) -> str:
    return f"{run_dir}/states/part-{shard:05d}.done.json"


def shard_of(path: str) -> int:
    """The shard index in a `part-NNNNN.*` path (a shard file or its marker)."""
    return int(path.rsplit("part-", 1)[1].split(".")[0])
