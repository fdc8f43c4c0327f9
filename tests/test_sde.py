"""Ground truth for the SDEs: perturbation kernels against simulated paths, priors, divergences."""
import math

import pytest
import torch

from gaussian import SDES

from pipeline.sde import bcast

CHECK_TIMES = (0.1, 0.3, 0.6, 1.0)


@pytest.mark.parametrize("name", list(SDES))
def test_marginal_prob_matches_euler_maruyama_paths(name):
    """Mean and std of 100k Euler–Maruyama paths of ``sde()`` (1,000 steps) at t = 0.1 ... 1
    match ``marginal_prob`` within 2% (mean: of max(|mean|, std)). Paths start from the
    kernel at t = 0 (x0 exactly for VP / sub-VP; x0 + σ_min z for VE, whose ``marginal_prob``
    std is σ(t), i.e. counts σ_min² at t = 0, as in score_sde). Monte-Carlo standard errors:
    0.32% of the std for the mean, 0.22% for the std; the EM bias of the std at dt = 1/1000
    is <= 0.7% (largest: sub-VP at t = 0.1, where g² ∝ t and the left Riemann sum of g²
    misses ~1/k of the variance after k steps; VE: g² ∝ e^{17 t}, 17 dt / 4). Measured at
    dt = 1/500: <= 0.76% (mean), <= 1.36% (std)."""
    sde = SDES[name]()
    g = torch.Generator().manual_seed(1)
    n, steps = 100_000, 1_000
    x0v = 1.5
    x0 = torch.full((n, 1), x0v)
    mean0, std0 = sde.marginal_prob(x0, torch.zeros(n))
    x = mean0 + bcast(std0, x0) * torch.randn(n, 1, generator=g)
    dt = 1.0 / steps
    checks = {round(c * steps): c for c in CHECK_TIMES}
    for k in range(steps):
        t = torch.full((n,), k * dt)
        f, gdiff = sde.sde(x, t)
        x = x + f * dt + bcast(gdiff, x) * math.sqrt(dt) * torch.randn(n, 1, generator=g)
        if k + 1 in checks:
            tc = torch.tensor([checks[k + 1]], dtype=torch.float64)
            mean, std = sde.marginal_prob(torch.tensor([[x0v]], dtype=torch.float64), tc)
            m_true, s_true = mean.item(), std.item()
            m_emp, s_emp = x.double().mean().item(), x.double().std().item()
            assert abs(m_emp - m_true) <= 0.02 * max(abs(m_true), s_true), (name, checks[k + 1], m_emp, m_true)
            assert abs(s_emp / s_true - 1) <= 0.02, (name, checks[k + 1], s_emp, s_true)


@pytest.mark.parametrize("name", list(SDES))
def test_prior_logp_matches_torch_normal(name):
    sde = SDES[name]()
    g = torch.Generator().manual_seed(0)
    z = sde.prior_sampling((5, 3, 4, 4), generator=g, dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.float64)
    ref = torch.distributions.Normal(zero, zero + sde.prior_std()).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(sde.prior_logp(z), ref, rtol=1e-12, atol=1e-9)
    # the prior has the marginal's scale at T (VE: σ_max; VP / sub-VP: ~1)
    assert abs(z.std().item() / sde.prior_std() - 1) < 0.15


@pytest.mark.parametrize("name", list(SDES))
def test_drift_divergence_is_trace_of_jacobian(name):
    sde = SDES[name]()
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda y: sde.drift(y, t).sum(0), x)  # (2,2,2, 3,2,2,2)
    tr = torch.stack([jac.reshape(8, 3, 8)[:, b, :].diagonal().sum() for b in range(3)])
    torch.testing.assert_close(sde.drift_divergence(x, t), tr)


@pytest.mark.parametrize("name", list(SDES))
def test_marginal_variance_solves_its_moment_ode(name):
    """d std²/dt = 2 (∂f/∂x) std² + g² for the linear drifts (VE's std counts σ_min² at 0)."""
    sde = SDES[name]()
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64).requires_grad_(True)
    var = sde.marginal_std(t) ** 2
    dvar = torch.autograd.grad(var.sum(), t)[0]
    lin = sde.drift_divergence(torch.zeros(7, 1, dtype=torch.float64), t)  # ∂f/∂x for D = 1
    g2 = sde.diffusion(t) ** 2
    torch.testing.assert_close(dvar, (2 * lin * var + g2).detach(), rtol=1e-9, atol=1e-9)
