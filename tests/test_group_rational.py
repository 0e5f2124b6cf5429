"""The group-rational op: Triton kernels (compiled on a GPU, interpreted on the CPU) and the
torch.library op, against the float64 reference on fresh random inputs."""

import contextlib

import pytest
import torch

import flashkat
from flashkat import reference
from flashkat.ops import group_rational as op
from conftest import DEVICE, check_coefficient_grads, coefficient_gradient_scale, random_coefficients, rel_l2, requires_cuda

# Relative L2 bounds for outputs stored in each dtype (one rounding of the result, plus float32
# arithmetic); coefficient gradients (float32 arithmetic, returned in float32) must be within
# COEF_TOL of the sum of their terms' magnitudes, the scale of any summation's rounding error.
OUT_TOL = {torch.float32: 2e-6, torch.float64: 1e-13, torch.bfloat16: 8e-3, torch.float16: 1e-3}
COEF_TOL = {torch.float32: 1e-6, torch.float64: 1e-7, torch.bfloat16: 1e-6, torch.float16: 1e-6}


KAT_SWISH = (
    [[3.054879741161051e-07, 0.5000007853744493, 0.24999783422824703, 0.05326628273219478,
      0.005803034571292244, 0.0002751961022402342]],
    [[-4.111554955950634e-06, 0.10652899335007572, -1.2690007399796238e-06, 0.0005502331264140556]],
)  # fmt: skip


def check_kernels(x, a, b, dim=-1, dtype=None):
    """Run the Triton forward and backward and compare every output with the reference."""
    dtype = dtype or x.dtype
    g = torch.randn(x.shape, device=x.device).to(x.dtype)
    y = op.triton_forward(x, a, b, dim)
    dx, da, db = op.triton_backward(g, x, a, b, dim)
    ry = reference.forward(x.double(), a.double(), b.double(), dim)
    rdx, rda, rdb = reference.backward(g.double(), x.double(), a.double(), b.double(), dim)
    assert y.dtype == x.dtype and dx.dtype == x.dtype and da.dtype == a.dtype and db.dtype == b.dtype
    assert y.shape == x.shape and dx.shape == x.shape and da.shape == a.shape and db.shape == b.shape
    assert rel_l2(y, ry) < OUT_TOL[dtype], rel_l2(y, ry)
    assert rel_l2(dx, rdx) < OUT_TOL[dtype], rel_l2(dx, rdx)
    scales = coefficient_gradient_scale(g, x, a, b, dim)
    check_coefficient_grads((da, db), (rda, rdb), scales, COEF_TOL[dtype])
    return y, dx, da, db


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(dtype):
    x = torch.randn(3, 37, 96, device=DEVICE).to(dtype)
    a, b = random_coefficients(1, 8, (5, 4))
    check_kernels(x, a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [(1, 8), (4, 4), (48, 48), (8, 1), (2, 16), (3, 6)])
