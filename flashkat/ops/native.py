"""The native (C++) launcher of the group-rational op's eager CUDA calls: build and describe kernels.

``flashkat/csrc/group_rational.cpp`` holds an autograd function in C++ that launches the op's
compiled Triton kernels itself, so an eager call costs about what an ATen op costs on the host
(docs/BENCHMARKS.md, step 22). This module builds it once per machine with
``torch.utils.cpp_extension`` (about 30-50 s, announced on stderr; cached, see ``build_directory``)
and turns a compiled kernel into the description the C++ side launches: its function handle, grid,
threads, shared memory, PDL flag and parameter list. ``flashkat.ops.group_rational`` registers one plan per
call signature after that signature's first call.

On by default where it is known to hold: CUDA, Triton 3.6 (whose compiled kernels take every
non-constexpr argument and then two scratch pointers), no launch hooks (a profiler's would be
skipped). FLASHKAT_NATIVE=0, set before the first call, turns it off. Anything else, a failed
build included (with one warning), keeps the Python path, which gives the same bits.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "group_rational.cpp"
TRITON_VERSIONS = ("3.6.",)  # whose kernel parameter layout the C++ launcher follows

_SCALAR_KINDS = {"i32": "i", "u32": "i", "i64": "l", "u64": "l", "fp32": "f", "fp64": "d"}
_module = None  # the built extension; False once it is known to be unavailable


def enabled() -> bool:
    """Whether this process may use the native launcher (before building it)."""
    import triton

    return (os.environ.get("FLASHKAT_NATIVE", "1") != "0" and os.environ.get("TRITON_INTERPRET") != "1"
            and triton.__version__.startswith(TRITON_VERSIONS) and torch.cuda.is_available())  # fmt: skip


def build():
    """The compiled extension module (built on first use); raises if it cannot be built."""
    import triton
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # the ninja package's binary, where its scripts are not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    include = Path(triton.__file__).parent / "backends" / "nvidia" / "include"  # cuda.h, as Triton's launcher
    arguments = dict(name="flashkat_native", sources=[str(SOURCE)], extra_include_paths=[str(include)],
                     extra_cflags=["-O2"], extra_ldflags=["-lc10_cuda", "-ltorch_cuda"])  # fmt: skip
    directory = build_directory(arguments)
    if not any(directory.glob("flashkat_native*.so")):  # the first call on this machine waits for the compiler
        print("flashkat: building the native launcher of eager CUDA calls, once per machine (~30-50 s; "
              "FLASHKAT_NATIVE=0 skips it)", file=sys.stderr, flush=True)  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    return load(**arguments, build_directory=str(directory), verbose=False)


def build_directory(arguments: dict) -> Path:
    """Where ``build`` compiles with ``arguments``: one folder per source text, arguments and torch,
    Triton and Python version, so a module found there was built from exactly these
    (TORCH_EXTENSIONS_DIR moves the root, as it does for torch's own extensions)."""
    import triton
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    inputs = f"{sorted(arguments.items())} {torch.__version__} {triton.__version__} {sys.version}".encode()
    return Path(root) / "flashkat_native" / hashlib.sha256(SOURCE.read_bytes() + inputs).hexdigest()[:16]


def module():
    """The extension where ``enabled()``, else None; a failed build warns once and returns None."""
    global _module
    if _module is None:
        _module = False
        if enabled():
            try:
                _module = build()
            except Exception as error:  # no compiler, no ninja, ...: the Python path still works
                warnings.warn(f"flashkat: native launcher unavailable, eager calls use the Python path ({error})",
                              RuntimeWarning, stacklevel=3)  # fmt: skip
    return _module or None


def clear() -> None:
    """Forget every registered plan (the op's plans were rebuilt, e.g. after a tuning change)."""
    if _module:
        _module.clear()


@contextlib.contextmanager
def disabled():
    """Calls inside take the Python path (to measure or test one path against the other)."""
    global _module
    saved, _module = _module, False
    try:
        yield
    finally:
        _module = saved


def kernel_spec(compiled, arg_names: list[str], args: tuple, n_tensors: int, grid: tuple) -> tuple | None:
    """(function, grid, threads, shared bytes, pdl, params) for the C++ launcher, or None where
    ``compiled`` needs what the launcher does not provide (scratch memory, clusters, cooperative
    launch, a scalar type it does not pass). ``args`` are the launch's arguments in order, the first
    ``n_tensors`` of them tensors; params name tensors by position and carry scalars' values."""
    metadata = compiled.metadata
    if (metadata.num_ctas != 1 or metadata.global_scratch_size or metadata.profile_scratch_size
            or metadata.launch_cooperative_grid):  # fmt: skip
        return None
    values = dict(zip(arg_names, args))
    params = []
    for name, kind in compiled.src.signature.items():
        if kind == "constexpr":
            continue
        position = arg_names.index(name)
        if kind.startswith("*"):
            if position >= n_tensors:
                return None
            params.append(("t", position, 0.0))
        elif kind in _SCALAR_KINDS and isinstance(values[name], (int, float)):
            code = _SCALAR_KINDS[kind]
            value = values[name]
            params.append((code, int(value), 0.0) if code in "il" else (code, 0, float(value)))
        else:
            return None
    compiled._init_handles()
    return (compiled.function, (*grid, 1, 1)[:3], 32 * metadata.num_warps, metadata.shared,
            bool(metadata.launch_pdl), params)  # fmt: skip
