"""``flashkat analyze``: the FlashKAT paper's analysis of KAT, re-run on this machine, as a report.

Writes ``report.md``, ``analyze.json`` and PNG plots into ``--output``:

1. ``slowdown``: training throughput of KAT next to the same-size ViT, per backward
   implementation (``flashkat``, FlashKAT's ``blocked``, KAT's ``atomic``).
2. ``flops``: the arithmetic per element raised several-fold while the bytes stay the same
   (higher rational orders; and for the baselines, the same math repeated ``work`` times with
   the same atomics). Time barely moves: the kernels wait on memory, not on arithmetic.
3. ``fwd_bwd``: forward vs backward time of the GR-KAN layer, next to their floors.
4. ``rounding``: rounding error of the coefficient gradients of each implementation against a
   float64 reference, over seeds, and whether two runs give bitwise identical results.
5. ``ncu``: where Nsight Compute is installed, DRAM throughput and the main warp stall reasons
   of each backward kernel.

On the CPU everything runs at small sizes with honest labels: timings are of the float64
reference the op runs there; Triton kernels only run under ``TRITON_INTERPRET=1``, and then only
for the rounding checks (the interpreter's times are not speeds, and its atomics are sequential).
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import flashkat.ops.baselines as baselines
from flashkat import reference
from flashkat.bench import kernels as kbench
from flashkat.bench import model as mbench
from flashkat.bench.harness import environment, interpreting, markdown_table, time_ms
from flashkat.ops import group_rational as op

SECTIONS = ("slowdown", "flops", "fwd_bwd", "rounding", "ncu")
IMPLS = kbench.IMPLS
CPU_LABEL = kbench.CPU_LABEL
ORDERS = ((5, 4), (10, 8), (15, 12))  # (20, 16) would spill registers: no longer the same kernel
WORKS = (1, 2, 4, 8)
# Rounding error of the public kernels against float64 (SPEC.md section 3): (dA, dB) relative L2.
PUBLIC_REL_L2 = {"atomic": ("KAT Triton", 2.6e-5, 5.8e-5), "blocked": ("FlashKAT", 5.6e-7, 5.6e-7)}
# Kernel times of the public code (SPEC.md section 5: H100, fp32, x of shape 128x197xD), in ms.
PUBLIC_MS = {
    192: {"copy": 0.018, "gelu_backward": 0.026, "KAT Triton fwd": 0.020, "KAT Triton bwd": 23.1,
          "FlashKAT fwd": 0.027, "FlashKAT bwd": 0.247},
    768: {"copy": 0.057, "gelu_backward": 0.083, "KAT Triton fwd": 0.066, "KAT Triton bwd": 102.3,
          "FlashKAT fwd": 0.097, "FlashKAT bwd": 0.279},
    3072: {"copy": 0.209, "gelu_backward": 0.310, "KAT Triton fwd": 0.246, "KAT Triton bwd": 398.6,
           "FlashKAT fwd": 0.370, "FlashKAT bwd": 0.634},
}  # fmt: skip
# Which public kernel each of our kernels re-creates (the forward: the fastest public one).
PUBLIC_COUNTERPART = {("backward", "atomic"): "KAT Triton bwd", ("backward", "blocked"): "FlashKAT bwd",
                      ("forward", "all"): "KAT Triton fwd"}  # fmt: skip
KERNEL_NAMES = {"flashkat": "_backward_kernel", "blocked": "_blocked_backward_kernel",
                "atomic": "_atomic_backward_kernel"}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _plot(out: Path, filename: str, draw: Callable) -> str | None:
    """Save the figure ``draw(plt)`` returns as ``out/filename``; None where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = draw(plt)
    fig.tight_layout()
    fig.savefig(out / filename, dpi=120)
    plt.close(fig)
    return filename


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pm(values: tuple[float, float]) -> str:
    return f"{values[0]:.3g} ± {values[1]:.2g}"


