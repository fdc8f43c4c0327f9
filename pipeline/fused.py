"""Custom autograd Functions for the higher-order derivatives of the FPE residual.

The residual needs third derivatives of the network (∇x of a Hutchinson divergence, then the
parameter gradient of its square) and a forward-mode pass in t whose outputs are differentiated
in reverse mode. Generic autograd builds a new graph level for every level of derivative of
every elementwise op; the Functions here carry their derivatives in closed form:

- ``Softmax`` (last dim): y = softmax(a); explicit ``jvp`` y ⊙ (ȧ − ⟨y, ȧ⟩) and a backward
  y ⊙ (ḡ − ⟨y, ḡ⟩) written with differentiable ops (any order). It also works around a
  PyTorch defect: reverse mode through the built-in softmax's / SDPA's forward-mode
  derivative fails ("modified by an inplace operation", torch 2.14, CPU) — seen here with the
  jvp in t of any model with attention.
- ``SiLU`` and its derivative chain ``SiLUDerivative(k)``: d^k/dx^k [x σ(x)] = x P_k(σ) + Q_k(σ)
  with P, Q polynomials in σ from the recursion P_{k+1} = P_k' σ(1−σ), Q_{k+1} = P_k + Q_k' σ(1−σ);
  every level is one Function whose backward is the next level, so no composite graph is built.
- ``group_norm``: GroupNorm as five differentiable ops; the built-in kernel's forward-mode and
  double-backward formulas expand into thousands of small multiplications per step.
- ``fused_ops()``: routes ``F.silu``, ``F.group_norm`` and ``F.scaled_dot_product_attention``
  (attention written as matmuls + ``Softmax``) of an unmodified model to these while the
  regularizer runs, by swapping the ``torch.nn.functional`` attributes under a lock (a
  TorchFunctionMode does the same, ``ROUTING = "mode"``, but runs Python for every torch call). ``plain_ops()`` routes SDPA
  to the same attention with the plain-autograd softmax (the reference path for tests).
``pipeline.fpe.ResidualEstimator`` with ``fused=True`` (``fpe.fused``) runs the residual under
``fused_ops``. (A variant with all probes in one vmapped VJP and one vmapped double backward cost
~30% more FLOPs in the parameter backward than the probe loop and was dropped;
benchmarks/RESULTS.md.)

All Functions have ``setup_context``, ``jvp`` and ``generate_vmap_rule = True``;
tests/test_fused.py runs gradcheck / gradgradcheck / forward-AD checks on each in float64.
"""
from __future__ import annotations

import contextlib
import math
import threading
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_SILU = F.silu  # the built-in kernels, captured before any routing swaps the attributes


