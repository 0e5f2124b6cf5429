"""The group-rational op: Triton kernels, their launchers, and the ``torch.library`` registration.

Math (see ``flashkat.reference``): for channel c with numerator group gn and denominator group gd,
F(x) = P(x)/Q(x), P = sum_i A[gn,i] x^i, Q = 1 + sum_j |B[gd,j]| |x|^(j+1).

Memory layout. Any dense tensor is viewed as ``(outer, D, inner)`` in memory, with
``inner = stride(dim)``: element (s, c) with s = o*inner + i lives at o*D*inner + c*inner + i.
For the usual channels-last case inner = 1 and this is a row-major (S, D) matrix. Kernels work on
[BLOCK_S, BLOCK_C] tiles; a program owns one column tile (so it looks up its channels' groups and
loads their coefficients once) and walks down the rows with a fixed stride.

Traffic (the floor). Forward: read x, write y. Backward: read x and grad, write dx: the bytes of
GELU's backward. Everything else (coefficients, per-program partial sums) is O(programs) bytes.

Determinism. The backward never uses atomics: each program keeps per-element running sums of the
m+1+n coefficient-gradient terms in registers, reduces them once at its end into one value per
(group slot, coefficient), and writes them with plain stores; a second, tiny kernel adds those
partials in a fixed order (in float64). Same inputs and device => bitwise identical gradients.

Launch paths. Eager CUDA calls launch the kernels from C++ after a signature's first call where
the native launcher is available (``flashkat.ops.native``), else from Python through
per-signature plans (``_plan``, ``_launch``); compiled graphs call the ``torch.library``
operators, whose CUDA kernels take the same two paths. Every path launches the same compiled kernels.

Range. Arithmetic is float32 (float64 for float64 inputs). A program that met any |x| above
``_safe_limit(order)`` redoes its elements in float64, a row at a time, so finite inputs up to
float32's range give finite results wherever the true value is finite; ordinary inputs never take
that branch, and its only cost on the fast path is a running max of |x|.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from flashkat import reference
from flashkat.ops import native

try:  # Triton is optional: without it every device uses the reference.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

__all__ = ["group_rational", "triton_forward", "triton_backward", "HAS_TRITON"]


if HAS_TRITON:

    @triton.jit
    def _tile(pid_c, D, cpg_a, cpg_b, BLOCK_C: tl.constexpr, FOLD: tl.constexpr, UNIFORM_A: tl.constexpr,
              UNIFORM_B: tl.constexpr, INDEX_64: tl.constexpr):  # fmt: skip
        """This program's BLOCK_C columns and their mask; then, per fold (FOLD adjacent columns, all
        in one group: see ``_column_parts``), its mask and numerator and denominator groups.

        A UNIFORM set has the whole tile inside one of its groups, so its group (and later its
        coefficients) is a scalar; otherwise it is a per-fold vector.
        """
        first = pid_c * BLOCK_C
        cols = first + tl.arange(0, BLOCK_C)
        col_mask = cols < D
        folds = first + tl.arange(0, BLOCK_C // FOLD) * FOLD  # each fold's first column
        group_a = first // cpg_a if UNIFORM_A else folds // cpg_a
        group_b = first // cpg_b if UNIFORM_B else folds // cpg_b
        if INDEX_64:
            cols = cols.to(tl.int64)
        return cols, col_mask, folds < D, group_a, group_b

    @triton.jit
    def _unzip(t):
        """Even and odd columns of a 2D tile (no data moves where each thread holds column pairs)."""
        return tl.split(tl.reshape(t, (t.shape[0], t.shape[1] // 2, 2)))

    @triton.jit
    def _zip(even, odd):
        """The inverse of ``_unzip``."""
        return tl.reshape(tl.join(even, odd), (even.shape[0], even.shape[1] * 2))

    @triton.jit
    def _column_parts(t, FOLD: tl.constexpr):
        """The tile as FOLD tiles, each with one column of every fold (FOLD adjacent columns).

        Work on the parts one after another lets a thread add the gradient terms of the FOLD
        adjacent elements it holds into one running sum: FOLD times fewer accumulator registers.
        """
        if FOLD == 1:
            parts = (t,)
        else:
            even, odd = _unzip(t)
            if FOLD == 2:
                parts = (even, odd)
            else:
                e0, e1 = _unzip(even)
                o0, o1 = _unzip(odd)
                if FOLD == 4:
                    parts = (e0, e1, o0, o1)
                else:
                    tl.static_assert(FOLD == 8, "FOLD must be 1, 2, 4 or 8")
                    a0, a1 = _unzip(e0)
                    b0, b1 = _unzip(e1)
                    c0, c1 = _unzip(o0)
                    d0, d1 = _unzip(o1)
                    parts = (a0, a1, b0, b1, c0, c1, d0, d1)
        return parts

    @triton.jit
    def _join_parts(parts, FOLD: tl.constexpr):
        """The inverse of ``_column_parts``."""
        if FOLD == 1:
            t = parts[0]
        elif FOLD == 2:
            t = _zip(parts[0], parts[1])
        elif FOLD == 4:
            t = _zip(_zip(parts[0], parts[1]), _zip(parts[2], parts[3]))
        else:
            even = _zip(_zip(parts[0], parts[1]), _zip(parts[2], parts[3]))
            odd = _zip(_zip(parts[4], parts[5]), _zip(parts[6], parts[7]))
            t = _zip(even, odd)
        return t

    @triton.jit
    def _offsets(rows, cols, S, D, INNER, col_mask, INDEX_64: tl.constexpr):
        if INDEX_64:
            rows = rows.to(tl.int64)
        row_offsets = (rows // INNER) * (D * INNER) + rows % INNER
        offsets = row_offsets[:, None] + cols[None, :] * INNER
        mask = (rows < S)[:, None] & col_mask[None, :]
        return offsets, mask

    @triton.jit
    def _tile_at(ptr, s0, cols, col_mask, S, D, INNER, BLOCK_S: tl.constexpr, INDEX_64: tl.constexpr):
        """The [BLOCK_S, BLOCK_C] tile at rows s0.., zeros past the end (row masks keep loads vectorised)."""
        offsets, mask = _offsets(s0 + tl.arange(0, BLOCK_S), cols, S, D, INNER, col_mask, INDEX_64)
        return tl.load(ptr + offsets, mask=mask, other=0.0)

    @triton.jit
    def _store(ptr, offsets, value, mask, EVEN: tl.constexpr):
        if EVEN:
            tl.store(ptr + offsets, value)
        else:
            tl.store(ptr + offsets, value, mask=mask)

    @triton.jit
    def _load_coefficients(ptr, group, col_mask, K: tl.constexpr, ABS: tl.constexpr, DTYPE: tl.constexpr,
                           UNIFORM: tl.constexpr):  # fmt: skip
        """Tuple of the K coefficients of the tile's group(s): scalars, or [1, BLOCK_C] rows."""
        coefficients = ()
        for k in tl.static_range(K):
            if UNIFORM:
                c = tl.load(ptr + group * K + k).to(DTYPE)
            else:
                c = tl.load(ptr + group * K + k, mask=col_mask, other=0.0).to(DTYPE)[None, :]
            if ABS:
                c = tl.abs(c)
            coefficients = coefficients + (c,)
        return coefficients

    @triton.jit
    def _reciprocal(q, FAST: tl.constexpr):
        """1/q for 1 <= q < 2**126: one MUFU.RCP (about 1 ulp) in float32 when FAST, else a division.

        The fast path skips the range checks of IEEE division, which cost as much as the rest
        of the forward pass; q is never outside that range there (see ``_safe_limit``).
        """
        if FAST and q.dtype == tl.float32:
            return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [q], dtype=tl.float32,
                                             is_pure=True, pack=1)  # fmt: skip
        else:
            return 1.0 / q

    @triton.jit
    def _rational(x, ax, a, b, M: tl.constexpr, N: tl.constexpr):
        """P(x) and Q(x) by Horner's rule, one FMA per coefficient; ``b`` holds |B|, ``ax`` |x|."""
        p = _horner(x, a, M)
        if N > 0:
            q = _horner(ax, b, N - 1) * ax + 1.0
        else:
            q = tl.full(x.shape, 1.0, x.dtype)
        return p, q

    @triton.jit
    def _horner(x, c, DEGREE: tl.constexpr):
        """sum_{i <= DEGREE} c[i] x^i, one FMA per coefficient (no broadcast add to start)."""
        if DEGREE == 0:
            return tl.broadcast_to(c[0], x.shape)
        else:
            h = c[DEGREE] * x + c[DEGREE - 1]
            for i in tl.static_range(DEGREE - 2, -1, -1):
                h = h * x + c[i]
            return h

    @triton.jit
    def _derivative(x, c, K: tl.constexpr, SHIFT: tl.constexpr):
        """sum_{k < K} (k+1) c[k+SHIFT] x^k by Horner's rule: the derivative of P (c = A, SHIFT = 1)
        or, in |x|, of Q (c = |B|, SHIFT = 0)."""
        if K == 0:
            return tl.zeros_like(x)
        else:
            scaled = ()
            for k in tl.static_range(K):
                scaled = scaled + ((k + 1) * c[k + SHIFT],)
            return _horner(x, scaled, K - 1)

    @triton.jit
    def _cast(v, DTYPE: tl.constexpr):
        """v as DTYPE; float64 reaches 16-bit types through float32 (the Triton interpreter's direct
        float64 -> bfloat16 cast returns garbage)."""
        if v.dtype == tl.float64 and DTYPE.primitive_bitwidth == 16:
            v = v.to(tl.float32)
        return v.to(DTYPE)

    @triton.jit
    def _rational_value(x, a, b, M: tl.constexpr, N: tl.constexpr, OUT: tl.constexpr, FAST: tl.constexpr):
        p, q = _rational(x, tl.abs(x), a, b, M, N)
        return _cast(p * _reciprocal(q, FAST), OUT)

    @triton.jit
    def _rational_tile(x, a, b, largest, M: tl.constexpr, N: tl.constexpr, FOLD: tl.constexpr, OUT: tl.constexpr,
                       COMPUTE: tl.constexpr, FAST: tl.constexpr):  # fmt: skip
        """F of a tile (as OUT), with one coefficient set per FOLD adjacent columns (see
        ``_column_parts``); ``largest`` updated with its |x|."""
        xs = _column_parts(x, FOLD)
        ys = ()
        for p in tl.static_range(FOLD):
            xp = xs[p].to(COMPUTE)
            largest = tl.maximum(largest, tl.abs(xp))
            ys = ys + (_rational_value(xp, a, b, M, N, OUT, FAST),)
        return _join_parts(ys, FOLD), largest

    @triton.jit
    def _power(x, k: tl.constexpr):
        """x**k for a small constant k by repeated squaring (unrolled)."""
        result = tl.full(x.shape, 1.0, x.dtype)
        base = x
        for bit in tl.static_range(8):
            if (k >> bit) & 1:
                result = result * base
            if (k >> (bit + 1)) > 0:
                base = base * base
        return result

    @triton.jit
    def _rational_grads(x, g, a, b, M: tl.constexpr, N: tl.constexpr, DX: tl.constexpr, TERMS: tl.constexpr,
                        FAST: tl.constexpr):  # fmt: skip
        """dx (as DX) and the m+1+n per-element coefficient-gradient terms (as TERMS).

        terms[i]     = g x^i / Q                  (numerator i)
        terms[m+1+j] = -g F |x|^(j+1) / Q          (denominator j; sign(B) is applied after summing)

        Horner's rule for P, Q and their derivatives; the terms reuse powers of x built once.
        """
        ax = tl.abs(x)
        p, q = _rational(x, ax, a, b, M, N)
        r = _reciprocal(q, FAST)
        f = p * r
        dp = _derivative(x, a, M, 1)  # P'(x)
        dq = _derivative(ax, b, N, 0)  # Q'(x) / sign(x), sign(0) = +1
        gr = g * r
        dx = gr * (dp - f * tl.where(x >= 0, dq, -dq))
        terms = (gr.to(TERMS),)
        for i in tl.static_range(1, M + 1):
            terms = terms + ((gr * _power(x, i)).to(TERMS),)
        w = -gr * f
        for j in tl.static_range(N):
            if j % 2 == 1:  # even powers of |x| are powers of x
                terms = terms + ((w * _power(x, j + 1)).to(TERMS),)
            else:
                terms = terms + ((w * ax * _power(x, j)).to(TERMS),)
        return _cast(dx, DX), terms

    @triton.jit
    def _forward_kernel(
        x_ptr, y_ptr, a_ptr, b_ptr,
        S, D, INNER, cpg_a, cpg_b, safe_limit,
        M: tl.constexpr, N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
        UNIFORM_A: tl.constexpr, UNIFORM_B: tl.constexpr, EVEN: tl.constexpr,
        COMPUTE: tl.constexpr, INDEX_64: tl.constexpr, FAST: tl.constexpr, FOLD: tl.constexpr,
    ):  # fmt: skip
        cols, col_mask, fold_mask, group_a, group_b = _tile(tl.program_id(1), D, cpg_a, cpg_b, BLOCK_C, FOLD,
                                                            UNIFORM_A, UNIFORM_B, INDEX_64)  # fmt: skip
        a = _load_coefficients(a_ptr, group_a, fold_mask, M + 1, False, COMPUTE, UNIFORM_A)
        b = _load_coefficients(b_ptr, group_b, fold_mask, N, True, COMPUTE, UNIFORM_B)
        largest = tl.zeros((BLOCK_S, BLOCK_C // FOLD), dtype=COMPUTE)  # max |x| seen, for the range check
        start, step = tl.program_id(0) * BLOCK_S, tl.num_programs(0) * BLOCK_S
        x_ahead = _tile_at(x_ptr, start, cols, col_mask, S, D, INNER, BLOCK_S, INDEX_64)
        for s0 in range(start, S, step):
            # The next tile is loaded before this one is worked on, so memory latency overlaps work.
            x = x_ahead
            x_ahead = _tile_at(x_ptr, s0 + step, cols, col_mask, S, D, INNER, BLOCK_S, INDEX_64)
            y, largest = _rational_tile(x, a, b, largest, M, N, FOLD, y_ptr.dtype.element_ty, COMPUTE, FAST)
            offsets, mask = _offsets(s0 + tl.arange(0, BLOCK_S), cols, S, D, INNER, col_mask, INDEX_64)
            _store(y_ptr, offsets, y, mask, EVEN)
        if tl.max(largest) > safe_limit:  # rare: redo this program's elements in float64
            _redo_forward_in_float64(x_ptr, y_ptr, a_ptr, b_ptr, cols, col_mask, fold_mask, group_a, group_b, S, D,
                                     INNER, M, N, BLOCK_S, BLOCK_C, FOLD, UNIFORM_A, UNIFORM_B, INDEX_64)  # fmt: skip

    @triton.jit
    def _redo_forward_in_float64(x_ptr, y_ptr, a_ptr, b_ptr, cols, col_mask, fold_mask, group_a, group_b, S, D,
                                 INNER, M: tl.constexpr, N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                                 FOLD: tl.constexpr, UNIFORM_A: tl.constexpr, UNIFORM_B: tl.constexpr,
                                 INDEX_64: tl.constexpr):  # fmt: skip
        """Overwrite this program's outputs with a float64 evaluation, a row at a time (few registers)."""
        tl.debug_barrier()  # the main loop's stores come first
        a = _load_coefficients(a_ptr, group_a, fold_mask, M + 1, False, tl.float64, UNIFORM_A)
        b = _load_coefficients(b_ptr, group_b, fold_mask, N, True, tl.float64, UNIFORM_B)
        unused = tl.zeros((1, BLOCK_C // FOLD), dtype=tl.float64)
        for s0 in range(tl.program_id(0) * BLOCK_S, S, tl.num_programs(0) * BLOCK_S):
            for row in range(s0, tl.minimum(s0 + BLOCK_S, S)):
                offsets, mask = _offsets(tl.full((1,), row, tl.int32), cols, S, D, INNER, col_mask, INDEX_64)
                x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
                y, _ = _rational_tile(x, a, b, unused, M, N, FOLD, y_ptr.dtype.element_ty, tl.float64, False)
                tl.store(y_ptr + offsets, y, mask=mask)

    @triton.jit
    def _column_sums(t, UNIFORM: tl.constexpr):
        """Sum over the rows of a tile; over its columns too when they share one group (UNIFORM)."""
        if UNIFORM:
            return tl.sum(tl.sum(t, axis=1), axis=0)
        else:
            return tl.sum(t, axis=0)

    @triton.jit
    def _sum_terms(acc, M: tl.constexpr, N: tl.constexpr, COPIES: tl.constexpr, UNIFORM_A: tl.constexpr,
                   UNIFORM_B: tl.constexpr):  # fmt: skip
        """Column sums (float64) of each coefficient's running sums (their COPIES added first):
        numerator ones, then denominator ones."""
        sums = ()
        for k in tl.static_range(M + 1 + N):
            t = acc[k]
            for c in tl.static_range(1, COPIES):
                t = t + acc[c * (M + 1 + N) + k]
            sums = sums + (_column_sums(t, UNIFORM_A if k <= M else UNIFORM_B).to(tl.float64),)
        return sums

    @triton.jit
    def _zero_terms(M: tl.constexpr, N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                    DTYPE: tl.constexpr, COPIES: tl.constexpr):  # fmt: skip
        """COPIES sets of m+1+n zero tiles: the start of running sums of the coefficient-gradient terms."""
        terms = ()
        for k in tl.static_range(COPIES * (M + 1 + N)):
            terms = terms + (tl.zeros((BLOCK_S, BLOCK_C), dtype=DTYPE),)
        return terms

    @triton.jit
    def _add_terms(sums, terms, FIRST: tl.constexpr):
        """``sums`` with the tuple ``terms`` added to its entries FIRST, FIRST+1, ..."""
        total = ()
        for k in tl.static_range(len(sums)):
            if k >= FIRST and k < FIRST + len(terms):
                total = total + (sums[k] + terms[k - FIRST],)
            else:
                total = total + (sums[k],)
        return total

    @triton.jit
    def _store_partials(partial_ptr, sums, col_mask, group, first_group, tile,
                        FIRST: tl.constexpr, K: tl.constexpr, SLOTS: tl.constexpr, UNIFORM: tl.constexpr):  # fmt: skip
        """Store column sums FIRST..FIRST+K-1 per group slot of the tile: partial[tile, slot, k]."""
        if UNIFORM:  # sums are already scalars
            for k in tl.static_range(K):
                tl.store(partial_ptr + tile * K + k, sums[FIRST + k])
        else:
            slots = tl.arange(0, SLOTS)
            onehot = ((group - first_group)[:, None] == slots[None, :]) & col_mask[:, None]
            for k in tl.static_range(K):
                per_slot = tl.sum(tl.where(onehot, sums[FIRST + k][:, None], 0.0), axis=0)
                tl.store(partial_ptr + (tile * SLOTS + slots) * K + k, per_slot)

    @triton.jit
    def _accumulate_tile(x, g, a, b, acc, largest, M: tl.constexpr, N: tl.constexpr, FOLD: tl.constexpr,
                         SHARED_SUMS: tl.constexpr, DX: tl.constexpr, COMPUTE: tl.constexpr,
                         FAST: tl.constexpr):  # fmt: skip
        """dx of a tile (as DX); ``acc`` plus its coefficient-gradient terms; ``largest`` updated
        with its |x|. The FOLD adjacent columns of a coefficient set add their terms into one
        set of running sums if SHARED_SUMS, else each into its own (``acc`` holds FOLD sets)."""
        xs, gs = _column_parts(x, FOLD), _column_parts(g, FOLD)
        dxs = ()
        for p in tl.static_range(FOLD):
            xp = xs[p].to(COMPUTE)
            largest = tl.maximum(largest, tl.abs(xp))
            dx, terms = _rational_grads(xp, gs[p].to(COMPUTE), a, b, M, N, DX, COMPUTE, FAST)  # masked: g = 0
            acc = _add_terms(acc, terms, 0 if SHARED_SUMS else p * (M + 1 + N))
            dxs = dxs + (dx,)
        return _join_parts(dxs, FOLD), acc, largest

    @triton.jit
    def _backward_kernel(
        x_ptr, g_ptr, dx_ptr, a_ptr, b_ptr, partial_ptr,
        S, D, INNER, cpg_a, cpg_b, safe_limit, offset_b,
        M: tl.constexpr, N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, FOLD: tl.constexpr,
        UNIFORM_A: tl.constexpr, UNIFORM_B: tl.constexpr, EVEN: tl.constexpr,
        SLOTS_A: tl.constexpr, SLOTS_B: tl.constexpr, COMPUTE: tl.constexpr, INDEX_64: tl.constexpr,
        FAST: tl.constexpr, PDL: tl.constexpr, SHARED_SUMS: tl.constexpr,
    ):  # fmt: skip
        DX: tl.constexpr = dx_ptr.dtype.element_ty
        COPIES: tl.constexpr = 1 if SHARED_SUMS else FOLD
        if PDL:  # the reduction kernel may start launching now (it waits for this grid's end itself)
            tl.extra.cuda.gdc_launch_dependents()
        pid_c = tl.program_id(1)
        cols, col_mask, fold_mask, group_a, group_b = _tile(pid_c, D, cpg_a, cpg_b, BLOCK_C, FOLD, UNIFORM_A,
                                                            UNIFORM_B, INDEX_64)  # fmt: skip
        a = _load_coefficients(a_ptr, group_a, fold_mask, M + 1, False, COMPUTE, UNIFORM_A)
        b = _load_coefficients(b_ptr, group_b, fold_mask, N, True, COMPUTE, UNIFORM_B)

        # Running sums of each coefficient's gradient terms (registers only): COPIES sets of tiles
        # of one sum per fold, so per element, or per FOLD elements where they are shared.
        acc = _zero_terms(M, N, BLOCK_S, BLOCK_C // FOLD, COMPUTE, COPIES)
        largest = tl.zeros((BLOCK_S, BLOCK_C // FOLD), dtype=COMPUTE)  # max |x| seen, for the range check
        start, step = tl.program_id(0) * BLOCK_S, tl.num_programs(0) * BLOCK_S
        x_ahead = _tile_at(x_ptr, start, cols, col_mask, S, D, INNER, BLOCK_S, INDEX_64)
        g_ahead = _tile_at(g_ptr, start, cols, col_mask, S, D, INNER, BLOCK_S, INDEX_64)
        for s0 in range(start, S, step):
            # The next tile is loaded before this one is worked on, so memory latency overlaps work.
            x, g = x_ahead, g_ahead
            x_ahead = _tile_at(x_ptr, s0 + step, cols, col_mask, S, D, INNER, BLOCK_S, INDEX_64)
            g_ahead = _tile_at(g_ptr, s0 + step, cols, col_mask, S, D, INNER, BLOCK_S, INDEX_64)
            dx, acc, largest = _accumulate_tile(x, g, a, b, acc, largest, M, N, FOLD, SHARED_SUMS, DX, COMPUTE,
                                                FAST)  # fmt: skip
            offsets, mask = _offsets(s0 + tl.arange(0, BLOCK_S), cols, S, D, INNER, col_mask, INDEX_64)
            _store(dx_ptr, offsets, dx, mask, EVEN)
        sums = _sum_terms(acc, M, N, COPIES, UNIFORM_A, UNIFORM_B)  # float64 partials: few, exact to add up

        if tl.max(largest) > safe_limit:  # rare: redo this program's elements in float64
            sums = _redo_backward_in_float64(x_ptr, g_ptr, dx_ptr, a_ptr, b_ptr, cols, col_mask, fold_mask, group_a,
                                             group_b, S, D, INNER, M, N, BLOCK_S, BLOCK_C, FOLD, UNIFORM_A,
                                             UNIFORM_B, INDEX_64)  # fmt: skip

        # Once per program: one value per (group slot, coefficient), with plain stores.
        tile = tl.program_id(0) * tl.num_programs(1) + pid_c
        first = pid_c * BLOCK_C
        _store_partials(partial_ptr, sums, fold_mask, group_a, first // cpg_a, tile, 0, M + 1, SLOTS_A, UNIFORM_A)
        if N > 0:  # B's partials follow A's in the same buffer
            _store_partials(partial_ptr + offset_b, sums, fold_mask, group_b, first // cpg_b, tile, M + 1, N, SLOTS_B,
                            UNIFORM_B)  # fmt: skip

    @triton.jit
    def _redo_backward_in_float64(x_ptr, g_ptr, dx_ptr, a_ptr, b_ptr, cols, col_mask, fold_mask, group_a, group_b,
                                  S, D, INNER, M: tl.constexpr, N: tl.constexpr, BLOCK_S: tl.constexpr,
                                  BLOCK_C: tl.constexpr, FOLD: tl.constexpr, UNIFORM_A: tl.constexpr,
                                  UNIFORM_B: tl.constexpr, INDEX_64: tl.constexpr):  # fmt: skip
        """Overwrite this program's dx with a float64 evaluation and return its float64 column sums,
        a row at a time (few registers)."""
        tl.debug_barrier()  # the main loop's dx stores come first
        a = _load_coefficients(a_ptr, group_a, fold_mask, M + 1, False, tl.float64, UNIFORM_A)
        b = _load_coefficients(b_ptr, group_b, fold_mask, N, True, tl.float64, UNIFORM_B)
        acc = _zero_terms(M, N, 1, BLOCK_C // FOLD, tl.float64, 1)
        unused = tl.zeros((1, BLOCK_C // FOLD), dtype=tl.float64)
        for s0 in range(tl.program_id(0) * BLOCK_S, S, tl.num_programs(0) * BLOCK_S):
            for row in range(s0, tl.minimum(s0 + BLOCK_S, S)):
                offsets, mask = _offsets(tl.full((1,), row, tl.int32), cols, S, D, INNER, col_mask, INDEX_64)
                x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
                g = tl.load(g_ptr + offsets, mask=mask, other=0.0)
                dx, acc, _ = _accumulate_tile(x, g, a, b, acc, unused, M, N, FOLD, True, dx_ptr.dtype.element_ty,
                                              tl.float64, False)  # fmt: skip
                tl.store(dx_ptr + offsets, dx, mask=mask)
        return _sum_terms(acc, M, N, 1, UNIFORM_A, UNIFORM_B)

    @triton.jit
    def _reduce_group(partial_ptr, coef_ptr, out_ptr, group, programs_s, tiles_c, cpg,
                      K: tl.constexpr, K_PAD: tl.constexpr, SLOTS: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_P: tl.constexpr, SIGN: tl.constexpr):  # fmt: skip
        """Sum, in a fixed order and in float64, every partial of ``group``; store d coef[group, :].

        The (program, tile) pairs holding the group's partials are visited BLOCK_P at a time, so a
        group spread over many tiles (a shared numerator) costs a few loads, not one per tile.
        """
        ks = tl.arange(0, K_PAD)
        first_tile = (group * cpg) // BLOCK_C
        tiles = ((group + 1) * cpg - 1) // BLOCK_C - first_tile + 1
        acc = tl.zeros((BLOCK_P, K_PAD), dtype=tl.float64)
        for i0 in range(0, programs_s * tiles, BLOCK_P):
            i = i0 + tl.arange(0, BLOCK_P)
            t = first_tile + i % tiles
            slot = group - (t * BLOCK_C) // cpg if SLOTS > 1 else 0
            index = (((i // tiles) * tiles_c + t) * SLOTS + slot)[:, None] * K + ks[None, :]
            mask = (i < programs_s * tiles)[:, None] & (ks < K)[None, :]
            acc += tl.load(partial_ptr + index, mask=mask, other=0.0)
        total = tl.sum(acc, axis=0)
        if SIGN:  # d/dB carries sign(B), with sign(0) = +1
            coef = tl.load(coef_ptr + group * K + ks, mask=ks < K, other=0.0)
            total = tl.where(coef >= 0, total, -total)
        tl.store(out_ptr + group * K + ks, total.to(out_ptr.dtype.element_ty), mask=ks < K)

    @triton.jit
    def _reduce_kernel(
        partial_ptr, a_ptr, da_ptr, b_ptr, db_ptr,
        offset_b, groups_a, programs_s, tiles_c, cpg_a, cpg_b,
        M: tl.constexpr, N: tl.constexpr, MP: tl.constexpr, NP: tl.constexpr,
        SLOTS_A: tl.constexpr, SLOTS_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        if PDL:  # launched while the backward kernel runs: wait until its partials are written
            tl.extra.cuda.gdc_wait()
        group = tl.program_id(0)
        if group < groups_a:
            _reduce_group(partial_ptr, a_ptr, da_ptr, group, programs_s, tiles_c, cpg_a,
                          M + 1, MP, SLOTS_A, BLOCK_C, BLOCK_P, False)  # fmt: skip
        else:
            _reduce_group(partial_ptr + offset_b, b_ptr, db_ptr, group - groups_a, programs_s, tiles_c, cpg_b,
                          N, NP, SLOTS_B, BLOCK_C, BLOCK_P, True)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _dense_layout(shape: tuple, stride: tuple, dim: int) -> tuple[int, int, int] | None:
    """(S, D, inner) of a tensor of ``shape`` and ``stride`` if it is non-overlapping and dense
    (any dim order), else None."""
    dims = sorted((d for d in range(len(shape)) if shape[d] > 1), key=lambda d: stride[d])
    expected = 1
    for d in dims:
        if stride[d] != expected:
            return None
        expected *= shape[d]
    channels = shape[dim]
    inner = stride[dim] if channels > 1 else 1
    return math.prod(shape) // max(channels, 1), channels, inner


def _contiguous_layout(shape: tuple, dim: int) -> tuple[int, int, int]:
    """(S, D, inner) of a contiguous tensor of ``shape``."""
    channels, inner = shape[dim], math.prod(shape[dim + 1:])
    return math.prod(shape) // max(channels, 1), channels, inner if channels > 1 else 1


def _as_dense(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t`` (a contiguous copy if it is not dense, e.g. a strided slice) and its (S, D, inner)."""
    layout = _dense_layout(t.shape, t.stride(), dim)
    if layout is None:
        return t.contiguous(), _contiguous_layout(tuple(t.shape), dim)
    return t, layout


@functools.lru_cache(maxsize=None)
def _programs_per_wave(device_index: int) -> int:
    if device_index < 0:  # the Triton interpreter on the CPU: a few programs exercise the row loop
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _safe_limit(m: int, n: int) -> float:
    """Largest |x| for which float32 evaluation cannot overflow with coefficients of sane size."""
    return float(2.0 ** (96 // max(m, n, 1)))


def _arithmetic(dtype: torch.dtype, m: int, n: int, device_index: int) -> tuple:
    """How a signature's kernels evaluate the rational: (compute dtype, fast reciprocal, safe limit).

    Float32 arithmetic except for float64 inputs, which never need the float64 redo (safe limit
    inf); PTX's fast reciprocal on NVIDIA GPUs, where the interpreter (and ROCm) divide.
    """
    compute = tl.float64 if dtype == torch.float64 else tl.float32
    fast = device_index >= 0 and torch.version.hip is None and os.environ.get("TRITON_INTERPRET") != "1"
    return compute, fast, float("inf") if dtype == torch.float64 else _safe_limit(m, n)


def _tile_width(D: int, cpg_a: int, cpg_b: int, itemsize: int) -> int:
    """Columns per tile: a power of two, with every coefficient set uniform over a tile (all its
    columns in one group) where such tiles span a whole 128-byte line per row (32 columns, 64 in
    16-bit), else 64 columns (folds keep per-group coefficients cheap there, see ``_fold``)."""
    common = math.gcd(cpg_a, cpg_b)
    both_uniform = min(common & -common, 64)  # largest power of two dividing both group widths
    if both_uniform >= max(128 // itemsize, 32):
        return both_uniform
    return min(_next_pow2(D), 64)


def _group_slots(width: int, cpg: int) -> int:
    """Most groups that one tile of ``width`` columns (starting at a multiple of it) can touch."""
    if cpg % width == 0:
        return 1
    if width % cpg == 0:
        return width // cpg
    return min(_next_pow2((width - 1) // cpg + 2), width)


def _fold(config: "_Config", dtype: torch.dtype, inner: int, elements: int) -> int:
    """Adjacent columns per coefficient set, see ``_column_parts``: the columns one thread holds
    (a 16-byte load's worth), within one group of every non-uniform set. Float32 tiles with scalar
    coefficients stay unfolded: they keep a running sum per element, so a fold would save nothing
    and only change the order of the final sums."""
    if inner != 1 or dtype.itemsize > 4 or (dtype.itemsize == 4 and config.uniform_a and config.uniform_b):
        return 1
    fold = min(16 // dtype.itemsize, config.block_c, max(elements // (32 * config.num_warps), 1))
    for cpg, uniform in ((config.cpg_a, config.uniform_a), (config.cpg_b, config.uniform_b)):
        if not uniform:
            fold = min(fold, cpg & -cpg)  # largest power of two dividing the group width
    return fold


_INDEX_64_FROM = 2**31 - 1  # element count from which offsets are computed in int64

# Tile sizes, whether float32 folds share running sums, register caps, grid occupancy (programs
# per SM) and the final reduction's shape; the defaults were chosen by measurement (docs/BENCHMARKS.md).
_TUNING = dict(num_warps=4, shared_sums_32bit=False,
               forward_elements=1024, forward_waves=8, forward_maxnreg=40, forward_capped_waves=12,
               backward_elements=512, backward_elements_16bit=1024, backward_waves=4, backward_maxnreg=80,
               backward_capped_waves=6, reduce_rows=1024, reduce_warps=16, pdl=True)  # fmt: skip


class _Config:
    """Launch parameters for one (layout, dtype, order, groups, device) combination."""

    def __init__(self, S, D, inner, dtype, m, n, groups_a, groups_b, device_index, backward):
        self.cpg_a, self.cpg_b = D // groups_a, D // groups_b
        if inner == 1:
            self.block_c = _tile_width(D, self.cpg_a, self.cpg_b, dtype.itemsize)
        else:
            self.block_c = min(_next_pow2(D), 16)
        self.uniform_a = groups_a == 1 or self.cpg_a % self.block_c == 0
        self.uniform_b = groups_b == 1 or self.cpg_b % self.block_c == 0
        self.slots_a = 1 if self.uniform_a else _group_slots(self.block_c, self.cpg_a)
        self.slots_b = 1 if self.uniform_b else _group_slots(self.block_c, self.cpg_b)
        self.num_warps = _TUNING["num_warps"]
        kind = "backward" if backward else "forward"
        elements = _TUNING["forward_elements"]
        if backward:
            # 16-bit tiles twice as large (a 16-byte load per thread) where a thread's elements
            # share running sums; unfolded, every element needs its own m+1+n of them
            elements = _TUNING["backward_elements_16bit" if dtype.itemsize == 2 else "backward_elements"]
        self.fold = _fold(self, dtype, inner, elements)
        # A fold's columns share running sums in 16-bit; float32 keeps one per element, because
        # sharing costs accuracy there (measured, docs/BENCHMARKS.md step 16)
        self.shared_sums = backward and self.fold > 1 and (dtype.itemsize == 2 or _TUNING["shared_sums_32bit"])
        if backward and not self.shared_sums:
            elements = _TUNING["backward_elements"]
        self.block_s = max(elements // self.block_c, 1)
        self.tiles_c = triton.cdiv(D, self.block_c)
        # A register cap buys more resident programs per SM where nothing spills: coefficients are
        # scalars (uniform tiles) or one set per fold, at KAT's order or below (measured; above it
        # the cap made the backward spill), and for the forward only 16-bit tiles (half the
        # registers of float32 ones).
        self.capped = ((self.uniform_a and self.uniform_b or self.fold > 1) and m + 1 + n <= 10
                       and (backward or dtype.itemsize == 2) and bool(_TUNING[f"{kind}_maxnreg"]))  # fmt: skip
        self.launch = dict(num_warps=self.num_warps, **({"maxnreg": _TUNING[f"{kind}_maxnreg"]} if self.capped else {}))
        waves = _TUNING[f"{kind}_capped_waves" if self.capped else f"{kind}_waves"]
        wanted = max(_programs_per_wave(device_index) * waves // self.tiles_c, 1)
        self.programs_s = max(min(wanted, triton.cdiv(S, self.block_s)), 1)
        self.even = S % self.block_s == 0 and D % self.block_c == 0
        self.index_64 = S * D >= _INDEX_64_FROM
        self.compute, self.fast, self.safe_limit = _arithmetic(dtype, m, n, device_index)
        # Hopper's programmatic dependent launch: the reduction kernel launches while the backward
        # kernel's last programs run, instead of after the whole grid has drained
        self.pdl = (_TUNING["pdl"] and backward and self.fast
                    and torch.cuda.get_device_capability(device_index)[0] >= 9)  # fmt: skip

    def meta(self) -> dict:
        """The constexpr arguments both kernels share."""
        return dict(BLOCK_S=self.block_s, BLOCK_C=self.block_c, FOLD=self.fold, UNIFORM_A=self.uniform_a,
                    UNIFORM_B=self.uniform_b, EVEN=self.even, COMPUTE=self.compute, INDEX_64=self.index_64,
                    FAST=self.fast, **self.launch)  # fmt: skip


@functools.lru_cache(maxsize=512)
def _config(*key) -> _Config:
    return _Config(*key)


def _device_index(t: torch.Tensor) -> int:
    return t.device.index if t.is_cuda else -1


class _Plan:
    """Everything a call needs that depends only on its signature (the tensors' shapes, strides,
    dtypes and devices, ``dim`` and ``out_dtype``): checked arguments, the dense layout, both
    kernels' configurations and launch arguments. Built once per signature by ``_plan``, because the
    op runs 4 times per transformer block and a training step's host time counts (BENCHMARKS.md).
    """

    def __init__(self, x, numerator, denominator, dim, out_dtype):
        shape, stride = tuple(x.shape), x.stride()
        self.dim = dim = _check_args(x, numerator, denominator, dim, out_dtype)
        self.out_dtype = out_dtype or x.dtype
        layout = _dense_layout(shape, stride, dim)
        self.dense = layout is not None  # else x is made contiguous before launch
        S, D, inner = layout or _contiguous_layout(shape, dim)
        self.empty = math.prod(shape) == 0
        groups_a, m = numerator.shape[0], numerator.shape[1] - 1
        groups_b, n = denominator.shape
        self.key = key = (S, D, inner, x.dtype, m, n, groups_a, groups_b, _device_index(x))
        fwd, bwd = _config(*key, False), _config(*key, True)
        self.forward = ((fwd.programs_s, fwd.tiles_c), (S, D, inner, fwd.cpg_a, fwd.cpg_b, fwd.safe_limit),
                        dict(M=m, N=n, **fwd.meta()))  # fmt: skip
        offset_b = bwd.programs_s * bwd.tiles_c * bwd.slots_a * (m + 1)  # B's partials follow A's
        self.partials = offset_b + max(bwd.programs_s * bwd.tiles_c * bwd.slots_b * n, 1)
        self.backward = ((bwd.programs_s, bwd.tiles_c), (S, D, inner, bwd.cpg_a, bwd.cpg_b, bwd.safe_limit,
                         offset_b), dict(M=m, N=n, SLOTS_A=bwd.slots_a, SLOTS_B=bwd.slots_b, PDL=bwd.pdl,
                                         SHARED_SUMS=bwd.shared_sums, **bwd.meta()))  # fmt: skip
        self.reduce = ((groups_a + (groups_b if n > 0 else 0),),
                       (offset_b, groups_a, bwd.programs_s, bwd.tiles_c, bwd.cpg_a, bwd.cpg_b),
                       dict(M=m, N=n, MP=_next_pow2(m + 1), NP=_next_pow2(max(n, 1)), SLOTS_A=bwd.slots_a,
                            SLOTS_B=bwd.slots_b, BLOCK_C=bwd.block_c, BLOCK_P=_TUNING["reduce_rows"],
                            PDL=bwd.pdl, num_warps=_TUNING["reduce_warps"],
                            **({"launch_pdl": True} if bwd.pdl else {})))  # fmt: skip
        self.launchers: dict = {}  # direct launchers of this plan's compiled kernels, see ``_launch``
        self.native: bool | None = None  # registered with the native launcher? (None: not tried yet)


_PLANS: dict = {}


def _plan(x, numerator, denominator, dim, out_dtype) -> _Plan:
    """The checked plan of a call (``ValueError``/``TypeError`` on bad arguments), cached by signature."""
    if not all(isinstance(t, torch.Tensor) for t in (x, numerator, denominator)):
        reference.check_args(x, numerator, denominator, dim)  # raises the TypeError
    signature = (x.shape, x.stride(), x.dtype, x.device, numerator.shape, numerator.dtype, numerator.device,
                 denominator.shape, denominator.dtype, denominator.device, dim, out_dtype)  # fmt: skip
    plan = _PLANS.get(signature)
    if plan is None:
        if len(_PLANS) >= 4096:  # e.g. a sweep over shapes: start over rather than grow
            _PLANS.clear()
        plan = _PLANS[signature] = _Plan(x, numerator, denominator, dim, out_dtype)
    return plan


# Eager CUDA launches go through per-plan launchers (see ``_launch``); FLASHKAT_FAST_LAUNCH=0 turns them off.
_FAST_LAUNCH = os.environ.get("FLASHKAT_FAST_LAUNCH", "1") != "0" and os.environ.get("TRITON_INTERPRET") != "1"


def _clear_caches() -> None:
    """Forget configurations, plans and launchers (after changing ``_TUNING`` or ``_INDEX_64_FROM``)."""
    _config.cache_clear()
    _PLANS.clear()
    native.clear()


def _bare_launch(run):
    """(Triton 3.6's compiled launch function, its flags) behind ``run``, whose Python wrapper only
    allocates scratch memory these kernels do not use; None for other versions or kernels."""
    if not triton.__version__.startswith("3.6."):
        return None
    try:
        if run.global_scratch_size or run.profile_scratch_size:
            return None
        return run.launch, (run.launch_cooperative_grid, run.launch_pdl, None, None)
    except AttributeError:
        return None


def _launches_hooked() -> bool:
    """Whether a profiler hooked Triton's launches (which launch paths that skip Triton's would hide)."""
    hooks = (triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook)
    return any(hook is not None and getattr(hook, "calls", True) for hook in hooks)


def _direct_launcher(compiled, grid: tuple, constants: tuple, device_index: int):
    """A function of the runtime arguments that launches ``compiled`` on the current stream: what
    ``compiled[grid](*args)`` does, without rebuilding a closure and looking up the device, stream
    and hooks on every call. None where this Triton's compiled kernels look different."""
    if _launches_hooked():
        return None  # a profiler hooked the launches: keep Triton's own path
    try:
        compiled._init_handles()
        run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
    except AttributeError:
        return None
    stream = torch._C._cuda_getCurrentRawStream
    x, y, z = (*grid, 1, 1)[:3]
    target, flags = _bare_launch(run) or (run, ())  # the bare function takes the flags ``run`` adds

    def launch(args: tuple) -> None:
        target(x, y, z, stream(device_index), function, *flags, metadata, None, None, None, *args, *constants)

    return launch


def _off_current_device(t: torch.Tensor) -> bool:
    """Whether ``t`` lives on a CUDA device other than the current one: Triton compiles, loads and
    launches for the current device, so such calls run under a device guard."""
    return t.is_cuda and t.device.index != torch.cuda.current_device()


def _launch(kernel, grid: tuple, tensors: tuple, scalars: tuple, meta: dict, plan: _Plan) -> None:
    """``kernel[grid](*tensors, *scalars, **meta)``, fast after the first launch with the same key.

    Triton's launcher binds and specialises every argument on every call, which costs more host
    time than the GPU time of a small layer. The plan fixes the grid and the scalar arguments; the
    key adds the tensors' dtypes (one of them, the incoming gradient's, is not in the plan). Only
    calls whose tensors are all 16-byte aligned (what Triton specialises pointers on) use cached
    launchers; others take Triton's path every time.
    """
    global _FAST_LAUNCH
    if _off_current_device(tensors[0]):
        with torch.cuda.device(tensors[0].device):
            return _launch(kernel, grid, tensors, scalars, meta, plan)
    aligned = True
    for t in tensors:
        if t.data_ptr() % 16:
            aligned = False
    key = (kernel.fn, *[t.dtype for t in tensors])
    launcher = plan.launchers.get(key) if aligned and _FAST_LAUNCH else None
    if launcher is not None:
        try:
            return launcher(tensors + scalars)
        except TypeError:  # another Triton's launcher signature (raised before launching): use the JIT's
            _FAST_LAUNCH = False
    compiled = kernel[grid](*tensors, *scalars, **meta)
    if aligned and _FAST_LAUNCH and tensors[0].is_cuda:
        constants = tuple(meta[name] for name in kernel.arg_names[len(tensors) + len(scalars):])
        launcher = _direct_launcher(compiled, grid, constants, tensors[0].device.index)
        if launcher is None:
            _FAST_LAUNCH = False
        else:
            plan.launchers[key] = launcher


def triton_forward(
    x: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    dim: int = -1,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """F(x) by the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), stored
    in ``out_dtype`` (default: x's dtype)."""
    return _launch_forward(x, numerator, denominator, _plan(x, numerator, denominator, dim, out_dtype))


def _launch_forward(x, numerator, denominator, plan: _Plan) -> torch.Tensor:
    if not plan.dense:  # e.g. a strided slice
        x = x.contiguous()
    y = torch.empty_like(x, dtype=plan.out_dtype)
    if plan.empty:
        return y
    numerator, denominator = numerator.contiguous(), denominator.contiguous()
    grid, scalars, meta = plan.forward
    _launch(_forward_kernel, grid, (x, y, numerator, denominator), scalars, meta, plan)
    return y


def triton_backward(
    grad_output: torch.Tensor, x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, dim: int = -1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d numerator, d denominator) by the Triton kernels, deterministically."""
    plan = _plan(x, numerator, denominator, dim, None)
    if not isinstance(grad_output, torch.Tensor) or grad_output.shape != x.shape:
        shape = tuple(grad_output.shape) if isinstance(grad_output, torch.Tensor) else type(grad_output).__name__
        raise ValueError(f"group_rational: grad_output shape {shape} != x shape {tuple(x.shape)}")
    return _launch_backward(grad_output, x, numerator, denominator, plan)


def _launch_backward(grad_output, x, numerator, denominator, plan: _Plan):
    if not plan.dense:
        x = x.contiguous()
    if grad_output.stride() != x.stride():
        grad_output = torch.empty_like(x, dtype=grad_output.dtype).copy_(grad_output)
    numerator, denominator = numerator.contiguous(), denominator.contiguous()
    dx, da, db = torch.empty_like(x), torch.empty_like(numerator), torch.empty_like(denominator)
    if plan.empty:
        return dx, da.zero_(), db.zero_()
    partials = torch.empty(plan.partials, device=x.device, dtype=torch.float64)
    grid, scalars, meta = plan.backward
    _launch(_backward_kernel, grid, (x, grad_output, dx, numerator, denominator, partials), scalars, meta, plan)
    grid, scalars, meta = plan.reduce
    _launch(_reduce_kernel, grid, (partials, numerator, da, denominator, db), scalars, meta, plan)
    return dx, da, db


# ----------------------------------------------------------------------------------------------
# torch.library registration: CUDA runs the Triton kernels, every other device the reference.
# Eager CUDA calls skip the dispatcher: see _GroupRational.
# ----------------------------------------------------------------------------------------------


# Backward implementations by name. "flashkat" is this file's; "blocked" and "atomic" re-create
# FlashKAT's and KAT's designs for measurement and teaching (flashkat/ops/baselines.py registers
# them). On devices without Triton every name runs the reference.
BACKWARDS = {"flashkat": triton_backward} if HAS_TRITON else {}


def _check_args(x, numerator, denominator, dim: int, out_dtype) -> int:
    """``reference.check_args`` and a floating ``out_dtype``; returns ``dim`` as an index."""
    dim = reference.check_args(x, numerator, denominator, dim)
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise TypeError(f"group_rational: out_dtype must be a floating-point dtype, got {out_dtype}")
    return dim


def _cuda_backward(grad_output, x, numerator, denominator, plan: _Plan, impl: str):
    """(dx, d numerator, d denominator) by backward implementation ``impl``."""
    if impl == "flashkat":
        return _launch_backward(grad_output, x, numerator, denominator, plan)
    return BACKWARDS[impl](grad_output, x, numerator, denominator, plan.dim)


def _check_impl(impl: str) -> None:
    if impl not in ("flashkat", "blocked", "atomic"):
        raise ValueError(f"group_rational: impl must be 'flashkat', 'blocked' or 'atomic', got {impl!r}")


# Two opaque operators, defined with the low-level torch.library API and differentiated by
# ``_GroupRational`` (an autograd.Function), not by a registered autograd kernel: a compiled graph
# calls them 4 times per KAT block, and ``custom_op``'s Python autograd and kernel wrappers cost
# ~20 us per call on an H100 host (measured, docs/BENCHMARKS.md) where the dispatcher alone costs
# ~5. Not a triton_op either: inductor could not fuse our kernels with their neighbours, and its
# launches of user-defined kernels cost more host time than ours (measured).
_LIB = torch.library.Library("flashkat", "DEF")
_LIB.define("group_rational(Tensor x, Tensor numerator, Tensor denominator, int dim, str impl, "
            "ScalarType? out_dtype) -> Tensor")  # fmt: skip
_LIB.define("group_rational_backward(Tensor grad_output, Tensor x, Tensor numerator, Tensor denominator, int dim, "
            "str impl) -> (Tensor, Tensor, Tensor)")  # fmt: skip


def _reference_forward_op(x, numerator, denominator, dim, impl, out_dtype):
    return reference.forward(x, numerator, denominator, dim).to(out_dtype or x.dtype)


def _reference_backward_op(grad_output, x, numerator, denominator, dim, impl):
    return reference.backward(grad_output, x, numerator, denominator, dim)


def _cuda_forward_op(x, numerator, denominator, dim, impl, out_dtype):
    launcher = native.module()
    if launcher is not None:  # a signature seen before: launched from C++
        y = launcher.launch_forward(x, numerator, denominator, dim, _OUT_CODES.get(out_dtype, -2))
        if y is not None:
            return y
    plan = _plan(x, numerator, denominator, dim, out_dtype)
    _register_once(launcher, x, numerator, denominator, dim, out_dtype, plan)
    return _launch_forward(x, numerator, denominator, plan)


def _cuda_backward_op(grad_output, x, numerator, denominator, dim, impl):
    launcher = native.module() if impl == "flashkat" else None
    if launcher is not None:
        grads = launcher.launch_backward(grad_output, x, numerator, denominator, dim)
        if grads is not None:
            return grads
    plan = _plan(x, numerator, denominator, dim, None)
    _register_once(launcher, x, numerator, denominator, dim, None, plan)
    return _cuda_backward(grad_output, x, numerator, denominator, plan, impl)


# Every device runs the reference, CUDA the Triton kernels (where Triton is installed).
_LIB.impl("group_rational", _reference_forward_op, "CompositeExplicitAutograd")
_LIB.impl("group_rational_backward", _reference_backward_op, "CompositeExplicitAutograd")
if HAS_TRITON:
    _LIB.impl("group_rational", _cuda_forward_op, "CUDA")
    _LIB.impl("group_rational_backward", _cuda_backward_op, "CUDA")


@torch.library.register_fake("flashkat::group_rational", lib=_LIB)
def _(x, numerator, denominator, dim, impl, out_dtype):
    return torch.empty_like(x, dtype=out_dtype or x.dtype)


@torch.library.register_fake("flashkat::group_rational_backward", lib=_LIB)
def _(grad_output, x, numerator, denominator, dim, impl):
    return torch.empty_like(x), numerator.new_empty(numerator.shape), denominator.new_empty(denominator.shape)


def group_rational(
    x: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    dim: int = -1,
    impl: str = "flashkat",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Apply the group-rational function along ``dim`` (see ``flashkat.reference`` for the math).

    ``numerator`` is (Gn, m+1), ``denominator`` (Gd, n); the order (m, n) is read from the shapes
    and the channel count ``x.shape[dim]`` must be divisible by Gn and Gd. CUDA tensors run the
    Triton kernels, others the float64 reference. Differentiable in all three tensors. The output
    has ``x``'s dtype (no upcast under autocast) unless ``out_dtype`` names another: storing the
    result of a float32 input directly in bfloat16 saves the cast a following matmul would do.
    ``impl`` picks the backward kernel on CUDA: "flashkat" (the default, deterministic) or the
    baselines "blocked" and "atomic".
    """
    _check_impl(impl)
    if not _launches_directly(x):
        dim = _check_args(x, numerator, denominator, dim, out_dtype)
        return _GroupRational.apply(x, numerator, denominator, dim, impl, out_dtype, None)
    launcher = native.module() if impl == "flashkat" else None
    if launcher is not None:  # signatures seen before, aligned tensors: all in C++
        try:
            y = launcher.forward(x, numerator, denominator, dim, _OUT_CODES.get(out_dtype, -2))
        except TypeError:  # not tensors, say: the Python path raises the clear error
            y = None
        if y is not None:
            return y
    plan = _plan(x, numerator, denominator, dim, out_dtype)  # checks the arguments (once per signature)
    _register_once(launcher, x, numerator, denominator, dim, out_dtype, plan)
    return _GroupRational.apply(x, numerator, denominator, dim, impl, out_dtype, plan)


_OUT_CODES = {None: -1, torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def _register_once(launcher, x, numerator, denominator, dim: int, out_dtype, plan: _Plan) -> None:
    if launcher is not None and plan.native is None:
        plan.native = _register_native(launcher, x, numerator, denominator, dim, out_dtype, plan)


def _register_native(launcher, x, numerator, denominator, dim: int, out_dtype, plan: _Plan) -> bool:
    """Compile the plan's three kernels (for the gradient in ``plan.out_dtype``, as autograd
    delivers it) and register them with the native launcher; False where it cannot take them."""
    if plan.empty or not (numerator.is_contiguous() and denominator.is_contiguous()) or _launches_hooked():
        return False
    if _off_current_device(x):  # compile and load for x's device (the C++ side launches under its guard)
        with torch.cuda.device(x.device):
            return _register_native(launcher, x, numerator, denominator, dim, out_dtype, plan)
    # (the C++ side launches only with aligned tensors, and makes a strided x contiguous as the
    # Python path does)
    a, b, f64 = numerator.dtype, denominator.dtype, torch.float64
    specs = _native_specs(x.device, ((_forward_kernel, plan.forward, (x.dtype, plan.out_dtype, a, b)),
                                     (_backward_kernel, plan.backward, (x.dtype, plan.out_dtype, x.dtype, a, b, f64)),
                                     (_reduce_kernel, plan.reduce, (f64, a, a, b, b))))  # fmt: skip
    if specs is None:
        return False
    launcher.register_plan(x, numerator, denominator, dim, _OUT_CODES.get(out_dtype, -2), plan.out_dtype, plan.dense,
                           plan.partials, *specs)  # fmt: skip
    return True


def _native_specs(device: torch.device, launches) -> list | None:
    """The native launcher's specs of each (kernel, (grid, scalars, meta), tensor dtypes) launch,
    or None where one cannot be taken. Triton specialises a pointer on its dtype and 16-byte
    alignment only, and warmup compiles without launching: aligned one-element tensors stand for
    every tensor."""
    specs = []
    for kernel, (grid, scalars, meta), dtypes in launches:
        tensors = tuple(torch.empty(1, device=device, dtype=dtype) for dtype in dtypes)
        compiled = kernel.warmup(*tensors, *scalars, grid=grid, **meta)
        spec = native.kernel_spec(compiled, kernel.arg_names, (*tensors, *scalars), len(tensors), grid)
        if spec is None:
            return None
        specs.append(spec)
    return specs


def _launches_directly(x) -> bool:
    """Whether a call launches the kernels itself (eager CUDA) rather than through the operators
    (which compilers and ``torch.jit.trace`` see: a launch of our own would be invisible to them)."""
    return (HAS_TRITON and isinstance(x, torch.Tensor) and x.is_cuda and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing())  # fmt: skip


class _GroupRational(torch.autograd.Function):
    """Autograd of the op. Given a ``plan`` (eager CUDA calls), it launches the kernels directly:
    through the dispatcher a call costs more host time than a small layer's GPU time (measured,
    docs/BENCHMARKS.md). Without one it calls the operators, which ``torch.compile`` traces and
    every other device runs."""

    @staticmethod
    def forward(ctx, x, numerator, denominator, dim, impl, out_dtype, plan):
        ctx.save_for_backward(x, numerator, denominator)
        ctx.dim, ctx.impl, ctx.plan = dim, impl, plan
        if plan is not None:
            return _launch_forward(x, numerator, denominator, plan)
        return torch.ops.flashkat.group_rational(x, numerator, denominator, dim, impl, out_dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, numerator, denominator = ctx.saved_tensors
        if ctx.plan is not None:
            dx, da, db = _cuda_backward(grad_output, x, numerator, denominator, ctx.plan, ctx.impl)
        else:
            dx, da, db = torch.ops.flashkat.group_rational_backward(grad_output, x, numerator, denominator, ctx.dim,
                                                                    ctx.impl)  # fmt: skip
        return dx, da, db, None, None, None, None
