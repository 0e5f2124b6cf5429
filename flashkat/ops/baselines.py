"""The two earlier backward designs, re-created for measurement and teaching (not for training).

``flashkat`` (the default, in ``group_rational.py``) reduces the coefficient gradients without
atomics and deterministically. To show side by side, on the same tensors, why KAT trained 100x
slower than a ViT and what FlashKAT changed, this module adds two more backward implementations
to ``group_rational.BACKWARDS``:

``atomic`` - KAT's design. One program per tile; every element issues m+1+n ``tl.atomic_add``s
    (10 for KAT's order) into float32 gradient buffers in global memory. Millions of atomics
    hit the same ~80 addresses, so the kernel waits on memory, not on arithmetic.
``blocked`` - FlashKAT's design. Each program sums its elements' terms in registers, then issues
    one atomic per coefficient (and group it touches). Programs are as large as FlashKAT's
    launch makes them: one per 64 rows and group of channels, hence as many atomics.

Both compute every per-element quantity with the op's own jit helpers (``_rational_grads`` and
friends), so the three implementations differ only in how they reduce. Both are
nondeterministic: float additions in the order the atomics land. Neither redoes huge inputs in
float64 (the public kernels don't either): |x| beyond ``_safe_limit`` may overflow.

Like KAT's layer, which repeats its shared numerator to the denominator's 8 groups before the
kernel (``weight_numerator.repeat(num_groups, 1)``) and FlashKAT's, which does the same, the
atomics go to per-"fine group" buffers: G = D / gcd(D/Gn, D/Gd) groups, each inside one
numerator and one denominator group. A tiny torch step then sums them to (Gn, m+1) and (Gd, n),
applies sign(B) and casts, as the public code's autograd does for its repeat.

``WORK`` (a launcher argument, default 1) evaluates the per-element math WORK times while the
bytes moved and the atomics stay the same: the FLOPs experiment of ``flashkat analyze``. The
extra evaluations feed each other through a runtime zero, so the compiler cannot drop them and
the results are unchanged.

Import ``flashkat`` (or this module) and pass ``impl="atomic"`` / ``impl="blocked"`` to
``flashkat.group_rational`` or set ``GroupRational.impl``; on CUDA the op's backward dispatches
through ``BACKWARDS``. Everywhere else every name runs the float64 reference.
"""

from __future__ import annotations

import math

import torch

from flashkat import reference
from flashkat.ops import group_rational as op

__all__ = ["atomic_backward", "blocked_backward", "IMPLEMENTATIONS"]

# Implementation name -> what it re-creates, for tables and reports.
IMPLEMENTATIONS = {
    "flashkat": "ours: register sums, plain stores, fixed-order float64 reduction (deterministic)",
    "blocked": "FlashKAT's design: register sums per program, one atomic per coefficient (nondeterministic)",
    "atomic": "KAT's design: m+1+n atomics per element into global memory (nondeterministic)",
}

# FlashKAT's launch: one program per 64 rows and group of channels.
_FLASHKAT_ROWS = 64


