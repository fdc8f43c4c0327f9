"""Custom autograd Functions of pipeline/fused.py (issue 3, check 3)."""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

sys.path.insert(0, os.path.dirname(__file__))
from mixture import TinyUNet  # noqa: E402

from pipeline.fpe import ResidualEstimator, fpe_precision, squared_norm_estimate  # noqa: E402
from pipeline.fused import (SiLUDerivative, attention, fused_ops, group_norm, plain_ops,  # noqa: E402
                            silu, silu_derivative_value, softmax)
from pipeline.likelihood import draw_probes  # noqa: E402
from pipeline.score import get_score_fn  # noqa: E402
from pipeline.sde import SubVPSDE, VESDE, VPSDE  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)


def _x(*shape, seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
            ).requires_grad_(True)


def test_softmax_gradcheck_gradgradcheck_forward_ad():
    a = _x(3, 5)
    assert torch.allclose(softmax(a), torch.softmax(a, -1))
    assert gradcheck(softmax, (a,), check_forward_ad=True, check_batched_grad=True)
    assert gradgradcheck(softmax, (a,), check_fwd_over_rev=True, check_rev_over_rev=True)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_silu_derivative_chain_gradcheck(k):
    x = _x(4, 3, seed=k)
    fn = lambda z: SiLUDerivative.apply(z, k)  # noqa: E731
    assert gradcheck(fn, (x,), check_forward_ad=True, check_batched_grad=True)
    assert gradgradcheck(fn, (x,), check_fwd_over_rev=True, check_rev_over_rev=True)


def test_silu_derivative_values_match_autograd():
    x = _x(50)
    y = F.silu(x)
    d = torch.ones_like(x)
    for k in range(1, 6):
        (d,) = torch.autograd.grad(y if k == 1 else d, x, torch.ones_like(x), create_graph=True)
        if k == 1:
            y = d
        assert torch.allclose(silu_derivative_value(x.detach(), k), d.detach(), atol=1e-12), k
        y = d
    assert torch.allclose(silu(x), F.silu(x))


def test_group_norm_matches_and_is_differentiable_at_all_orders(all_ops):
    x, w, b = _x(2, 8, 3, 3), _x(8, seed=1), _x(8, seed=2)
    assert torch.allclose(group_norm(x, 2, w, b, 1e-6), F.group_norm(x, 2, w, b, 1e-6), atol=1e-12)
    with fused_ops():
        assert torch.allclose(F.group_norm(x, 2, w, b, 1e-6), group_norm(x, 2, w, b, 1e-6))
    fn = lambda a, c, d: group_norm(a, 2, c, d, 1e-6)  # noqa: E731
    assert gradcheck(fn, (x, w, b), check_forward_ad=True)
    assert gradgradcheck(fn, (x, w, b))


def test_functions_under_vmap_and_torch_func():
    x = _x(4, 6).detach()
    assert torch.allclose(torch.func.vmap(silu)(x), F.silu(x))
    assert torch.allclose(torch.func.vmap(softmax)(x), torch.softmax(x, -1))
    J = torch.func.jacrev(silu)(x[0])
    assert torch.allclose(J, torch.diag(silu_derivative_value(x[0], 1)))
    _, t = torch.func.jvp(softmax, (x,), (torch.ones_like(x),))
    assert t.abs().max() < 1e-12  # softmax is shift invariant
    H = torch.func.hessian(lambda z: silu(z).sum())(x[0])
    assert torch.allclose(H, torch.diag(silu_derivative_value(x[0], 2)))


def test_attention_equals_sdpa(all_ops):
    q, k, v = _x(2, 1, 6, 4, seed=1), _x(2, 1, 6, 4, seed=2), _x(2, 1, 6, 4, seed=3)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(attention(q, k, v), ref, atol=1e-12)
    with fused_ops():
        assert torch.allclose(F.scaled_dot_product_attention(q, k, v), ref, atol=1e-12)
    assert gradgradcheck(lambda a, b, c: attention(a, b, c), (q, k, v))


