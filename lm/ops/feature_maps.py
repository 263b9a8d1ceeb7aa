"""Feature maps phi for kernelized attention: phi(q) . phi(k) approximates (or defines) the attention kernel.

Shapes: inputs ``x`` are ``(..., N, d)`` (queries or keys of one head), projections ``w`` are ``(M, d)``,
features are ``(..., N, M)`` and non-negative.

Stabilisers and exactness under causality
-----------------------------------------
Normalised attention ``sum_j c_ij phi(q_i).phi(k_j) v_j / sum_j c_ij phi(q_i).phi(k_j)`` is unchanged when
``phi(q_i)`` is multiplied by any positive constant of query ``i`` alone, so queries subtract their own
max exponent (``stabilise=True``): this cancels exactly, needs no future token and works in incremental
decoding. A *per-key* constant would change the weights, and a constant shared by all keys (Performer's
global max over the sequence) would need future keys, which decoding does not have. So keys take no
data-dependent stabiliser. They do not need one: the key exponent ``w.k - |k|^2 / 2`` is at most
``|w|^2 / 2`` for every ``k`` (about d/2 for a head of dimension d, far from float32 overflow), and for
NPRF (``|k| = 1``) it lies in ``[-|w| - 1/2, |w| - 1/2]``.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

__all__ = ["random_projection", "positive_random_features", "nprf_features", "elu_features", "relu_features",
           "RELU_EPS"]

RELU_EPS = 1e-6
"""Added to relu features so that a query whose features are all zero still has a positive normaliser."""


def no_autocast(device: torch.device):
    """Autocast off for ``device`` (a no-op context for devices without autocast, such as ``meta``)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def random_projection(num_features: int, dim: int, *, orthogonal: bool = True,
                      generator: torch.Generator | None = None,
                      dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Random Gaussian projection ``w`` of shape ``(num_features, dim)``, rows ``w_m ~ N(0, I_dim)`` marginally.

    ``orthogonal=True``: block-orthogonal rows (Performer's ORF): each block of ``dim`` rows is the Q of a
    Gaussian matrix's QR decomposition, and every row is rescaled by the norm of an independent
    ``dim``-dimensional Gaussian vector (chi-distributed), so each row is still marginally ``N(0, I)`` and the
    kernel estimate stays unbiased while its variance drops. Drawn in float64 on the CPU from ``generator``
    (the same generator state gives the same matrix on every device), then cast.
    """
    if num_features <= 0 or dim <= 0:
        raise ValueError(f"random_projection needs num_features > 0 and dim > 0, got {num_features}, {dim}")
    g = dict(generator=generator, dtype=torch.float64)
    if not orthogonal:
        w = torch.randn(num_features, dim, **g)
    else:
        blocks = []
        for _ in range(math.ceil(num_features / dim)):
            q, r = torch.linalg.qr(torch.randn(dim, dim, **g))
            # Sign fix makes Q Haar-distributed (QR alone biases the signs of its columns).
            q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
            blocks.append(q.T)
        w = torch.cat(blocks)[:num_features]
        w = w * torch.randn(num_features, dim, **g).norm(dim=1, keepdim=True)
    return w.to(dtype=dtype, device=device)


def positive_random_features(x: torch.Tensor, w: torch.Tensor, *, stabilise: bool) -> torch.Tensor:
    """Performer positive random features, ``E[phi(q).phi(k)] = exp(q.k)`` (up to a positive per-query factor).

    ``phi(x)_m = exp(w_m.x - |x|^2 / 2 - s(x)) / sqrt(M)`` with ``x`` ``(..., N, d)``, ``w`` ``(M, d)``, result
    ``(..., N, M)``. ``stabilise=True`` (queries) sets ``s(x) = max_m w_m.x - |x|^2/2``, a per-row constant
    that cancels exactly in normalised attention; ``stabilise=False`` (keys) sets ``s = 0`` (see the module
    docstring for why keys must not be stabilised per row). Computed in ``x``'s dtype whatever the autocast
    state (under bf16 autocast ``x @ w.T`` would otherwise round the exponent); pass float32 or better.
    """
    if w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"positive_random_features: x (..., N, d) and w (M, d) must agree on d; "
                         f"got x {tuple(x.shape)}, w {tuple(w.shape)}")
    with no_autocast(x.device):
        w = w.to(x.dtype)
        logits = x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)
        if stabilise:
            logits = logits - logits.amax(-1, keepdim=True).detach()
        return torch.exp(logits) * (w.shape[0] ** -0.5)


def nprf_features(x: torch.Tensor, w: torch.Tensor, *, stabilise: bool) -> torch.Tensor:
    """NPRF (Luo et al. 2021): L2-normalise ``x`` then positive random features, so the kernel is
    ``exp(q.k / (|q| |k|))`` and every exponent is bounded by ``|w_m| + 1/2``. Shapes as
    :func:`positive_random_features`."""
    with no_autocast(x.device):
        return positive_random_features(F.normalize(x, dim=-1), w, stabilise=stabilise)


def elu_features(x: torch.Tensor) -> torch.Tensor:
    """``elu(x) + 1`` (Katharopoulos et al. 2020): deterministic, ``(..., N, d)`` -> same.

    Written as ``x + 1`` / ``exp(x)`` because ``elu(x) + 1`` rounds to 0 for ``x < -17`` in float32, which
    could leave a query with a zero normaliser."""
    return torch.where(x > 0, x + 1.0, torch.exp(x.clamp(max=0)))


def relu_features(x: torch.Tensor) -> torch.Tensor:
    """``relu(x) + RELU_EPS``: deterministic, ``(..., N, d)`` -> same; the epsilon keeps normalisers > 0."""
    return F.relu(x) + RELU_EPS
