"""``flashkat bench model``: training-step throughput of KAT next to the same-size timm ViT.

One training step = forward, cross-entropy, backward and an AdamW step on a random batch under
autocast (bf16, or fp16 with a GradScaler), for ``kat_{size}_patch16_224`` (registered in timm
by ``flashkat.models``) with each backward implementation, and for timm's
``vit_{size}_patch16_224`` with the same batch, dtype, optimizer and mode. Throughput is the
batch over the median step time after warm-up; "vs_vit" is KAT's over the ViT's. "host_ms" is the
median time until the step's Python code returns (the GPU may still be working): where it is close
to "step_ms" the host, not the GPU, sets the pace (fp16's GradScaler waits for the GPU once).

Modes: ``eager``; ``compile``: ``torch.compile`` applied to each transformer block ("regional"
compilation: the blocks share their code, so one compilation serves all of them and a model
compiles in seconds rather than a minute; patch embedding and head stay eager);
``compile-model``: ``torch.compile`` of the whole model (one graph, longer to compile, and no
per-block call overhead, which matters where the host bounds the step); and ``reduce-overhead``:
the whole model compiled with ``mode="reduce-overhead"``, which replays each step's kernels as
CUDA graphs, so the step costs its GPU time and next to no host time. Eager configurations run
first, before the process has compiled anything (see ``configurations``).

``--impls gelu`` adds a KAT whose GR-KANs are replaced by GELUs (same output dtypes): what KAT
would cost if each GR-KAN cost what ATen's GELU costs, host time included, i.e. the best any
activation operator could do in this architecture; in eager steps of small models, where the host
sets the pace, it shows how much of KAT's gap is the extra layer itself rather than the operator.

The ``atomic`` implementation (KAT's design) is about 100x slower: it is opt-in (``--impls``)
and runs ``--atomic-steps`` timed steps only. On the CPU the op runs the float64 reference for
every implementation, so one KAT row ("cpu-reference") is timed, on a small configuration.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import flashkat.ops.baselines  # noqa: F401  (registers the "blocked" and "atomic" backwards)
from flashkat.layers.group_rational import GroupRational, follow_autocast_io
from flashkat.bench.harness import environment, markdown_table, non_negative_int, positive_int, write_results

SIZES = ("tiny", "small", "base")
MODES = ("eager", "compile", "compile-model", "reduce-overhead")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CPU_LABEL = "cpu-reference"
GELU_LABEL = "gelu"  # KAT with GELUs in place of its GR-KANs (see the module docstring)
UNFUSED_LABEL = "unfused"  # flashkat in timm's blocks: norm2 and act1 launched apart (fuse_norm=False)
# A model small enough for a CPU (and CI): 32 px images in 8 px patches, 2 blocks.
CPU_MODEL_ARGS = {"img_size": 32, "patch_size": 8, "depth": 2}


def model_names(size: str) -> tuple[str, str]:
    """(KAT, ViT) timm model names of one size."""
    return f"kat_{size}_patch16_224", f"vit_{size}_patch16_224"


def create_model(name: str, device: str, model_args: dict) -> torch.nn.Module:
    """A timm model (KAT ones registered by ``flashkat.models``), built directly on ``device``."""
    import timm

    if name.startswith("kat_"):
        try:
            import flashkat.models  # noqa: F401  (registers the KAT models in timm)
        except ModuleNotFoundError:
            if not timm.is_model(name):
                raise
    with torch.device(device):
        return timm.create_model(name, pretrained=False, **model_args)


def set_impl(model: torch.nn.Module, impl: str) -> int:
    """Point every GroupRational of ``model`` at backward ``impl``; returns how many there are."""
    layers = [m for m in model.modules() if isinstance(m, GroupRational)]
    for layer in layers:
        layer.impl = impl
    return len(layers)


class GeluStandin(torch.nn.Module):
    """F.gelu where a ``GroupRational`` was, with the same output dtype (under autocast a
    ``follow_autocast`` layer stores the autocast dtype, and takes it when compiled)."""

    def __init__(self, follow_autocast: bool) -> None:
        super().__init__()
        self.follow_autocast = follow_autocast

    def forward(self, x: torch.Tensor, norm: torch.nn.Module | None = None) -> torch.Tensor:
        if norm is not None:
            x = norm(x)
        x, out_dtype = follow_autocast_io(x, self.follow_autocast)
        y = F.gelu(x)
        return y if out_dtype is None else y.to(out_dtype)


def use_gelu_standins(model: torch.nn.Module) -> int:
    """Replace every ``GroupRational`` of ``model`` by a ``GeluStandin``; returns how many."""
    parents = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, GroupRational)]  # fmt: skip
    for parent, name, child in parents:
        setattr(parent, name, GeluStandin(child.follow_autocast))
    return len(parents)


def apply_mode(model: torch.nn.Module, mode: str) -> None:
    """``torch.compile`` ``model`` in place as ``mode`` says (see the module docstring): each
    transformer block (the whole model when it has no ``blocks``), the whole model (with CUDA
    graphs for ``reduce-overhead``), or nothing."""
    blocks = getattr(model, "blocks", None)
    if mode == "reduce-overhead":
        model.compile(mode="reduce-overhead")
    elif mode == "compile-model" or (mode == "compile" and blocks is None):
        model.compile()
    elif mode == "compile":
        for block in blocks:
            block.compile()


class TrainingStep:
    """One model's training step (forward, cross-entropy, backward, AdamW) on a fixed random batch."""

    def __init__(self, name: str, impl: str | None, dtype: torch.dtype, mode: str, batch: int, device: str,
                 model_args: dict, seed: int = 0) -> None:  # fmt: skip
        torch.manual_seed(seed)
        self.name, self.impl, self.dtype, self.mode, self.batch, self.device = name, impl, dtype, mode, batch, device
        unfused = impl == UNFUSED_LABEL
        self.model = create_model(name, device, {**model_args, "fuse_norm": False} if unfused else model_args)
        if impl is not None and impl != CPU_LABEL:
            if impl == GELU_LABEL:
                layers = use_gelu_standins(self.model)
            else:
                layers = set_impl(self.model, "flashkat" if unfused else impl)
            if layers == 0:
                raise RuntimeError(f"bench model: {name} has no GroupRational layers for impl={impl!r}")
        apply_mode(self.model, mode)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.05, fused=device == "cuda")
        self.scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
        self.size = self.model.patch_embed.img_size if hasattr(self.model, "patch_embed") else (224, 224)
        self.images = torch.randn(batch, 3, *self.size, device=device)
        self.labels = torch.randint(0, self.model.num_classes, (batch,), device=device)
        self.samples: list[float] = []
        self.host_samples: list[float] = []  # until step() returns: where they match, the host bounds the step
        self.pipelined_samples: list[float] = []  # seconds per step of back-to-back runs
        self.last_host_s = 0.0
        self.first_step_s = self.timed()  # compiles kernels (and the blocks, in compile mode)

    def step(self) -> None:
        with torch.autocast(device_type=self.device, dtype=self.dtype):
            loss = F.cross_entropy(self.model(self.images), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def timed(self) -> float:
        """Seconds of one step, GPU work included; the host's part is kept as ``last_host_s``."""
        if self.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.step()
        self.last_host_s = time.perf_counter() - start
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def pipelined(self, steps: int) -> float:
        """Seconds per step of ``steps`` steps back to back, one synchronize at the end: a training
        loop's throughput, where the host prepares the next step while the GPU runs this one."""
        if self.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps

    def row(self) -> dict:
        step_s = statistics.median(self.samples)
        pipelined = {"pipelined_images_per_s": self.batch / statistics.median(self.pipelined_samples)} \
            if self.pipelined_samples else {}  # fmt: skip
        return {"model": self.name, "impl": self.impl or "-", "dtype": str(self.dtype).replace("torch.", ""),
                "mode": self.mode, "batch": self.batch, "img_size": self.size[0], "steps": len(self.samples),
                "step_ms": step_s * 1000, "host_ms": statistics.median(self.host_samples) * 1000,
                "images_per_s": self.batch / step_s, **pipelined, "first_step_s": self.first_step_s}  # fmt: skip


def configurations(sizes: list[str], dtypes: list[str], modes: list[str]) -> list[tuple[str, str, str]]:
    """(size, dtype, mode) in the order they run: eager ones first. Once a process has compiled,
    its eager steps run slower (H200, docs/BENCHMARKS.md step 36: ViT-T 29.2 -> 35.4 ms per step,
    KAT-T over ViT-T 0.968 -> 0.937), which a training run that does not compile never pays."""
    groups = [(size, dtype, mode) for size in sizes for dtype in dtypes for mode in modes]
    return sorted(groups, key=lambda group: group[2] != "eager")  # stable: the given order otherwise


def benchmark(
    sizes: list[str], impls: list[str], dtypes: list[str], modes: list[str], batch: int, device: str,
    warmup: int, steps: int, atomic_steps: int, model_args: dict, desc: str = "bench model",
    pipelined_steps: int = 0,
) -> list[dict]:  # fmt: skip
    """ViT and KAT (each implementation) rows for every size, dtype and mode, with KAT's ratio to the ViT.

    The models of one (size, dtype, mode) are timed in turns, one step each per round: the host's
    speed drifts over seconds (by up to 30% on a shared machine), and at KAT-T's size the step
    time is host time, so only interleaved samples compare fairly. Each of those steps starts on
    an idle GPU, so the host's work before a step's first kernel is in its time; with
    ``pipelined_steps``, three more rounds in turns time that many steps back to back per model
    (``pipelined_images_per_s``, ``pipelined_vs_vit``): a training loop's throughput.
    """
    rows = []
    for size, dtype, mode in tqdm(configurations(sizes, dtypes, modes), desc=desc, unit="config"):
        kat_name, vit_name = model_names(size)
        if mode != "eager":
            torch._dynamo.reset()  # fresh caches: no recompile limit hit across configurations
        runs = [TrainingStep(vit_name if impl is None else kat_name, impl, DTYPES[dtype], mode, batch, device,
                             model_args) for impl in [None, *impls]]  # fmt: skip
        for _ in range(max(warmup - 1, 0)):
            for run in runs:
                run.timed()
        for i in range(steps):
            for run in runs:
                if run.impl != "atomic" or i < atomic_steps:
                    run.samples.append(run.timed())
                    run.host_samples.append(run.last_host_s)
        for _ in range(3 if pipelined_steps else 0):
            for run in runs:
                run.pipelined_samples.append(run.pipelined(atomic_steps if run.impl == "atomic" else pipelined_steps))
        results = [{"size": size, **run.row()} for run in runs]
        for row in results[1:]:
            row["vs_vit"] = row["images_per_s"] / results[0]["images_per_s"]
            if pipelined_steps:
                row["pipelined_vs_vit"] = row["pipelined_images_per_s"] / results[0]["pipelined_images_per_s"]
        rows += results
        del runs
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def parse_model_args(items: list[str] | None, device: str) -> dict:
    """``key=value`` overrides for timm.create_model (ints where they parse); CPU default: a tiny model."""
    if items is None:
        return dict(CPU_MODEL_ARGS) if device != "cuda" else {}
    args = {}
    for item in items:
        key, _, value = item.partition("=")
        args[key] = int(value) if value.lstrip("-").isdigit() else value
    return args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", nargs="+", choices=SIZES, help="model sizes (default: all on a GPU, tiny on the CPU)")
    parser.add_argument("--impls", nargs="+", choices=["flashkat", "blocked", "atomic", GELU_LABEL, UNFUSED_LABEL],
                        help="backward implementations (default: flashkat blocked; atomic is opt-in); "
                             "gelu: KAT with GELUs in place of its GR-KANs, the cost of an activation as cheap as ATen's; "
                             "unfused: flashkat with each block's norm2 and act1 launched apart (fuse_norm=False)")  # fmt: skip
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16"])
    parser.add_argument("--modes", nargs="+", choices=MODES,
                        help="eager, compile (each block), compile-model or reduce-overhead (default: eager, compile and reduce-overhead on a GPU, eager on the CPU)")  # fmt: skip
    parser.add_argument("--batch", type=positive_int, help="images per step (default 128 on a GPU, 4 on the CPU)")
    parser.add_argument("--model-args", nargs="+", metavar="KEY=VALUE",
                        help="timm.create_model overrides (default on the CPU: img_size=32 patch_size=8 depth=2)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (the first compiles)")
    parser.add_argument("--steps", type=positive_int, help="timed steps per model (default 20 on a GPU, 3 on the CPU)")
    parser.add_argument("--atomic-steps", type=positive_int, default=2, help="timed steps for the slow atomic implementation")
    parser.add_argument("--pipelined-steps", type=non_negative_int,
                        help="steps back to back per model in each of three more rounds, for a training loop's "
                             "throughput (default 10 on a GPU, 2 on the CPU; 0 skips them)")  # fmt: skip
    parser.add_argument("--output", type=Path, default=Path("bench-results"), help="folder for JSON and Markdown")


COLUMNS = ["size", "mode", "dtype", "model", "impl", "batch", "images_per_s", "vs_vit", "step_ms", "host_ms",
           "pipelined_images_per_s", "pipelined_vs_vit"]  # fmt: skip


def run(args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    # On the CPU every implementation runs the reference: one KAT row says it all (and the GELU one).
    impls = args.impls or ["flashkat", "blocked"]
    if not gpu:
        impls = [CPU_LABEL] + ([GELU_LABEL] if GELU_LABEL in impls else [])
    model_args = parse_model_args(args.model_args, device)
    rows = benchmark(
        sizes=args.sizes or (list(SIZES) if gpu else ["tiny"]), impls=impls, dtypes=args.dtypes,
        modes=args.modes or (["eager", "compile", "reduce-overhead"] if gpu else ["eager"]),
        batch=args.batch or (128 if gpu else 4), device=device, warmup=args.warmup,
        steps=args.steps or (20 if gpu else 3), atomic_steps=args.atomic_steps, model_args=model_args,
        pipelined_steps=(10 if gpu else 2) if args.pipelined_steps is None else args.pipelined_steps,
    )  # fmt: skip
    table = markdown_table(rows, COLUMNS)
    env = environment(device)
    payload = {"environment": env, "model_args": model_args, "optimizer": "AdamW (fused on CUDA)", "rows": rows}
    write_results(args.output, "model", payload, table)
    heading = f"{env.get('gpu', env.get('cpu'))}, torch {env['torch']}, triton {env['triton']}, AdamW, autocast"
    if not gpu:
        heading += f" (CPU: small models {model_args}, the op runs the float64 reference)"
    print(f"{heading}\n{table}")
    return 0