if op.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _grads(x, g, a, b, jitter, M: tl.constexpr, N: tl.constexpr, DX: tl.constexpr, TERMS: tl.constexpr,
               FAST: tl.constexpr, WORK: tl.constexpr):  # fmt: skip
        """``_rational_grads`` done WORK times; the result is that of one evaluation.

        Each extra evaluation takes x + jitter * (everything the previous one produced), with
        jitter = 0 at run time: unknown when compiling, so no evaluation can be dropped.
        """
        xr = x
        for _ in tl.static_range(WORK - 1):
            dx, terms = _rational_grads(xr, g, a, b, M, N, x.dtype, x.dtype, FAST)
            total = dx
            for k in tl.static_range(M + 1 + N):
                total = total + terms[k]
            xr = x + jitter * total
        return _rational_grads(xr, g, a, b, M, N, DX, TERMS, FAST)

    # Shared helpers of the op (same per-element math, tiles and addressing).
    _tile = op._tile
    _offsets = op._offsets
    _store = op._store
    _load_coefficients = op._load_coefficients
    _zero_terms = op._zero_terms
    _add_terms = op._add_terms
    _rational_grads = op._rational_grads

    @triton.jit
    def _load(ptr, offsets, mask, EVEN: tl.constexpr):
        if EVEN:  # whole tiles only: no masks
            return tl.load(ptr + offsets)
        else:
            return tl.load(ptr + offsets, mask=mask, other=0.0)

    @triton.jit
    def _atomic_backward_kernel(
        x_ptr, g_ptr, dx_ptr, a_ptr, b_ptr, fine_a_ptr, fine_b_ptr,
        S, D, INNER, cpg_a, cpg_b, cpg_f, jitter,
        M: tl.constexpr, N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
        UNIFORM_A: tl.constexpr, UNIFORM_B: tl.constexpr, EVEN: tl.constexpr,
        COMPUTE: tl.constexpr, INDEX_64: tl.constexpr, FAST: tl.constexpr, WORK: tl.constexpr,
    ):  # fmt: skip
        """KAT's reduction: one tile per program, every element atomically adds its m+1+n terms."""
        cols, col_mask, _, group_a, group_b = _tile(tl.program_id(1), D, cpg_a, cpg_b, BLOCK_C, 1, UNIFORM_A,
                                                    UNIFORM_B, INDEX_64)  # fmt: skip
        a = _load_coefficients(a_ptr, group_a, col_mask, M + 1, False, COMPUTE, UNIFORM_A)
        b = _load_coefficients(b_ptr, group_b, col_mask, N, True, COMPUTE, UNIFORM_B)
        rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        offsets, mask = _offsets(rows, cols, S, D, INNER, col_mask, INDEX_64)
        x = _load(x_ptr, offsets, mask, EVEN).to(COMPUTE)
        g = _load(g_ptr, offsets, mask, EVEN).to(COMPUTE)
        dx, terms = _grads(x, g, a, b, jitter, M, N, dx_ptr.dtype.element_ty, fine_a_ptr.dtype.element_ty, FAST, WORK)
        _store(dx_ptr, offsets, dx, mask, EVEN)
        # Per-element addresses, computed from each column as KAT's kernel does (never a splat
        # the compiler could recognise): [BLOCK_S, BLOCK_C] atomics per coefficient.
        fine = (cols // cpg_f)[None, :] + tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.int32)
        for k in tl.static_range(M + 1):
            if EVEN:
                tl.atomic_add(fine_a_ptr + fine * (M + 1) + k, terms[k])
            else:
                tl.atomic_add(fine_a_ptr + fine * (M + 1) + k, terms[k], mask=mask)
        for j in tl.static_range(N):
            if EVEN:
                tl.atomic_add(fine_b_ptr + fine * N + j, terms[M + 1 + j])
            else:
                tl.atomic_add(fine_b_ptr + fine * N + j, terms[M + 1 + j], mask=mask)

    @triton.jit
    def _atomic_per_group(ptr, column_sums, fine, first_fine, col_mask, K: tl.constexpr, k: tl.constexpr,
                          SLOTS: tl.constexpr, UNIFORM: tl.constexpr):  # fmt: skip
        """One atomic per fine group of the tile for coefficient k (a scalar one when UNIFORM)."""
        if UNIFORM:
            tl.atomic_add(ptr + first_fine * K + k, tl.sum(column_sums, axis=0))
        else:
            slots = tl.arange(0, SLOTS)
            onehot = ((fine - first_fine)[:, None] == slots[None, :]) & col_mask[:, None]
            per_slot = tl.sum(tl.where(onehot, column_sums[:, None], 0.0), axis=0)
            used = tl.sum(onehot.to(tl.int32), axis=0) > 0
            tl.atomic_add(ptr + (first_fine + slots) * K + k, per_slot, mask=used)

    @triton.jit
    def _blocked_backward_kernel(
        x_ptr, g_ptr, dx_ptr, a_ptr, b_ptr, fine_a_ptr, fine_b_ptr,
        S, D, INNER, cpg_a, cpg_b, cpg_f, jitter, ROWS,
        M: tl.constexpr, N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
        UNIFORM_A: tl.constexpr, UNIFORM_B: tl.constexpr, EVEN: tl.constexpr,
        COMPUTE: tl.constexpr, INDEX_64: tl.constexpr, FAST: tl.constexpr, WORK: tl.constexpr,
        UNIFORM_F: tl.constexpr, SLOTS_F: tl.constexpr,
    ):  # fmt: skip
        """FlashKAT's reduction: sum ROWS rows of one column tile in registers, then atomics."""
        pid_c = tl.program_id(1)
        cols, col_mask, _, group_a, group_b = _tile(pid_c, D, cpg_a, cpg_b, BLOCK_C, 1, UNIFORM_A, UNIFORM_B, INDEX_64)
        a = _load_coefficients(a_ptr, group_a, col_mask, M + 1, False, COMPUTE, UNIFORM_A)
        b = _load_coefficients(b_ptr, group_b, col_mask, N, True, COMPUTE, UNIFORM_B)
        acc = _zero_terms(M, N, BLOCK_S, BLOCK_C, COMPUTE, 1)
        first_row = tl.program_id(0) * ROWS
        # ROWS is a multiple of BLOCK_S, so with EVEN every sub-tile in range is whole
        for s0 in range(first_row, tl.minimum(first_row + ROWS, S), BLOCK_S):
            offsets, mask = _offsets(s0 + tl.arange(0, BLOCK_S), cols, S, D, INNER, col_mask, INDEX_64)
            x = _load(x_ptr, offsets, mask, EVEN).to(COMPUTE)
            g = _load(g_ptr, offsets, mask, EVEN).to(COMPUTE)  # masked: g = 0, so every term is 0
            dx, terms = _grads(x, g, a, b, jitter, M, N, dx_ptr.dtype.element_ty, COMPUTE, FAST, WORK)
            _store(dx_ptr, offsets, dx, mask, EVEN)
            acc = _add_terms(acc, terms, 0)
        first = pid_c * BLOCK_C
        fine = cols // cpg_f
        for k in tl.static_range(M + 1):
            column_sums = tl.sum(acc[k], axis=0).to(fine_a_ptr.dtype.element_ty)
            _atomic_per_group(fine_a_ptr, column_sums, fine, first // cpg_f, col_mask, M + 1, k, SLOTS_F, UNIFORM_F)
        for j in tl.static_range(N):
            column_sums = tl.sum(acc[M + 1 + j], axis=0).to(fine_b_ptr.dtype.element_ty)
            _atomic_per_group(fine_b_ptr, column_sums, fine, first // cpg_f, col_mask, N, j, SLOTS_F, UNIFORM_F)


def _prepare(grad_output, x, numerator, denominator, dim):
    """Checks and dense views shared by both launchers (the same as the op's backward)."""
    dim = reference.check_args(x, numerator, denominator, dim)
    if grad_output.shape != x.shape:
        raise ValueError(f"group_rational: grad_output shape {tuple(grad_output.shape)} != x shape {tuple(x.shape)}")
    x, layout = op._as_dense(x, dim)
    if grad_output.stride() != x.stride():
        grad_output = torch.empty_like(x).copy_(grad_output)
    return grad_output, x, layout, numerator.contiguous(), denominator.contiguous()


def _finish(fine_a, fine_b, numerator, denominator):
    """Fine-group sums -> (Gn, m+1), (Gd, n); sign(B) with sign(0) = +1; the coefficients' dtype."""
    fine_groups = fine_a.shape[0]
    da = fine_a.reshape(numerator.shape[0], fine_groups // numerator.shape[0], numerator.shape[1]).sum(1)
    db = fine_b.reshape(denominator.shape[0], fine_groups // denominator.shape[0], denominator.shape[1]).sum(1)
    db = torch.where(denominator >= 0, db, -db)
    return da.to(numerator.dtype), db.to(denominator.dtype)


def _launch(kind, grad_output, x, numerator, denominator, dim, work):
    grad_output, x, (S, D, inner), numerator, denominator = _prepare(grad_output, x, numerator, denominator, dim)
    m, n = numerator.shape[1] - 1, denominator.shape[1]
    dx = torch.empty_like(x)
    cpg_a, cpg_b = D // numerator.shape[0], D // denominator.shape[0]
    cpg_f = math.gcd(cpg_a, cpg_b)
    # Zeroed here on every call: the atomics add into them (nothing may run a launch twice on them).
    accumulate = torch.float64 if x.dtype == torch.float64 else torch.float32
    fine_a = torch.zeros(D // cpg_f, m + 1, device=x.device, dtype=accumulate)
    fine_b = torch.zeros(D // cpg_f, max(n, 1), device=x.device, dtype=accumulate)[:, :n]
    if x.numel() == 0:
        return (dx, *_finish(fine_a, fine_b, numerator, denominator))
    # The op's tile width and flags (not cfg.meta(): its pipelining options belong to its own
    # kernels), with unfolded tiles' rows. As for 4-byte elements: the op widens 16-bit tiles and
    # sizes their rows only where adjacent columns share running sums, which these kernels do not.
    tile_dtype = torch.float32 if x.dtype.itemsize == 2 else x.dtype
    cfg = op._config(S, D, inner, tile_dtype, m, n, numerator.shape[0], denominator.shape[0], op._device_index(x), True)
    block_s = max(op._TUNING["backward_elements"] // cfg.block_c, 1)
    even = S % block_s == 0 and D % cfg.block_c == 0
    common = dict(M=m, N=n, WORK=work, BLOCK_S=block_s, BLOCK_C=cfg.block_c, UNIFORM_A=cfg.uniform_a,
                  UNIFORM_B=cfg.uniform_b, EVEN=even, COMPUTE=cfg.compute, INDEX_64=cfg.index_64, FAST=cfg.fast,
                  num_warps=cfg.num_warps)  # fmt: skip
    if kind == "atomic":
        grid = (triton.cdiv(S, block_s), cfg.tiles_c)
        _atomic_backward_kernel[grid](
            x, grad_output, dx, numerator, denominator, fine_a, fine_b,
            S, D, inner, cpg_a, cpg_b, cpg_f, 0.0, **common,
        )  # fmt: skip
    else:
        # As many programs (and atomics) as FlashKAT's launch: one per 64 rows and group width.
        rows = max(_FLASHKAT_ROWS * cpg_f // cfg.block_c, 1)
        rows = triton.cdiv(rows, block_s) * block_s
        uniform_f = cpg_f % cfg.block_c == 0
        slots_f = 1 if uniform_f else op._group_slots(cfg.block_c, cpg_f)
        _blocked_backward_kernel[(triton.cdiv(S, rows), cfg.tiles_c)](
            x, grad_output, dx, numerator, denominator, fine_a, fine_b,
            S, D, inner, cpg_a, cpg_b, cpg_f, 0.0, rows,
            UNIFORM_F=uniform_f, SLOTS_F=slots_f, **common,
        )  # fmt: skip
    return (dx, *_finish(fine_a, fine_b, numerator, denominator))


def atomic_backward(
    grad_output: torch.Tensor, x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, dim: int = -1,
    work: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dx, d numerator, d denominator) the way KAT computes them: per-element atomics.

    ``work`` > 1 repeats the per-element arithmetic (timing experiments only).
    """
    return _launch("atomic", grad_output, x, numerator, denominator, dim, work)


def blocked_backward(
    grad_output: torch.Tensor, x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, dim: int = -1,
    work: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dx, d numerator, d denominator) the way FlashKAT computes them: a sum per program, then atomics.

    ``work`` > 1 repeats the per-element arithmetic (timing experiments only).
    """
    return _launch("blocked", grad_output, x, numerator, denominator, dim, work)


if op.HAS_TRITON:
    op.BACKWARDS["atomic"] = atomic_backward
    op.BACKWARDS["blocked"] = blocked_backward
