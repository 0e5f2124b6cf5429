"""LayerNorm followed by the group-rational function, fused: y = F(LayerNorm(x)) over the last dim.

Math: u = (x - mean) * rstd * weight + bias per row (LayerNorm over the D channels, rstd =
1/sqrt(var + eps)), then y = F(u) = P(u)/Q(u) with the group coefficients of
``flashkat.ops.group_rational``. Backward: du = dF/du * g (and the coefficient-gradient terms of
that op, at u), then LayerNorm's backward: d weight = sum du * xhat, d bias = sum du, and
dx = rstd * (du*w - mean_row(du*w) - xhat * mean_row(du*w * xhat)).

Why fused: in KAT's blocks the first rational (``act1``) follows the LayerNorm ``norm2``. Apart,
the LayerNorm writes u and ``act1`` reads it; backward, ``act1`` writes du and the LayerNorm's two
backward kernels read it and x again. Here one kernel reads x and writes y (and two floats per
row), one reads x and g and writes dx, and a tiny one adds the per-program partial sums: per
element 28 fewer bytes with float32 activations (eager autocast), 4 fewer under compile, and three
launches instead of six.

Kernels work on whole rows ([ROWS, BLOCK_D] tiles, BLOCK_D >= D, one column tile), so the row
statistics never leave the program; each program walks down the rows with a fixed stride. The
coefficient-gradient terms are summed per program into float64 partials, reduced in a fixed
order (deterministic, as there); the weight and bias gradients likewise per program (float32
column sums), added in float64 and a fixed order by the same reduction launch.

Range: as ``group_rational``, a program that met any |u| above the op's safe limit redoes its
rows in float64, so huge LayerNorm weights cannot overflow the float32 rational.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from flashkat import reference
from flashkat.ops import group_rational as gr
from flashkat.ops import native

__all__ = ["layer_norm_group_rational", "triton_forward", "triton_backward"]

if gr.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _row_tile(r0, S, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, INDEX_64: tl.constexpr):
        """Rows r0.. of the tile, their mask, element offsets and element mask."""
        rows = r0 + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_D)
        row_mask = rows < S
        if INDEX_64:
            offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]
        else:
            offsets = rows[:, None] * D + cols[None, :]
        return rows, row_mask, offsets, row_mask[:, None] & (cols < D)[None, :]

    @triton.jit
    def _tile_offsets(r0, S, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, INDEX_64: tl.constexpr):
        rows, row_mask, offsets, mask = _row_tile(r0, S, D, ROWS, BLOCK_D, INDEX_64)
        return offsets, mask

    @triton.jit
    def _normalize(x, col_mask, D, eps):
        """(xhat, mean, rstd) of each row of x (masked columns hold 0 and stay 0)."""
        mean = tl.sum(x, axis=1) / D
        centered = tl.where(col_mask[None, :], x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / D + eps)
        return centered * rstd[:, None], mean, rstd

    @triton.jit
    def _parameters(w_ptr, bias_ptr, a_ptr, b_ptr, cpg_a, cpg_b, D, M: tl.constexpr, N: tl.constexpr,
                    BLOCK_D: tl.constexpr, FOLD: tl.constexpr, UNIFORM_A: tl.constexpr, DTYPE: tl.constexpr):  # fmt: skip
        """The LayerNorm's weight and bias as [1, BLOCK_D] rows, the rational's coefficients per
        fold (scalars for a numerator shared by all channels), as DTYPE."""
        cols = tl.arange(0, BLOCK_D)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(DTYPE)[None, :]
        bias = tl.load(bias_ptr + cols, mask=cols < D, other=0.0).to(DTYPE)[None, :]
        fold_mask, group_a, group_b = _folds(cpg_a, cpg_b, D, BLOCK_D, FOLD, UNIFORM_A)
        a = gr._load_coefficients(a_ptr, group_a, fold_mask, M + 1, False, DTYPE, UNIFORM_A)
        b = gr._load_coefficients(b_ptr, group_b, fold_mask, N, True, DTYPE, False)
        return w, bias, a, b

    @triton.jit
    def _folds(cpg_a, cpg_b, D, BLOCK_D: tl.constexpr, FOLD: tl.constexpr, UNIFORM_A: tl.constexpr):
        """Each fold's (FOLD adjacent columns of one group, see group_rational's ``_column_parts``)
        mask and numerator and denominator groups."""
        folds = tl.arange(0, BLOCK_D // FOLD) * FOLD
        return folds < D, 0 if UNIFORM_A else folds // cpg_a, folds // cpg_b

    @triton.jit
    def _forward_kernel(
        x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
        S, D, cpg_a, cpg_b, eps, safe_limit,
        M: tl.constexpr, N: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, FOLD: tl.constexpr,
        UNIFORM_A: tl.constexpr, COMPUTE: tl.constexpr, FAST: tl.constexpr, INDEX_64: tl.constexpr,
    ):  # fmt: skip
        # Traffic per element: x in, y out; per row two floats out (mean, rstd, for the backward).
        col_mask = tl.arange(0, BLOCK_D) < D
        w, bias, a, b = _parameters(w_ptr, bias_ptr, a_ptr, b_ptr, cpg_a, cpg_b, D, M, N, BLOCK_D, FOLD, UNIFORM_A,
                                    COMPUTE)  # fmt: skip
        largest = tl.zeros((ROWS, BLOCK_D // FOLD), dtype=COMPUTE)
        start, step = tl.program_id(0) * ROWS, tl.num_programs(0) * ROWS
        offsets, mask = _tile_offsets(start, S, D, ROWS, BLOCK_D, INDEX_64)
        x_ahead = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        for r0 in range(start, S, step):
            # The next tile is loaded before this one is worked on, so memory latency overlaps work.
            x = x_ahead.to(COMPUTE)
            rows, row_mask, offsets, mask = _row_tile(r0, S, D, ROWS, BLOCK_D, INDEX_64)
            next_offsets, next_mask = _tile_offsets(r0 + step, S, D, ROWS, BLOCK_D, INDEX_64)
            x_ahead = tl.load(x_ptr + next_offsets, mask=next_mask, other=0.0)
            xhat, mean, rstd = _normalize(x, col_mask, D, eps)
            y, largest = gr._rational_tile(xhat * w + bias, a, b, largest, M, N, FOLD, y_ptr.dtype.element_ty,
                                           COMPUTE, FAST)  # fmt: skip
            tl.store(y_ptr + offsets, y, mask=mask)
            tl.store(mean_ptr + rows, mean, mask=row_mask)
            tl.store(rstd_ptr + rows, rstd, mask=row_mask)
        if tl.max(largest) > safe_limit:  # rare: this program's rows again, in float64
            tl.debug_barrier()
            w64, bias64, a64, b64 = _parameters(w_ptr, bias_ptr, a_ptr, b_ptr, cpg_a, cpg_b, D, M, N, BLOCK_D, FOLD,
                                                UNIFORM_A, tl.float64)  # fmt: skip
            unused = tl.zeros((1, BLOCK_D // FOLD), dtype=tl.float64)
            for r0 in range(start, S, step):
                for row in range(r0, tl.minimum(r0 + ROWS, S)):
                    offsets64, mask64 = _tile_offsets(row, S, D, 1, BLOCK_D, INDEX_64)
                    x64 = tl.load(x_ptr + offsets64, mask=mask64, other=0.0).to(tl.float64)
                    xhat64, mean64, rstd64 = _normalize(x64, col_mask, D, eps)
                    y64, unused = gr._rational_tile(xhat64 * w64 + bias64, a64, b64, unused, M, N, FOLD,
                                                    y_ptr.dtype.element_ty, tl.float64, False)  # fmt: skip
                    tl.store(y_ptr + offsets64, y64, mask=mask64)

    @triton.jit
    def _backward_tile(g, xhat, rstd, w, bias, a, b, acc, dw, db, largest, D, M: tl.constexpr, N: tl.constexpr,
                       FOLD: tl.constexpr, COMPUTE: tl.constexpr, FAST: tl.constexpr):  # fmt: skip
        """dx of one tile of normalized rows ``xhat`` (masked elements: g = 0, so du and every term
        is 0), with the running sums ``acc`` (FOLD sets, one per column of a fold), ``dw``, ``db``
        and ``largest`` updated."""
        du, acc, largest = gr._accumulate_tile(xhat * w + bias, g, a, b, acc, largest, M, N, FOLD, False, COMPUTE,
                                               COMPUTE, FAST)  # fmt: skip
        dw += du * xhat
        db += du
        dxhat = du * w
        mean_dxhat = tl.sum(dxhat, axis=1) / D
        mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=1) / D
        dx = (dxhat - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None]) * rstd[:, None]
        return dx, acc, dw, db, largest

    @triton.jit
    def _backward_kernel(
        x_ptr, g_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, mean_ptr, rstd_ptr, dx_ptr, partial_ptr, affine_ptr,
        S, D, cpg_a, cpg_b, eps, safe_limit, offset_b,
        M: tl.constexpr, N: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, FOLD: tl.constexpr,
        UNIFORM_A: tl.constexpr, SLOTS_A: tl.constexpr, SLOTS_B: tl.constexpr, COMPUTE: tl.constexpr,
        FAST: tl.constexpr, INDEX_64: tl.constexpr,
    ):  # fmt: skip
        # Traffic per element: x and g in, dx out; per row mean and rstd in; per program
        # O(groups + D) partial sums out.
        DX: tl.constexpr = dx_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK_D)
        col_mask = cols < D
        w, bias, a, b = _parameters(w_ptr, bias_ptr, a_ptr, b_ptr, cpg_a, cpg_b, D, M, N, BLOCK_D, FOLD, UNIFORM_A,
                                    COMPUTE)  # fmt: skip
        acc = gr._zero_terms(M, N, ROWS, BLOCK_D // FOLD, COMPUTE, FOLD)  # per-element running sums
        dw = tl.zeros((ROWS, BLOCK_D), dtype=COMPUTE)
        db = tl.zeros((ROWS, BLOCK_D), dtype=COMPUTE)
        largest = tl.zeros((ROWS, BLOCK_D // FOLD), dtype=COMPUTE)
        start, step = tl.program_id(0) * ROWS, tl.num_programs(0) * ROWS
        offsets, mask = _tile_offsets(start, S, D, ROWS, BLOCK_D, INDEX_64)
        x_ahead = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        g_ahead = tl.load(g_ptr + offsets, mask=mask, other=0.0)
        for r0 in range(start, S, step):
            # The next tile is loaded before this one is worked on, so memory latency overlaps work.
            x, g = x_ahead.to(COMPUTE), g_ahead.to(COMPUTE)
            rows, row_mask, offsets, mask = _row_tile(r0, S, D, ROWS, BLOCK_D, INDEX_64)
            next_offsets, next_mask = _tile_offsets(r0 + step, S, D, ROWS, BLOCK_D, INDEX_64)
            x_ahead = tl.load(x_ptr + next_offsets, mask=next_mask, other=0.0)
            g_ahead = tl.load(g_ptr + next_offsets, mask=next_mask, other=0.0)
            mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0).to(COMPUTE)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0).to(COMPUTE)
            xhat = tl.where(col_mask[None, :], (x - mean[:, None]) * rstd[:, None], 0.0)
            dx, acc, dw, db, largest = _backward_tile(g, xhat, rstd, w, bias, a, b, acc, dw, db, largest, D, M, N,
                                                      FOLD, COMPUTE, FAST)  # fmt: skip
            tl.store(dx_ptr + offsets, dx.to(DX), mask=mask)
        sums = gr._sum_terms(acc, M, N, FOLD, UNIFORM_A, False)
        dw_sum = tl.sum(dw, axis=0).to(tl.float64)
        db_sum = tl.sum(db, axis=0).to(tl.float64)
        if tl.max(largest) > safe_limit:  # rare: this program's rows again, in float64, a row at a time
            tl.debug_barrier()
            w64, bias64, a64, b64 = _parameters(w_ptr, bias_ptr, a_ptr, b_ptr, cpg_a, cpg_b, D, M, N, BLOCK_D, FOLD,
                                                UNIFORM_A, tl.float64)  # fmt: skip
            acc64 = gr._zero_terms(M, N, 1, BLOCK_D // FOLD, tl.float64, FOLD)
            dw64 = tl.zeros((1, BLOCK_D), dtype=tl.float64)
            db64 = tl.zeros((1, BLOCK_D), dtype=tl.float64)
            unused = tl.zeros((1, BLOCK_D // FOLD), dtype=tl.float64)
            for r0 in range(start, S, step):
                for row in range(r0, tl.minimum(r0 + ROWS, S)):
                    offsets64, mask64 = _tile_offsets(row, S, D, 1, BLOCK_D, INDEX_64)
                    x64 = tl.load(x_ptr + offsets64, mask=mask64, other=0.0).to(tl.float64)
                    g64 = tl.load(g_ptr + offsets64, mask=mask64, other=0.0).to(tl.float64)
                    xhat64, mean64, rstd64 = _normalize(x64, col_mask, D, eps)
                    dx64, acc64, dw64, db64, unused = _backward_tile(g64, xhat64, rstd64, w64, bias64, a64, b64, acc64,
                                                                     dw64, db64, unused, D, M, N, FOLD, tl.float64,
                                                                     False)  # fmt: skip
                    tl.store(dx_ptr + offsets64, dx64.to(DX), mask=mask64)
            sums = gr._sum_terms(acc64, M, N, FOLD, UNIFORM_A, False)
            dw_sum = tl.sum(dw64, axis=0)
            db_sum = tl.sum(db64, axis=0)
        program = tl.program_id(0)
        fold_mask, group_a, group_b = _folds(cpg_a, cpg_b, D, BLOCK_D, FOLD, UNIFORM_A)
        gr._store_partials(partial_ptr, sums, fold_mask, group_a, 0, program, 0, M + 1, SLOTS_A, UNIFORM_A)
        if N > 0:  # B's partials follow A's in the same buffer
            gr._store_partials(partial_ptr + offset_b, sums, fold_mask, group_b, 0, program, M + 1, N, SLOTS_B, False)
        # d weight and d bias: row ``program`` of a [programs, 2, D] float32 buffer
        tl.store(affine_ptr + (program * 2) * D + cols, dw_sum.to(tl.float32), mask=col_mask)
        tl.store(affine_ptr + (program * 2 + 1) * D + cols, db_sum.to(tl.float32), mask=col_mask)


    @triton.jit
    def _reduce_kernel(
        partial_ptr, a_ptr, da_ptr, b_ptr, db_ptr, affine_ptr, dw_ptr, dbias_ptr,
        offset_b, groups_a, groups, programs_s, cpg_a, cpg_b, D,
        M: tl.constexpr, N: tl.constexpr, MP: tl.constexpr, NP: tl.constexpr, SLOTS_A: tl.constexpr,
        SLOTS_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_COLS: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
    ):  # fmt: skip
        """The first ``groups`` programs add one coefficient group's partials each (``group_rational``'s
        reduction); the others BLOCK_COLS columns of the weight and bias partials, in float64 and
        in a fixed order: every gradient the backward kernel left in partial sums, in one launch."""
        pid = tl.program_id(0)
        if pid < groups_a:
            gr._reduce_group(partial_ptr, a_ptr, da_ptr, pid, programs_s, 1, cpg_a, M + 1, MP, SLOTS_A, BLOCK_C,
                             BLOCK_P, False)  # fmt: skip
        elif pid < groups:
            gr._reduce_group(partial_ptr + offset_b, b_ptr, db_ptr, pid - groups_a, programs_s, 1, cpg_b, N, NP,
                             SLOTS_B, BLOCK_C, BLOCK_P, True)  # fmt: skip
        else:
            cols = (pid - groups) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
            col_mask = cols < D
            for which in tl.static_range(2):  # rows 2p hold program p's d weight, rows 2p+1 its d bias
                acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float64)
                for p0 in range(0, programs_s, BLOCK_ROWS):
                    p = p0 + tl.arange(0, BLOCK_ROWS)
                    mask = (p < programs_s)[:, None] & col_mask[None, :]
                    acc += tl.load(affine_ptr + (p * 2 + which)[:, None] * D + cols[None, :], mask=mask, other=0.0)
                out_ptr = dw_ptr if which == 0 else dbias_ptr
                tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=col_mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration and launchers
# ----------------------------------------------------------------------------------------------

# Elements per tile and per thread: the forward holds 16 (and as many loaded ahead), the backward 4
# (each keeps m+1+n running sums per element); programs per SM. From offline sm_90 compiles and one
# H100 run (docs/BENCHMARKS.md step 32).
# The backward's register cap leaves its float64 redo (which alone doubles the registers) to spill,
# and the main loop at 128 without spills.
_TUNING = dict(forward_elements=2048, forward_per_thread=16, backward_elements=512, backward_per_thread=4,
               backward_maxnreg=128, waves=4, reduce_columns=64, reduce_rows=64)  # fmt: skip


def _fold(D: int, groups_a: int, groups_b: int, per_thread: int) -> int:
    """Adjacent columns sharing one coefficient set: a thread's 16-byte vector of float32 (at most
    4), within one group of every per-column set."""
    fold = min(4, per_thread)
    for groups in (groups_b,) if groups_a == 1 else (groups_a, groups_b):
        cpg = D // groups
        fold = min(fold, cpg & -cpg)
    return max(fold, 1)


@functools.lru_cache(maxsize=512)
def _config(S: int, D: int, dtype: torch.dtype, m: int, n: int, groups_a: int, groups_b: int, device_index: int):
    """(forward, backward, reduce) launch arguments of one signature: grid, scalars, constexprs."""
    block_d = gr._next_pow2(D)
    cpg_a, cpg_b = D // groups_a, D // groups_b
    uniform_a = groups_a == 1
    slots_a = 1 if uniform_a else gr._group_slots(block_d, cpg_a)
    slots_b = gr._group_slots(block_d, cpg_b)
    compute, fast, safe_limit = gr._arithmetic(dtype, m, n, device_index)
    index_64 = S * D >= gr._INDEX_64_FROM
    launches = []
    for kind in ("forward", "backward"):
        rows = max(_TUNING[f"{kind}_elements"] // block_d, 1)
        per_thread = _TUNING[f"{kind}_per_thread"]
        warps = min(max(rows * block_d // (32 * per_thread), 1), 16)
        programs = max(min(gr._programs_per_wave(device_index) * _TUNING["waves"], triton.cdiv(S, rows)), 1)
        fold = _fold(D, groups_a, groups_b, rows * block_d // (32 * warps))
        launches.append((rows, warps, programs, fold))
    common = dict(M=m, N=n, BLOCK_D=block_d, UNIFORM_A=uniform_a, COMPUTE=compute, FAST=fast, INDEX_64=index_64)
    (f_rows, f_warps, f_programs, f_fold), (b_rows, b_warps, b_programs, b_fold) = launches
    forward = ((f_programs,), (S, D, cpg_a, cpg_b), dict(ROWS=f_rows, FOLD=f_fold, num_warps=f_warps, **common),
               safe_limit)  # fmt: skip
    offset_b = b_programs * slots_a * (m + 1)
    partials = offset_b + max(b_programs * slots_b * n, 1)
    backward = ((b_programs,), (S, D, cpg_a, cpg_b), dict(ROWS=b_rows, FOLD=b_fold, SLOTS_A=slots_a, SLOTS_B=slots_b,
                num_warps=b_warps, maxnreg=_TUNING["backward_maxnreg"], **common), safe_limit, offset_b, partials)  # fmt: skip
    groups = groups_a + (groups_b if n > 0 else 0)
    column_programs = triton.cdiv(D, _TUNING["reduce_columns"])
    reduce = ((groups + column_programs,), (offset_b, groups_a, groups, b_programs, cpg_a, cpg_b, D),
              dict(M=m, N=n, MP=gr._next_pow2(m + 1), NP=gr._next_pow2(max(n, 1)), SLOTS_A=slots_a, SLOTS_B=slots_b,
                   BLOCK_C=block_d, BLOCK_P=gr._TUNING["reduce_rows"], BLOCK_COLS=_TUNING["reduce_columns"],
                   BLOCK_ROWS=_TUNING["reduce_rows"], num_warps=gr._TUNING["reduce_warps"]))  # fmt: skip
    return _Launches(forward, backward, reduce, b_programs)


class _Launches:
    """One signature's launch arguments, and the direct launchers of its compiled kernels that
    ``group_rational._launch`` caches (eager calls skip Triton's launch code after the first)."""

    def __init__(self, forward: tuple, backward: tuple, reduce: tuple, programs: int) -> None:
        self.forward, self.backward, self.reduce, self.programs = forward, backward, reduce, programs
        self.launchers: dict = {}


def _check_args(x, weight, bias, numerator, denominator, eps, out_dtype) -> None:
    reference.check_args(x, numerator, denominator, -1)
    D = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (D,):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"layer_norm_group_rational: {name} must have shape ({D},) (x's last dim), got {shape}")
        if t.device != x.device:
            raise ValueError(f"layer_norm_group_rational: {name} is on {t.device}, x on {x.device}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"layer_norm_group_rational: eps must be a positive number, got {eps!r}")
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise TypeError(f"layer_norm_group_rational: out_dtype must be a floating-point dtype, got {out_dtype}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous (S, D) matrix (a view where it already is one)."""
    return x.contiguous().view(-1, x.shape[-1]) if x.dim() != 2 or not x.is_contiguous() else x


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def triton_forward(x, weight, bias, numerator, denominator, eps: float = 1e-6, out_dtype=None):
    """(y, mean, rstd) by the Triton kernel: y = F(LayerNorm(x)) in ``out_dtype`` (default x's),
    the row statistics (flattened leading dims) in float32 (float64 for float64 x)."""
    _check_args(x, weight, bias, numerator, denominator, eps, out_dtype)
    return _forward(x, weight, bias, numerator, denominator, eps, out_dtype)


def _forward(x, weight, bias, numerator, denominator, eps, out_dtype):
    rows = _rows(x)
    S, D = rows.shape
    y = torch.empty(x.shape, device=x.device, dtype=out_dtype or x.dtype)
    mean = torch.empty(S, device=x.device, dtype=_stats_dtype(x))
    rstd = torch.empty_like(mean)
    if S == 0 or D == 0:
        return y, mean, rstd
    plan = _config(S, D, x.dtype, numerator.shape[1] - 1, denominator.shape[1], numerator.shape[0],
                   denominator.shape[0], gr._device_index(x))  # fmt: skip
    grid, scalars, meta, safe_limit = plan.forward
    tensors = (rows, weight.contiguous(), bias.contiguous(), numerator.contiguous(), denominator.contiguous(), y, mean,
               rstd)  # fmt: skip
    gr._launch(_forward_kernel, grid, tensors, (*scalars, float(eps), safe_limit), meta, plan)
    return y, mean, rstd


def triton_backward(grad_output, x, weight, bias, numerator, denominator, mean, rstd, eps: float = 1e-6):
    """(dx, d weight, d bias, d numerator, d denominator) by the Triton kernels, deterministically;
    ``mean`` and ``rstd`` are ``triton_forward``'s."""
    _check_args(x, weight, bias, numerator, denominator, eps, None)
    if not isinstance(grad_output, torch.Tensor) or grad_output.shape != x.shape:
        shape = tuple(grad_output.shape) if isinstance(grad_output, torch.Tensor) else type(grad_output).__name__
        raise ValueError(f"layer_norm_group_rational: grad_output shape {shape} != x shape {tuple(x.shape)}")
    return _backward(grad_output, x, weight, bias, numerator, denominator, mean, rstd, eps)


def _backward(grad_output, x, weight, bias, numerator, denominator, mean, rstd, eps):
    rows, g = _rows(x), _rows(grad_output)
    S, D = rows.shape
    weight, bias = weight.contiguous(), bias.contiguous()
    numerator, denominator = numerator.contiguous(), denominator.contiguous()
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    da, db = torch.empty_like(numerator), torch.empty_like(denominator)
    if S == 0 or D == 0:
        return dx, torch.zeros_like(weight), torch.zeros_like(bias), da.zero_(), db.zero_()
    plan = _config(S, D, x.dtype, numerator.shape[1] - 1, denominator.shape[1], numerator.shape[0],
                   denominator.shape[0], gr._device_index(x))  # fmt: skip
    grid, scalars, meta, safe_limit, offset_b, size = plan.backward
    partials = torch.empty(size, device=x.device, dtype=torch.float64)
    affine = torch.empty(plan.programs, 2, D, device=x.device, dtype=torch.float32)
    dw, dbias = torch.empty_like(weight), torch.empty_like(bias)
    tensors = (rows, g, weight, bias, numerator, denominator, mean, rstd, dx, partials, affine)
    gr._launch(_backward_kernel, grid, tensors, (*scalars, float(eps), safe_limit, offset_b), meta, plan)
    grid, scalars, meta = plan.reduce
    gr._launch(_reduce_kernel, grid, (partials, numerator, da, denominator, db, affine, dw, dbias), scalars, meta, plan)
    return dx, dw, dbias, da, db


# ----------------------------------------------------------------------------------------------
# The float64 reference (every device without Triton kernels), operators and autograd
# ----------------------------------------------------------------------------------------------


def _normalized(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(xhat, mean, rstd) of x's rows in float64 (biased variance, as LayerNorm)."""
    var, mean = torch.var_mean(x.double(), dim=-1, unbiased=False, keepdim=True)
    rstd = (var + eps).rsqrt()
    return (x.double() - mean) * rstd, mean, rstd


def _reference_forward_op(x, weight, bias, numerator, denominator, eps, out_dtype):
    xhat, mean, rstd = _normalized(x, eps)
    y = reference.forward(xhat * weight.double() + bias.double(), numerator, denominator)
    stats = _stats_dtype(x)
    return y.to(out_dtype or x.dtype), mean.reshape(-1).to(stats), rstd.reshape(-1).to(stats)


def _reference_backward_op(grad_output, x, weight, bias, numerator, denominator, mean, rstd, eps):
    """The formulas of this module's docstring in float64 (the operator runs below autograd, so
    it cannot differentiate the forward)."""
    xhat, _, rstd64 = _normalized(x, eps)
    u = xhat * weight.double() + bias.double()
    du, da, db = reference.backward(grad_output.double(), u, numerator, denominator)
    rows = (-1, x.shape[-1])
    d_weight = (du * xhat).reshape(rows).sum(0)
    d_bias = du.reshape(rows).sum(0)
    dxhat = du * weight.double()
    dx = rstd64 * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), d_weight.to(weight.dtype), d_bias.to(bias.dtype), da, db


_LIB = torch.library.Library("flashkat", "FRAGMENT")
_LIB.define("layer_norm_group_rational(Tensor x, Tensor weight, Tensor bias, Tensor numerator, Tensor denominator, "
            "float eps, ScalarType? out_dtype) -> (Tensor, Tensor, Tensor)")  # fmt: skip
_LIB.define("layer_norm_group_rational_backward(Tensor grad_output, Tensor x, Tensor weight, Tensor bias, "
            "Tensor numerator, Tensor denominator, Tensor mean, Tensor rstd, float eps) "
            "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")  # fmt: skip
_LIB.impl("layer_norm_group_rational", _reference_forward_op, "CompositeExplicitAutograd")
_LIB.impl("layer_norm_group_rational_backward", _reference_backward_op, "CompositeExplicitAutograd")


def _cuda_forward_op(x, weight, bias, numerator, denominator, eps, out_dtype):
    launcher = native.module()
    if launcher is not None:  # a signature seen before: launched from C++
        outputs = launcher.layer_norm_launch_forward(x, weight, bias, numerator, denominator, eps,
                                                     gr._OUT_CODES.get(out_dtype, -2))  # fmt: skip
        if outputs is not None:
            return outputs
        _register_native_once(launcher, x, weight, bias, numerator, denominator, eps, out_dtype)
    return triton_forward(x, weight, bias, numerator, denominator, eps, out_dtype)


def _cuda_backward_op(grad_output, x, weight, bias, numerator, denominator, mean, rstd, eps):
    launcher = native.module()
    if launcher is not None:
        grads = launcher.layer_norm_launch_backward(grad_output, x, weight, bias, numerator, denominator, mean, rstd,
                                                    eps, gr._OUT_CODES.get(grad_output.dtype, -2))  # fmt: skip
        if grads is not None:
            return grads
    return triton_backward(grad_output, x, weight, bias, numerator, denominator, mean, rstd, eps)


if gr.HAS_TRITON:  # CUDA runs the Triton kernels (from C++ after a signature's first call, where it can)
    _LIB.impl("layer_norm_group_rational", _cuda_forward_op, "CUDA")
    _LIB.impl("layer_norm_group_rational_backward", _cuda_backward_op, "CUDA")


@torch.library.register_fake("flashkat::layer_norm_group_rational", lib=_LIB)
def _(x, weight, bias, numerator, denominator, eps, out_dtype):
    rows = math.prod(x.shape[:-1])
    mean = x.new_empty(rows, dtype=_stats_dtype(x))
    return torch.empty_like(x, dtype=out_dtype or x.dtype), mean, torch.empty_like(mean)


@torch.library.register_fake("flashkat::layer_norm_group_rational_backward", lib=_LIB)
def _(grad_output, x, weight, bias, numerator, denominator, mean, rstd, eps):
    return (torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias), torch.empty_like(numerator),
            torch.empty_like(denominator))  # fmt: skip


class _LayerNormGroupRational(torch.autograd.Function):
    """Autograd of the op: eager CUDA calls launch the kernels directly (the dispatcher's trip to a
    Python kernel costs host time a small layer cannot spare, as for ``group_rational``); compiled
    graphs and other devices call the operators."""

    @staticmethod
    def forward(ctx, x, weight, bias, numerator, denominator, eps, out_dtype):
        ctx.direct = gr._launches_directly(x)
        run = _forward if ctx.direct else torch.ops.flashkat.layer_norm_group_rational  # arguments checked
        y, mean, rstd = run(x, weight, bias, numerator, denominator, eps, out_dtype)
        ctx.save_for_backward(x, weight, bias, numerator, denominator, mean, rstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad_output):
        run = _backward if ctx.direct else torch.ops.flashkat.layer_norm_group_rational_backward
        grads = run(grad_output.contiguous(), *ctx.saved_tensors, ctx.eps)
        return (*grads, None, None)


def layer_norm_group_rational(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """F(LayerNorm(x)) over the last dim: ``group_rational(F.layer_norm(x, (D,), weight, bias, eps),
    numerator, denominator)`` in one pass over memory (see this module's docstring).

    ``weight`` and ``bias`` are the LayerNorm's (D,); ``numerator`` (Gn, m+1) and ``denominator``
    (Gd, n) as in ``group_rational``. CUDA tensors run the Triton kernels, others the float64
    reference. Differentiable in all five tensors. The output has x's dtype unless ``out_dtype``
    names another (a float32 residual stream feeding a bfloat16 matmul under autocast, say).
    """
    launcher = native.module() if gr._launches_directly(x) else None
    if launcher is not None:  # a signature seen (and checked) before: forward and backward in C++
        try:
            y = launcher.layer_norm_forward(x, weight, bias, numerator, denominator, eps,
                                            gr._OUT_CODES.get(out_dtype, -2))  # fmt: skip
        except TypeError:  # not tensors, say: the checks below raise the clear error
            y = None
        if y is not None:
            return y
    if not all(isinstance(t, torch.Tensor) for t in (x, weight, bias, numerator, denominator)):
        reference.check_args(x, numerator, denominator, -1)  # raises the TypeError for x and the coefficients
    _check_args(x, weight, bias, numerator, denominator, eps, out_dtype)
    eps = float(eps)
    if launcher is not None:
        _register_native_once(launcher, x, weight, bias, numerator, denominator, eps, out_dtype)
    return _LayerNormGroupRational.apply(x, weight, bias, numerator, denominator, eps, out_dtype)


_NATIVE: dict = {}  # call signature -> registered with the native launcher?


def _clear_caches() -> None:
    """Forget configurations and native registrations (after changing ``_TUNING``)."""
    _config.cache_clear()
    _NATIVE.clear()
    native.clear()


def _register_native_once(launcher, x, weight, bias, numerator, denominator, eps: float, out_dtype) -> None:
    key = (x.shape, x.stride(), x.dtype, x.device, *[(t.shape, t.stride(), t.dtype) for t in (weight, bias, numerator,
           denominator)], eps, out_dtype)  # fmt: skip
    if key not in _NATIVE:
        if len(_NATIVE) >= 4096:
            _NATIVE.clear()
        _NATIVE[key] = _register_native(launcher, x, weight, bias, numerator, denominator, eps, out_dtype)


def _register_native(launcher, x, weight, bias, numerator, denominator, eps: float, out_dtype) -> bool:
    """Compile the three kernels of this signature and register them with the native launcher
    (through ``group_rational._native_specs``); False where it cannot take them."""
    params = (weight, bias, numerator, denominator)
    if x.numel() == 0 or not all(t.is_contiguous() for t in (x, *params)) or gr._launches_hooked():
        return False
    if gr._off_current_device(x):
        with torch.cuda.device(x.device):
            return _register_native(launcher, x, weight, bias, numerator, denominator, eps, out_dtype)
    D = x.shape[-1]
    plan = _config(x.numel() // D, D, x.dtype, numerator.shape[1] - 1, denominator.shape[1], numerator.shape[0],
                   denominator.shape[0], gr._device_index(x))  # fmt: skip
    out, stats, f32, f64 = out_dtype or x.dtype, _stats_dtype(x), torch.float32, torch.float64
    w, b, a, c = (t.dtype for t in params)
    (f_grid, f_scalars, f_meta, f_limit), (b_grid, b_scalars, b_meta, b_limit, offset_b, size) = plan.forward, plan.backward
    specs = gr._native_specs(x.device, (
        (_forward_kernel, (f_grid, (*f_scalars, eps, f_limit), f_meta), (x.dtype, w, b, a, c, out, stats, stats)),
        (_backward_kernel, (b_grid, (*b_scalars, eps, b_limit, offset_b), b_meta),
         (x.dtype, out, w, b, a, c, stats, stats, x.dtype, f64, f32)),
        (_reduce_kernel, plan.reduce, (f64, a, a, c, c, f32, w, b))))  # fmt: skip
    if specs is None:
        return False
    launcher.register_layer_norm_plan(x, weight, bias, numerator, denominator, eps, gr._OUT_CODES.get(out_dtype, -2),
                                      out, stats, size, plan.programs, *specs)  # fmt: skip
    return True
