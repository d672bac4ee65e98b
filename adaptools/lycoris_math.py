"""Exact LoRA factors (B, A) of the LyCORIS updates (DESIGN §11): LoHa, LoKr and Tucker cores, never the dense ΔW.

Pure functions on tensors, batched over leading dimensions (stack same-shape modules, one call per stack).
Convolution factors are flattened as a conv weight is: A's columns are (in_channel, *kernel) in row-major order.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .linalg import accurate_svd

__all__ = ["face_split", "tucker_down", "kron", "kron_factors", "svd_factors", "numerical_rank", "dense_factors"]


def face_split(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor) -> tuple[Tensor, Tensor]:
    """(w1a·w1b) ⊙ (w2a·w2b) = B·A with B[i, (a,b)] = w1a[i,a]·w2a[i,b], A[(a,b), j] = w1b[a,j]·w2b[b,j] (rank r1·r2).

    w1a (..., out, r1), w1b (..., r1, in), w2a (..., out, r2), w2b (..., r2, in).
    """
    B = (w1a.unsqueeze(-1) * w2a.unsqueeze(-2)).flatten(-2)
    A = (w1b.unsqueeze(-2) * w2b.unsqueeze(-3)).flatten(-3, -2)
    return B, A


def dense_factors(delta: Tensor) -> tuple[Tensor, Tensor]:
    """Exact factors of dense ΔW (..., out, in) with an identity on the smaller side: B = I, A = ΔW when out ≤ in,
    else B = ΔW, A = I (rank min(out, in); used when exact factors of a larger rank would cost more)."""
    out_features, in_features = delta.shape[-2:]
    size = min(out_features, in_features)
    eye = torch.eye(size, dtype=delta.dtype, device=delta.device).expand(*delta.shape[:-2], size, size)
    return (eye, delta) if out_features <= in_features else (delta, eye)


def tucker_down(core: Tensor, down: Tensor) -> Tensor:
    """A[a, (i, *k)] = Σ_b core[a, b, *k]·down[b, i]: the Tucker core contracted into the input factor.

    core (..., ra, rb, *kernel), down (..., rb, in); returns (..., ra, in·prod(kernel)), so that
    up·A is the conv update Σ_ab up[o,a]·core[a,b,*k]·down[b,i] flattened as a conv weight.
    """
    lead = down.ndim - 2
    kernel = core.shape[lead + 2:]
    flat = core.reshape(*core.shape[:lead + 2], math.prod(kernel))
    A = torch.einsum("...abk,...bi->...aik", flat, down)
    return A.reshape(*A.shape[:-2], -1)


def kron_factors(U1: Tensor, V1: Tensor, U2: Tensor, V2: Tensor) -> tuple[Tensor, Tensor]:
    """kron(U1·V1, U2·V2) = kron(U1, U2)·kron(V1, V2): exact factors of rank k1·k2 (mixed-product property).

    U1 (..., a, k1), V1 (..., k1, c), U2 (..., b, k2), V2 (..., k2, d); returns B (..., a·b, k1·k2), A (..., k1·k2, c·d).
    """
    return kron(U1, U2), kron(V1, V2)


def kron(X: Tensor, Y: Tensor) -> Tensor:
    """Batched Kronecker product: (..., m, n) ⊗ (..., p, q) → (..., m·p, n·q)."""
    product = X[..., :, None, :, None] * Y[..., None, :, None, :]
    return product.reshape(*product.shape[:-4], X.shape[-2] * Y.shape[-2], X.shape[-1] * Y.shape[-1])


def numerical_rank(S: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """Ranks of (m, n) matrices stored in `dtype` from their singular values S (..., k), descending:
    s_i > s_0·max(m, n)·eps(dtype) (numpy's matrix_rank rule)."""
    tol = S[..., :1] * max(shape) * torch.finfo(dtype).eps
    return (S > tol).sum(-1)


def svd_factors(W: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Exact factors (U·√S, √S·Vh) of full matrices W (b, m, n), each truncated to its numerical rank (at least 1).

    One SVD for the whole stack, in float64; singular values below W's own rounding count as zero.
    """
    U, S, Vh = accurate_svd(W.double())
    ranks = numerical_rank(S, (W.shape[-2], W.shape[-1]), W.dtype).clamp_min(1).tolist()
    root = S.sqrt()
    factors = []
    for j, k in enumerate(ranks):
        factors.append(((U[j, :, :k] * root[j, :k]).to(W.dtype), (root[j, :k, None] * Vh[j, :k]).to(W.dtype)))
    return factors
