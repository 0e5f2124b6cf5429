"""Fitting the initial coefficients of a group-rational activation to a named function.

The objective, for a target f and order (m, n), is the mean squared error

    E(A, B) = mean_k (F(x_k) - f(x_k))**2,    F = P/Q as in ``flashkat.reference``,

on ``FIT_POINTS`` equally spaced points x_k covering ``FIT_INTERVAL`` = [-3, 3] with its ends, each
weighted equally (``FIT_WEIGHTING``). That is where the inputs of a normalised layer mostly lie;
outside it F follows its own asymptote (about A[m]/|B[n-1]| * x**(m-n)), not the target.

Method (float64 throughout, deterministic): Sanathanan-Koerner iterations (linear least squares of
P - f Q weighted by 1/Q_prev) give a start, made admissible by taking |B| and refitting the
numerator to that denominator. It, the same for the two orders below padded with zeros, a
polynomial start (B = 0) and a few seeded random denominators are refined on E itself with L-BFGS
through ``reference.group_rational``; the best three are refined further (L-BFGS restarted until it
stops gaining) and the best of them is kept. F is evaluated only by ``flashkat.reference``.

The stored results live in ``flashkat/data/rational_init.json``; ``flashkat fit --write`` regenerates
them, ``initial_coefficients`` reads them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.resources
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as tf

from flashkat import reference

__all__ = [
    "MODES",
    "ORDERS",
    "FIT_INTERVAL",
    "FIT_POINTS",
    "FIT_WEIGHTING",
    "RationalFit",
    "target",
    "fit",
    "gain",
    "initial_coefficients",
    "write_data",
    "add_arguments",
    "run",
]

MODES = ("identity", "swish", "gelu", "relu", "tanh", "sigmoid")
ORDERS = ((3, 2), (4, 3), (5, 4), (6, 5), (7, 6))  # the orders stored in the data file
FIT_INTERVAL = (-3.0, 3.0)
FIT_POINTS = 6001  # grid step 0.001
FIT_WEIGHTING = "uniform"
DATA_FILE = "rational_init.json"

_TARGETS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "swish": tf.silu,
    "gelu": tf.gelu,  # the exact erf form (approximate="none")
    "relu": tf.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


@dataclasses.dataclass(frozen=True)
class RationalFit:
    """Coefficients of F = P/Q fitted to ``mode`` (A: numerator, m+1 values; B: denominator, n) and
    their errors on the fit grid, with the variance-preserving gain of F."""

    mode: str
    order: tuple[int, int]
    numerator: tuple[float, ...]
    denominator: tuple[float, ...]
    max_error: float
    rms_error: float
    gain: float


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes are {', '.join(MODES)}")


def _check_order(order) -> tuple[int, int]:
    """The order as a pair of ints; ValueError unless it is a pair of non-negative integers."""
    if not (
        isinstance(order, (tuple, list))
        and len(order) == 2
        and all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 0 for k in order)
    ):
        raise ValueError(f"order must be a pair (m, n) of integers with m >= 0 and n >= 0, got {order!r}")
    return int(order[0]), int(order[1])


def target(mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function that ``mode`` names (torch's own implementation)."""
    _check_mode(mode)
    return _TARGETS[mode]


def _grid() -> torch.Tensor:
    return torch.linspace(*FIT_INTERVAL, FIT_POINTS, dtype=torch.float64)


def _evaluate(numerator, denominator, x: torch.Tensor) -> torch.Tensor:
    """F(x) through the reference implementation (one group, channels of size 1)."""
    a = torch.as_tensor(numerator, dtype=torch.float64).reshape(1, -1)
    b = torch.as_tensor(denominator, dtype=torch.float64).reshape(1, -1)
    return reference.forward(x.reshape(-1, 1), a, b).reshape(x.shape)


def _errors(numerator, denominator, x: torch.Tensor, f: torch.Tensor) -> tuple[float, float]:
    e = _evaluate(numerator, denominator, x) - f
    return e.abs().max().item(), e.square().mean().sqrt().item()


# The fit works in the scaled variable t = x / s with s = FIT_INTERVAL's half-width, so that the
# basis t**i stays within [-1, 1] and the least-squares problems are well conditioned. The same F
# has coefficients u_i = A_i s**i and v_j = B_j s**(j+1) in t, so the reference still evaluates it.


