"""``flashkat train``: train a KAT (or any timm model) on a laptop CPU or on many GPUs.

    flashkat train                                     # KAT-micro on sklearn's 8x8 digits, ~1 min on 2 cores
    flashkat train --dataset /data/imagenet --model kat_tiny_patch16_224 --preset kat-imagenet
    torchrun --nproc_per_node 8 -m flashkat.cli train ...   # DistributedDataParallel (NCCL; gloo on CPU)

``--batch-size`` is the global batch: each of the N processes runs ``batch / (N * accum_steps)``
images per micro-batch, so one command trains the same thing on 1 or 8 devices. The output folder
gets ``last.pth`` (the whole training state, written atomically, also every ``--save-every-steps``),
``best.pth`` (weights of the best epoch), ``log.csv`` (one row per epoch) and ``metrics.json``.
``--resume`` continues a run exactly where its last checkpoint left it (epoch, step, optimizer,
scheduler, grad scaler, EMA and every process's RNG state); with ``--workers 0`` the continued run
is bitwise the uninterrupted one.

Sections: arguments and presets; data; model and optimisation (``Trainer``); evaluation;
checkpoints; the run itself.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from flashkat import datasets

__all__ = ["PRESETS", "DEFAULTS", "TrainError", "add_arguments", "run", "train", "evaluate", "save_checkpoint",
           "load_checkpoint", "model_from_checkpoint", "build_datasets"]  # fmt: skip

# ----------------------------------------------------------------------------------------------
# Arguments and presets
# ----------------------------------------------------------------------------------------------

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --amp: autocast dtype
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's

# Values of the options a preset may set, when neither the command line nor the preset does.
# They train the default model on the default dataset (digits) in about a minute on 2 CPU cores.
DEFAULTS: dict[str, Any] = dict(
    epochs=20, batch_size=64, accum_steps=1, opt="adamw", lr=2e-3, weight_decay=0.05, sched="cosine",
    warmup_epochs=1, warmup_lr=1e-5, min_lr=1e-5, smoothing=0.1, mixup=0.0, cutmix=0.0, drop_path=0.1,
    aa=None, reprob=0.0, remode="pixel", amp="none", ema_decay=0.0,
)  # fmt: skip

# KAT's ImageNet-1K recipe (timm's train script; SPEC.md section 4). drop_path 0.4 for the base model.
PRESETS: dict[str, dict[str, Any]] = {
    "kat-imagenet": dict(
        epochs=300, batch_size=1024, opt="adamw", lr=1e-3, weight_decay=0.05, sched="cosine", warmup_epochs=5,
        warmup_lr=1e-5, min_lr=0.0, smoothing=0.1, mixup=0.8, cutmix=1.0, drop_path=0.1, aa="rand-m9-mstd0.5",
        reprob=0.25, remode="pixel", amp="fp16", ema_decay=0.9999,
    ),
}  # fmt: skip


class TrainError(Exception):
    """A problem with the user's request (dataset, model, checkpoint, flags): reported in one line."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from timm.utils import ParseKwargs

    unset = dict(default=None)  # resolved later from --preset, then DEFAULTS
    what = parser.add_argument_group("what to train")
    what.add_argument("--model", default="kat_micro_patch4_16", help="timm model name (default: kat_micro_patch4_16)")
    what.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                      help="extra arguments of the model, e.g. depth=6 weight_init=kan_variance")
    what.add_argument("--pretrained", action="store_true", help="start from the model's published weights")
    what.add_argument("--dataset", default="digits",
                      help="'digits' (sklearn's 8x8 digits, the default), 'synthetic', or an ImageFolder root "
                           "with train/ and val/ sub-folders (ImageNet layout)")
    what.add_argument("--num-classes", type=int, help="classes (default: the dataset's; synthetic: the model's)")
    what.add_argument("--synthetic-size", type=int, default=2048, help="training images of --dataset synthetic")
    what.add_argument("--preset", choices=sorted(PRESETS), help="a named recipe; explicit flags override it")

    out = parser.add_argument_group("output and resuming")
    out.add_argument("--output", help="output folder (default: runs/<model>-<dataset>, numbered if taken)")
    out.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                     help="continue from CHECKPOINT (default: OUTPUT/last.pth)")
    out.add_argument("--save-every-steps", type=int, default=0, help="also checkpoint every N optimizer steps")
    out.add_argument("--max-steps", type=int, default=0, help="stop (with a checkpoint) after N optimizer steps")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, **unset, help=f"epochs (default: {DEFAULTS['epochs']})")
    opt.add_argument("--batch-size", "-b", type=int, **unset, help="global batch size, all processes together")
    opt.add_argument("--accum-steps", type=int, **unset, help="micro-batches per optimizer step (default: 1)")
    opt.add_argument("--opt", **unset, help="timm optimizer name (default: adamw)")
    opt.add_argument("--lr", type=float, **unset, help=f"peak learning rate (default: {DEFAULTS['lr']})")
    opt.add_argument("--weight-decay", type=float, **unset, help="weight decay (default: 0.05)")
    opt.add_argument("--sched", **unset, help="timm scheduler, stepped every update (default: cosine)")
    opt.add_argument("--warmup-epochs", type=float, **unset, help="linear warmup epochs")
    opt.add_argument("--warmup-lr", type=float, **unset, help="learning rate at the start of warmup")
    opt.add_argument("--min-lr", type=float, **unset, help="final learning rate of the schedule")
    opt.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    opt.add_argument("--amp", choices=tuple(AMP_DTYPES), **unset, help="autocast dtype (default: none)")
    opt.add_argument("--ema-decay", type=float, **unset, help="keep an EMA of the weights (0: off)")
    opt.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                     help="torch.compile the model, optionally with a mode: reduce-overhead replays CUDA graphs, "
                          "for models whose step the host bounds (e.g. tiny ones; docs/BENCHMARKS.md)")  # fmt: skip

    reg = parser.add_argument_group("augmentation and regularisation")
    reg.add_argument("--smoothing", type=float, **unset, help="label smoothing (default: 0.1)")
    reg.add_argument("--mixup", type=float, **unset, help="mixup alpha (0: off)")
    reg.add_argument("--cutmix", type=float, **unset, help="cutmix alpha (0: off)")
    reg.add_argument("--drop-path", type=float, **unset, help="stochastic depth rate (default: 0.1)")
    reg.add_argument("--aa", **unset, help="timm auto-augment policy, e.g. rand-m9-mstd0.5 (folders only)")
    reg.add_argument("--reprob", type=float, **unset, help="random erasing probability (folders only)")
    reg.add_argument("--remode", **unset, help="random erasing mode (default: pixel)")

    run_ = parser.add_argument_group("running")
    run_.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    run_.add_argument("--workers", type=int, help="data loader processes (default: 0 for digits, else min(8, cores))")
    run_.add_argument("--threads", type=int, help="CPU threads per process (default: cores / local processes)")
    run_.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    run_.add_argument("--log-interval", type=int, default=10, help="progress bar refresh, in steps")
    run_.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the unset options from the preset, then DEFAULTS, and check what can be checked cheaply."""
    preset = PRESETS.get(args.preset, {})
    if args.drop_path is None and args.preset == "kat-imagenet" and "base" in args.model:
        args.drop_path = 0.4  # KAT-B's stochastic depth
    for name, default in DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, preset.get(name, default))
    for name in ("epochs", "batch_size", "accum_steps"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_model_name(args.model)
    return args


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def dataset_num_classes(dataset: str, model_name: str) -> int:
    """Classes of a dataset, found cheaply and early (a bad path fails here, before any work)."""
    if dataset == "digits":
        return 10
    if dataset == "synthetic":
        import timm

        return timm.models.get_pretrained_cfg(model_name).num_classes or 1000
    from torchvision.datasets.folder import find_classes

    root = Path(dataset)
    if not root.is_dir():
        raise TrainError(f"dataset path {dataset} does not exist or is not a directory "
                         f"(use 'digits', 'synthetic' or an ImageFolder root with train/ and val/)")  # fmt: skip
    try:
        classes, _ = find_classes(str(datasets._split_dir(root, ("train",))))
    except (FileNotFoundError, datasets.DatasetError) as error:
        raise TrainError(str(error)) from error
    return len(classes)


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model takes."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None):
        return (patch_embed.proj.in_channels, *patch_embed.img_size)
    return tuple(model.pretrained_cfg["input_size"])


def build_datasets(dataset: str, model: nn.Module, num_classes: int, train: bool = True, synthetic_size: int = 2048,
                   seed: int = 0, aa: str | None = None, reprob: float = 0.0, remode: str = "pixel"):  # fmt: skip
    """(train set or None, validation set) of ``dataset`` at the model's input size.

    Folders get timm's transforms: RandAugment (``aa``) and random erasing for training, resize and
    centre crop (the model's crop_pct) for validation. Raises ``DatasetError`` for a bad dataset.
    """
    input_size = model_input_size(model)
    if dataset == "digits":
        return (datasets.digits("train", input_size) if train else None), datasets.digits("val", input_size)
    if dataset == "synthetic":
        val_set = datasets.SyntheticImages(max(synthetic_size // 8, 64), num_classes, input_size, seed, "val")
        return (datasets.SyntheticImages(synthetic_size, num_classes, input_size, seed) if train else None), val_set
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({"input_size": input_size}, model=model)
    train_set = None
    if train:
        train_transform = create_transform(
            config["input_size"], is_training=True, auto_augment=aa, interpolation="random",
            mean=config["mean"], std=config["std"], re_prob=reprob, re_mode=remode,
        )  # fmt: skip
        train_set = datasets.image_folder(dataset, "train", train_transform)
    val_set = datasets.image_folder(dataset, "val", create_transform(**config))
    if train and train_set.classes != val_set.classes:
        raise datasets.DatasetError(f"{dataset}: train/ and val/ have different class folders")
    return train_set, val_set


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch part-way through (for a resumed run).

    The order of an epoch depends only on (seed, epoch), so skipping its first ``start`` indices
    continues exactly where an interrupted run stopped.
    """

    start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return super().__len__() - self.start


# ----------------------------------------------------------------------------------------------
# Model and optimisation
# ----------------------------------------------------------------------------------------------


def check_model_name(name: str) -> None:
    """A clear error for a model timm does not know (the KAT models are registered first)."""
    import timm

    import flashkat.models  # noqa: F401 - registers the KAT models with timm

    if not timm.is_model(name):
        raise TrainError(f"unknown model {name!r}; KAT models: {', '.join(timm.list_models('kat_*'))} "
                         "(or any timm model name)")  # fmt: skip


def create_model(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """timm.create_model, after ``check_model_name``; a failed weight download is a clear error."""
    import timm

    check_model_name(name)
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as error:  # no network, no such file, ...
        raise TrainError(f"cannot load the weights of {name}: {_first_line(error)} (offline? download the file and "
                         "pass it as the checkpoint, with --model)") from error  # fmt: skip


class Trainer:
    """The model, its optimizer, scheduler, grad scaler, EMA and loss, and one epoch of training."""

    def __init__(self, model: nn.Module, args: argparse.Namespace, device: torch.device, updates_per_epoch: int):
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3

        self.args, self.device, self.updates_per_epoch = args, device, updates_per_epoch
        self.model = model.to(device)
        self.ema = ModelEmaV3(self.model, decay=args.ema_decay) if args.ema_decay > 0 else None
        self.optimizer = create_optimizer_v2(self.model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
            warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=updates_per_epoch,
        )  # fmt: skip
        self.amp_dtype = AMP_DTYPES[args.amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
        self.distributed = dist.is_available() and dist.is_initialized()
        self.train_model = self.model
        if self.distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.ddp_model = self.train_model
        if args.compile:
            self.train_model = torch.compile(self.train_model, mode=None if args.compile == "default" else args.compile)
        self.mixup = None
        if args.mixup > 0 or args.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                               num_classes=model.num_classes)  # fmt: skip
            self.loss_fn = SoftTargetCrossEntropy()
        elif args.smoothing > 0:
            self.loss_fn = LabelSmoothingCrossEntropy(args.smoothing)
        else:
            self.loss_fn = nn.CrossEntropyLoss()
        self.global_step = 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def train_one_epoch(self, loader: DataLoader, epoch: int, first_step: int, on_step) -> dict[str, float]:
        """Optimizer steps ``first_step .. updates_per_epoch - 1`` of ``epoch``.

        ``on_step(step_in_epoch)`` runs after each step and returns True to stop early (max steps).
        Returns the epoch's mean loss and accuracy (all processes) and its throughput.
        """
        args, accum = self.args, self.args.accum_steps
        self.train_model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)  # against the un-mixed labels
        seen = 0
        batches = iter(loader)
        primary = not self.distributed or dist.get_rank() == 0
        bar = _progress(self.updates_per_epoch, first_step, f"epoch {epoch + 1}/{args.epochs}",
                        disable=args.no_progress or not primary)  # fmt: skip
        started, images_done = time.perf_counter(), 0
        step = first_step
        for step in range(first_step, self.updates_per_epoch):
            for micro in range(accum):
                images, targets = next(batches)
                images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
                labels = targets
                if self.mixup is not None:
                    images, targets = self.mixup(images, targets)
                syncing = micro == accum - 1 or not self.distributed
                with contextlib.nullcontext() if syncing else self.ddp_model.no_sync():
                    with self.autocast():
                        output = self.train_model(images)
                        loss = self.loss_fn(output, targets)
                    self.scaler.scale(loss / accum).backward()
                loss_sum += loss.detach().double() * len(labels)
                correct += (output.argmax(-1) == labels).sum()
                seen += len(labels)
            if args.clip_grad:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            self.scheduler.step_update(num_updates=self.global_step)
            if self.ema is not None:
                self.ema.update(self.model, step=self.global_step)
            images_done += len(labels) * accum * (dist.get_world_size() if self.distributed else 1)
            if (step + 1) % args.log_interval == 0 or step + 1 == self.updates_per_epoch:
                seconds = time.perf_counter() - started
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{100 * correct.item() / seen:.1f}%",
                                img_s=f"{images_done / seconds:.0f}", lr=f"{self.lr:.2e}", refresh=False)  # fmt: skip
            bar.update()
            if on_step(step + 1):
                break
        bar.close()
        totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), device=self.device)])
        seconds = time.perf_counter() - started  # .item() and stack above waited for the device
        if self.distributed:
            dist.all_reduce(totals)
        count = max(totals[2].item(), 1.0)
        return {"train_loss": totals[0].item() / count, "train_top1": 100 * totals[1].item() / count,
                "images_per_second": images_done / max(seconds, 1e-9), "epoch_seconds": seconds,
                "steps_done": step + 1 - first_step}  # fmt: skip

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        state = {"state_dict": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "global_step": self.global_step}  # fmt: skip
        if self.ema is not None:
            state["state_dict_ema"] = self.ema.module.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        try:
            self.model.load_state_dict(state["state_dict"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as error:
            raise TrainError(f"checkpoint {source} does not fit this model/optimizer: {_first_line(error)}") from error
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # empty when fp16 scaling is off
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state.get("state_dict_ema", state["state_dict"]))
        self.global_step = state["global_step"]
        self.scheduler.step_update(num_updates=self.global_step)  # the learning rate of the next step


def _progress(total: int, initial: int, desc: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, disable=disable,
                file=sys.stderr)  # fmt: skip


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None = None,
             ) -> dict[str, float]:  # fmt: skip
    """Loss, top-1 and top-5 (percent) of ``model`` over ``loader``, summed over all processes."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(images).float()
        hits = output.topk(min(5, output.shape[-1]), dim=-1).indices == targets[:, None]  # [B, k]
        totals[0] += F.cross_entropy(output, targets, reduction="sum")
        totals[1] += hits[:, 0].sum()
        totals[2] += hits.sum()
        totals[3] += len(targets)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    count = max(totals[3].item(), 1.0)
    return {"loss": totals[0].item() / count, "top1": 100 * totals[1].item() / count,
            "top5": 100 * totals[2].item() / count, "images": int(totals[3].item())}  # fmt: skip


def eval_loader(dataset, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    """Each process evaluates every world_size-th image (no padding, so counts are exact)."""
    if dist.is_available() and dist.is_initialized():
        dataset = Subset(dataset, range(dist.get_rank(), len(dataset), dist.get_world_size()))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def save_checkpoint(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed over ``path``.

    The rename is atomic, so ``path`` is always either the previous complete checkpoint or the new
    one, whenever the process dies; a failed save removes its temporary file.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint on the CPU (tensors and plain data only), with a clear error if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated, not a checkpoint, foreign pickle, ...
        raise TrainError(f"checkpoint {path} is unreadable (truncated or not a PyTorch checkpoint): "
                         f"{_first_line(error)}") from error  # fmt: skip
    if not isinstance(checkpoint, dict):
        raise TrainError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": numpy_state[2],
                  "has_gauss": numpy_state[3], "cached_gaussian": numpy_state[4]},  # fmt: skip
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,  # this process's device
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))  # fmt: skip
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _all_rng_states() -> list[dict[str, Any]]:
    """Every process's RNG state, in rank order (a collective: all processes must call it)."""
    state = _rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def model_from_checkpoint(source: str, model_name: str | None = None, use_ema: bool = False) -> tuple[nn.Module, dict]:
    """A model with weights from ``source``, for evaluation and plots.

    ``source`` is a ``flashkat train`` checkpoint (it knows its model), a KAT / FlashKAT / timm
    checkpoint file (``model_name`` needed: loaded through the model's checkpoint filter), or a
    registered model name (its published weights). Returns the model and the checkpoint's metadata.
    """
    path = Path(source)
    if path.is_file():
        checkpoint = load_checkpoint(path)
        if "arch" in checkpoint:  # ours
            model = create_model(checkpoint["arch"], **checkpoint.get("model_kwargs", {}))
            key = "state_dict_ema" if use_ema and "state_dict_ema" in checkpoint else "state_dict"
            try:
                model.load_state_dict(checkpoint[key])
            except RuntimeError as error:
                message = f"checkpoint {path} does not fit {checkpoint['arch']}: {_first_line(error)}"
                raise TrainError(message) from error
            return model, checkpoint
        if model_name is None:
            raise TrainError(f"{path} is not a flashkat checkpoint: name its model with --model")
        try:
            return create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))), {}
        except RuntimeError as error:
            raise TrainError(f"checkpoint {path} does not fit {model_name}: {_first_line(error)}") from error
    if path.suffix in (".pth", ".pt", ".bin", ".safetensors") or os.sep in source:
        raise TrainError(f"checkpoint {source} does not exist")
    return create_model(source, pretrained=True), {}



# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def _setup_device(args: argparse.Namespace) -> torch.device:
    """Join the process group when started by torchrun (NCCL on GPUs, gloo on CPU) and pick the device."""
    from timm.utils.distributed import init_distributed_device_so

    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if name == "cuda" and local_processes > torch.cuda.device_count():  # one GPU per process
        raise TrainError(f"{local_processes} processes per node but {torch.cuda.device_count()} visible GPU(s): "
                         "start at most one process per GPU (torchrun --nproc_per_node), or pass --device cpu")
    try:
        info = init_distributed_device_so(device=name)
    except AssertionError as error:
        raise TrainError(str(error)) from error
    torch.set_num_threads(args.threads or max(1, _cores() // local_processes))
    device = torch.device(info["device"])
    if device.type == "cpu":
        _keep_freed_memory()
    return device


def _keep_freed_memory() -> None:
    """Stop glibc from unmapping large freed blocks (and page-faulting them back on the next call).

    On the CPU the GR-KAN op runs its float64 reference, which allocates a few MB of temporaries per
    call; with glibc's defaults each is mmap'ed and zero-filled anew, which doubled the time of the
    digits run (half of it in the kernel). Allocations up to 32 MB now reuse the heap.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return
    trim_threshold, mmap_threshold = -1, -3  # mallopt parameter numbers (malloc.h)
    libc.mallopt(mmap_threshold, 32 << 20)  # glibc's maximum on 64-bit systems
    libc.mallopt(trim_threshold, 256 << 20)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _output_folder(args: argparse.Namespace) -> tuple[Path, str | None]:
    """(where this run writes, or a problem). Never another run's folder: overwriting it would lose work."""
    if args.resume:
        if args.resume == "auto":
            if not args.output:
                return Path(), "--resume without a checkpoint path needs --output (the run to continue)"
            return Path(args.output), None
        return (Path(args.output) if args.output else Path(args.resume).parent), None
    if args.output:
        output = Path(args.output)
        if (output / "last.pth").exists():
            return output, (f"{output} already holds a run (last.pth): pass --resume to continue it, "
                            "or choose another --output")  # fmt: skip
        return output, None
    base = Path("runs") / f"{args.model}-{datasets.describe(args.dataset)}"
    output, number = base, 1
    while output.exists() and any(output.iterdir()):
        number += 1
        output = base.with_name(f"{base.name}-{number}")
    return output, None


def _broadcast(value: Any) -> Any:
    """Rank 0's value on every process."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


LOG_FIELDS = ("epoch", "step", "lr", "train_loss", "train_top1", "loss", "top1", "top5", "ema_top1", "ema_top5",
              "images_per_second", "epoch_seconds", "seconds")  # fmt: skip


def _log_rows(path: Path, keep_before_epoch: int) -> list[dict]:
    """Rows of an existing log for epochs before ``keep_before_epoch`` (a resumed run redoes the rest)."""
    if not path.exists():
        return []
    with open(path, newline="") as file:
        return [row for row in csv.DictReader(file) if int(row["epoch"]) <= keep_before_epoch]


def _write_log(path: Path, rows: list[dict]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=LOG_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train as ``args`` says; returns the final metrics (also written to OUTPUT/metrics.json)."""
    started = time.perf_counter()
    args = resolve_args(args)
    device = _setup_device(args)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    primary = rank == 0
    if args.batch_size % (world * args.accum_steps):
        raise TrainError(f"--batch-size {args.batch_size} is not divisible by {world} processes x "
                         f"{args.accum_steps} accumulation steps")  # fmt: skip
    micro_batch = args.batch_size // (world * args.accum_steps)
    if (args.mixup > 0 or args.cutmix > 0) and micro_batch % 2:
        raise TrainError(f"mixup/cutmix need an even micro-batch; this run has {micro_batch} images per micro-batch")

    # Everything that can be wrong with the request is checked before the run writes anything.
    output, problem = _broadcast(_output_folder(args) if primary else None)
    if problem:
        raise TrainError(problem)
    checkpoint, resume_path = None, None
    if args.resume:
        resume_path = output / "last.pth" if args.resume == "auto" else Path(args.resume)
        checkpoint = load_checkpoint(resume_path)
        if checkpoint.get("arch") != args.model:
            raise TrainError(f"checkpoint {resume_path} is a {checkpoint.get('arch', 'foreign')!r} run, "
                             f"not {args.model!r}")  # fmt: skip
    num_classes = args.num_classes or dataset_num_classes(args.dataset, args.model)
    torch.manual_seed(args.seed)  # the same initial model in every process
    model_kwargs = {**args.model_kwargs, "num_classes": num_classes}
    if args.drop_path:
        model_kwargs["drop_path_rate"] = args.drop_path
    model = create_model(args.model, pretrained=args.pretrained, **model_kwargs)
    try:
        train_set, val_set = build_datasets(args.dataset, model, num_classes, True, args.synthetic_size, args.seed,
                                            args.aa, args.reprob, args.remode)  # fmt: skip
    except datasets.DatasetError as error:
        raise TrainError(str(error)) from error
    for generator_seed in (torch.manual_seed, np.random.seed, random.seed):  # dropout, mixup: per process
        generator_seed(args.seed + rank)

    workers = args.workers if args.workers is not None else (0 if args.dataset == "digits" else min(8, _cores()))
    pin = device.type == "cuda"
    sampler = ResumableSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader_generator = torch.Generator()  # the loader's own, so it never draws from the global RNG
    train_loader = DataLoader(train_set, batch_size=micro_batch, sampler=sampler, num_workers=workers,
                              pin_memory=pin, drop_last=True, generator=loader_generator)  # fmt: skip
    updates_per_epoch = len(train_loader) // args.accum_steps
    if updates_per_epoch < 1:
        raise TrainError(f"the training set ({len(train_set)} images) is smaller than one batch ({args.batch_size})")
    val_loader = eval_loader(val_set, micro_batch, workers, pin)
    trainer = Trainer(model, args, device, updates_per_epoch)

    start_epoch, start_step, best_top1 = 0, 0, -1.0
    if checkpoint is not None:
        if checkpoint.get("updates_per_epoch") != updates_per_epoch:
            raise TrainError(f"checkpoint {resume_path} has {checkpoint.get('updates_per_epoch')} steps per "
                             f"epoch, this run {updates_per_epoch}: resume with the same dataset and --batch-size")
        if checkpoint.get("args", {}).get("epochs", args.epochs) != args.epochs:
            raise TrainError(f"checkpoint {resume_path} was scheduled for {checkpoint['args']['epochs']} epochs, "
                             f"not {args.epochs}: resume with the same --epochs")  # fmt: skip
        trainer.load_state_dict(checkpoint, str(resume_path))
        start_epoch, start_step = checkpoint["epoch"], checkpoint["step_in_epoch"]
        best_top1 = checkpoint.get("best_top1", -1.0)
        if len(checkpoint.get("rng", [])) == world:  # else: a different process count, fresh streams
            _set_rng_state(checkpoint["rng"][rank])

    log_path = output / "log.csv"
    log_rows = []
    if primary:
        output.mkdir(parents=True, exist_ok=True)
        _write_json(output / "args.json", json.loads(json.dumps(vars(args), default=str)))
        log_rows = _log_rows(log_path, start_epoch)
        parameters = sum(p.numel() for p in model.parameters())
        processes = f"{world} processes (rank 0 on {device})" if world > 1 else f"1 process on {device}"
        print(f"flashkat train: {args.model} ({parameters:,} parameters) on {args.dataset} "
              f"({len(train_set)} train / {len(val_set)} val images), {processes}, "
              f"global batch {args.batch_size}, {updates_per_epoch} steps/epoch -> {output}",
              file=sys.stderr)  # fmt: skip

    def save(epoch: int, step_in_epoch: int) -> None:
        """Checkpoint the whole state as of ``step_in_epoch`` steps into ``epoch`` (all processes call it)."""
        rng_states = _all_rng_states()
        if primary:
            state = {"arch": args.model, "model_kwargs": model_kwargs, "epoch": epoch, "step_in_epoch": step_in_epoch,
                     "updates_per_epoch": updates_per_epoch, "best_top1": best_top1, "rng": rng_states,
                     "args": json.loads(json.dumps(vars(args), default=str)), **trainer.state_dict()}  # fmt: skip
            save_checkpoint(state, output / "last.pth")

    def after_step(epoch: int):
        def callback(step_in_epoch: int) -> bool:
            stop = bool(args.max_steps) and trainer.global_step >= args.max_steps
            periodic = args.save_every_steps and trainer.global_step % args.save_every_steps == 0
            if (stop or periodic) and step_in_epoch < updates_per_epoch:  # epoch ends save anyway
                save(epoch, step_in_epoch)
            return stop

        return callback

    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, args.epochs):
        if args.max_steps and trainer.global_step >= args.max_steps:
            break
        sampler.set_epoch(epoch)
        first_step = start_step if epoch == start_epoch else 0
        sampler.start = first_step * args.accum_steps * micro_batch
        loader_generator.manual_seed(args.seed * 100_003 + epoch * 1_009 + rank)
        stats = trainer.train_one_epoch(train_loader, epoch, first_step, after_step(epoch))
        metrics = {"epoch": epoch + 1, "step": trainer.global_step, "lr": trainer.lr, **stats}
        if first_step + stats["steps_done"] < updates_per_epoch:  # stopped part-way (checkpoint written)
            break
        metrics.update(evaluate(trainer.model, val_loader, device, trainer.amp_dtype))
        if trainer.ema is not None:
            ema = evaluate(trainer.ema.module, val_loader, device, trainer.amp_dtype)
            metrics.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
        metrics["seconds"] = time.perf_counter() - started
        improved, best_top1 = metrics["top1"] > best_top1, max(best_top1, metrics["top1"])
        save(epoch + 1, 0)
        if primary:
            if improved:
                weights = {k: v for k, v in trainer.state_dict().items() if k.startswith("state_dict")}
                save_checkpoint({"arch": args.model, "model_kwargs": model_kwargs, "epoch": epoch + 1,
                                 "top1": metrics["top1"], **weights}, output / "best.pth")  # fmt: skip
            log_rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in metrics.items()})
            _write_log(log_path, log_rows)
            ema_text = f", EMA top-1 {metrics['ema_top1']:.2f}%" if "ema_top1" in metrics else ""
            print(f"epoch {epoch + 1}: train loss {metrics['train_loss']:.4f}, val top-1 {metrics['top1']:.2f}% "
                  f"top-5 {metrics['top5']:.2f}%{ema_text}, {metrics['images_per_second']:.0f} img/s",
                  file=sys.stderr)  # fmt: skip
    if "top1" not in metrics:  # stopped part-way, or nothing left to train: evaluate the model as it is
        metrics.update(evaluate(trainer.model, val_loader, device, trainer.amp_dtype))

    result = {
        "model": args.model, "dataset": args.dataset, "top1": metrics["top1"], "top5": metrics["top5"],
        "loss": metrics["loss"], "best_top1": max(best_top1, metrics["top1"]),
        "epochs": round(trainer.global_step / updates_per_epoch, 4), "steps": trainer.global_step,
        "seconds": time.perf_counter() - started, "images_per_second": metrics.get("images_per_second"),
        "train_loss": metrics.get("train_loss"), "global_batch": args.batch_size, "world_size": world,
        "device": str(device), "amp": args.amp, "output": str(output),
        **{key: metrics[key] for key in ("ema_top1", "ema_top5") if key in metrics},
    }  # fmt: skip
    if primary:
        _write_json(output / "metrics.json", result)
        print(f"done: top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}% after {result['epochs']:.3g} epochs "
              f"({result['steps']} steps) in {result['seconds']:.1f} s -> {output}", file=sys.stderr)  # fmt: skip
    return result


def run(args: argparse.Namespace) -> int:
    try:
        train(args)
    except TrainError as error:
        print(f"flashkat train: error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
