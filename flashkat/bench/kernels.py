"""``flashkat bench kernels``: forward and backward of every implementation against their floors.

Floors, measured on the same tensors in the same process with the same timer: the forward moves
a copy's bytes (read x, write y), the backward GELU's backward's (read x and grad, write dx).
Every backward implementation (``flashkat``, and the baselines ``blocked`` and ``atomic``, see
``flashkat.ops.baselines``) runs on the same tensors; the forward is shared by all of them.

On a GPU each kernel is timed twice (``--timer``): replayed from a CUDA graph (``ms``: GPU time
only; the ratios use it) and from Python (``launch_ms``: what an eager training step sees,
launch overhead included when the CPU is the slower side). On the CPU the op runs the float64
reference, which is what is timed ("cpu-reference"); under ``TRITON_INTERPRET=1`` the Triton
kernels also run, as a functional check whose times are not speeds.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import flashkat.ops.baselines  # noqa: F401  (registers the "blocked" and "atomic" backwards)
from flashkat import reference
from flashkat.bench.harness import environment, interpreting, markdown_table, time_ms, write_results
from flashkat.ops import group_rational as op

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("flashkat", "blocked", "atomic")
GPU_DIMS = (192, 384, 768, 1536, 3072)
GPU_TOKENS = 128 * 197  # the ViT token grid at batch 128
ODD_SHAPE = (1000 * 37, 200)  # rows and channels that fit no tile: catches tail handling
CPU_DIMS = (32, 64)
CPU_TOKENS = 256
CPU_LABEL = "cpu-reference"
INTERPRETER_NOTE = "interpreter: not a speed"

# A small, deliberate list of launch settings tried by --sweep, each a change to the defaults
# (``op._TUNING``, the first entry): the alternatives measured in docs/BENCHMARKS.md, steps 11-21.
SWEEP = [
    {},
    {"backward_capped_waves": 4},  # fewer resident backward programs
    {"backward_capped_waves": 8, "backward_maxnreg": 64},  # more, with fewer registers each
    {"backward_elements_16bit": 2048},  # two 16-byte loads per thread and tensor
    {"forward_capped_waves": 16, "forward_maxnreg": 32},  # more resident 16-bit forward programs
    {"forward_maxnreg": 0, "forward_waves": 8},  # 16-bit forward without a register cap
    {"reduce_rows": 256, "reduce_warps": 4, "pdl": False},  # step 16's final reduction, as before
    {"reduce_warps": 8},  # step 21's final reduction, as before
    {"shared_sums_32bit": True},  # float32 running sums shared by 4 columns (faster, less accurate)
]


def kat_coefficients(device: str, order: tuple[int, int] = (5, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """KAT's layer shape: one shared numerator, eight denominators (of order (5, 4) unless told)."""
    generator = torch.Generator().manual_seed(0)
    m, n = order
    a = torch.randn(1, m + 1, generator=generator) * 0.3 / (1 + torch.arange(m + 1))
    b = torch.randn(8, n, generator=generator) * 0.3 / (1 + torch.arange(n))
    return a.to(device), b.to(device)


def kernels(impl: str) -> tuple[Callable, Callable]:
    """(forward(x, a, b), backward(g, x, a, b)) run for ``impl``: the reference for the CPU label."""
    if impl == CPU_LABEL:
        return reference.forward, reference.backward
    return op.triton_forward, op.BACKWARDS[impl]


def default_impls(device: str) -> list[str]:
    """What this machine can run: every Triton implementation on a GPU; on the CPU the reference,
    plus the Triton kernels when they run under the interpreter."""
    if device == "cuda":
        return list(IMPLS)
    return [CPU_LABEL] + (list(IMPLS) if interpreting() else [])


# Above this GPU time, launch overhead is noise: the Python-launch timing is skipped (saves minutes
# of the slow atomic kernel).
LAUNCH_TIMING_BELOW_MS = 2.0


def _timings(fn: Callable[[], object], device: str, rep_ms: int, timer: str) -> dict:
    """{"ms": ..., "launch_ms": ...} as asked: "ms" is the CUDA-graph time on a GPU unless the timer
    is "launch"; on the CPU both are the wall clock."""
    if device != "cuda":
        wall = time_ms(fn, device, rep_ms=rep_ms)
        return {"ms": wall, "launch_ms": wall}
    out = {}
    if timer in ("graph", "both"):
        out["ms"] = time_ms(fn, device, rep_ms=rep_ms, cuda_graph=True)
    if timer == "launch" or (timer == "both" and out["ms"] < LAUNCH_TIMING_BELOW_MS):
        out["launch_ms"] = time_ms(fn, device, rep_ms=rep_ms)
    out.setdefault("ms", out.get("launch_ms"))
    return out