def _denominator(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Q(t) for denominator coefficients v, taken from the reference as 1 / F with P = 1."""
    return 1 / _evaluate([1.0], v, t)


def _numerator_for(t: torch.Tensor, f: torch.Tensor, q: torch.Tensor, m: int) -> torch.Tensor:
    """The u minimising mean(P(t)/q - f)**2 for a fixed denominator q (linear least squares)."""
    basis = torch.stack([t**i for i in range(m + 1)], dim=1) / q[:, None]
    return torch.linalg.lstsq(basis, f[:, None], driver="gelsd").solution[:, 0]


def _sanathanan_koerner(t: torch.Tensor, f: torch.Tensor, m: int, n: int, iterations: int = 20) -> torch.Tensor:
    """A start (u, v) from linearised fits: min sum ((P - f Q) / Q_prev)**2, linear in (u, v)."""
    at = t.abs()
    columns = [t**i for i in range(m + 1)] + [-f * at ** (j + 1) for j in range(n)]
    basis = torch.stack(columns, dim=1)
    v = torch.zeros(n, dtype=torch.float64)
    for _ in range(iterations):
        # Q_prev uses |v| (as F does), which keeps the weights bounded: a signed v may have poles.
        w = 1 / _denominator(v, t)
        v = torch.linalg.lstsq(basis * w[:, None], (f * w)[:, None], driver="gelsd").solution[m + 1 :, 0]
    # F uses |B|: make the denominator admissible and refit the numerator to it.
    v = v.abs()
    return torch.cat([_numerator_for(t, f, _denominator(v, t), m), v])


def _lbfgs(
    t: torch.Tensor, f: torch.Tensor, start: torch.Tensor, m: int, iterations: int
) -> tuple[torch.Tensor, float]:
    """Minimise the true objective from ``start`` with L-BFGS; return (u, v) and the final loss."""
    params = start.clone().requires_grad_(True)
    tt = t.reshape(-1, 1)
    scale = 1.0

    def loss_fn() -> torch.Tensor:
        y = reference.group_rational(tt, params[: m + 1].reshape(1, -1), params[m + 1 :].reshape(1, -1))
        return (y[:, 0] - f).square().mean() / scale

    # Measured relative to the start's loss, so L-BFGS's absolute tolerances suit every target.
    with torch.no_grad():
        scale = max(loss_fn().item(), 1e-300)
    opt = torch.optim.LBFGS(
        [params], lr=1, max_iter=iterations, max_eval=iterations * 5 // 4, history_size=50,
        tolerance_grad=1e-16, tolerance_change=1e-20, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return params.detach().clone(), loss_fn().item() * scale


def _refine(
    t: torch.Tensor, f: torch.Tensor, start: torch.Tensor, m: int, iterations: int, rounds: int = 1
) -> tuple[torch.Tensor, float]:
    """L-BFGS, restarted with a fresh history for up to ``rounds`` rounds while that still helps: the
    |B| kinks and the flat valleys of the objective stall a single run short of its minimum."""
    u, loss = _lbfgs(t, f, start, m, iterations)
    for _ in range(rounds - 1):
        u_next, loss_next = _lbfgs(t, f, u, m, iterations)
        if not loss_next < loss:
            break
        gained = 1 - loss_next / loss
        u, loss = u_next, loss_next
        if gained < 1e-9:
            break
    return u, loss


_NESTED_STARTS = 2  # Sanathanan-Koerner starts of orders (m - k, n - k), k = 1.._NESTED_STARTS, padded
_RANDOM_STARTS = 8  # seeded random denominators
_SCREEN_ITERATIONS = 200  # L-BFGS iterations given to every start ...
_FINALISTS = 3  # ... then the best few get
_FINAL_ROUNDS, _FINAL_ITERATIONS = 20, 500  # up to this many rounds of this many iterations


def _starts(t: torch.Tensor, f: torch.Tensor, m: int, n: int) -> list[torch.Tensor]:
    """Starting points (u, v): the |B| constraint (B >= 0 in effect) gives the objective many local
    minima with some B[j] = 0, so a few seeded random denominators are tried as well."""
    starts = [_sanathanan_koerner(t, f, m, n)]
    if n == 0:  # Q = 1: the linear least-squares fit is already the optimum
        return starts
    # Lower orders' starts padded with zeros: they keep a higher order from ending up worse than a
    # lower one (which it contains) when its own start leads to a poorer local minimum.
    for k in range(1, min(m, n, _NESTED_STARTS) + 1):
        u = _sanathanan_koerner(t, f, m - k, n - k)
        starts.append(torch.cat([u[: m - k + 1], t.new_zeros(k), u[m - k + 1 :], t.new_zeros(k)]))
    starts.append(torch.cat([_numerator_for(t, f, torch.ones_like(t), m), t.new_zeros(n)]))
    generator = torch.Generator().manual_seed(0)
    for _ in range(_RANDOM_STARTS):
        v = 3 * torch.rand(n, generator=generator, dtype=torch.float64)
        starts.append(torch.cat([_numerator_for(t, f, _denominator(v, t), m), v]))
    return starts


def fit(mode: str, order: tuple[int, int] = (5, 4)) -> RationalFit:
    """Least-squares fit of F = P/Q of ``order`` (m, n) to ``mode`` on ``FIT_POINTS`` uniformly
    spaced, equally weighted points of ``FIT_INTERVAL``. ``identity`` is exact whenever m >= 1."""
    _check_mode(mode)
    m, n = _check_order(order)
    x = _grid()
    f = _TARGETS[mode](x)
    if mode == "identity" and m >= 1:
        a, b = [0.0] * (m + 1), [0.0] * n
        a[1] = 1.0
    else:
        s = FIT_INTERVAL[1]
        t = x / s
        screened = sorted((_refine(t, f, u, m, _SCREEN_ITERATIONS) for u in _starts(t, f, m, n)), key=lambda r: r[1])
        finals = (_refine(t, f, u, m, _FINAL_ITERATIONS, _FINAL_ROUNDS) for u, _ in screened[:_FINALISTS])
        best = min(finals, key=lambda r: r[1])[0]
        a = [best[i].item() / s**i for i in range(m + 1)]
        b = [abs(best[m + 1 + j].item()) / s ** (j + 1) for j in range(n)]  # B enters only as |B|
    max_error, rms_error = _errors(a, b, x, f)
    return RationalFit(mode, (m, n), tuple(a), tuple(b), max_error, rms_error, gain(a, b))


@functools.lru_cache(maxsize=1)
def _half_normal_rule(nodes: int = 100, end: float = 12.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of int_0^end g(x) phi(x) dx (Gauss-Legendre, phi the standard normal density)."""
    t, w = np.polynomial.legendre.leggauss(nodes)
    x = torch.as_tensor(end / 2 * (t + 1), dtype=torch.float64)
    return x, torch.as_tensor(end / 2 * w, dtype=torch.float64) * torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def gain(numerator, denominator) -> float:
    """sqrt(Var(x) / E[F(x)**2]) for x ~ N(0, 1): the gain that keeps a layer variance-preserving.

    KAT publishes gain**2 (2.8178 for swish, 2.3568 for gelu); those are about 0.25% above the exact
    values for their functions (2.8108 for KAT's swish coefficients and for SiLU itself, 2.3517 for GELU).

    F is smooth on each half-line but has a kink at 0 (it depends on |x|), which slows Gauss-Hermite
    quadrature down; so E[F**2] = int_0^inf (F(x)**2 + F(-x)**2) phi(x) dx is integrated with
    100-point Gauss-Legendre on [0, 12] (beyond it, phi < 1e-31 more than makes up for F**2's growth).
    That gives about 15 digits: 1 for F(x) = x, 1/sqrt(3) for x**2.
    """
    x, w = _half_normal_rule()
    second_moment = (w * (_evaluate(numerator, denominator, x) ** 2 + _evaluate(numerator, denominator, -x) ** 2)).sum()
    return math.sqrt(1.0 / second_moment.item()) if second_moment > 0 else math.inf


def _data_path() -> Path:
    return Path(__file__).resolve().parent / "data" / DATA_FILE


def _dumps(obj: dict) -> str:
    """JSON with one key per line, each value on one line and a list of records one record a line."""

    def value(v) -> str:
        if isinstance(v, list) and v and isinstance(v[0], dict):
            return "[\n" + ",\n".join("  " + json.dumps(record) for record in v) + "\n ]"
        return json.dumps(v)

    return "{\n" + ",\n".join(f" {json.dumps(k)}: {value(v)}" for k, v in obj.items()) + "\n}\n"


def _to_json(fits: list[RationalFit]) -> dict:
    return {
        "description": "initial coefficients of F = P/Q, Q = 1 + sum |B[j]| |x|^(j+1), least-squares fits "
        "generated by flashkat.fitting.write_data (flashkat fit --write)",
        "interval": list(FIT_INTERVAL),
        "points": FIT_POINTS,
        "weighting": FIT_WEIGHTING,
        "objective": "mean squared error of F - target on the points",
        "fits": [dataclasses.asdict(r) for r in fits],
    }


def write_data(path: str | Path | None = None, modes=MODES, orders=ORDERS) -> Path:
    """Fit every mode at every order and write the results as JSON (by default, the package data file)."""
    path = Path(path) if path is not None else _data_path()
    fits = [fit(mode, order) for mode in modes for order in orders]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_dumps(_to_json(fits)))
    _stored.cache_clear()  # the package's file may just have changed
    _initial.cache_clear()
    return path