def test_group_settings(groups, dtype):
    """Shared numerator, equal groups, per-channel, and groups narrower than a tile (16-bit inputs
    also share one coefficient set and one running sum across up to 8 adjacent columns of a group:
    see ``_fold``)."""
    x = torch.randn(5, 13, 48, device=DEVICE).to(dtype)
    check_kernels(x, *random_coefficients(*groups, (5, 4)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiles_across_wide_groups(dtype):
    """96-column groups (KAT's at D=768): 16-bit tiles of 64 columns hold parts of two groups."""
    x = torch.randn(3, 37, 192, device=DEVICE).to(dtype)
    check_kernels(x, *random_coefficients(1, 2, (5, 4)))
    check_kernels(x, *random_coefficients(2, 2, (5, 4)))


@pytest.mark.parametrize("order", [(5, 4), (3, 2), (7, 6), (4, 0), (0, 3), (1, 1), (9, 2)])
def test_orders(order):
    x = torch.randn(4, 21, 64, device=DEVICE)
    check_kernels(x, *random_coefficients(1, 8, order))


def test_odd_sizes_with_tails():
    """200 channels in 8 groups of 25: tiles of 25 columns padded to 32, rows not a tile multiple."""
    x = torch.randn(10, 37, 200, device=DEVICE)
    check_kernels(x, *random_coefficients(1, 8, (5, 4)))
    check_kernels(x[:, :, :120], *random_coefficients(5, 3, (5, 4)))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided", "transposed", "1d", "middle"])
def test_layouts_and_dims(layout):
    if layout == "nchw":
        x, dim = torch.randn(2, 16, 5, 3, device=DEVICE), 1
    elif layout == "channels_last":
        x, dim = torch.randn(2, 16, 5, 3, device=DEVICE).to(memory_format=torch.channels_last), 1
    elif layout == "strided":
        x, dim = torch.randn(6, 10, 64, device=DEVICE)[:, ::3, :], -1
    elif layout == "transposed":
        x, dim = torch.randn(32, 40, device=DEVICE).t(), 0
    elif layout == "1d":
        x, dim = torch.randn(64, device=DEVICE), 0
    else:
        x, dim = torch.randn(3, 32, 7, device=DEVICE).transpose(0, 2), 1
    y, dx, _, _ = check_kernels(x, *random_coefficients(2, 8, (5, 4)), dim=dim)
    assert y.stride() == torch.empty_like(x).stride() == dx.stride()


def test_backward_is_bitwise_deterministic():
    x = torch.randn(8, 50, 96, device=DEVICE)
    g = torch.randn_like(x)
    a, b = random_coefficients(1, 8, (5, 4))
    first = op.triton_backward(g, x, a, b)
    for _ in range(2):
        for t0, t1 in zip(first, op.triton_backward(g, x, a, b)):
            assert torch.equal(t0, t1)


def test_empty_tensors():
    a, b = random_coefficients(1, 8, (5, 4))
    for shape in [(0, 96), (4, 0, 96)]:
        x = torch.randn(shape, device=DEVICE)
        assert op.triton_forward(x, a, b).shape == x.shape
        dx, da, db = op.triton_backward(x, x, a, b)
        assert dx.shape == x.shape and (da == 0).all() and (db == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("coefficients", ["kat_swish", "identity"])
def test_huge_inputs_stay_finite(coefficients, dtype):
    """|x| up to 1e30: finite wherever the true value is finite, and accurate."""
    if coefficients == "kat_swish":
        a, b = torch.tensor(KAT_SWISH[0]), torch.tensor(KAT_SWISH[1]).repeat(8, 1)
    else:
        a, b = torch.tensor([[0.0, 1, 0, 0, 0, 0]]), torch.zeros(8, 4)
    a, b = a.to(DEVICE), b.to(DEVICE)
    x = torch.randn(40, 64)
    x[3, 5], x[7, 9], x[20, 3] = 1e30, -3e29, 5e37
    x[10] = 1e6 * torch.randn(64)
    x[11] = 1e12 * torch.randn(64)
    x, g = x.to(DEVICE, dtype), torch.randn(40, 64, device=DEVICE).to(dtype)
    y = op.triton_forward(x, a, b)
    dx, da, db = op.triton_backward(g, x, a, b)
    ry = reference.forward(x.double(), a.double(), b.double())
    rdx, rda, rdb = reference.backward(g.double(), x.double(), a.double(), b.double())
    out_tol = max(OUT_TOL[dtype], 1e-6)
    for ours, ref, tol in [(y, ry, out_tol), (dx, rdx, out_tol), (da, rda, 1e-6), (db, rdb, 1e-6)]:
        finite = torch.isfinite(ref.float())
        assert torch.isfinite(ours[finite]).all()
        assert rel_l2(ours[finite], ref[finite]) < tol
        assert torch.equal(torch.isinf(ours[~finite]), torch.isinf(ref.float()[~finite]))


def test_64_bit_indexing_path(monkeypatch):
    """The int64 offsets used beyond 2**31 elements, forced on a small tensor."""
    monkeypatch.setattr(op, "_INDEX_64_FROM", 0)
    op._clear_caches()
    try:
        check_kernels(torch.randn(3, 5, 48, device=DEVICE), *random_coefficients(1, 8, (5, 4)))
        check_kernels(torch.randn(2, 16, 3, 3, device=DEVICE), *random_coefficients(4, 16, (3, 2)), dim=1)
    finally:
        op._clear_caches()


# ---------------------------------------------------------------------------------------------
# The torch.library op and the public function
# ---------------------------------------------------------------------------------------------


def test_public_function_matches_reference_and_differentiates():
    x = torch.randn(4, 9, 32, device=DEVICE, requires_grad=True)
    a, b = (t.requires_grad_() for t in random_coefficients(1, 8, (5, 4)))
    y = flashkat.group_rational(x, a, b)
    g = torch.randn_like(y)
    y.backward(g)
    ry = reference.forward(x.detach().double(), a.detach().double(), b.detach().double())
    rdx, rda, rdb = reference.backward(g.double(), x.detach().double(), a.detach().double(), b.detach().double())
    assert rel_l2(y.detach(), ry) < 2e-6
    assert rel_l2(x.grad, rdx) < 2e-6 and rel_l2(a.grad, rda) < 2e-6 and rel_l2(b.grad, rdb) < 2e-6


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_opcheck(device):
    """The operators (differentiated by flashkat.group_rational's autograd.Function, not by an
    autograd kernel: gradients are checked by the gradcheck and compile tests)."""
    x = torch.randn(3, 5, 16, device=device)
    a, b = (t.to(device) for t in random_coefficients(1, 8, (5, 4)))
    torch.library.opcheck(torch.ops.flashkat.group_rational.default, (x, a, b, -1, "flashkat", None))
    torch.library.opcheck(torch.ops.flashkat.group_rational.default, (x, a, b, -1, "flashkat", torch.bfloat16))
    g = torch.randn(3, 5, 16, device=device)
    args = (g, x.detach(), a.detach(), b.detach(), -1, "flashkat")
    torch.library.opcheck(torch.ops.flashkat.group_rational_backward.default, args)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_gradcheck_float64(device):
    x = torch.randn(2, 3, 8, dtype=torch.float64, device=device, requires_grad=True)
    a, b = (t.double().to(device).requires_grad_() for t in random_coefficients(2, 4, (5, 4)))
    assert torch.autograd.gradcheck(lambda *t: flashkat.group_rational(*t, dim=-1), (x, a, b))


def test_compile_fullgraph_without_graph_breaks():
    layer = flashkat.GroupRational(num_groups=4, mode="swish").to(DEVICE)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), layer, torch.nn.Linear(32, 8)).to(DEVICE)
    x = torch.randn(6, 16, device=DEVICE)
    eager = model(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert rel_l2(out.detach(), eager.detach()) < 1e-5
    for p, g in zip(model.parameters(), eager_grads):
        assert rel_l2(p.grad, g) < 1e-5


def test_compile_with_symbolic_batch_size_matches_reference():
    """torch.compile(dynamic=True): one graph serves several row counts and dtypes, forward and backward."""
    a, b = (t.requires_grad_() for t in random_coefficients(1, 8, (5, 4)))

    def fn(x):
        return flashkat.group_rational(x, a, b).float().square().sum()

    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    for rows, dtype in [(37, torch.float32), (50, torch.float32), (19, torch.bfloat16)]:
        x = torch.randn(rows, 3, 64, device=DEVICE, dtype=dtype, requires_grad=True)
        loss = compiled(x)
        loss.backward()
        x64, a64, b64 = x.detach().double(), a.detach().double(), b.detach().double()
        y = reference.forward(x64, a64, b64).to(dtype).double()
        want = reference.backward(2 * y, x64, a64, b64)
        assert rel_l2(loss.detach().double(), y.square().sum()) < 1e-5
        for got, ref in zip((x.grad, a.grad, b.grad), want):
            assert rel_l2(got, ref) < (1e-5 if dtype == torch.float32 else 2e-2)
        a.grad = b.grad = None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_activation_dtype(dtype):
    if DEVICE == "cpu" and dtype == torch.float16:
        pytest.skip("CPU autocast runs bfloat16")
    layer = flashkat.GroupRational(num_groups=8, mode="swish").to(DEVICE)
    fc = torch.nn.Linear(16, 64).to(DEVICE)
    x = torch.randn(4, 16, device=DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        h = fc(x)
        y = layer(h)
        y_fp32 = layer(x.repeat(1, 4))  # a float32 activation stays float32
    assert h.dtype == dtype and y.dtype == dtype and y_fp32.dtype == torch.float32
    assert layer.weight_numerator.dtype == torch.float32
    ref = reference.forward(h.double(), layer.weight_numerator.double(), layer.weight_denominator.double())
    assert rel_l2(y, ref) < OUT_TOL[dtype]
    y.float().sum().backward()
    assert layer.weight_numerator.grad.dtype == torch.float32


def test_bad_inputs_name_what_was_passed():
    x = torch.randn(4, 30)
    a, b = random_coefficients(1, 8, (5, 4), device="cpu")
    with pytest.raises(ValueError, match=r"30 channels.*8 groups"):
        flashkat.group_rational(x, a, b)
    with pytest.raises(ValueError, match=r"numerator must have shape.*\(6,\)"):
        flashkat.group_rational(torch.randn(4, 32), a[0], b)
    with pytest.raises(TypeError, match="floating-point dtype.*torch.int64"):
        flashkat.group_rational(torch.ones(4, 32, dtype=torch.int64), a, b)
    with pytest.raises(ValueError, match="one device.*meta.*cpu"):
        flashkat.group_rational(torch.randn(4, 32, device="meta"), a, b)
    with pytest.raises(ValueError, match="dim=3 is out of range"):
        flashkat.group_rational(torch.randn(4, 32), a, b, dim=3)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        flashkat.group_rational([1.0, 2.0], a, b)
    with pytest.raises(ValueError, match="impl must be.*'nope'"):
        flashkat.group_rational(torch.randn(4, 32), a, b, impl="nope")
    with pytest.raises(ValueError, match="grad_output shape"):
        op.triton_backward(torch.randn(4, 16), torch.randn(4, 32), a, b)


# ---------------------------------------------------------------------------------------------
# GPU only: shapes too large for the interpreter
# ---------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [192, 768, 3072])
def test_kat_shapes_on_gpu(dtype, D):
    x = torch.randn(128, 197, D, device="cuda").to(dtype)
    check_kernels(x, *random_coefficients(1, 8, (5, 4)))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_programmatic_dependent_launch_changes_no_bit(dtype, monkeypatch):
    """Hopper launches the final reduction early (it waits for the partials in the kernel): the
    gradients must be the same bits as with an ordinary launch after the main kernel."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    x = torch.randn(128 * 197, 192, device="cuda").to(dtype)
    g = torch.randn_like(x)
    a, b = random_coefficients(1, 8, (5, 4))
    results = []
    for pdl in (True, False):
        monkeypatch.setitem(op._TUNING, "pdl", pdl)
        op._clear_caches()
        assert op._plan(x, a, b, -1, None).backward[2]["PDL"] == pdl
        results.append(op.triton_backward(g, x, a, b))
    op._clear_caches()  # the next test plans with the restored setting
    for with_pdl, without in zip(*results):
        assert torch.equal(with_pdl, without)


@requires_cuda
def test_more_than_2_pow_31_elements():
    """int64 offsets: values near the end of a 2**31 + 2**20 element bf16 tensor are right."""
    D = 256
    rows = (2**31 + 2**20) // D
    x = torch.randn(rows, D, device="cuda", dtype=torch.bfloat16)
    a, b = random_coefficients(1, 8, (5, 4))
    y = op.triton_forward(x, a, b)
    tail = slice(rows - 4096, rows)
    assert rel_l2(y[tail], reference.forward(x[tail].double(), a.double(), b.double())) < OUT_TOL[torch.bfloat16]
    g = torch.zeros_like(x)
    g[tail] = torch.randn(4096, D, device="cuda", dtype=torch.bfloat16)  # grads only from the tail
    del y
    dx, da, db = op.triton_backward(g, x, a, b)
    rdx, rda, rdb = reference.backward(g[tail].double(), x[tail].double(), a.double(), b.double())
    assert rel_l2(dx[tail], rdx) < OUT_TOL[torch.bfloat16]
    assert rel_l2(da, rda) < 1e-5 and rel_l2(db, rdb) < 1e-5


def test_out_dtype_stores_the_result_in_another_dtype():
    """A float32 input stored straight to bfloat16; its gradient still comes back in float32."""
    x = torch.randn(4, 9, 64, device=DEVICE, requires_grad=True)
    a, b = (t.requires_grad_() for t in random_coefficients(1, 8, (5, 4)))
    y = flashkat.group_rational(x, a, b, out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    expected = reference.forward(x.detach().double(), a.detach().double(), b.detach().double())
    assert rel_l2(y.detach(), expected) < 4e-3
    g = torch.randn_like(y)
    y.backward(g)
    assert x.grad.dtype == torch.float32
    rdx, _, _ = reference.backward(g.double(), x.detach().double(), a.detach().double(), b.detach().double())
    assert rel_l2(x.grad, rdx) < 2e-6
    y_kernel = op.triton_forward(x.detach(), a.detach(), b.detach(), out_dtype=torch.bfloat16)
    assert y_kernel.dtype == torch.bfloat16 and rel_l2(y_kernel, expected) < 4e-3
    with pytest.raises(TypeError, match="out_dtype"):
        flashkat.group_rational(x, a, b, out_dtype=torch.int32)


def test_views_of_any_alignment_after_aligned_calls():
    """Only calls whose pointers are all 16-byte aligned reuse cached launchers: a view that starts
    4 bytes into its storage must not reuse the kernel specialised for aligned pointers."""
    a, b = random_coefficients(1, 8, (5, 4))
    storage = torch.randn(3 * 16 * 64 + 1, device=DEVICE)
    aligned = storage[:-1].view(3, 16, 64)
    shifted = storage[1:].view(3, 16, 64)
    for x in (aligned, shifted, aligned):
        check_kernels(x, a, b)


@pytest.mark.parametrize("impl", ["flashkat", "blocked", "atomic"])
def test_direct_launch_path_matches_the_reference(impl, monkeypatch):
    """CUDA tensors in eager mode launch the kernels without the dispatcher (its Python kernels
    cost more than small layers' kernels); run that path here on DEVICE."""
    monkeypatch.setattr(op, "_launches_directly", lambda x: True)
    x = torch.randn(3, 11, 64, device=DEVICE, requires_grad=True)
    a, b = (t.requires_grad_() for t in random_coefficients(1, 8, (5, 4)))
    y = flashkat.group_rational(x, a, b, 2, impl)
    g = torch.randn_like(y)
    dx, da, db = torch.autograd.grad(y, (x, a, b), g)
    ry = reference.forward(x.detach().double(), a.detach().double(), b.detach().double())
    rdx, rda, rdb = reference.backward(g.double(), x.detach().double(), a.detach().double(), b.detach().double())
    assert rel_l2(y.detach(), ry) < 2e-6 and rel_l2(dx, rdx) < 2e-6
    scales = coefficient_gradient_scale(g, x.detach(), a.detach(), b.detach())
    check_coefficient_grads((da, db), (rda, rdb), scales, COEF_TOL[torch.float32])


def test_same_shapes_with_other_dtypes_get_their_own_kernels():
    """Calls that differ only in an output or gradient dtype must not share a compiled launch."""
    x = torch.randn(6, 64, device=DEVICE)
    a, b = random_coefficients(1, 8, (5, 4))
    ref = reference.forward(x.double(), a.double(), b.double())
    for out_dtype in (None, torch.bfloat16, None, torch.float16):
        y = op.triton_forward(x, a, b, out_dtype=out_dtype)
        assert y.dtype == (out_dtype or x.dtype)
        assert rel_l2(y, ref) < OUT_TOL.get(out_dtype, 1e-6)
    for g_dtype in (torch.float32, torch.bfloat16, torch.float32):
        g = torch.randn(6, 64, device=DEVICE).to(g_dtype)
        dx, da, db = op.triton_backward(g, x, a, b)
        want = reference.backward(g.double(), x.double(), a.double(), b.double())
        for got, ref_grad in zip((dx, da, db), want):
            assert rel_l2(got, ref_grad) < 1e-5


@pytest.mark.parametrize(
    "dtype, D, groups, inner, fold, width",
    [
        (torch.bfloat16, 768, (1, 8), 1, 8, 64),  # 96-column groups straddle 64-column (128-byte) tiles
        (torch.float16, 96, (1, 8), 1, 4, 64),  # 12-column denominator groups straddle tiles
        (torch.bfloat16, 200, (1, 8), 1, 1, 64),  # 25 columns: neighbours may sit in two groups
        (torch.float32, 768, (1, 8), 1, 1, 32),  # 128-byte tiles inside one group: scalar coefficients
        (torch.float32, 192, (1, 8), 1, 4, 64),  # 24-column groups: a thread's 4 columns share one
        (torch.bfloat16, 768, (1, 8), 7, 1, 16),  # channels not contiguous: a thread's elements are rows
        (torch.bfloat16, 1536, (1, 8), 1, 8, 64),  # 192-column groups: uniform 64-column tiles
    ],
)
def test_tiles_fold_only_columns_of_one_group(dtype, D, groups, inner, fold, width):
    """How many adjacent columns share coefficients, whether they share running sums (16-bit
    inputs only: float32 keeps one per element, see ``_Config``), and the tiles and register caps
    that go with it."""
    for backward in (False, True):
        config = op._config(64 * inner, D, inner, dtype, 5, 4, *groups, -1, backward)
        assert config.fold == fold and config.block_c == width
        assert config.shared_sums == (backward and fold > 1 and dtype.itemsize == 2)
        for cpg, uniform in ((config.cpg_a, config.uniform_a), (config.cpg_b, config.uniform_b)):
            assert uniform or cpg % fold == 0
        elements = op._TUNING["backward_elements_16bit" if config.shared_sums else "backward_elements"]
        assert config.block_s * config.block_c == (elements if backward else op._TUNING["forward_elements"])
        fits = fold > 1 or (config.uniform_a and config.uniform_b)  # coefficients need few registers
        assert config.capped == (fits and (backward or dtype.itemsize == 2))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("python_path", [False, True])
def test_tensors_on_a_device_other_than_the_current_one(python_path):
    """Tensors on cuda:1 while cuda:0 is current (a model moved with .to("cuda:1")): the kernels
    compile, load and launch for cuda:1, eager and through the operators, and the current device
    stays cuda:0."""
    from flashkat.ops import native

    torch.cuda.set_device(0)
    op._clear_caches()
    x = torch.randn(4, 197, 192, device="cuda:1", requires_grad=True)
    a, b = (t.to("cuda:1").requires_grad_() for t in random_coefficients(1, 8, (5, 4)))
    g = torch.randn_like(x)
    with native.disabled() if python_path else contextlib.nullcontext():
        for _ in range(3):  # first call (plans, compiles), then the cached launch paths
            y = flashkat.group_rational(x, a, b)
            dx, da, db = torch.autograd.grad(y, (x, a, b), g)
            ops_y = torch.ops.flashkat.group_rational(x.detach(), a.detach(), b.detach(), -1, "flashkat", None)
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0 and y.device == dx.device == da.device == x.device
    xd, ad, bd = x.detach().double(), a.detach().double(), b.detach().double()
    assert rel_l2(y.detach(), reference.forward(xd, ad, bd)) < 2e-6 and torch.equal(ops_y, y.detach())
    rdx, rda, rdb = reference.backward(g.double(), xd, ad, bd)
    assert rel_l2(dx, rdx) < 2e-6
    check_coefficient_grads((da, db), (rda, rdb), coefficient_gradient_scale(g, x.detach(), a.detach(), b.detach()),
                            1e-6)  # fmt: skip
    op._clear_caches()