def _section(title: str, text: str, table: str = "", data=None, plot: str | None = None) -> dict:
    return {"title": title, "text": text, "table": table, "data": data, "plot": plot}


def flops_per_element(m: int, n: int, kernel: str, work: int = 1) -> int:
    """Estimated floating-point operations per element (an FMA counts 2), from the kernels' code.

    Forward: Horner for P and Q, |x|, a reciprocal and a product. Backward, per evaluation: P, Q,
    P', Q' by Horner, the powers and products of the m+1+n terms, and ~8 for 1/Q, F, g/Q and dx;
    then one add per term to accumulate (and, with ``work``, one per term to feed the next one).
    """
    if kernel == "forward":
        return 2 * (m + n) + 4
    evaluation = 6 * (m + n) + 8
    return work * evaluation + work * (m + 1 + n)


def _backward(impl: str) -> Callable:
    return kbench.kernels(impl)[1]


def _timer(device: str, rep_ms: int) -> Callable[[Callable], float]:
    """CUDA-graph GPU time on a GPU (launch overhead would hide the kernels), wall clock on the CPU."""
    return lambda fn: time_ms(fn, device, rep_ms=rep_ms, cuda_graph=device == "cuda")


# ----------------------------------------------------------------------------------------------
# 1. KAT vs ViT training slowdown
# ----------------------------------------------------------------------------------------------


def slowdown(args, device: str, out: Path) -> dict:
    gpu = device == "cuda"
    impls = list(IMPLS) if gpu else [CPU_LABEL]
    model_args = mbench.parse_model_args(args.model_args, device)
    try:
        rows = mbench.benchmark(
            sizes=[args.model_size], impls=impls, dtypes=[args.model_dtype], modes=["eager"],
            batch=args.batch or (128 if gpu else 4), device=device, warmup=2 if gpu else 1,
            steps=args.steps or (10 if gpu else 2), atomic_steps=args.atomic_steps, model_args=model_args,
            desc="slowdown",
        )  # fmt: skip
    except (ImportError, RuntimeError) as error:  # e.g. no KAT models registered
        return _section("KAT vs ViT training throughput", f"Skipped: {error}")
    for row in rows:
        row["slowdown"] = 1 / row["vs_vit"] if "vs_vit" in row else 1.0
    table = markdown_table(rows, ["model", "impl", "dtype", "batch", "images_per_s", "vs_vit", "slowdown", "steps"])

    def draw(plt):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = [r["model"].split("_patch")[0] + ("" if r["impl"] == "-" else f"\n{r['impl']}") for r in rows]
        colors = ["#777"] + ["#1f77b4", "#ff7f0e", "#d62728"][: len(rows) - 1]  # ViT grey, then each impl
        bars = ax.bar(labels, [r["images_per_s"] for r in rows], color=colors)
        for bar, row in zip(bars, rows):
            ax.annotate(f"{row['images_per_s']:.3g}/s\n{row['slowdown']:.3g}x slower" if row["impl"] != "-" else
                        f"{row['images_per_s']:.3g}/s", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)  # fmt: skip
        ax.set_yscale("log")
        ax.set_ylim(min(r["images_per_s"] for r in rows) / 3, max(r["images_per_s"] for r in rows) * 3)
        ax.set_ylabel("training images/s (log)")
        ax.set_title(f"{args.model_size}: one training step, {args.model_dtype} autocast, AdamW ({device})", fontsize=9)
        return fig

    plot = _plot(out, "slowdown.png", draw)
    if gpu:
        text = ("Training throughput (forward, backward, AdamW step; eager) of KAT with each backward "
                "implementation next to the same-size timm ViT, same batch and dtype. The slowdown is "
                "the ViT's images/s over KAT's. SPEC.md section 5 measured on the public code (H100, "
                "fp16): ViT-T 4976, FlashKAT-T 3666 (0.74x), KAT-T 83 img/s (60x slower).")  # fmt: skip
        if model_args:
            text += f" Model overrides: {model_args}."
        text += " Here: " + "; ".join(f"KAT with `{r['impl']}` {r['slowdown']:.3g}x slower than the ViT"
                                       for r in rows if r["impl"] != "-") + "."  # fmt: skip
    else:
        text = ("CPU: a small model (" + ", ".join(f"{k}={v}" for k, v in model_args.items()) + "); the op runs "
                "its float64 reference here for every implementation, so no implementation's slowdown can "
                "show: the slowdown is a GPU phenomenon.")  # fmt: skip
    return _section("KAT vs ViT training throughput", text, table, rows, plot)


