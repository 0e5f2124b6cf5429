"""The native (C++) launcher of eager CUDA calls: kernel descriptions, the build, and on a GPU the
same bits as the Python path and the float64 reference."""

import contextlib
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import flashkat
from flashkat import reference
from flashkat.ops import group_rational as op
from flashkat.ops import layer_norm_group_rational as lnop
from flashkat.ops import native
from conftest import (DEVICE, check_coefficient_grads, coefficient_gradient_scale, random_coefficients, rel_l2,
                      requires_cuda)


needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="needs a C++ compiler")


def fake_compiled(signature: dict, **metadata):
    fields = dict(num_ctas=1, global_scratch_size=0, profile_scratch_size=0, launch_cooperative_grid=False,
                  num_warps=4, shared=1024, launch_pdl=True)  # fmt: skip
    fields.update(metadata)
    return SimpleNamespace(src=SimpleNamespace(signature=signature), metadata=SimpleNamespace(**fields),
                           function=1234, _init_handles=lambda: None)  # fmt: skip


def test_kernel_spec_lists_the_compiled_parameters():
    """Tensors by position, scalars by type and value, constexprs left out (as Triton's launcher)."""
    names = ["x_ptr", "y_ptr", "S", "ONE", "big", "limit", "BLOCK"]
    signature = {"x_ptr": "*bf16", "y_ptr": "*fp32", "S": "i32", "ONE": "constexpr", "big": "i64",
                 "limit": "fp32", "BLOCK": "constexpr"}  # fmt: skip
    args = ("x", "y", 197, 1, 2**40, 0.5, 64)
    spec = native.kernel_spec(fake_compiled(signature), names, args, 2, (33, 2))
    assert spec == (1234, (33, 2, 1), 128, 1024, True,
                    [("t", 0, 0.0), ("t", 1, 0.0), ("i", 197, 0.0), ("l", 2**40, 0.0), ("f", 0, 0.5)])  # fmt: skip


@pytest.mark.parametrize("metadata", [{"global_scratch_size": 64}, {"profile_scratch_size": 8}, {"num_ctas": 2},
                                      {"launch_cooperative_grid": True}])  # fmt: skip
def test_kernel_spec_refuses_what_the_launcher_cannot_provide(metadata):
    assert native.kernel_spec(fake_compiled({"x_ptr": "*fp32"}, **metadata), ["x_ptr"], ("x",), 1, (1,)) is None


def test_kernel_spec_refuses_unknown_scalars_and_stray_pointers():
    assert native.kernel_spec(fake_compiled({"flag": "u1"}), ["flag"], (True,), 0, (1,)) is None
    assert native.kernel_spec(fake_compiled({"x_ptr": "*fp32", "p": "*fp32"}), ["x_ptr", "p"], ("x", 0), 1, (1,)) is None


@needs_compiler
def test_native_source_builds():
    """The C++ launcher compiles and links against this torch (on any machine with a compiler)."""
    module = native.build()
    assert module.plan_count() == 0 or torch.cuda.is_available()
    x = torch.randn(4, 16)
    a, b = random_coefficients(1, 8, (5, 4), device="cpu")
    assert module.forward(x, a, b, -1, -1) is None  # no plan for this signature: the caller's Python path


def test_first_build_is_announced_and_later_ones_are_not(monkeypatch, tmp_path, capsys):
    """The first build on a machine takes ~30-50 s: it says so on stderr; a build folder that
    already holds the module is quiet. Each source text builds in its own folder."""
    import torch.utils.cpp_extension

    def fake_load(name, build_directory, **kwargs):  # stands in for the compiler: leaves the module
        (Path(build_directory) / f"{name}.so").write_bytes(b"")
        return SimpleNamespace(built_in=build_directory)

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    first = native.build()
    assert "building the native launcher" in capsys.readouterr().err
    assert native.build().built_in == first.built_in and capsys.readouterr().err == ""
    assert Path(first.built_in).is_relative_to(tmp_path)
    monkeypatch.setattr(native, "SOURCE", tmp_path / "changed.cpp")
    native.SOURCE.write_text(native.SOURCE.name)
    assert native.build().built_in != first.built_in and "building" in capsys.readouterr().err