def measure(
    tokens: int, D: int, dtype: torch.dtype, device: str, impls: list[str], rep_ms: int = 100, timer: str = "both"
) -> list[dict]:
    """Rows for x of shape (tokens, D): the floors, the forward, and each implementation's backward."""
    x = torch.randn(tokens, D, device=device).to(dtype)
    g = torch.randn(tokens, D, device=device).to(dtype)
    y = torch.empty_like(x)
    a, b = kat_coefficients(device)
    gelu_backward = torch.ops.aten.gelu_backward.default
    floors = {
        "copy": _timings(lambda: y.copy_(x), device, rep_ms, timer),
        "gelu_backward": _timings(lambda: gelu_backward(g, x), device, rep_ms, timer),
    }
    nbytes = x.numel() * x.element_size()
    cases = []  # (kernel, impl, fn, floor, bytes moved)
    if CPU_LABEL in impls:
        cases.append(("forward", CPU_LABEL, lambda: reference.forward(x, a, b), "copy", 2 * nbytes))
    if any(impl != CPU_LABEL for impl in impls):  # one Triton forward serves every implementation
        cases.append(("forward", "all", lambda: op.triton_forward(x, a, b), "copy", 2 * nbytes))
    for impl in impls:
        backward = kernels(impl)[1]
        cases.append(("backward", impl, lambda backward=backward: backward(g, x, a, b), "gelu_backward", 3 * nbytes))
    rows = []
    for kernel, impl, fn, floor, moved in cases:
        row = {"shape": f"{tokens}x{D}", "dtype": str(dtype).replace("torch.", ""), "kernel": kernel, "impl": impl,
               "floor": floor, "note": INTERPRETER_NOTE if device != "cuda" and impl != CPU_LABEL else ""}  # fmt: skip
        row.update(_timings(fn, device, rep_ms, timer))
        row["floor_ms"] = floors[floor]["ms"]
        if "launch_ms" in floors[floor]:
            row["floor_launch_ms"] = floors[floor]["launch_ms"]
        row["x_floor"] = row["ms"] / row["floor_ms"]
        row["GBps"] = moved / row["ms"] / 1e6
        row["floor_GBps"] = moved / row["floor_ms"] / 1e6
        rows.append(row)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dims", type=int, nargs="+", help="channel sizes D (default: the ViT sizes on a GPU)")
    parser.add_argument("--tokens", type=int, help=f"rows of x (default {GPU_TOKENS} on a GPU, {CPU_TOKENS} on the CPU)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16", "fp16"])
    parser.add_argument("--impls", nargs="+", help="backward implementations (default: all; with --sweep: flashkat)")
    parser.add_argument("--no-odd", action="store_true", help=f"skip the odd shape {ODD_SHAPE[0]}x{ODD_SHAPE[1]}")
    parser.add_argument("--timer", choices=["graph", "launch", "both"], default="both",
                        help="GPU timer: CUDA-graph replay (GPU time), Python launch (do_bench), or both")  # fmt: skip
    parser.add_argument("--sweep", action="store_true", help="also time each launch setting in SWEEP")
    parser.add_argument("--output", type=Path, default=Path("bench-results"), help="folder for JSON and Markdown")
    parser.add_argument("--rep-ms", type=int, default=100, help="measuring time per timing")


def run(args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = args.tokens or (GPU_TOKENS if device == "cuda" else CPU_TOKENS)
    shapes = [(tokens, D) for D in (args.dims or (GPU_DIMS if device == "cuda" else CPU_DIMS))]
    if device == "cuda" and not args.no_odd and not args.dims:
        shapes.append(ODD_SHAPE)
    impls = args.impls or (["flashkat"] if args.sweep and device == "cuda" else default_impls(device))
    unknown = [i for i in impls if i not in op.BACKWARDS and i != CPU_LABEL]
    if unknown:
        raise SystemExit(f"bench kernels: unknown or unavailable implementation(s) {unknown} on {device}")
    settings = SWEEP if args.sweep else [dict(op._TUNING)]
    default = dict(op._TUNING)
    rows = []
    cases = list(itertools.product(range(len(settings)), shapes, args.dtypes))
    try:
        for setting, (S, D), dtype in tqdm(cases, desc="bench kernels", unit="shape"):
            op._TUNING.clear()
            op._TUNING.update(default, **settings[setting])
            op._clear_caches()
            for row in measure(S, D, DTYPES[dtype], device, impls, args.rep_ms, args.timer):
                rows.append({"setting": setting, **row})
    finally:
        op._TUNING.clear()
        op._TUNING.update(default)
        op._clear_caches()
    columns = ["shape", "dtype", "kernel", "impl", "ms", "floor", "floor_ms", "x_floor", "GBps"]
    if device == "cuda" and args.timer == "both":
        columns.append("launch_ms")
    if device != "cuda":
        columns.append("note")
    table = markdown_table(rows, (["setting"] if args.sweep else []) + columns)
    env = environment(device)
    timer = args.timer if device == "cuda" else "wall clock"
    payload = {"environment": env, "timer": timer, "impls": impls, "settings": settings, "rows": rows}
    write_results(args.output, "kernels", payload, table)
    heading = f"{env.get('gpu', env.get('cpu'))}, torch {env['torch']}, triton {env['triton']}, timer: {timer}"
    if device != "cuda":
        heading += " (CPU: the op runs the float64 reference here; interpreter rows are not speeds)"
    print(f"{heading}\n{table}")
    return 0