# ----------------------------------------------------------------------------------------------
# 2. The FLOPs experiment
# ----------------------------------------------------------------------------------------------


def flops(args, device: str, out: Path) -> dict:
    gpu = device == "cuda"
    tokens, D = _shape(args, device)
    timer = _timer(device, args.rep_ms)
    x = torch.randn(tokens, D, device=device)
    g = torch.randn(tokens, D, device=device)
    impls = list(IMPLS) if gpu else [CPU_LABEL]
    cases = []  # (series, kernel, impl, order, work)
    for order in ORDERS:
        cases.append(("order", "forward", "all" if gpu else CPU_LABEL, order, 1))
        cases += [("order", "backward", impl, order, 1) for impl in impls]
    if gpu:  # the repeated-math variant exists for the Triton baselines only
        cases += [("work", "backward", impl, (5, 4), w) for impl in ("blocked", "atomic") for w in WORKS]
    rows = []
    for series, kernel, impl, (m, n), work in tqdm(cases, desc="flops", unit="timing", leave=False):
        a, b = kbench.kat_coefficients(device, (m, n))
        if kernel == "forward":
            fn = (lambda: op.triton_forward(x, a, b)) if gpu else (lambda: reference.forward(x, a, b))
        elif work > 1:
            launcher = baselines.atomic_backward if impl == "atomic" else baselines.blocked_backward
            fn = lambda: launcher(g, x, a, b, work=work)  # noqa: E731
        else:
            backward = _backward(impl)
            fn = lambda: backward(g, x, a, b)  # noqa: E731
        rows.append({"series": series, "kernel": kernel, "impl": impl, "order": f"{m}/{n}", "work": work,
                     "flops_per_element": flops_per_element(m, n, kernel, work), "ms": timer(fn)})  # fmt: skip
    for row in rows:  # relative to the same kernel and implementation at order 5/4, work 1
        base = next(r for r in rows if r["series"] == row["series"] and r["kernel"] == row["kernel"]
                    and r["impl"] == row["impl"] and r["order"] == "5/4" and r["work"] == 1)  # fmt: skip
        row["arithmetic_x"] = row["flops_per_element"] / base["flops_per_element"]
        row["time_x"] = row["ms"] / base["ms"]
        row["atomics_per_element"] = _atomics_per_element(row)
    table = markdown_table(rows, ["series", "kernel", "impl", "order", "work", "flops_per_element", "arithmetic_x",
                                  "ms", "time_x", "atomics_per_element"])  # fmt: skip

    def draw(plt):
        series = ["order", "work"] if gpu else ["order"]
        fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.8), squeeze=False)
        for ax, name in zip(axes[0], series):
            chosen = [r for r in rows if r["series"] == name]
            top = max(r["arithmetic_x"] for r in chosen)
            ax.plot([1, top], [1, top], "k--", lw=1, label="time ∝ arithmetic")
            for kernel, impl in dict.fromkeys((r["kernel"], r["impl"]) for r in chosen):
                line = [r for r in chosen if r["kernel"] == kernel and r["impl"] == impl]
                ax.plot([r["arithmetic_x"] for r in line], [r["time_x"] for r in line], "o-",
                        label=f"{kernel} ({impl})")  # fmt: skip
            ax.set_xlabel("arithmetic per element (x, estimated FLOPs)")
            ax.set_ylabel("time (x)")
            ax.set_title("higher order (m, n)" if name == "order" else "same math repeated (work)", fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle(f"x of shape {tokens}x{D}, fp32 ({device})", fontsize=9)
        return fig

    plot = _plot(out, "flops.png", draw)
    text = (f"x and grad of shape {tokens}x{D}, fp32. Two ways to raise the arithmetic per element while the "
            "bytes read and written stay the same: a higher rational order (m, n) = "
            + ", ".join(f"({m}, {n})" for m, n in ORDERS) + " (every implementation; the atomic one also adds "
            "an atomic per extra coefficient), and, for the Triton baselines, the same per-element math done "
            "`work` times with the same atomics. `arithmetic_x` and `time_x` are relative to order (5, 4), "
            "work 1 of the same kernel. A kernel limited by arithmetic would follow the dashed line; one "
            "limited by memory (or by atomics) stays flat.")  # fmt: skip
    for kernel, impl, series in dict.fromkeys((r["kernel"], r["impl"], r["series"]) for r in rows):
        last = [r for r in rows if (r["kernel"], r["impl"], r["series"]) == (kernel, impl, series)][-1]
        text += (f" {kernel} ({impl}, {series}): {last['arithmetic_x']:.2g}x the arithmetic took "
                 f"{last['time_x']:.2g}x the time.")  # fmt: skip
    if not gpu:
        text += (" CPU: the float64 reference (what the op runs here) is timed; it computes in float64 on "
                 "whole tensors, so it is closer to the dashed line than a GPU kernel.")  # fmt: skip
    return _section("The FLOPs experiment: more arithmetic per element, same bytes", text, table, rows, plot)


def _atomics_per_element(row: dict) -> int:
    """Global atomics each element causes: m+1+n for KAT's design, about none for the others."""
    m, n = map(int, row["order"].split("/"))
    return m + 1 + n if row["impl"] == "atomic" and row["kernel"] == "backward" else 0


def _shape(args, device: str) -> tuple[int, int]:
    if device == "cuda":
        return args.tokens or kbench.GPU_TOKENS, args.dim or 768
    return args.tokens or 256, args.dim or 64


# ----------------------------------------------------------------------------------------------
# 3. Forward vs backward
# ----------------------------------------------------------------------------------------------


def fwd_bwd(args, device: str, out: Path) -> dict:
    gpu = device == "cuda"
    tokens = _shape(args, device)[0]
    dims = args.dims or (kbench.GPU_DIMS if gpu else kbench.CPU_DIMS)
    impls = list(IMPLS) if gpu else [CPU_LABEL]
    measured, rows = [], []
    for D in tqdm(dims, desc="fwd_bwd", unit="shape", leave=False):
        found = kbench.measure(tokens, D, torch.float32, device, impls, args.rep_ms, timer="graph")
        measured += found
        forward = next(r for r in found if r["kernel"] == "forward")
        row = {"shape": f"{tokens}x{D}", "copy_ms": forward["floor_ms"], "fwd_ms": forward["ms"],
               "gelu_bwd_ms": next(r for r in found if r["kernel"] == "backward")["floor_ms"]}  # fmt: skip
        for r in found:
            if r["kernel"] == "backward":
                row[f"bwd_{r['impl']}_ms"] = r["ms"]
                row[f"bwd/fwd_{r['impl']}"] = r["ms"] / forward["ms"]
        rows.append(row)
    columns = ["shape", "copy_ms", "fwd_ms", "gelu_bwd_ms", *(f"bwd_{i}_ms" for i in impls), *(f"bwd/fwd_{i}" for i in impls)]
    table = markdown_table(rows, columns)

    def draw(plt):
        fig, ax = plt.subplots(figsize=(7, 3.8))
        bars = ["copy_ms", "fwd_ms", "gelu_bwd_ms"] + [f"bwd_{i}_ms" for i in impls]
        width = 0.8 / len(bars)
        for k, key in enumerate(bars):
            floor = key in ("copy_ms", "gelu_bwd_ms")
            ax.bar([d + k * width for d in range(len(dims))], [r[key] for r in rows], width,
                   label=key.replace("_ms", "").replace("_", " "), hatch="//" if floor else None)  # fmt: skip
        ax.set_xticks([d + 0.4 - width / 2 for d in range(len(dims))], [r["shape"] for r in rows], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title(f"GR-KAN forward and backward, fp32, floors hatched ({device})", fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        return fig

    plot = _plot(out, "fwd_bwd.png", draw)
    public = compare_with_public(measured, tokens) if gpu else []
    if public:
        table += ("\n\nAgainst the public code (SPEC.md section 5, H100, fp32), each time also as a multiple "
                  "of its own floor measured in the same run:\n\n" + markdown_table(public, list(public[0])))  # fmt: skip
    text = ("Forward and backward of the GR-KAN layer (KAT's shape: 1 numerator, 8 denominators, order 5/4) "
            "in fp32, with their floors: a copy (what the forward must move) and GELU's backward (what the "
            "backward must move). The forward is shared by every implementation; only the backward differs.")  # fmt: skip
    for row in rows:
        text += f" {row['shape']}: backward/forward " + ", ".join(
            f"{i} {row[f'bwd/fwd_{i}']:.3g}x" for i in impls) + "."  # fmt: skip
    if not gpu:
        text += " CPU: the float64 reference, timed with a wall clock."
    return _section("Forward vs backward", text, table, {"summary": rows, "rows": measured, "public": public}, plot)


def compare_with_public(measured: list[dict], tokens: int) -> list[dict]:
    """Our re-created kernels next to the public ones they mirror, as ms and as multiples of the floor."""
    rows = []
    for r in measured:
        D = int(r["shape"].split("x")[1])
        name = PUBLIC_COUNTERPART.get((r["kernel"], r["impl"]))
        if tokens != kbench.GPU_TOKENS or D not in PUBLIC_MS or name is None:
            continue
        public_ms, public_floor = PUBLIC_MS[D][name], PUBLIC_MS[D][r["floor"]]
        rows.append({"shape": r["shape"], "kernel": r["kernel"], "impl": r["impl"], "ms": r["ms"],
                     "x_floor": r["x_floor"], "public": name, "public_ms": public_ms,
                     "public_x_floor": public_ms / public_floor, "ms / public_ms": r["ms"] / public_ms})  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------
# 4. Rounding error and determinism
# ----------------------------------------------------------------------------------------------


def rounding(args, device: str, out: Path) -> dict:
    gpu = device == "cuda"
    if not gpu and not interpreting():
        return _section("Rounding error of the coefficient gradients",
                        "Skipped: no GPU and no Triton interpreter (TRITON_INTERPRET=1), so only the float64 "
                        "reference runs here, whose error is zero by definition.")  # fmt: skip
    tokens, D = _shape(args, device) if gpu else (args.tokens or 4 * 37, args.dim or 64)
    a, b = kbench.kat_coefficients(device)
    found = {impl: {"da_mae": [], "da_rel_l2": [], "db_mae": [], "db_rel_l2": [], "dx_rel_l2": [], "equal": []}
             for impl in IMPLS}  # fmt: skip
    cases = [(seed, impl) for seed in range(args.seeds) for impl in IMPLS]
    expected, last_seed = None, None
    for seed, impl in tqdm(cases, desc="rounding", unit="run", leave=False):
        generator = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(tokens, D, device=device, generator=generator)
        g = torch.randn(tokens, D, device=device, generator=generator)
        if seed != last_seed:
            expected, last_seed = reference.backward(g.double(), x.double(), a.double(), b.double()), seed
        backward = _backward(impl)
        first, second = backward(g, x, a, b), backward(g, x, a, b)
        stats = found[impl]
        stats["equal"].append(all(torch.equal(u, v) for u, v in zip(first, second)))
        for name, got, want in zip(("dx", "da", "db"), first, expected):
            diff = got.double() - want
            stats[f"{name}_rel_l2"].append((diff.norm() / want.norm()).item())
            if name != "dx":
                stats[f"{name}_mae"].append(diff.abs().mean().item())
    rows = []
    for impl, stats in found.items():
        row = {"impl": impl, "runs": 2 * args.seeds, "bitwise_equal_pairs": f"{sum(stats['equal'])}/{args.seeds}"}
        for key in ("da_mae", "da_rel_l2", "db_mae", "db_rel_l2", "dx_rel_l2"):
            row[key] = _mean_std(stats[key])
            row[key.replace("_", " ", 1).replace("_", " ")] = _pm(row[key])
        public = PUBLIC_REL_L2.get(impl)
        row["public code (dA / dB rel L2)"] = f"{public[0]}: {public[1]:.2g} / {public[2]:.2g}" if public else "-"
        rows.append(row)
    table = markdown_table(rows, ["impl", "da mae", "da rel l2", "db mae", "db rel l2", "bitwise_equal_pairs",
                                  "public code (dA / dB rel L2)"])  # fmt: skip
    def draw(plt):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        width = 0.38
        for k, key in enumerate(("da_rel_l2", "db_rel_l2")):
            ax.bar([i + k * width for i in range(len(rows))], [r[key][0] for r in rows], width,
                   yerr=[[min(r[key][1], 0.9 * r[key][0]) for r in rows], [r[key][1] for r in rows]],  # log axis: > 0
                   capsize=3, label=key.replace("_rel_l2", ": relative L2"))  # fmt: skip
        ax.set_xticks([i + width / 2 for i in range(len(rows))], [r["impl"] for r in rows])
        ax.set_yscale("log")
        ax.set_ylabel("error vs float64 (log)")
        ax.set_title(f"coefficient gradients, x of shape {tokens}x{D} fp32, {args.seeds} seeds ({device})", fontsize=9)
        ax.legend(fontsize=8)
        return fig

    plot = _plot(out, "rounding.png", draw)
    text = (f"x and grad ~ N(0, 1) of shape {tokens}x{D}, fp32, KAT's layer (1 numerator, 8 denominators); "
            f"{args.seeds} seeds. Errors of d numerator (dA) and d denominator (dB) against the float64 "
            "reference: mean absolute error and relative L2, mean ± std over seeds. Each implementation "
            "ran twice per seed on the same tensors: `bitwise_equal_pairs` counts the seeds whose two runs "
            "were identical (dx, dA and dB).")  # fmt: skip
    ours = next(r for r in rows if r["impl"] == "flashkat")
    for row in rows:
        if row["impl"] != "flashkat":
            text += (f" `{row['impl']}`: dA relative L2 {row['da_rel_l2'][0] / ours['da_rel_l2'][0]:.2g}x and dB "
                     f"{row['db_rel_l2'][0] / ours['db_rel_l2'][0]:.2g}x those of `flashkat`.")  # fmt: skip
    if not gpu:
        text += (" CPU: the Triton kernels under the interpreter, which applies atomics one after another "
                 "in a fixed order, so the atomic designs look deterministic here; on a GPU they are not.")  # fmt: skip
    clean = [{k: v for k, v in r.items() if " " not in k} for r in rows]
    return _section("Rounding error of the coefficient gradients", text, table, clean, plot)


# ----------------------------------------------------------------------------------------------
# 5. Nsight Compute
# ----------------------------------------------------------------------------------------------


def find_ncu() -> str | None:
    """The ``ncu`` executable: on PATH, or in the usual CUDA install folder."""
    found = shutil.which("ncu")
    if found:
        return found
    candidates = ["/usr/local/cuda/bin/ncu", *sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"), reverse=True)]
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def parse_ncu_csv(text: str) -> dict:
    """Metrics of the profiled kernel from ``ncu --csv --page raw`` output: {metric: value}.

    Returns {"dram_pct", "duration_us", "stalls": {reason: warps per issue}, "metrics": {...}}.
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError("no CSV table in ncu's output")
    table = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header, data = table[0], [r for r in table[1:] if r and r[0].strip().isdigit()]
    if not data:
        raise ValueError("ncu's CSV has no kernel rows")
    metrics = {}
    for name, value in zip(header, data[0]):
        try:
            metrics[name] = float(value.replace(",", ""))
        except ValueError:
            metrics[name] = value
    stalls = {}
    for name, value in metrics.items():
        match = re.match(r"smsp__average_warps?_issue_stalled_(\w+?)_per_issue_active", name)
        if match and isinstance(value, float) and match.group(1) not in ("selected", "not_selected"):
            stalls[match.group(1)] = value
    duration = metrics.get("gpu__time_duration.sum")
    return {
        # the Speed Of Light section names it gpu__dram_throughput on Hopper, dram__throughput elsewhere
        "dram_pct": next((v for k, v in metrics.items() if k.endswith("dram__throughput.avg.pct_of_peak_sustained_elapsed")
                          or k.endswith("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed")), None),
        "duration_us": duration / 1000 if isinstance(duration, float) else None,  # ncu reports ns
        "stalls": dict(sorted(stalls.items(), key=lambda kv: -kv[1])),
        "metrics": metrics,
    }


def _ncu_child(impl: str, D: int, tokens: int) -> int:
    """Run one backward twice (the first compiles; ncu profiles the second)."""
    x = torch.randn(tokens, D, device="cuda")
    g = torch.randn(tokens, D, device="cuda")
    a, b = kbench.kat_coefficients("cuda")
    for _ in range(2):
        _backward(impl)(g, x, a, b)
    torch.cuda.synchronize()
    return 0


def ncu(args, device: str, out: Path) -> dict:
    title = "Nsight Compute: memory throughput and warp stalls of each backward"
    executable = find_ncu()
    if device != "cuda" or executable is None:
        why = "no GPU" if device != "cuda" else "`ncu` (Nsight Compute) is not on PATH"
        return _section(title, f"Skipped: {why}.")
    tokens, D = _shape(args, device)
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    rows, errors = [], {}
    for impl in tqdm(IMPLS, desc="ncu", unit="kernel", leave=False):
        command = [executable, "--target-processes", "all", "--kernel-name", f"regex:^{KERNEL_NAMES[impl]}",
                   "--launch-skip", "1", "--launch-count", "1", "--clock-control", "none", "--section", "SpeedOfLight",
                   "--section", "MemoryWorkloadAnalysis", "--section", "WarpStateStats", "--csv", "--page", "raw",
                   sys.executable, "-m", "flashkat.cli", "analyze", "--ncu-child", impl, "--dim", str(D),
                   "--tokens", str(tokens)]  # fmt: skip
        done = None
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.ncu_timeout, env=env)
            parsed = parse_ncu_csv(done.stdout)
        except (subprocess.TimeoutExpired, ValueError, OSError) as error:
            detail = (done.stdout[-300:] + done.stderr[-300:]).strip() if done is not None else ""
            errors[impl] = f"{type(error).__name__}: {error} {detail}".strip()
            continue
        top = list(parsed["stalls"].items())[:3]
        rows.append({"impl": impl, "kernel": KERNEL_NAMES[impl], "duration_us": parsed["duration_us"],
                     "dram_pct": parsed["dram_pct"],
                     "top stalls (warps per issue)": ", ".join(f"{k} {v:.3g}" for k, v in top),
                     "stalls": parsed["stalls"]})  # fmt: skip
    columns = ["impl", "kernel", "duration_us", "dram_pct", "top stalls (warps per issue)"]
    table = markdown_table(rows, columns) if rows else ""
    text = (f"`{executable}` profiled each backward kernel once (x of shape {tokens}x{D}, fp32): DRAM "
            "throughput as % of peak, and the warp stall reasons with the most warps stalled per issued "
            "instruction (long_scoreboard: waiting on global memory; lg_throttle: the memory instruction "
            "queue is full; membar/drain: memory ordering, as atomics with acq_rel semantics need).")  # fmt: skip
    if errors:
        text += " Failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items())
    return _section(title, text, table, {"rows": rows, "errors": errors})


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

RUNNERS = {"slowdown": slowdown, "flops": flops, "fwd_bwd": fwd_bwd, "rounding": rounding, "ncu": ncu}


def write_report(out: Path, env: dict, results: dict) -> str:
    card = env.get("gpu") or f"CPU {env.get('cpu')}"
    lines = [
        "# GR-KAN analysis",
        "",
        f"{card}; torch {env['torch']}, triton {env['triton']}, python {env['python']}"
        + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
        + ("; Triton interpreter on (functional checks only)" if env.get("triton_interpret") else "")
        + ".",
        "",
        "Implementations: " + "; ".join(f"`{k}`: {v}" for k, v in baselines.IMPLEMENTATIONS.items()) + ".",
        "",
    ]
    for number, (name, section) in enumerate(results.items(), 1):
        lines += [f"## {number}. {section['title']}", "", section["text"], ""]
        if section["table"]:
            lines += [section["table"], ""]
        if section["plot"]:
            lines += [f"![{name}]({section['plot']})", ""]
        elif section["table"] and name != "ncu":
            lines += ["(No plot: matplotlib is not installed.)", ""]
    report = "\n".join(lines)
    (out / "report.md").write_text(report)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, default=Path("analysis"), help="folder for report.md, JSON and PNGs")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--tokens", type=int, help="rows of x (default 128*197 on a GPU; small on the CPU)")
    parser.add_argument("--dim", type=int, help="channels D for flops, rounding and ncu (default 768; 64 on the CPU)")
    parser.add_argument("--dims", type=int, nargs="+", help="channel sizes for fwd_bwd (default: the ViT sizes)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds for the rounding errors")
    parser.add_argument("--model-size", choices=mbench.SIZES, default="tiny", help="model size for the slowdown")
    parser.add_argument("--model-dtype", choices=sorted(mbench.DTYPES), default="fp16",
                        help="autocast dtype (the paper's: fp16)")  # fmt: skip
    parser.add_argument("--batch", type=int, help="images per step (default 128 on a GPU, 4 on the CPU)")
    parser.add_argument("--model-args", nargs="+", metavar="KEY=VALUE",
                        help="timm.create_model overrides (default on the CPU: img_size=32 patch_size=8 depth=2)")  # fmt: skip
    parser.add_argument("--steps", type=int, help="timed steps (default 10 on a GPU, 2 on the CPU)")
    parser.add_argument("--atomic-steps", type=int, default=2, help="timed steps for the slow atomic implementation")
    parser.add_argument("--rep-ms", type=int, default=100, help="measuring time per kernel timing")
    parser.add_argument("--ncu-timeout", type=int, default=300, help="seconds per ncu run")
    parser.add_argument("--ncu-child", choices=IMPLS, help=argparse.SUPPRESS)  # what ncu runs


def run(args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.ncu_child:
        tokens, D = _shape(args, device)
        return _ncu_child(args.ncu_child, D, tokens)
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    results = {}
    for name in tqdm(args.sections, desc="analyze", unit="section"):
        results[name] = RUNNERS[name](args, device, out)
    write_report(out, env, results)
    payload = {"environment": env, "sections": {k: {"title": v["title"], "text": v["text"], "data": v["data"],
                                                    "plot": v["plot"]} for k, v in results.items()}}  # fmt: skip
    (out / "analyze.json").write_text(json.dumps(payload, indent=2, default=str))
    for name, section in results.items():
        print(f"\n## {section['title']}\n{section['table'] or section['text']}")
    print(f"\nreport: {out / 'report.md'}")
    return 0
