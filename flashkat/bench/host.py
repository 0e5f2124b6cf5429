"""``flashkat bench host``: host (CPU) time per call of the op, next to GELU's.

At KAT-T's size a training step is bound by the host, not the GPU: each of the 24 GR-KAN layer
calls per step costs its Python and launch time. Here the tensors are tiny (GPU work negligible),
every call is followed by nothing, and the wall time of many calls divided by their number is the
host cost of one. Rows: the Triton launchers alone (forward, backward), the public function's
forward under no_grad, the registered operators (what a compiled graph calls), and forward +
backward through autograd, also of the fused LayerNorm + rational; GELU's for scale. On the CPU the
op runs the float64 reference (and so do these rows).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from flashkat import reference
from flashkat.bench.harness import environment, markdown_table, positive_int, write_results
from flashkat.ops import group_rational as op
from flashkat.ops import native
from flashkat.ops.layer_norm_group_rational import layer_norm_group_rational


def host_us(fn: Callable[[], object], device: str, calls: int) -> float:
    """Mean wall time of one call of ``fn`` in microseconds, over ``calls`` calls after warm-up."""
    for _ in range(max(calls // 10, 3)):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def measure(device: str, calls: int, rows: int = 64, channels: int = 192) -> list[dict]:
    """Host microseconds per call of each path (KAT's layer: order 5/4, 1 numerator, 8 denominators)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, channels, generator=gen).to(device)
    grad = torch.randn(rows, channels, generator=gen).to(device)
    numerator = torch.randn(1, 6, generator=gen).to(device)
    denominator = torch.randn(8, 4, generator=gen).to(device)
    leaves = [t.clone().requires_grad_() for t in (x, numerator, denominator)]
    norm = torch.nn.LayerNorm(channels, device=device)
    kernels = op.HAS_TRITON and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")

    def op_pair():
        for t in leaves:
            t.grad = None
        op.group_rational(*leaves).backward(grad)

    def gelu_pair():
        leaves[0].grad = None
        F.gelu(leaves[0]).backward(grad)

    def fused_pair():  # KAT's first activation with the LayerNorm before it
        for t in (*leaves, norm.weight, norm.bias):
            t.grad = None
        layer_norm_group_rational(leaves[0], norm.weight, norm.bias, *leaves[1:], norm.eps).backward(grad)

    def norm_gelu_pair():
        for t in (leaves[0], norm.weight, norm.bias):
            t.grad = None
        F.gelu(norm(leaves[0])).backward(grad)

    cases = {}
    if kernels:
        cases["triton_forward"] = lambda: op.triton_forward(x, numerator, denominator)
        cases["triton_backward"] = lambda: op.triton_backward(grad, x, numerator, denominator)
    else:
        cases["reference forward"] = lambda: reference.forward(x, numerator, denominator)
    # what a torch.compile'd graph calls
    cases["operator forward (compiled graphs)"] = lambda: torch.ops.flashkat.group_rational(
        x, numerator, denominator, -1, "flashkat", None)  # fmt: skip
    cases["operator backward (compiled graphs)"] = lambda: torch.ops.flashkat.group_rational_backward(
        grad, x, numerator, denominator, -1, "flashkat")  # fmt: skip
    cases["group_rational forward (no_grad)"] = lambda: op.group_rational(x, numerator, denominator)
    cases["gelu forward (no_grad)"] = lambda: F.gelu(x)
    cases["group_rational forward+backward"] = op_pair
    cases["gelu forward+backward"] = gelu_pair
    cases["layer_norm_group_rational forward+backward"] = fused_pair
    cases["layer_norm then gelu forward+backward"] = norm_gelu_pair
    if native.module() is not None:
        for name in ("operator forward (compiled graphs)", "group_rational forward+backward",
                     "layer_norm_group_rational forward+backward"):
            cases[f"{name} (Python path)"] = cases[name]
    results = []
    for name, fn in cases.items():
        python_path = native.disabled() if name.endswith("(Python path)") else contextlib.nullcontext()
        with torch.set_grad_enabled("backward" in name), python_path:
            results.append({"call": name, "host_us": host_us(fn, device, calls), "shape": f"{rows}x{channels}"})
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=positive_int, help="timed calls per row (default 500 on a GPU, 20 on the CPU)")
    parser.add_argument("--output", type=Path, default=Path("bench-results"), help="folder for JSON and Markdown")


def run(args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = measure(device, args.calls or (500 if device == "cuda" else 20))
    table = markdown_table(rows, ["call", "shape", "host_us"])
    env = environment(device)
    write_results(args.output, "host", {"environment": env, "rows": rows}, table)
    print(f"{env.get('gpu', env.get('cpu'))} host, torch {env['torch']}, triton {env['triton']}\n{table}")
    return 0
