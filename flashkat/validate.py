"""``flashkat validate``: top-1 / top-5 of a checkpoint or a pretrained model on a dataset.

    flashkat validate runs/kat_micro_patch4_16-digits/best.pth              # a flashkat train checkpoint
    flashkat validate kat_tiny_patch16_224 --dataset /data/imagenet        # KAT's published weights
    flashkat validate kat_t.pth --model kat_tiny_patch16_224 --dataset /data/imagenet   # a KAT/FlashKAT file

Prints the metrics as JSON on stdout (loss, top1, top5 in percent, images).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from flashkat import datasets
from flashkat.train import AMP_DTYPES, TrainError, build_datasets, eval_loader, evaluate, model_from_checkpoint

__all__ = ["add_arguments", "run", "validate"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint file, or a model name to use its published weights")
    parser.add_argument("--model", help="the model of a checkpoint not written by flashkat train (KAT, FlashKAT)")
    parser.add_argument("--dataset", help="'digits', 'synthetic' or an ImageFolder root with val/ "
                                          "(default: the checkpoint's training dataset, else digits)")  # fmt: skip
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights of the checkpoint")
    parser.add_argument("--batch-size", "-b", type=int, default=128, help="images per batch (default: 128)")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none", help="autocast dtype")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--workers", type=int, default=0, help="data loader processes (default: 0)")


def validate(args: argparse.Namespace) -> dict[str, Any]:
    """The metrics of ``args.checkpoint`` on ``args.dataset``."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model, checkpoint = model_from_checkpoint(args.checkpoint, args.model, use_ema=args.ema)
    trained_with = checkpoint.get("args", {})
    dataset = args.dataset or trained_with.get("dataset", "digits")
    try:
        _, val_set = build_datasets(dataset, model, model.num_classes, train=False,
                                    synthetic_size=trained_with.get("synthetic_size", 2048),
                                    seed=trained_with.get("seed", 0))  # fmt: skip
    except datasets.DatasetError as error:
        raise TrainError(str(error)) from error
    classes = len(getattr(val_set, "classes", [])) or getattr(val_set, "num_classes", 10)
    if classes > model.num_classes:
        raise TrainError(f"{dataset} has {classes} classes but the model only {model.num_classes}")
    loader = eval_loader(val_set, args.batch_size, args.workers, device.type == "cuda")
    amp_dtype = AMP_DTYPES[args.amp]
    metrics = evaluate(model.to(device), loader, device, amp_dtype)
    return {"checkpoint": args.checkpoint, "dataset": dataset, **metrics}


def run(args: argparse.Namespace) -> int:
    try:
        metrics = validate(args)
    except TrainError as error:
        print(f"flashkat validate: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(metrics))
    print(f"top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% on {metrics['images']} images "
          f"of {metrics['dataset']}", file=sys.stderr)  # fmt: skip
    return 0
