"""Timing by the project's method (docs/PERFORMANCE.md): warm-up first, then the median of
repeats, CUDA events on a GPU and perf_counter elsewhere, peak memory where the device reports it."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    repeats: int
    peak_mib: float | None  # peak allocated during the timed calls (CUDA); None on CPU


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[int], object], device: torch.device, repeats: int = 20, warmup: int = 3) -> Timing:
    """Median wall time of fn(i) over `repeats` calls after `warmup` calls; i lets fn rotate its inputs."""
    for i in range(warmup):
        fn(i)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for i in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
    return Timing(statistics.median(times), min(times), repeats, peak)


def describe_device(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    return {"device": name, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}
