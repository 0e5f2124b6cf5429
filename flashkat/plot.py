"""``flashkat plot``: draw every learned rational function of a model, beside its initial shape.

    flashkat plot runs/kat_micro_patch4_16-digits/last.pth --output plots/

For each ``GroupRational`` of the model (in a KAT: ``blocks.{i}.mlp.act1`` and ``act2``) it writes
``<module name>.png`` with one panel per group function (solid: learned, dashed: the initial shape
it started from), and ``overview.png`` with every activation of the model in one grid.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from flashkat import reference
from flashkat.fitting import initial_coefficients
from flashkat.layers import GroupRational
from flashkat.train import TrainError, model_from_checkpoint

__all__ = ["add_arguments", "run", "group_functions", "plot_model"]


def group_functions(module: GroupRational) -> list[tuple[int, int]]:
    """The distinct (numerator group, denominator group) pairs that some channel uses.

    A channel count D divisible by both group counts repeats the pattern of D = lcm(Gn, Gd) channels.
    """
    gn, gd = module.weight_numerator.shape[0], module.weight_denominator.shape[0]
    channels = math.lcm(gn, gd)
    return sorted({(c * gn // channels, c * gd // channels) for c in range(channels)})


def _evaluate(numerator: torch.Tensor, denominator: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """F(x) of one (1, m+1) numerator and (1, n) denominator, in float64."""
    return reference.forward(x[:, None], numerator.detach().double(), denominator.detach().double())[:, 0]


def plot_model(model: torch.nn.Module, output: str | Path, x_range: float = 3.0, title: str = "") -> list[Path]:
    """Write the PNGs for every ``GroupRational`` of ``model`` into ``output``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    x = torch.linspace(-x_range, x_range, 401, dtype=torch.float64)
    rationals = [(name, m) for name, m in model.named_modules() if isinstance(m, GroupRational)]
    if not rationals:
        raise TrainError("the model has no GroupRational activations to plot")

    def curves(module: GroupRational):
        start = initial_coefficients(module.mode, module.order)
        initial = _evaluate(torch.tensor([start.numerator]), torch.tensor([start.denominator]).reshape(1, -1), x)
        learned = [(g, _evaluate(module.weight_numerator[g[0]:g[0] + 1], module.weight_denominator[g[1]:g[1] + 1], x))
                   for g in group_functions(module)]  # fmt: skip
        return initial, learned

    written = []
    for name, module in rationals:
        initial, learned = curves(module)
        columns = min(4, len(learned))
        rows = math.ceil(len(learned) / columns)
        figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 2.6 * rows), squeeze=False,
                                    sharex=True, sharey=True)  # fmt: skip
        for axis, ((gn, gd), y) in zip(axes.flat, learned):
            axis.plot(x, initial, "k--", linewidth=1, label=f"initial ({module.mode})")
            axis.plot(x, y, linewidth=1.6, label="learned")
            axis.set_title(f"numerator {gn}, denominator {gd}", fontsize=9)
            axis.grid(alpha=0.3)
        for axis in list(axes.flat)[len(learned):]:
            axis.set_visible(False)
        axes.flat[0].legend(fontsize=8)
        figure.suptitle(f"{title} {name}".strip())
        figure.tight_layout()
        written.append(output / f"{name}.png")
        figure.savefig(written[-1], dpi=100)
        plt.close(figure)

    columns = 2 if all(n.endswith(("act1", "act2")) for n, _ in rationals) else min(4, len(rationals))
    rows = math.ceil(len(rationals) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.4 * rows), squeeze=False, sharex=True)
    for axis, (name, module) in zip(axes.flat, rationals):
        initial, learned = curves(module)
        axis.plot(x, initial, "k--", linewidth=1)
        for (gn, gd), y in learned:
            axis.plot(x, y, linewidth=1)
        axis.set_title(name, fontsize=9)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(rationals):]:
        axis.set_visible(False)
    figure.suptitle(f"{title}: learned rationals, one colour per group (dashed: initial shape)".strip(": "))
    figure.tight_layout()
    written.append(output / "overview.png")
    figure.savefig(written[-1], dpi=100)
    plt.close(figure)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint file, or a model name to use its published weights")
    parser.add_argument("--model", help="the model of a checkpoint not written by flashkat train (KAT, FlashKAT)")
    parser.add_argument("--output", help="folder for the PNGs (default: <checkpoint folder>/rationals)")
    parser.add_argument("--ema", action="store_true", help="plot the EMA weights of the checkpoint")
    parser.add_argument("--range", type=float, default=3.0, dest="x_range", help="plot x in [-R, R] (default: 3)")


def run(args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint)
    output = Path(args.output) if args.output else (
        checkpoint.parent / "rationals" if checkpoint.is_file() else Path("plots") / args.checkpoint)  # fmt: skip
    try:
        model, _ = model_from_checkpoint(args.checkpoint, args.model, use_ema=args.ema)
        title = f"{checkpoint.parent.name}/{checkpoint.name}" if checkpoint.is_file() else args.checkpoint
        written = plot_model(model, output, args.x_range, title=title)
    except TrainError as error:
        print(f"flashkat plot: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} PNGs to {output}", file=sys.stderr)
    return 0
