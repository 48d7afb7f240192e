"""Colour scales of the plan's heat maps (:mod:`tamp_fx.artifact.report`): limits, ticks and
colour-bar labels that stay readable for any values, a constant map included."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


def percent(x: float) -> str:
    """A share as a percentage, two significant digits below 10%: 0.5 -> '50%', 0.012 -> '1.2%', 0.001 -> '0.1%'."""
    v = 100 * x
    return f"{v:.0f}%" if abs(v) >= 10 else f"{v:.2g}%"


def points(x: float) -> str:
    """A difference of shares in percentage points: 0.0015 -> '+0.15', -0.05 -> '-5', 0 -> '0'."""
    v = 100 * x
    return "0" if v == 0 else f"{v:+.0f}" if abs(v) >= 10 else f"{v:+.2g}"


@dataclass(frozen=True)
class ColourScale:
    """How a heat map's values become colours, and what its colour bar shows."""

    vmin: float
    vmax: float
    ticks: tuple[float, ...]
    label: str                        # the colour bar's
    cmap: str
    fmt: Callable[[float], str]       # a tick's or a cell's text
    log: bool = False

    def norm(self):
        from matplotlib.colors import LogNorm, Normalize
        return (LogNorm if self.log else Normalize)(vmin=self.vmin, vmax=self.vmax, clip=True)


def sparsity_scale(values: list[float], span: float = 0.1) -> ColourScale:
    """A linear scale for sparsities, at least ``span`` wide within [0, 1]: centred on values that
    (nearly) agree, so a uniform plan is drawn mid-scale under distinct ticks; else from and to
    whole multiples of ``span`` around them."""
    lo, hi = min(values), max(values)
    if hi - lo <= span / 2:
        vmin = (lo + hi - span) / 2
    else:
        vmin, hi = math.floor(lo / span + 1e-9) * span, math.ceil(hi / span - 1e-9) * span
        span = hi - vmin
    vmin = min(max(vmin, 0.0), 1.0 - span)
    vmax = vmin + span
    step = next(t for t in (0.01, 0.02, 0.05, 0.1, 0.2) if span / t <= 6)
    ticks = tuple(round(k * step, 6) for k in range(math.ceil(vmin / step - 1e-9), math.floor(vmax / step + 1e-9) + 1))
    return ColourScale(vmin, vmax, ticks, "sparsity", "viridis", percent)


def difference_scale(values: list[float]) -> ColourScale:
    """A diverging scale symmetric about 0 (white) for achieved minus target sparsity, out to the
    next round number of percentage points (1, 2, 2.5 or 5 times a power of ten) beyond the largest."""
    largest = max((abs(v) for v in values), default=0.0) or 0.001
    decade = 10.0 ** math.floor(math.log10(largest))
    m = next(k * decade for k in (1, 2, 2.5, 5, 10) if k * decade >= largest * (1 - 1e-9))
    return ColourScale(-m, m, (-m, -m / 2, 0.0, m / 2, m), "achieved - target (pp)", "RdBu_r", points)


def token_scale(values: list[float]) -> ColourScale:
    """A log scale for shares of tokens selected, from a decade below the smallest share above 0
    (so 1% is a colour of its own, not the black of 0%) to 100%."""
    low = min((v for v in values if v > 0), default=0.01)
    vmin = max(1e-4, 10.0 ** (math.floor(math.log10(low)) - 1))
    ticks = tuple(10.0 ** k for k in range(round(math.log10(vmin)), 1))
    return ColourScale(vmin, 1.0, ticks, "tokens selected (log scale)", "magma", percent,
                       log=True)