def test_on_by_default_only_on_cuda_and_off_with_zero(monkeypatch):
    import triton

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    expected = torch.cuda.is_available() and triton.__version__.startswith(native.TRITON_VERSIONS)
    for value in (None, "1"):
        if value is None:
            monkeypatch.delenv("FLASHKAT_NATIVE", raising=False)
        else:
            monkeypatch.setenv("FLASHKAT_NATIVE", value)
        assert native.enabled() == expected
    monkeypatch.setenv("FLASHKAT_NATIVE", "0")
    assert not native.enabled()
    monkeypatch.setenv("FLASHKAT_NATIVE", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # interpreted kernels have no compiled function to launch
    assert not native.enabled()


@pytest.fixture
def native_on(monkeypatch):
    """The native launcher turned on (FLASHKAT_NATIVE=1) for one test, with fresh plans."""
    monkeypatch.setenv("FLASHKAT_NATIVE", "1")
    monkeypatch.setattr(native, "_module", None)  # decide again, with the variable set
    op._clear_caches()
    if native.module() is None:
        pytest.fail("the native launcher did not build on this CUDA machine")
    yield
    op._clear_caches()


class InterpretedLaunches:
    """Registers one plan of ``x``'s signature whose launches the C++ side hands back to Python
    (``set_launch_hook``): each checks its parameter cells against the tensors and scalars the
    Python path would pass, then runs the kernel (on the CPU: in the Triton interpreter)."""

    def __init__(self, module, x, a, b, dim=-1):
        self.module, self.calls = module, []
        plan = op._plan(x, a, b, dim, None)
        self.kernels = {1: (op._forward_kernel, plan.forward), 2: (op._backward_kernel, plan.backward),
                        3: (op._reduce_kernel, plan.reduce)}  # fmt: skip
        module.register_plan(x, a, b, dim, -1, x.dtype, plan.dense, plan.partials, *self.specs({1: 4, 2: 6, 3: 5}))

    def specs(self, counts: dict) -> list:
        """Launch descriptions naming ``counts[function]`` tensors, then the plan's scalars."""
        specs = []
        for function, (kernel, (grid, scalars, meta)) in self.kernels.items():
            params = [("t", i, 0.0) for i in range(counts[function])]
            params += [("i", v, 0.0) if isinstance(v, int) else ("f", 0, float(v)) for v in scalars]
            specs.append((function, (*grid, 1, 1)[:3], 128, 0, False, params))
        return specs

    def __call__(self, function, grid, tensors, cells):
        kernel, (plan_grid, scalars, meta) = self.kernels[function]
        assert grid == (*plan_grid, 1, 1)[:3]
        assert cells[: len(tensors)] == [t.data_ptr() for t in tensors]
        for cell, value in zip(cells[len(tensors):], scalars):
            low = cell & 0xFFFFFFFF
            if isinstance(value, int):
                assert low == value & 0xFFFFFFFF
            else:
                assert struct.unpack("<f", struct.pack("<I", low))[0] == pytest.approx(value, rel=1e-7)
        assert cells[len(tensors) + len(scalars):] == [0, 0]  # Triton's two scratch pointers
        kernel[plan_grid](*tensors, *scalars, **meta)
        self.calls.append(function)


@needs_compiler
def test_native_autograd_function_with_interpreted_launches():
    """On any machine: the C++ autograd function, plan lookup, allocations and launch parameters,
    with the launches run by Python (the Triton interpreter on the CPU): the reference's values, and
    the Python path's ordering of kernels; a loop of forward + backward calls on leaves finishes."""
    module = native.build()
    module.clear()  # on a GPU, earlier tests' plans: only this test's signature may be known
    x = torch.randn(3, 11, 64, device=DEVICE)
    a, b = random_coefficients(1, 8, (5, 4))
    launches = InterpretedLaunches(module, x, a, b)
    module.set_launch_hook(launches)
    try:
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        g = torch.randn_like(x)
        for _ in range(3):
            for t in leaves:
                t.grad = None
            y = module.forward(*leaves, -1, -1)
            assert "GroupRationalFunction" in y.grad_fn.name()
            y.backward(g)
        assert launches.calls == [1, 2, 3] * 3
        assert rel_l2(y.detach(), reference.forward(x.double(), a.double(), b.double())) < 2e-6
        rdx, rda, rdb = reference.backward(g.double(), x.double(), a.double(), b.double())
        assert rel_l2(leaves[0].grad, rdx) < 2e-6
        check_coefficient_grads((leaves[1].grad, leaves[2].grad), (rda, rdb), coefficient_gradient_scale(g, x, a, b),
                                1e-6)  # fmt: skip
        dx, da, db = module.launch_backward(g, x, a, b, -1)
        assert torch.equal(dx, leaves[0].grad) and torch.equal(da, leaves[1].grad) and torch.equal(db, leaves[2].grad)
        assert torch.equal(module.launch_forward(x, a, b, -1, -1), y.detach())
        assert module.forward(x, a, b, 2, -1) is None  # another dim: another signature
        assert module.forward(x.bfloat16(), a, b, -1, -1) is None
    finally:
        module.set_launch_hook(None)
        module.clear()
        op._clear_caches()  # on a GPU, later tests' signatures register again (else they stay on the Python path)


class InterpretedLayerNormLaunches(InterpretedLaunches):
    """The same for the fused LayerNorm + group-rational op's three kernels."""

    def __init__(self, module, x, weight, bias, a, b, eps):
        self.module, self.calls = module, []
        plan = lnop._config(x.numel() // x.shape[-1], x.shape[-1], x.dtype, a.shape[1] - 1, b.shape[1], a.shape[0],
                            b.shape[0], -1)  # fmt: skip
        (f_grid, f_scalars, f_meta, f_limit), (b_grid, b_scalars, b_meta, b_limit, offset_b, size) = plan.forward, plan.backward
        self.kernels = {11: (lnop._forward_kernel, (f_grid, (*f_scalars, eps, f_limit), f_meta)),
                        12: (lnop._backward_kernel, (b_grid, (*b_scalars, eps, b_limit, offset_b), b_meta)),
                        13: (lnop._reduce_kernel, plan.reduce)}  # fmt: skip
        module.register_layer_norm_plan(x, weight, bias, a, b, eps, -1, x.dtype, torch.float32, size, plan.programs,
                                        *self.specs({11: 8, 12: 11, 13: 8}))  # fmt: skip



def test_native_specs_compile_stand_ins_and_stop_at_the_first_refusal(monkeypatch):
    """Each launch compiles for aligned one-element stand-ins of its tensors' dtypes, with its
    scalars, grid and meta-parameters; one spec the launcher cannot take refuses the whole plan."""
    warmups = []

    class Kernel:
        arg_names = ["p", "q", "n"]

        def __init__(self, name):
            self.name = name

        def warmup(self, *args, grid, **meta):
            tensors = args[:2]
            warmups.append((self.name, [t.dtype for t in tensors], [t.numel() for t in tensors], args[2:], grid, meta))
            return self.name

    refused = set()
    monkeypatch.setattr(native, "kernel_spec", lambda compiled, names, args, n_tensors, grid:
                        None if compiled in refused else (compiled, names, n_tensors, grid))  # fmt: skip
    launches = ((Kernel("f"), ((4,), (7,), {"BLOCK": 8}), (torch.float32, torch.bfloat16)),
                (Kernel("g"), ((2,), (9,), {"BLOCK": 16}), (torch.float64, torch.float16)))
    specs = op._native_specs(torch.device("cpu"), launches)
    assert specs == [("f", ["p", "q", "n"], 2, (4,)), ("g", ["p", "q", "n"], 2, (2,))]
    assert warmups == [("f", [torch.float32, torch.bfloat16], [1, 1], (7,), (4,), {"BLOCK": 8}),
                       ("g", [torch.float64, torch.float16], [1, 1], (9,), (2,), {"BLOCK": 16})]  # fmt: skip
    refused.add("f")
    warmups.clear()
    assert op._native_specs(torch.device("cpu"), launches) is None and [w[0] for w in warmups] == ["f"]

@needs_compiler
def test_native_layer_norm_function_with_interpreted_launches():
    """The fused op's C++ autograd function, plan lookup, allocations and launch parameters, the
    launches run by Python: the reference's values; a signature with another eps has no plan."""
    module = native.build()
    module.clear()
    x = torch.randn(3, 11, 64, device=DEVICE)
    weight, bias = 1 + 0.2 * torch.randn(64, device=DEVICE), 0.1 * torch.randn(64, device=DEVICE)
    a, b = random_coefficients(1, 8, (5, 4))
    launches = InterpretedLayerNormLaunches(module, x, weight, bias, a, b, 1e-5)
    module.set_launch_hook(launches)
    try:
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, a, b)]
        g = torch.randn_like(x)
        for _ in range(2):
            for t in leaves:
                t.grad = None
            y = module.layer_norm_forward(*leaves, 1e-5, -1)
            assert "LayerNormGroupRationalFunction" in y.grad_fn.name()
            y.backward(g)
        assert launches.calls == [11, 12, 13] * 2
        want_y = lnop._reference_forward_op(x, weight, bias, a, b, 1e-5, None)[0]
        want_grads = lnop._reference_backward_op(g, x, weight, bias, a, b, None, None, 1e-5)  # float64 formulas
        assert rel_l2(y.detach(), want_y) < 2e-6
        for leaf, want in zip(leaves, want_grads):  # sums over rows: a little more rounding than dx
            assert rel_l2(leaf.grad, want) < 1e-5
        y2, mean, rstd = module.layer_norm_launch_forward(x, weight, bias, a, b, 1e-5, -1)  # the operators' kernels
        assert torch.equal(y2, y.detach()) and mean.shape == rstd.shape == (33,)
        grads = module.layer_norm_launch_backward(g, x, weight, bias, a, b, mean, rstd, 1e-5, op._OUT_CODES[g.dtype])
        assert all(torch.equal(got, leaf.grad) for got, leaf in zip(grads, leaves))
        assert module.layer_norm_forward(x, weight, bias, a, b, 1e-6, -1) is None
        assert module.layer_norm_forward(x.transpose(0, 1), weight, bias, a, b, 1e-5, -1) is None
        assert module.layer_norm_launch_backward(g.bfloat16(), x, weight, bias, a, b, mean, rstd, 1e-5,
                                                 op._OUT_CODES[torch.bfloat16]) is None
    finally:
        module.set_launch_hook(None)
        module.clear()
        lnop._clear_caches()


