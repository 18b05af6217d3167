"""What a job will cost before it launches: shards, GPU-hours, bytes. Pure arithmetic, no I/O.

GPU time comes from one of two places. Preferred: a per-GPU rate you measured
(`python -m benchmarks.throughput` on the GPU type you will rent). Otherwise a FLOP model: matmul
FLOPs of the layers that run, divided by an assumed peak and utilisation. Both are printed with
the plan, so nobody mistakes an assumption for a measurement.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from pipeline.config import ConfigError


@dataclass(frozen=True)
class ModelGeometry:
    hidden: int
    intermediate: int
    layers: int  # layers that actually run (the input component's lower N)


@dataclass(frozen=True)
class GpuAssumptions:
    # Dense bf16 tensor peak of an A10/A10G-class GPU (cluster.yaml's g5 workers), datasheet figure.
    peak_tflops: float = 125.0
    # Share of peak a padded-batch BERT encoder sustains: an assumption, not a measurement here.
    utilisation: float = 0.25
    # A measured rate (tokens/s per GPU, real tokens) overrides the FLOP model when set.
    tokens_per_second: float | None = None
    price_per_gpu_hour: float | None = None  # e.g. 1.006 for g5.xlarge on demand in us-east-1

    def __post_init__(self):
        if self.peak_tflops <= 0 or not 0 < self.utilisation <= 1:
            raise ConfigError("plan.peak_tflops must be positive and plan.utilisation in (0, 1]")
        if self.tokens_per_second is not None and self.tokens_per_second <= 0:
            raise ConfigError("plan.tokens_per_second must be positive")
        if self.price_per_gpu_hour is not None and self.price_per_gpu_hour < 0:
            raise ConfigError("plan.price_per_gpu_hour must be non-negative")


def flops_per_token(g: ModelGeometry, seq_len: float) -> float:
    """Forward FLOPs per token: Q/K/V/O projections (4h²), the FFN (2·h·i) and attention (2·s·h), as MACs x 2."""
    return 2.0 * g.layers * (4 * g.hidden ** 2 + 2 * g.hidden * g.intermediate + 2 * seq_len * g.hidden)


def gpu_seconds(tokens: float, flops: float, gpu: GpuAssumptions) -> float:
    if gpu.tokens_per_second:
        return tokens / gpu.tokens_per_second
    return tokens * flops / (gpu.peak_tflops * 1e12 * gpu.utilisation)


@dataclass(frozen=True)
class JobPlan:
    job: str
    passages: int
    shards: int
    tokens: float
    gpu_hours: float
    gpu_hours_basis: str
    storage_bytes: float
    storage_basis: str
    gpu_cost_usd: float | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        cost = f" (~{_usd(self.gpu_cost_usd)})" if self.gpu_cost_usd is not None else ""
        lines = [f"{self.job} plan",
                 f"  passages:  {self.passages:,}",
                 f"  shards:    {self.shards:,}",
                 f"  tokens:    ~{self.tokens:,.0f}",
                 f"  GPU-hours: ~{_hours(self.gpu_hours)}{cost}  [{self.gpu_hours_basis}]",
                 f"  storage:   ~{_fmt(self.storage_bytes)}  [{self.storage_basis}]"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _hours(h: float) -> str:
    if h == 0:
        return "0"
    if h >= 10:
        return f"{h:,.1f}"
    return f"{h:.3g}" if h >= 0.1 else f"{h:.2g} ({h * 3600:,.1f} GPU-seconds)"


def _usd(x: float) -> str:
    from storage.estimate import fmt_usd

    return fmt_usd(x)


def _fmt(n: float) -> str:
    from storage.estimate import fmt_size  # the one size renderer (B, KB, MB, GB, TB)

    return fmt_size(n)


def encode_plan(job: str, passages: int, shard_size: int, tokens_per_passage: float, geometry: ModelGeometry,
                gpu: GpuAssumptions, storage_bytes: float, storage_basis: str,
                dpr_geometry: ModelGeometry | None = None, notes: tuple[str, ...] = ()) -> JobPlan:
    """Plan for encoding `passages` (a full run, or an update's delta) into `shard_size` shards."""
    if shard_size < 1:
        raise ConfigError("shard_size must be at least 1")
    tokens = passages * tokens_per_passage
    flops = flops_per_token(geometry, tokens_per_passage)
    if dpr_geometry is not None:
        flops += flops_per_token(dpr_geometry, tokens_per_passage)
    seconds = gpu_seconds(tokens, flops, gpu)
    if gpu.tokens_per_second:
        basis = f"measured rate {gpu.tokens_per_second:,.0f} tokens/s per GPU"
    else:
        basis = (f"FLOP model: {flops / 1e6:,.0f} MFLOP/token at {gpu.peak_tflops:g} TFLOPS x "
                 f"{gpu.utilisation:.0%} utilisation (assumed: give a measured tokens/s per GPU to replace it)")
    hours = seconds / 3600
    cost = hours * gpu.price_per_gpu_hour if gpu.price_per_gpu_hour is not None else None
    return JobPlan(job=job, passages=passages, shards=math.ceil(passages / shard_size) if passages else 0,
                   tokens=tokens, gpu_hours=hours, gpu_hours_basis=basis, storage_bytes=storage_bytes,
                   storage_basis=storage_basis, gpu_cost_usd=cost, notes=notes)