def _read(resource) -> dict[tuple[str, tuple[int, int]], RationalFit]:
    """The fits in a data file (a Path or an importlib.resources Traversable), by (mode, order)."""
    data = json.loads(resource.read_text())
    fits = {}
    for entry in data["fits"]:
        entry = dict(entry, order=tuple(entry["order"]), numerator=tuple(entry["numerator"]),
                     denominator=tuple(entry["denominator"]))
        fits[entry["mode"], entry["order"]] = RationalFit(**entry)
    return fits


@functools.lru_cache(maxsize=1)
def _stored() -> dict[tuple[str, tuple[int, int]], RationalFit]:
    resource = importlib.resources.files("flashkat").joinpath("data").joinpath(DATA_FILE)
    return _read(resource) if resource.is_file() else {}


@functools.lru_cache(maxsize=None)
def _initial(mode: str, order: tuple[int, int]) -> RationalFit:
    return _stored().get((mode, order)) or fit(mode, order)


def initial_coefficients(mode: str, order: tuple[int, int] = (5, 4)) -> RationalFit:
    """The stored fit of ``mode`` at ``order`` if the data file has it, else a fresh ``fit`` (cached)."""
    _check_mode(mode)
    return _initial(mode, _check_order(order))


# ----------------------------------------------------------------------------- the `flashkat fit` command


