"""Radial basis of E3Relax (spec §4): Gaussians on d / cutoff times a polynomial envelope."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# The original builds its centres with float32 ``linspace(0, 1, 128)``; that differs from the
# correctly rounded k/127 by one ulp at these indices. Reproducing them bit for bit is required for
# float64 parity with the golden data (spec §4), so they are spelled out instead of depending on
# how a given torch version implements linspace.
_ULP_BELOW = (9, 13, 18, 26, 36, 52)
_ULP_ABOVE = (87, 119)


def rbf_centres(num_rbf: int = 128) -> Tensor:
    """``(num_rbf,)`` float32 centres in units of the cutoff, bit-identical to the original's."""
    mu = (np.arange(num_rbf, dtype=np.float64) / (num_rbf - 1)).astype(np.float32)
    if num_rbf == 128:
        mu[list(_ULP_BELOW)] = np.nextafter(mu[list(_ULP_BELOW)], np.float32(-np.inf))
        mu[list(_ULP_ABOVE)] = np.nextafter(mu[list(_ULP_ABOVE)], np.float32(np.inf))
    return torch.from_numpy(mu)


def rbf_coefficient(centres: Tensor) -> float:
    """Gaussian exponent eta = -0.5 / spacing**2, from the float32 spacing evaluated in float64
    (-8064.500060085207 for 128 centres; the exact -8064.5 breaks float64 parity, spec §4)."""
    spacing = float(centres[1].to(torch.float32) - centres[0].to(torch.float32))
    return -0.5 / spacing**2


def envelope(x: Tensor, exponent: int = 5) -> Tensor:
    """Polynomial envelope u(x) = 1 + a x^p + b x^(p+1) + c x^(p+2) for x < 1, else 0."""
    p = exponent
    a = -(p + 1) * (p + 2) / 2
    b = p * (p + 2)
    c = -p * (p + 1) / 2
    xp = x.pow(p)
    u = 1 + a * xp + b * xp * x + c * xp * x * x
    return torch.where(x < 1, u, torch.zeros_like(u))


def radial_basis(distances: Tensor, centres: Tensor, coeff: float, cutoff: float) -> Tensor:
    """Envelope-weighted Gaussian basis.

    Args:
        distances: ``(...)`` distances in Å (any float dtype).
        centres: ``(R,)`` centres in units of ``cutoff`` (upcast to the distances' dtype).
        coeff: Gaussian exponent eta (< 0), see :func:`rbf_coefficient`.
        cutoff: basis cutoff in Å (30 in the trained configuration).

    Returns:
        ``(..., R)`` basis values, same dtype as ``distances``; values below the dtype's smallest
        normal number (1.2e-38 in float32, 2.2e-308 in float64) are exactly 0.
    """
    x = distances / cutoff
    exponent = coeff * (x.unsqueeze(-1) - centres.to(x.dtype)).pow(2)
    tiny = torch.finfo(exponent.dtype).tiny
    # Most centres are far from x: their Gaussians underflow to subnormal numbers or to 0, which x86
    # CPUs compute (exp) and multiply (the projections that read the basis) many times slower than
    # normal numbers: the weight gradient of the radial projections, an (R, E) x (E, 3H) product, was
    # half of a CPU training step. Those values are set to exactly 0, as FTZ/DAZ would (at this
    # precision they add nothing): exp runs only where its result can be normal (one unit of slack
    # below log(tiny)), and what is still subnormal after the envelope is flushed. (By magnitude:
    # rounding makes the envelope a few 1e-15 below zero just short of the cutoff.)
    near = exponent > math.log(tiny) - 1.0
    gauss = torch.where(near, torch.exp(torch.where(near, exponent, 0.0)), 0.0)
    basis = envelope(x).unsqueeze(-1) * gauss
    return torch.where(basis.abs() < tiny, 0.0, basis)


def nonzero_window(distances: Tensor, centres: Tensor, coeff: float, cutoff: float) -> slice:
    """The contiguous range of centres whose basis values can be non-zero for these distances.

    :func:`radial_basis` is exactly 0 wherever its exponent is below ``log(tiny) - 1``: for the
    trained basis (128 centres over 30 Å) every centre more than 3.1 Å (float32; 8.9 Å in float64)
    from every distance. The atom–atom edges are at most the graph radius (6 Å) plus what the layers
    moved them, so about 90 of the 128 columns are zeros that the projection ``W f(d)`` and its
    gradients would multiply on CPU for nothing; the reference ops compute and project only this
    window, with the same result (the left-out terms are exact zeros, their gradients too).

    Args:
        distances: ``(...)`` distances in Å; centres ``(R,)`` ascending, coeff, cutoff as
            :func:`radial_basis`.

    Returns:
        A slice of the centres; all of them on a GPU or under ``torch.compile`` (the bounds are read
        on the host: a synchronisation, a data-dependent shape; there the fused kernels or the
        compiler do the work) and for no distances.
    """
    if distances.device.type != "cpu" or distances.numel() == 0 or torch.compiler.is_compiling():
        return slice(None)
    # |x - mu| below which exp can be normal, with 1 % slack for rounding (radial_basis keeps exp
    # where coeff (x - mu)^2 > log(tiny) - 1, coeff < 0).
    reach = 1.01 * math.sqrt((math.log(torch.finfo(distances.dtype).tiny) - 1.0) / coeff)
    lo = float(distances.detach().min()) / cutoff - reach
    hi = float(distances.detach().max()) / cutoff + reach
    if not (math.isfinite(lo) and math.isfinite(hi)):  # a NaN or inf distance must reach the output
        return slice(None)
    mu = centres.to(torch.float64)
    start = int(torch.searchsorted(mu, torch.tensor(lo, dtype=torch.float64)))
    stop = int(torch.searchsorted(mu, torch.tensor(hi, dtype=torch.float64), right=True))
    return slice(start, stop)


def radial_basis_with_subnormals(distances: Tensor, centres: Tensor, coeff: float, cutoff: float) -> Tensor:
    """:func:`radial_basis` as the spec (§4) writes it, ``envelope(x) * exp(coeff (x - mu)^2)``, the
    subnormal tails kept: the oracle of the flush (``tests/model/test_rbf.py``) and the baseline of
    ``bench/bench_train_step.py``."""
    x = distances / cutoff
    return envelope(x).unsqueeze(-1) * torch.exp(coeff * (x.unsqueeze(-1) - centres.to(x.dtype)).pow(2))