@requires_cuda
@pytest.mark.parametrize("dtype, out_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, None)])
def test_native_layer_norm_path_gives_the_python_paths_bits(dtype, out_dtype, native_on):
    lnop._clear_caches()
    x = torch.randn(8, 197, 192, device="cuda").to(dtype)
    weight, bias = 1 + 0.2 * torch.randn(192, device="cuda"), 0.1 * torch.randn(192, device="cuda")
    a, b = random_coefficients(1, 8, (5, 4))
    g = torch.randn(x.shape, device="cuda").to(out_dtype or dtype)
    results = []
    for path in (contextlib.nullcontext, native.disabled):
        with path():
            for _ in range(2):  # the first call registers the signature
                leaves = [t.detach().requires_grad_() for t in (x, weight, bias, a, b)]
                y = lnop.layer_norm_group_rational(*leaves, eps=1e-6, out_dtype=out_dtype)
                grads = torch.autograd.grad(y, leaves, g)
            results.append((y.grad_fn.name(), y.detach(), *grads))
    (fast_name, *fast), (slow_name, *slow) = results
    assert "LayerNormGroupRationalFunction" in fast_name and "LayerNormGroupRationalFunction" not in slow_name
    for got, want in zip(fast, slow):
        assert got.dtype == want.dtype and torch.equal(got, want)
    operator_results = []  # the operators compiled graphs call: from C++ after the first call, else Python
    for path in (contextlib.nullcontext, native.disabled):
        with path():
            for _ in range(2):
                y, mean, rstd = torch.ops.flashkat.layer_norm_group_rational(x, weight, bias, a, b, 1e-6, out_dtype)
                grads = torch.ops.flashkat.layer_norm_group_rational_backward(g, x, weight, bias, a, b, mean, rstd,
                                                                              1e-6)  # fmt: skip
            operator_results.append((y, mean, rstd, *grads))
    for got, want in zip(*operator_results):
        assert torch.equal(got, want)
    assert torch.equal(operator_results[0][0], fast[0])
    lnop._clear_caches()


def run_both_paths(x, a, b, dim=-1, out_dtype=None, calls=2):
    """(output, dx, da, db, grad_fn name) of the last of ``calls`` calls, native path then Python."""
    results = []
    for path in (contextlib.nullcontext, native.disabled):
        with path():
            for _ in range(calls):
                xg, ag, bg = (t.detach().requires_grad_() for t in (x, a, b))
                y = flashkat.group_rational(xg, ag, bg, dim, out_dtype=out_dtype)
                g = torch.randn(y.shape, generator=torch.Generator(x.device).manual_seed(0), device=x.device).to(y.dtype)
                grads = torch.autograd.grad(y, (xg, ag, bg), g)
            results.append((y.detach(), *grads, y.grad_fn.name(), g))
    return results


CASES = {
    "fp32": (lambda: torch.randn(8, 197, 192, device="cuda"), -1, None),
    "bf16": (lambda: torch.randn(8, 197, 768, device="cuda").bfloat16(), -1, None),
    "fp16_4d_channels_first": (lambda: torch.randn(4, 64, 14, 14, device="cuda").half(), 1, None),
    "fp32_stored_bf16": (lambda: torch.randn(8, 197, 192, device="cuda"), -1, torch.bfloat16),
    "strided_slice": (lambda: torch.randn(8, 197, 384, device="cuda")[:, ::2], -1, None),
}


@requires_cuda
@pytest.mark.parametrize("case", list(CASES))
def test_native_path_gives_the_python_paths_bits(case, native_on):
    make, dim, out_dtype = CASES[case]
    x = make()
    a, b = random_coefficients(1, 8, (5, 4))
    fast, slow = run_both_paths(x, a, b, dim, out_dtype)
    assert "GroupRationalFunction" in fast[4] and "GroupRationalFunction" not in slow[4], (fast[4], slow[4])
    for got, want in zip(fast[:4], slow[:4]):
        assert got.dtype == want.dtype and torch.equal(got, want)
    y, dx, da, db, _, g = fast
    xd, ad, bd = x.double(), a.double(), b.double()
    assert rel_l2(y, reference.forward(xd, ad, bd, dim)) < 8e-3
    rdx, rda, rdb = reference.backward(g.double(), xd, ad, bd, dim)
    assert rel_l2(dx, rdx) < 8e-3
    check_coefficient_grads((da, db), (rda, rdb), coefficient_gradient_scale(g, x, a, b, dim), 1e-6)


@requires_cuda
def test_native_path_leaves_unaligned_views_and_other_impls_to_python(native_on):
    """A signature's first call plans it (Python path); later aligned calls run natively, a view
    4 bytes into its storage (same signature) and other backward implementations do not."""
    a, b = random_coefficients(1, 8, (5, 4))
    storage = torch.randn(3 * 16 * 64 + 1, device="cuda")
    aligned, shifted = storage[:-1].view(3, 16, 64), storage[1:].view(3, 16, 64)
    for x, native_expected in ((aligned, False), (aligned, True), (shifted, False), (aligned, True)):
        y = flashkat.group_rational(x.detach().requires_grad_(), a, b)
        assert ("GroupRationalFunction" in y.grad_fn.name()) == native_expected, y.grad_fn.name()
        assert rel_l2(y.detach(), reference.forward(x.double(), a.double(), b.double())) < 2e-6
    y = flashkat.group_rational(aligned.detach().requires_grad_(), a, b, impl="blocked")
    assert "GroupRationalFunction" not in y.grad_fn.name()


@requires_cuda
def test_native_backward_is_bitwise_deterministic(native_on):
    x = torch.randn(64, 197, 192, device="cuda", requires_grad=True)
    a, b = (t.requires_grad_() for t in random_coefficients(1, 8, (5, 4)))
    g = torch.randn(64, 197, 192, device="cuda")
    grads = [torch.autograd.grad(flashkat.group_rational(x, a, b), (x, a, b), g) for _ in range(4)]
    for later in grads[2:]:
        assert all(torch.equal(u, v) for u, v in zip(grads[1], later))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_operators_give_the_python_paths_bits(dtype, native_on):
    """The registered operators (what compiled graphs call) launch from C++ after a signature's
    first call: same bits as the Python path, and as the reference within the usual bounds."""
    x = torch.randn(16, 197, 192, device="cuda").to(dtype)
    g = torch.randn_like(x)
    a, b = random_coefficients(1, 8, (5, 4))
    calls = [torch.ops.flashkat.group_rational, torch.ops.flashkat.group_rational_backward]
    fast = [calls[0](x, a, b, -1, "flashkat", None) for _ in range(2)][-1]
    fast_grads = [calls[1](g, x, a, b, -1, "flashkat") for _ in range(2)][-1]
    assert native.module().plan_count() >= 1
    with native.disabled():
        slow, slow_grads = calls[0](x, a, b, -1, "flashkat", None), calls[1](g, x, a, b, -1, "flashkat")
    for got, want in zip((fast, *fast_grads), (slow, *slow_grads)):
        assert torch.equal(got, want)
    assert rel_l2(fast, reference.forward(x.double(), a.double(), b.double())) < 8e-3


@requires_cuda
def test_native_loop_of_forward_backward_calls_finishes(native_on):
    """What hung once (``flashkat bench host``'s loop): many forward + backward calls on tiny
    leaves without synchronising, gradients accumulated by autograd."""
    leaves = [t.requires_grad_() for t in (torch.randn(64, 192, device="cuda"), *random_coefficients(1, 8, (5, 4)))]
    g = torch.randn(64, 192, device="cuda")
    for _ in range(400):
        for t in leaves:
            t.grad = None
        flashkat.group_rational(*leaves).backward(g)
    torch.cuda.synchronize()
    assert "GroupRationalFunction" in flashkat.group_rational(*leaves).grad_fn.name()
    rdx, _, _ = reference.backward(g.double(), *(t.detach().double() for t in leaves))
    assert rel_l2(leaves[0].grad, rdx) < 2e-6


FIRST_BACKWARD_IN_C = textwrap.dedent("""
    import ctypes, sys, torch, flashkat
    x, g = torch.randn(64, 192, device="cuda"), torch.randn(64, 192, device="cuda")
    a, b = torch.randn(1, 6, device="cuda"), torch.randn(8, 4, device="cuda")
    torch.ops.flashkat.group_rational(x, a, b, -1, "flashkat", None)  # registers the signature, no backward
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    y = flashkat.group_rational(*leaves)
    assert "GroupRationalFunction" in y.grad_fn.name(), y.grad_fn.name()
    libcuda, context = ctypes.CDLL("libcuda.so.1"), []
    def record_context(grad):  # runs on autograd's device thread, before the C++ backward
        current = ctypes.c_void_p()
        libcuda.cuCtxGetCurrent(ctypes.byref(current))
        context.append(current.value)
    y.register_hook(record_context)
    y.backward(g)
    torch.cuda.synchronize()
    print("device thread had a context before the backward:", bool(context[0]))
    torch.save([x, g, a, b] + [t.grad for t in leaves], sys.argv[1])
""")


@requires_cuda
def test_native_backward_as_the_first_cuda_work_of_a_thread(tmp_path):
    """The process's first backward pass runs the C++ backward on an autograd device thread that
    has launched nothing before (what crashed ``flashkat bench host``): it finishes, with the
    reference's gradients."""
    out = tmp_path / "grads.pt"
    env = dict(os.environ, FLASHKAT_NATIVE="1")
    run = subprocess.run([sys.executable, "-c", FIRST_BACKWARD_IN_C, str(out)], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    print(run.stdout)  # whether the device thread had a context: shown with -s
    x, g, a, b, dx, da, db = torch.load(out)
    rdx, rda, rdb = reference.backward(g.double(), x.double(), a.double(), b.double())
    assert rel_l2(dx, rdx) < 2e-6
    check_coefficient_grads((da, db), (rda, rdb), coefficient_gradient_scale(g, x, a, b, -1), 1e-6)