ALL_OPS = {"softmax", "silu", "group_norm"}


@pytest.fixture
def all_ops(monkeypatch):
    """Route every Function (the default routes only the softmax, see FUSED_OPS)."""
    import pipeline.fused as fu
    monkeypatch.setattr(fu, "FUSED_OPS", set(ALL_OPS))


@pytest.mark.parametrize("routing", ["patch", "mode"])
def test_fused_ops_leave_the_model_output_unchanged(all_ops, routing, monkeypatch):
    import pipeline.fused as fu
    monkeypatch.setattr(fu, "ROUTING", routing)
    torch.manual_seed(0)
    net = TinyUNet(nf=8, dropout=0.0).double()
    x, lab = _x(2, 1, 8, 8).detach(), torch.tensor([10.0, 500.0], dtype=torch.float64)
    ref = net(x, lab)
    with fused_ops():
        assert torch.allclose(net(x, lab), ref, atol=1e-12)
    with plain_ops():
        assert torch.allclose(net(x, lab), ref, atol=1e-12)


def _plain_vs_fused(net, sde, graph_probes):
    """(residual estimates, loss, parameter gradient) of the two-probe L_FP on two 8×8 images,
    plain path and fused path, with one dropout mask and the same probes for both."""
    x = _x(2, 1, 8, 8).detach()
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)
    v = draw_probes(x.shape, 2, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    out = {}
    for fused in (False, True):
        net.zero_grad()
        torch.manual_seed(42)  # one dropout mask, the same for both paths
        with fpe_precision(x.device):
            rs = ResidualEstimator(sde, fused=fused, probe_gradient=graph_probes).estimates(
                get_score_fn(net, sde), x, t, probes=v)
            loss = squared_norm_estimate(rs).mean()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
        out[fused] = (rs.detach(), loss.detach(), grads)
    assert torch.isfinite(out[True][2]).all() and out[True][2].abs().max() > 0
    return out


@pytest.mark.parametrize("graph_probes", ["all", "first"])
@pytest.mark.parametrize("sde_cls", [VPSDE, SubVPSDE, VESDE])
def test_fused_parameter_gradient_equals_plain_autograd(sde_cls, graph_probes, all_ops):
    """L_FP (two probes, unbiased) from the fused path = plain path, parameter gradients included."""
    torch.manual_seed(0)
    net = TinyUNet(nf=8, dropout=0.1).double().train()
    out = _plain_vs_fused(net, sde_cls(), graph_probes)
    for a, b in zip(out[False], out[True]):
        assert ((a - b).norm() / b.norm()).item() < 1e-6


@pytest.mark.parametrize("ops", ["default", "all"])
@pytest.mark.parametrize("kind,emb", [("vp", "positional"), ("ve", "fourier")])
def test_fused_equals_plain_on_the_project_model(kind, emb, ops, monkeypatch):
    """The same on pipeline.models (GroupNorm, SiLU, dropout 0.1, attention via SDPA), with the
    trainer's default gradient (first probe only)."""
    import pipeline.fused as fu
    if ops == "all":
        monkeypatch.setattr(fu, "FUSED_OPS", set(ALL_OPS))
    from pipeline.config_files import load_config
    from pipeline.models import build_model
    from pipeline.sde import build_sde
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "mnist_tiny.yaml"),
                      [f"sde.type={kind}", f"model.embedding_type={emb}", "model.nf=8", "data.image_size=8",
                       "model.attn_resolutions=[4]", "model.dropout=0.1"])
    torch.manual_seed(0)
    net = build_model(cfg).double().train()
    out = _plain_vs_fused(net, build_sde(cfg.sde), "first")
    assert ((out[False][2] - out[True][2]).norm() / out[True][2].norm()).item() < 1e-6
