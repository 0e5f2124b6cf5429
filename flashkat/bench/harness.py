"""Shared timing and reporting helpers for ``flashkat bench`` and ``flashkat analyze``.

Every time is a median in milliseconds, with L2 flushed before each call on a GPU:

- ``time_ms(fn, "cuda")``: ``triton.testing.do_bench``, CUDA events around each Python call of
  ``fn``. If launching ``fn`` takes the CPU longer than the previous GPU work, this includes
  launch overhead (tens of microseconds for a Python launcher: as large as the kernels here).
- ``time_ms(fn, "cuda", cuda_graph=True)``: ``fn`` captured once in a CUDA graph and replayed;
  events around each replay give the GPU time of its kernels alone.
- ``time_ms(fn, "cpu")``: a wall clock.

Every kernel time is reported beside its floor measured in the same process on the same
tensors with the same timer (see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def time_ms(
    fn: Callable[[], object], device: str, warmup_ms: int = 25, rep_ms: int = 100, cuda_graph: bool = False
) -> float:
    """Median time of ``fn()`` in milliseconds (see the module's docstring for the timers)."""
    if device == "cuda" and cuda_graph:
        return _graph_time_ms(fn, rep_ms)
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()  # warm-up (and first-call compilation)
    samples, deadline = [], time.perf_counter() + rep_ms / 1000
    while len(samples) < 3 or (time.perf_counter() < deadline and len(samples) < 50):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


_L2_FLUSH_BYTES = 256 * 2**20  # larger than any L2 so far (H100: 50 MB), as do_bench uses


@functools.lru_cache(maxsize=1)
def _flush_buffer() -> torch.Tensor:
    return torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")


def _graph_time_ms(fn: Callable[[], object], rep_ms: int, min_reps: int = 3, max_reps: int = 1000) -> float:
    """GPU time of ``fn``'s kernels: capture one call in a CUDA graph, replay it with L2 flushed.

    ``fn`` must be capturable (no host synchronisation) once warmed up; it runs once eagerly
    (compiling kernels) and once on a side stream before capture, as torch asks.
    """
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = _flush_buffer()

    def replays(count: int) -> list[float]:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
        for start, end in events:
            flush.zero_()  # the flush also gives the CPU a head start: no launch gaps in the timing
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]

    estimate = statistics.median(replays(3))
    count = int(min(max(rep_ms / max(estimate, 1e-3), min_reps), max_reps))
    samples = replays(count)
    del graph
    return float(statistics.median(samples))


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (a count of steps, calls or images)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0 (a count where 0 turns something off)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def environment(device: str) -> dict:
    """Card and versions, recorded with every result."""
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
        info["triton_interpret"] = interpreting()
    return info


def interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (functional checks only, never speeds)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of ``rows`` restricted to ``columns`` (floats with 3 significant digits)."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(output: Path, name: str, payload: dict, table: str) -> None:
    """``name``.json (everything) and ``name``.md (the table) under ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (output / f"{name}.md").write_text(table + "\n")
