"""``flashkat bench kernels``: forward and backward of the GR-KAN op against their floors.

Floors, measured on the same tensors in the same process: the forward moves a copy's bytes
(read x, write y), the backward GELU's backward's (read x and grad, write dx).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from tqdm import tqdm

from flashkat.bench.harness import environment, markdown_table, time_ms, write_results
from flashkat.ops import group_rational as op

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_DIMS = (192, 384, 768, 1536, 3072)
CPU_DIMS = (32, 64)

# A small, deliberate list of launch settings tried by --sweep (see docs/BENCHMARKS.md).
SWEEP = [
    dict(backward_elements=e, backward_waves=w, num_warps=nw, forward_elements=f, forward_waves=fw)
    for e, w, nw, f, fw in [
        (512, 4, 4, 1024, 8),
        (512, 8, 4, 2048, 8),
        (1024, 4, 4, 2048, 4),
        (1024, 4, 8, 4096, 8),
        (512, 2, 4, 1024, 16),
        (512, 6, 4, 1024, 12),
    ]
]


def kat_coefficients(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """KAT's layer shape: one shared numerator of order 5, eight denominators of order 4."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(1, 6, generator=generator) * 0.3
    b = torch.randn(8, 4, generator=generator) * 0.3
    return a.to(device), b.to(device)


def measure(tokens: int, D: int, dtype: torch.dtype, device: str, reps_ms: int) -> dict:
    """Forward, backward and their floors for x of shape (tokens, D), in one process."""
    x = torch.randn(tokens, D, device=device).to(dtype)
    g = torch.randn(tokens, D, device=device).to(dtype)
    y = torch.empty_like(x)
    a, b = kat_coefficients(device)
    gelu_backward = torch.ops.aten.gelu_backward.default
    row = {
        "copy_ms": time_ms(lambda: y.copy_(x), device, rep_ms=reps_ms),
        "gelu_bwd_ms": time_ms(lambda: gelu_backward(g, x), device, rep_ms=reps_ms),
        "fwd_ms": time_ms(lambda: op.triton_forward(x, a, b), device, rep_ms=reps_ms),
        "bwd_ms": time_ms(lambda: op.triton_backward(g, x, a, b), device, rep_ms=reps_ms),
    }
    row["fwd_vs_copy"] = row["fwd_ms"] / row["copy_ms"]
    row["bwd_vs_gelu_bwd"] = row["bwd_ms"] / row["gelu_bwd_ms"]
    nbytes = x.numel() * x.element_size()
    row["fwd_GBps"] = 2 * nbytes / row["fwd_ms"] / 1e6
    row["bwd_GBps"] = 3 * nbytes / row["bwd_ms"] / 1e6
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dims", type=int, nargs="+", help="channel sizes D (default: the ViT sizes on a GPU)")
    parser.add_argument("--tokens", type=int, help="rows of x (default 128*197 on a GPU, 512 on the CPU)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16", "fp16"])
    parser.add_argument("--sweep", action="store_true", help="also time each launch setting in SWEEP")
    parser.add_argument("--output", type=Path, default=Path("bench-results"), help="folder for JSON and Markdown")
    parser.add_argument("--rep-ms", type=int, default=100, help="measuring time per timing")


def run(args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dims = args.dims or (GPU_DIMS if device == "cuda" else CPU_DIMS)
    tokens = args.tokens or (128 * 197 if device == "cuda" else 512)
    settings = SWEEP if args.sweep else [dict(op._TUNING)]
    default = dict(op._TUNING)
    rows = []
    cases = list(itertools.product(range(len(settings)), dims, args.dtypes))
    try:
        for setting, D, dtype in tqdm(cases, desc="bench kernels", unit="case"):
            op._TUNING.update(settings[setting])
            op._config.cache_clear()
            row = {"setting": setting, "shape": f"{tokens}x{D}", "dtype": dtype}
            row.update(measure(tokens, D, DTYPES[dtype], device, args.rep_ms))
            rows.append(row)
    finally:
        op._TUNING.update(default)
        op._config.cache_clear()
    columns = ["setting", "shape", "dtype", "copy_ms", "fwd_ms", "fwd_vs_copy", "gelu_bwd_ms", "bwd_ms",
               "bwd_vs_gelu_bwd", "bwd_GBps"]  # fmt: skip
    table = markdown_table(rows, columns if args.sweep else columns[1:])
    env = environment(device)
    write_results(args.output, "kernels", {"environment": env, "settings": settings, "rows": rows}, table)
    print(f"{env}\n{table}")
    return 0
