"""DSM loss against the closed-form score of Gaussian data and score_sde's formula."""
import math

import pytest
import torch

from gaussian import SDES, GaussianData
from pipeline.losses import DSMLoss
from pipeline.sde import VPSDE, bcast


def snr_closed_form(sde, t):
    """a(t)² / σ(t)² from the SDE's own coefficients: a = 1 for VE, exp(∫-β/2) for VP / sub-VP."""
    a = torch.exp(sde.log_mean_coeff(t)) if hasattr(sde, "log_mean_coeff") else torch.ones_like(t)
    return (a / sde.marginal_std(t)) ** 2


@pytest.mark.parametrize("weighting", ["sigma2", "g2", "minsnr"])
@pytest.mark.parametrize("name", list(SDES))
def test_dsm_loss_is_minimal_at_the_true_score(name, weighting):
    """With common random numbers (same x0, t, z) the empirical DSM loss of the exact score is
    below that of perturbed scores, for both weightings.

    Per sample the loss is w(t) ‖σ s + z‖² with w = 1 (λ = σ²) or w = g²/σ² (λ = g²). The
    additive perturbation s + δ c / (σ √w) gives L(δ) = L(0) + δ² ‖c‖²/D + 2δ·(noise), the
    noise term having zero mean and, over n = 100k draws, a standard error ~0.02 δ even for
    w = g²/σ² ~ 1/t (E[w] ~ log(1/eps)), i.e. 5-10 standard errors at |δ| = 0.1-0.2. The
    scaled perturbation (1 + δ) s is used with w = 1 only: with w ~ 1/t its noise term has
    variance ∝ E[w²] ~ 1/eps (this is why likelihood weighting is usually paired with
    importance sampling of t). The fitted vertex of L(δ) must satisfy |δ*| < 0.05."""
    sde = SDES[name]()
    data = GaussianData.random(3, seed=2)
    n = 100_000
    g = torch.Generator().manual_seed(3)
    x0 = data.sample(n, generator=g, shape=(1, 3))
    lw = weighting == "g2"
    loss = DSMLoss(sde, eps=1e-5, likelihood_weighting=lw, min_snr_gamma=5.0 if weighting == "minsnr" else 0.0)
    t = loss.sample_t(n, "cpu", torch.float64, g)
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    true = data.score_fn(sde)
    c = torch.tensor([1.0, -0.5, 0.8], dtype=torch.float64).reshape(1, 1, 3)

    def sqrt_w(tt):
        if weighting == "minsnr":
            snr = snr_closed_form(sde, tt)
            return torch.sqrt(snr.clamp(max=5.0) / snr)
        return sde.diffusion(tt) / sde.marginal_std(tt) if lw else torch.ones_like(tt)

    def additive(d):
        return lambda x, tt: true(x, tt) + d * c / bcast(sde.marginal_std(tt) * sqrt_w(tt), x)

    def scaled(d):
        return lambda x, tt: (1 + d) * true(x, tt)

    L0 = loss(true, x0, t=t, z=z).loss.item()
    for family in (additive,) if lw else (additive, scaled):
        deltas = [-0.2, -0.1, 0.1, 0.2]
        Ls = [loss(family(d), x0, t=t, z=z).loss.item() for d in deltas]
        assert all(L > L0 for L in Ls), (family.__name__, L0, Ls)
        # quadratic fit through (δ, L - L0): vertex near 0
        X = torch.tensor([[d, d * d] for d in deltas], dtype=torch.float64)
        y = torch.tensor([L - L0 for L in Ls], dtype=torch.float64)
        a, b = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
        assert b > 0 and abs(a / (2 * b)) < 0.05, (family.__name__, a.item(), b.item())