# --------------------------------------------------------------------------- softmax
class Softmax(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(a):
        return torch.softmax(a, dim=-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        # differentiable in y and g: higher orders come from autograd of these two ops and
        # of this Function itself (y is its output)
        return y * (g - (y * g).sum(-1, keepdim=True))

    @staticmethod
    def jvp(ctx, a_t):
        (y,) = ctx.saved_tensors
        return y * (a_t - (y * a_t).sum(-1, keepdim=True))


def softmax(a: torch.Tensor) -> torch.Tensor:
    return Softmax.apply(a)


def _plain_softmax(a: torch.Tensor) -> torch.Tensor:
    e = torch.exp(a - a.amax(-1, keepdim=True).detach())
    return e / e.sum(-1, keepdim=True)


def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
              *, softmax_fn=softmax):
    """SDPA written out (math kernel semantics) with a chosen softmax."""
    if dropout_p or is_causal or enable_gqa:
        raise NotImplementedError("fused attention: dropout_p / is_causal / enable_gqa are not supported")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    a = (q * scale) @ k.transpose(-2, -1)
    if attn_mask is not None:
        a = a.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else a + attn_mask
    return softmax_fn(a) @ v


# --------------------------------------------------------------------------- SiLU chain
@lru_cache(maxsize=None)
def _silu_poly(k: int):
    """Coefficients (low → high) of P_k, Q_k with d^k silu/dx^k = x P_k(σ) + Q_k(σ)."""
    P, Q = [0.0, 1.0], [0.0]

    def deriv_times_s1ms(c):  # c'(σ) · σ(1−σ) as a coefficient list
        d = [i * c[i] for i in range(1, len(c))] or [0.0]
        out = [0.0] * (len(d) + 2)
        for i, di in enumerate(d):
            out[i + 1] += di
            out[i + 2] -= di
        return out

    for _ in range(k):
        P, Q = deriv_times_s1ms(P), [a + b for a, b in _zip_pad(P, deriv_times_s1ms(Q))]
    return tuple(P), tuple(Q)


def _zip_pad(a, b):
    n = max(len(a), len(b))
    return zip(list(a) + [0.0] * (n - len(a)), list(b) + [0.0] * (n - len(b)))


def _horner(c, s):
    out = torch.full_like(s, c[-1])
    for ci in reversed(c[:-1]):
        out = out * s + ci
    return out


def silu_derivative_value(x: torch.Tensor, k: int) -> torch.Tensor:
    """d^k/dx^k silu(x), closed form (no graph)."""
    if k == 0:
        return _SILU(x)
    if k == 1:  # σ(1 + x(1 − σ))
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    if k == 2:  # σ(1−σ)(2 + x(1 − 2σ))
        s = torch.sigmoid(x)
        return s * (1 - s) * (2 + x * (1 - 2 * s))
    P, Q = _silu_poly(k)
    s = torch.sigmoid(x)
    return x * _horner(P, s) + _horner(Q, s)


class SiLUDerivative(torch.autograd.Function):
    """y = d^k silu / dx^k (x); backward and jvp use level k + 1 (another Function)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, k):
        return silu_derivative_value(x, k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, k = inputs
        ctx.k = k
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * SiLUDerivative.apply(x, ctx.k + 1), None

    @staticmethod
    def jvp(ctx, x_t, _k_t):
        (x,) = ctx.saved_tensors
        return x_t * SiLUDerivative.apply(x, ctx.k + 1)


def silu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return SiLUDerivative.apply(x, 0)


# --------------------------------------------------------------------------- group norm
def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """GroupNorm as a short chain of ops: x̂ = (x − μ_g) · (σ²_g + ε)^{-1/2}, y = γ x̂ + β.

    The built-in kernel's forward-mode and higher reverse derivatives expand into long
    composite formulas (thousands of small muls per step); autograd of these five ops is
    exact at every order and much shorter.
    """
    B, C = x.shape[:2]
    xg = x.reshape(B, num_groups, -1)
    xc = xg - xg.mean(-1, keepdim=True)
    xh = (xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)).reshape(x.shape)
    shape = (1, C) + (1,) * (x.dim() - 2)
    if weight is not None:
        xh = xh * weight.reshape(shape)
    if bias is not None:
        xh = xh + bias.reshape(shape)
    return xh


# --------------------------------------------------------------------------- routing modes
class _Route(TorchFunctionMode):
    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return attention(*args, **kwargs,
                             softmax_fn=softmax if self.fused and "softmax" in FUSED_OPS else _plain_softmax)
        if self.fused and "silu" in FUSED_OPS and func is F.silu:
            return silu(*args, **kwargs)
        if self.fused and "group_norm" in FUSED_OPS and func is F.group_norm:
            return group_norm(*args, **kwargs)
        return func(*args, **kwargs)


_PATCH_LOCK = threading.RLock()
ROUTING = "patch"  # "patch": swap the torch.nn.functional attributes; "mode": a TorchFunctionMode
# Which Functions fused_ops() routes to. Measured on CPU (tiny DDPM++, 1 probe, median of 6,
# benchmarks/RESULTS.md): Softmax ±0%, SiLU chain +12%, GroupNorm chain +8% time against the
# built-in kernels' own higher derivatives, so only the softmax (needed anyway: the built-in
# fails reverse-over-forward) is on by default. Add "silu" / "group_norm" to try them.
FUSED_OPS = {"softmax"}


@contextlib.contextmanager
def _patched(fused: bool):
    """Swap F.silu / F.group_norm / F.scaled_dot_product_attention for the duration.

    Modules look these up as ``F.<name>`` at call time (nn.SiLU, nn.GroupNorm, the project's
    attention), so an unmodified model picks them up. Cheaper than a TorchFunctionMode, which
    runs Python for every torch call of the model (~10k per residual).
    """
    sm = softmax if fused and "softmax" in FUSED_OPS else _plain_softmax
    new = {"scaled_dot_product_attention": lambda *a, **k: attention(*a, **k, softmax_fn=sm)}
    if fused and "silu" in FUSED_OPS:
        new["silu"] = silu
    if fused and "group_norm" in FUSED_OPS:
        new["group_norm"] = group_norm
    with _PATCH_LOCK:
        old = {k: getattr(F, k) for k in new}
        try:
            for k, v in new.items():
                setattr(F, k, v)
            yield
        finally:
            for k, v in old.items():
                setattr(F, k, v)


@contextlib.contextmanager
def fused_ops():
    """Route F.silu, F.group_norm and SDPA of any model to the Functions of this module."""
    with (_patched(True) if ROUTING == "patch" else _Route(True)):
        yield


@contextlib.contextmanager
def plain_ops():
    """Plain-autograd reference path: SDPA as matmuls + a composite softmax."""
    with (_patched(False) if ROUTING == "patch" else _Route(False)):
        yield
