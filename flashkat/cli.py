"""The ``flashkat`` command: one sub-command per tool, each living in its own module.

Each module named in ``COMMANDS`` provides ``add_arguments(parser)`` and ``run(args) -> int``; it is
imported only when its sub-command is used, so ``flashkat fit`` does not pay for timm's import.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "fit": ("flashkat.fitting", "fit the initial rational coefficients of an activation"),
    "bench": ("flashkat.bench", "time kernels and models against their floors"),
    "train": ("flashkat.train", "train a KAT (default: a small one on sklearn's digits, CPU-friendly)"),
    "validate": ("flashkat.validate", "top-1/top-5 of a checkpoint or pretrained model on a dataset"),
    "plot": ("flashkat.plot", "draw every learned rational function of a checkpoint to PNG"),
    "analyze": ("flashkat.analyze", "the paper's analysis (slowdown, FLOPs, rounding, ncu) as a report"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="flashkat", description="Fast group-rational KAN layers and KAT models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if argv and argv[0] in COMMANDS:  # build only the chosen sub-command's full parser
        module = importlib.import_module(COMMANDS[argv[0]][0])
        command = argparse.ArgumentParser(prog=f"flashkat {argv[0]}", description=COMMANDS[argv[0]][1])
        module.add_arguments(command)
        return module.run(command.parse_args(argv[1:]))
    parser.parse_args(argv)  # prints usage or the error for an unknown command
    return 2


if __name__ == "__main__":
    sys.exit(main())
