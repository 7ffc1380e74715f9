"""The radial projection ``W e(d) + b`` evaluated on a window of centres (spec §4, §14), the readable
twin of the fused CPU ops' window (``csrc/radial_window.h``).

The projection ``W e(d)`` of the edge and lattice gates (``edge_proj``, ``edge_local_proj``) is a
function of d alone and most of the edge arithmetic (2·R·3H FLOP per edge). Its Gaussians are as
wide as their spacing: a centre m spacings away from x = d/cutoff contributes exp(-m²/2) of its
peak (1.5e-8 at m = 6, 6e-13 at m = 7.5). So only the 2K+1 centres nearest x matter; the others
are dropped, and :func:`tail_bound` bounds what they could have added.

The rule (the compiled ops follow it exactly): with the centres uniform to within ``dev`` of
``mu_0 + k·spacing``, the nearest grid index is ``k0 = round((x - mu_0) / spacing)`` and the window
is ``[k0 - K, k0 + K]``, shifted inside ``[0, R)`` at the ends of the range (it then holds every
centre within K of k0 and more on the other side, so the ends are exact too). For x >= 1 the
envelope is 0 and the projection is exactly the bias, as in the exact form.

The exact projection (``reference/rbf.py`` with ``torch.nn.functional.linear``) stays the
reference; this module is the oracle of the windowed evaluation and of its error bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .rbf import envelope

#: The excluded Gaussians of a window sum to at most this fraction of one Gaussian's peak.
TAIL_TARGET = 1e-12
#: Centres further than this fraction of the spacing from a uniform grid get no window.
MAX_DEVIATION = 0.25


@dataclass(frozen=True)
class Window:
    """A basis's window: ``2 * halfwidth + 1`` centres around the nearest grid index of x.

    first, spacing: the uniform grid ``mu_0 + k·spacing`` the centres lie on (within ``deviation``).
    tail: :func:`tail_bound` of this window, the largest sum of the Gaussians it drops.
    """

    halfwidth: int
    first: float
    spacing: float
    deviation: float
    tail: float

    @property
    def size(self) -> int:
        return 2 * self.halfwidth + 1


def tail_bound(halfwidth: int, spacing: float, deviation: float, coeff: float) -> float:
    """Largest sum of the Gaussians ``exp(coeff (x - mu_k)^2)`` of the centres outside the window.

    x lies within half a spacing of grid point k0, so the excluded centres m > K grid steps away
    are at least ``(m - 1/2)·spacing - deviation`` from it on one side and ``(m + 1/2)·spacing -
    deviation`` on the other (the sum is largest with x half-way between two centres). The series
    is summed until its terms vanish in float64.
    """
    total, m = 0.0, halfwidth + 1
    while True:
        near = max((m - 0.5) * spacing - deviation, 0.0)
        term = math.exp(coeff * near * near) + math.exp(coeff * ((m + 0.5) * spacing - deviation) ** 2)
        total += term
        if term < 1e-30 * total or term == 0.0:
            return total
        m += 1


def radial_window(centres: Tensor, coeff: float, target: float = TAIL_TARGET) -> Window | None:
    """The narrowest window whose :func:`tail_bound` is at most ``target``, or ``None`` when the basis
    has none narrower than all its centres (non-uniform centres, Gaussians too wide, few centres).

    For the model's basis (128 centres, width = spacing) this is K = 7: 15 centres, tail 6.1e-13.
    """
    mu = centres.detach().to(torch.float64).cpu()
    r = mu.shape[0]
    if r < 2 or not coeff < 0:
        return None
    spacing = float(mu[-1] - mu[0]) / (r - 1)
    if not spacing > 0:
        return None
    grid = float(mu[0]) + spacing * torch.arange(r, dtype=torch.float64)
    deviation = float((mu - grid).abs().max())
    if not deviation <= MAX_DEVIATION * spacing:
        return None
    for k in range(r // 2):  # a window of 2k+1 < r centres
        tail = tail_bound(k, spacing, deviation, coeff)
        if tail <= target:
            return Window(k, float(mu[0]), spacing, deviation, tail)
    return None


def window_start(x: Tensor, window: Window, num_rbf: int) -> Tensor:
    """``(...)`` int64 first centre of the window of each scaled distance ``x``."""
    nearest = torch.nan_to_num(torch.round((x - window.first) / window.spacing), nan=0.0)
    return (nearest - window.halfwidth).clamp(0, num_rbf - window.size).to(torch.int64)


def windowed_projection(distances: Tensor, weight: Tensor, bias: Tensor, centres: Tensor, coeff: float,
                        cutoff: float, window: Window) -> Tensor:
    """``W e(d) + b`` from the window's centres only.

    Args:
        distances: ``(E,)`` Å.  weight: ``(C, R)``; bias: ``(C,)``.
        centres, coeff, cutoff: the basis (``reference/rbf.py``); ``window``: its :func:`radial_window`.

    Returns:
        ``(E, C)`` in the distances' dtype; differs from the exact projection by at most
        ``u(x) · window.tail · max_k |W[c, k]|`` in channel c (plus rounding).
    """
    x = distances / cutoff
    idx = window_start(x, window, centres.shape[0]).unsqueeze(-1) + torch.arange(window.size, device=x.device)
    mu = centres.to(x.dtype)[idx]
    values = envelope(x).unsqueeze(-1) * torch.exp(coeff * (x.unsqueeze(-1) - mu).pow(2))
    return torch.einsum("ew,ewc->ec", values, weight.t()[idx]) + bias
