"""The gated messages' shared pieces (spec §4, §6): the radial basis with its envelope as Triton
device functions, the edge-projection biases of the three chunks, and the kernels' float constants.

Used by ``message_passing`` (atom–atom) and ``lattice_message`` (atom–lattice). ``basis_tile``
evaluates one (tile, block_k) block inside a K-loop (optionally with df/dd); ``basis_blocks``
evaluates a tile's whole basis once, as a tuple of register blocks that the caller reuses across
chunks and channel blocks. The float constants
(coeff, cutoff, 1/sqrt(3), 1/sqrt(H), eps) reach the kernels through a small tensor in the working
dtype (:func:`scalars` builds it, :func:`load_scalars` reads it), because a Python float literal
would be rounded to float32 inside a kernel.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..geometry import EPS


def scalars(coeff: float, cutoff: float, h: int, like: Tensor) -> Tensor:
    """The kernels' float constants as a tensor in ``like``'s dtype, on its device."""
    return _scalars_cached(float(coeff), float(cutoff), int(h), like.dtype, like.device)


@functools.lru_cache(maxsize=64)
def _scalars_cached(coeff: float, cutoff: float, h: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Cached: building it is a host-to-device copy, which must not happen inside a CUDA-graph
    # capture (or on every call). Never written to.
    return torch.tensor([coeff, cutoff, 1 / math.sqrt(3.0), 1 / math.sqrt(h), EPS], dtype=dtype, device=device)


@triton.jit
def load_scalars(scal_ptr):
    """The float constants of :func:`scalars`: coeff, cutoff, 1/sqrt(3), 1/sqrt(H), eps."""
    return (tl.load(scal_ptr + 0), tl.load(scal_ptr + 1), tl.load(scal_ptr + 2), tl.load(scal_ptr + 3),
            tl.load(scal_ptr + 4))


@triton.jit
def chunk_biases(b_ptr, h, hm, H):
    """The edge-projection bias of channels ``h`` (mask ``hm``) in each of the three chunks."""
    return (tl.load(b_ptr + h, mask=hm, other=0.0), tl.load(b_ptr + H + h, mask=hm, other=0.0),
            tl.load(b_ptr + 2 * H + h, mask=hm, other=0.0))


@triton.jit
def envelope(d, cutoff, WITH_DERIVATIVE: tl.constexpr):
    """x = d / cutoff, the envelope u(x) and (optionally) du/dx, as reference/rbf.py (p = 5)."""
    x = d / cutoff
    x5 = x * x * x * x * x
    inside = x < 1.0
    env = tl.where(inside, 1.0 + (-21.0) * x5 + 35.0 * x5 * x + (-15.0) * x5 * x * x, 0.0)
    if WITH_DERIVATIVE:
        x4 = x * x * x * x
        denv = tl.where(inside, (-105.0) * x4 + 210.0 * x5 + (-105.0) * x5 * x, 0.0)
    else:
        denv = env
    return x, env, denv


@triton.jit
def basis_tile(x, env, denv, em, mu_ptr, k, km, coeff, cutoff, WITH_DERIVATIVE: tl.constexpr):
    """(tile_e, tile_k) basis values f = u(x) exp(coeff (x - mu_k)^2) for the centres ``k`` and,
    optionally, df/dd. Rows outside ``em`` and columns outside ``km`` are zero."""
    mu = tl.load(mu_ptr + k, mask=km, other=0.0)
    diff = x[:, None] - mu[None, :]
    gauss = tl.exp(coeff * (diff * diff))
    valid = em[:, None] & km[None, :]
    f = tl.where(valid, env[:, None] * gauss, 0.0)
    if WITH_DERIVATIVE:
        df = tl.where(valid, (denv[:, None] + env[:, None] * (2.0 * coeff) * diff) * gauss / cutoff, 0.0)
    else:
        df = f
    return f, df


@triton.jit
def basis_blocks(x, env, em, mu_ptr, coeff, R: tl.constexpr, BLOCK_K: tl.constexpr):
    """The basis f = u(x) exp(coeff (x - mu_k)^2) of a tile of scaled distances ``x`` (envelope
    ``env``, mask ``em``) for all R centres, as a tuple of ceil(R / BLOCK_K) (tile, BLOCK_K) blocks:
    R exponentials per edge, kept in registers while they are used. Rows outside ``em`` and columns
    past R are zero."""
    blocks = ()
    for q in tl.static_range((R + BLOCK_K - 1) // BLOCK_K):
        k = q * BLOCK_K + tl.arange(0, BLOCK_K)
        km = k < R
        mu = tl.load(mu_ptr + k, mask=km, other=0.0)
        diff = x[:, None] - mu[None, :]
        blocks = blocks + (tl.where(em[:, None] & km[None, :], env[:, None] * tl.exp(coeff * (diff * diff)), 0.0),)
    return blocks