@pytest.mark.parametrize("name", list(SDES))
def test_likelihood_weighting_is_g2_weighting(name):
    """Per sample: λ = g² gives g² reduce(‖s + z/σ‖²) = (g²/σ²) times the λ = σ² loss;
    reduce_mean=False halves the sum (D / 2 times the mean, score_sde's 0.5 * sum)."""
    sde = SDES[name]()
    data = GaussianData.random(4, seed=1)
    g = torch.Generator().manual_seed(0)
    x0 = data.sample(64, generator=g, shape=(1, 2, 2))
    score = lambda x, t: data.score(sde, x, t) * 0.9 + 0.1  # not the exact score
    plain = DSMLoss(sde, eps=1e-5)(score, x0, generator=torch.Generator().manual_seed(5))
    lw = DSMLoss(sde, eps=1e-5, likelihood_weighting=True)(score, x0, generator=torch.Generator().manual_seed(5))
    summed = DSMLoss(sde, eps=1e-5, reduce_mean=False)(score, x0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(lw.t, plain.t)
    torch.testing.assert_close(lw.z, plain.z)
    g2, std = sde.diffusion(plain.t) ** 2, sde.marginal_std(plain.t)
    torch.testing.assert_close(lw.per_sample, plain.per_sample * g2 / std ** 2)
    direct = g2 * (score(lw.xt, lw.t) + lw.z / bcast(std, lw.z)).flatten(1).pow(2).mean(1)
    torch.testing.assert_close(lw.per_sample, direct)
    torch.testing.assert_close(summed.per_sample, plain.per_sample * 4 / 2)
    torch.testing.assert_close(plain.loss, plain.per_sample.mean())


@pytest.mark.parametrize("name", list(SDES))
def test_min_snr_weighting_caps_the_nearly_clean_times(name):
    """min-SNR-γ: per sample the λ = σ² loss times min(SNR, γ) / SNR, i.e. unchanged where SNR <= γ
    and γ / SNR below 1 at the nearly clean times; with likelihood weighting it is refused."""
    sde = SDES[name]()
    data = GaussianData.random(4, seed=1)
    x0 = data.sample(512, generator=torch.Generator().manual_seed(0), shape=(1, 2, 2))
    score = lambda x, t: data.score(sde, x, t) * 0.9 + 0.1
    plain = DSMLoss(sde, eps=1e-5)(score, x0, generator=torch.Generator().manual_seed(5))
    capped = DSMLoss(sde, eps=1e-5, min_snr_gamma=5.0)(score, x0, generator=torch.Generator().manual_seed(5))
    snr = snr_closed_form(sde, plain.t)
    assert (snr > 5).any() and (snr < 5).any()  # both regimes are exercised
    torch.testing.assert_close(capped.per_sample, plain.per_sample * torch.where(snr > 5, 5 / snr, torch.ones_like(snr)))
    with pytest.raises(ValueError, match="min_snr_gamma"):
        DSMLoss(sde, min_snr_gamma=5.0, likelihood_weighting=True)


def test_stratified_times_cover_the_range_with_the_same_marginal():
    """t_sampling="stratified": in every batch the B times sit one per 1/B of (eps, T); over many batches
    each time is still U(eps, T) (KS distance to the uniform CDF), and the batch mean of a smooth
    function of t varies far less than with i.i.d. times (here by more than 10x in variance)."""
    sde, B, eps = VPSDE(), 16, 1e-3
    strat, iid = DSMLoss(sde, eps=eps, t_sampling="stratified"), DSMLoss(sde, eps=eps)
    g = torch.Generator().manual_seed(0)
    ts = torch.stack([strat.sample_t(B, "cpu", torch.float64, g) for _ in range(2000)])
    u = (ts - eps) / (sde.T - eps)
    assert (torch.floor(u * B).sort(1).values == torch.arange(B, dtype=u.dtype)).all()
    flat = u.flatten().sort().values
    ks = (flat - torch.arange(1, flat.numel() + 1, dtype=u.dtype) / flat.numel()).abs().max()
    assert ks < 0.02
    f = lambda t: sde.marginal_std(t)  # a smooth function of t, as the loss is in expectation
    var_strat = f(ts.flatten()).reshape(ts.shape).mean(1).var()
    ti = torch.stack([iid.sample_t(B, "cpu", torch.float64, g) for _ in range(2000)])
    var_iid = f(ti.flatten()).reshape(ti.shape).mean(1).var()
    assert var_strat < var_iid / 10
    with pytest.raises(ValueError, match="t_sampling"):
        DSMLoss(sde, t_sampling="sobol")


@pytest.mark.parametrize("name", list(SDES))
def test_outputs_are_the_perturbation_kernel(name):
    sde = SDES[name]()
    x0 = torch.randn(256, 3, 4, 4)
    out = DSMLoss(sde, eps=1e-3)(lambda x, t: -x, x0, generator=torch.Generator().manual_seed(0))
    assert out.t.shape == (256,) and out.per_sample.shape == (256,) and out.loss.dim() == 0
    assert float(out.t.min()) >= 1e-3 and float(out.t.max()) <= 1.0
    mean, std = sde.marginal_prob(x0, out.t)
    torch.testing.assert_close(out.xt, mean + bcast(std, x0) * out.z)
    torch.testing.assert_close(out.std, std)
    # reproducible from the generator
    again = DSMLoss(sde, eps=1e-3)(lambda x, t: -x, x0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.xt, out.xt) and torch.equal(again.t, out.t)


def test_loss_backpropagates_to_parameters():
    sde = VPSDE()
    net = torch.nn.Linear(8, 8)
    score = lambda x, t: net(x) * (1 + t[:, None])
    out = DSMLoss(sde)(score, torch.randn(16, 8), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all()


def score_sde_loss(kind, x0, t, z, score_fn, reduce_mean, likelihood_weighting,
                   beta_min=0.1, beta_max=20.0, sigma_min=0.01, sigma_max=50.0):
    """score_sde_pytorch's losses.get_sde_loss_fn (continuous) written out from its source:
    its SDEs' marginal_prob and sde()[1], reduce_op = mean or 0.5 * sum, mean over the batch."""
    if kind == "ve":
        std = sigma_min * (sigma_max / sigma_min) ** t
        mean = x0
        g = std * math.sqrt(2 * (math.log(sigma_max) - math.log(sigma_min)))
    else:
        log_mean_coeff = -0.25 * t ** 2 * (beta_max - beta_min) - 0.5 * t * beta_min
        mean = torch.exp(log_mean_coeff)[:, None, None, None] * x0
        beta_t = beta_min + t * (beta_max - beta_min)
        if kind == "vp":
            std = torch.sqrt(1.0 - torch.exp(2.0 * log_mean_coeff))
            g = torch.sqrt(beta_t)
        else:  # subvp
            std = 1.0 - torch.exp(2.0 * log_mean_coeff)
            discount = 1.0 - torch.exp(-2 * beta_min * t - (beta_max - beta_min) * t ** 2)
            g = torch.sqrt(beta_t * discount)
    reduce_op = torch.mean if reduce_mean else (lambda *a, **k: 0.5 * torch.sum(*a, **k))
    perturbed = mean + std[:, None, None, None] * z
    score = score_fn(perturbed, t)
    if not likelihood_weighting:
        losses = torch.square(score * std[:, None, None, None] + z)
        losses = reduce_op(losses.reshape(losses.shape[0], -1), dim=-1)
    else:
        losses = torch.square(score + z / std[:, None, None, None])
        losses = reduce_op(losses.reshape(losses.shape[0], -1), dim=-1) * g ** 2
    return torch.mean(losses)


@pytest.mark.parametrize("likelihood_weighting", [False, True])
@pytest.mark.parametrize("reduce_mean", [True, False])
@pytest.mark.parametrize("name", list(SDES))
def test_dsm_loss_is_score_sde_loss(name, reduce_mean, likelihood_weighting):
    """All 12 combinations (3 SDEs x reduce_mean x likelihood weighting) equal score_sde's loss on
    the same batch, times and noise, to float64 rounding."""
    sde = SDES[name]()
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(16, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.rand(16, generator=g, dtype=torch.float64) * (1 - 1e-5) + 1e-5
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    w = torch.randn(16, generator=g, dtype=torch.float64)
    score_fn = lambda x, tt: -x * (1 + tt[:, None, None, None]) + w.reshape(1, 1, 4, 4)  # any smooth field
    ours = DSMLoss(sde, eps=1e-5, reduce_mean=reduce_mean, likelihood_weighting=likelihood_weighting)(
        score_fn, x0, t=t, z=z).loss
    ref = score_sde_loss(name, x0, t, z, score_fn, reduce_mean, likelihood_weighting)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