def _order_term(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"order terms must be non-negative integers, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"order terms must be non-negative integers, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``flashkat fit``."""
    parser.add_argument("--mode", choices=MODES, default="swish", help="the function to fit (default: swish)")
    parser.add_argument("--order", nargs=2, type=_order_term, default=[5, 4], metavar=("M", "N"),
                        help="numerator degree m and denominator degree n (default: 5 4)")
    parser.add_argument("--json", action="store_true", help="print the fit as JSON")
    parser.add_argument("--write", action="store_true",
                        help=f"refit every mode at orders {' '.join(f'{m},{n}' for m, n in ORDERS)} "
                        f"and rewrite the package's {DATA_FILE}")


def run(args: argparse.Namespace) -> int:
    """Refit (never reading the stored data) and print; or regenerate the data file with --write."""
    if args.write:
        path = write_data()
        print(f"{'mode':<9} {'order':<7} {'max error':>10} {'rms error':>10} {'gain':>8}")
        for (mode, order), r in sorted(_read(path).items(), key=lambda item: (MODES.index(item[0][0]), item[0][1])):
            print(f"{mode:<9} {f'{order[0]},{order[1]}':<7} {r.max_error:10.3e} {r.rms_error:10.3e} {r.gain:8.5f}")
        print(f"wrote {path}")
        return 0
    r = fit(args.mode, tuple(args.order))
    if args.json:
        extra = {"interval": list(FIT_INTERVAL), "points": FIT_POINTS, "weighting": FIT_WEIGHTING}
        print(_dumps(dataclasses.asdict(r) | extra), end="")
        return 0
    lo, hi = FIT_INTERVAL
    print(f"{r.mode}, order ({r.order[0]}, {r.order[1]}), fitted on [{lo:g}, {hi:g}] "
          f"({FIT_POINTS} points, {FIT_WEIGHTING} weights)")
    print("numerator:   " + ", ".join(f"{c:.17g}" for c in r.numerator))
    print("denominator: " + (", ".join(f"{c:.17g}" for c in r.denominator) or "(none: Q = 1)"))
    print(f"max error:   {r.max_error:.3e}")
    print(f"rms error:   {r.rms_error:.3e}")
    print(f"gain:        {r.gain:.6f}")
    return 0
