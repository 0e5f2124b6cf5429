"""``flashkat bench``: measurements against their floors (see docs/BENCHMARKS.md)."""

from __future__ import annotations

import argparse
import importlib

SUITES = {"kernels": "flashkat.bench.kernels", "model": "flashkat.bench.model", "host": "flashkat.bench.host"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="suite", metavar="SUITE", required=True)
    for name, module in SUITES.items():
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=f"benchmark {name}"))


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(SUITES[args.suite]).run(args)
