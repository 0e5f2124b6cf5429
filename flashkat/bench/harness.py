"""Shared timing and reporting helpers for ``flashkat bench`` and ``flashkat analyze``.

Every time is a median from ``triton.testing.do_bench`` (which flushes L2 before each call) on
a GPU, or from a wall clock on the CPU; every kernel time is reported beside its floor measured in
the same process on the same tensors (see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def time_ms(fn: Callable[[], object], device: str, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of ``fn()`` in milliseconds."""
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
    return info


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
