"""Samplers and the adaptive ODE solver against ground truth (Gaussian data, scipy)."""

import numpy as np
import pytest
import torch

from gaussian import SDES, GaussianData, moments
from pipeline.config import SamplingConfig
from pipeline.ode import odeint_adaptive
from pipeline.sampling import ode_sample, pc_sample, sample

N_SAMPLES = 10_000


@pytest.fixture(scope="module")
def data():
    # correlated 2-D Gaussian, μ ≈ (-0.80, 0.12), Σ ≈ [[3.17, 1.17], [1.17, 1.10]]
    return GaussianData.random(2, seed=4, dtype=torch.float32)


def assert_moments(x, data, bias=0.02, k=4.0, what=""):
    """Sample mean / covariance of n samples against N(μ, Σ).

    Tolerance = k standard errors of the Monte-Carlo estimate + a discretisation bias
    allowance: mean_i: k √(Σ_ii/n) + bias √Σ_ii; cov_ij: k √((Σ_ii Σ_jj + Σ_ij²)/n) +
    bias √(Σ_ii Σ_jj). With n = 10k, k = 4, bias = 2%: 6% of σ_i for the mean and 7.7% of
    Σ_ii for the variances. The measured errors (1000 / 500 steps) are <= 1.7 standard
    errors; predictor-only sampling has an O(1/K) bias of ~1% of Σ at K = 1000 (~4% at K = 200).
    """
    n = x.shape[0]
    assert torch.isfinite(x).all(), what
    m, C = moments(x)
    mu, S = data.mu.double(), data.cov.double()
    d = S.diagonal()
    tol_m = k * (d / n).sqrt() + bias * d.sqrt()
    tol_C = k * ((d[:, None] * d[None, :] + S ** 2) / n).sqrt() + bias * (d[:, None] * d[None, :]).sqrt()
    assert torch.all((m - mu).abs() <= tol_m), f"{what}: mean {m.tolist()} vs {mu.tolist()} (tol {tol_m.tolist()})"
    assert torch.all((C - S).abs() <= tol_C), f"{what}: cov {C.tolist()} vs {S.tolist()} (tol {tol_C.tolist()})"


# (sde, predictor, corrector, num_steps): the paper's combinations and the sub-VP Langevin fix
PC_CASES = [
    ("ve", "reverse_diffusion", "langevin", 500),
    ("ve", "ancestral", "none", 1000),
    ("vp", "euler_maruyama", "none", 1000),
    ("vp", "ancestral", "langevin", 500),
    ("subvp", "euler_maruyama", "langevin", 500),  # score_sde's Langevin corrector crashes here
    ("subvp", "reverse_diffusion", "ald", 500),
]


@pytest.mark.parametrize("name,predictor,corrector,K", PC_CASES)
def test_pc_sampler_reproduces_gaussian(data, name, predictor, corrector, K):
    sde = SDES[name]()
    x, nfe = pc_sample(data.score_fn(sde), sde, (N_SAMPLES, 1, 2), predictor=predictor, corrector=corrector,
                       num_steps=K, generator=torch.Generator().manual_seed(0))
    assert x.shape == (N_SAMPLES, 1, 2)
    assert nfe == K * (1 + (corrector != "none"))
    assert_moments(x, data, what=f"{name}/{predictor}/{corrector}")


@pytest.mark.parametrize("name", list(SDES))
def test_ode_sampler_reproduces_gaussian(data, name):
    sde = SDES[name]()
    calls = []

    def score(x, t):
        calls.append(1)
        return data.score(sde, x, t)

    x, nfe = ode_sample(score, sde, (N_SAMPLES, 2), rtol=1e-5, atol=1e-5,
                        generator=torch.Generator().manual_seed(0))
    assert nfe == len(calls) and 20 < nfe < 400
    assert_moments(x, data, what=f"{name}/ode")


@pytest.mark.parametrize("name", list(SDES))
def test_every_predictor_corrector_combination_runs(data, name):
    """All sensible combinations, coarse (K = 50, 2k samples): finite, right nfe, moments
    within a 25% bias allowance; ancestral on sub-VP is refused."""
    sde = SDES[name]()
    for predictor in ("reverse_diffusion", "euler_maruyama", "ancestral"):
        for corrector in ("none", "langevin", "ald"):
            if predictor == "ancestral" and name == "subvp":
                with pytest.raises(ValueError, match="ancestral"):
                    pc_sample(data.score_fn(sde), sde, (4, 2), predictor=predictor, corrector=corrector)
                continue
            x, nfe = pc_sample(data.score_fn(sde), sde, (2000, 2), predictor=predictor, corrector=corrector,
                               num_steps=50, n_steps_each=2, generator=torch.Generator().manual_seed(1))
            assert nfe == 50 * (1 + 2 * (corrector != "none"))
            assert_moments(x, data, bias=0.25, what=f"{name}/{predictor}/{corrector}")


def test_final_denoising_uses_the_current_x(data):
    """The last score evaluation is made at the x the final (noise-free) step starts from,
    after the last corrector update, and the output is that step's mean."""
    sde = SDES["ve"]()
    seen = []

    def score(x, t):
        seen.append((x.clone(), t.clone()))
        return data.score(sde, x, t)

    # predictor step without noise: VE reverse diffusion from eps to σ = 0 is Tweedie's x + σ² s
    x, nfe = pc_sample(score, sde, (64, 2), predictor="reverse_diffusion", corrector="langevin", num_steps=20,
                       eps=1e-2, generator=torch.Generator().manual_seed(0))
    (x_last, t_last), (x_corr, _) = seen[-1], seen[-2]
    assert torch.allclose(t_last, torch.full_like(t_last, 1e-2))
    assert not torch.equal(x_last, x_corr)  # the corrector moved x before the predictor saw it
    expected = x_last + sde.sigma(t_last)[:, None] ** 2 * data.score(sde, x_last, t_last)
    torch.testing.assert_close(x, expected)
    # no predictor: an explicit Tweedie step (x + σ² s) / a at eps on the corrected x; one more NFE
    for name in ("ve", "vp", "subvp"):
        sde = SDES[name]()
        seen.clear()
        x, nfe = pc_sample(score, sde, (64, 2), predictor="none", corrector="langevin", num_steps=20,
                           n_steps_each=3, generator=torch.Generator().manual_seed(0))
        assert nfe == 20 * 3 + 1 == len(seen)
        x_last, t_last = seen[-1]
        assert not torch.equal(x_last, seen[-2][0])
        a, std = sde.mean_coeff(t_last)[:, None], sde.marginal_std(t_last)[:, None]
        torch.testing.assert_close(x, (x_last + std ** 2 * data.score(sde, x_last, t_last)) / a)
        # without noise removal no extra evaluation
        _, nfe = pc_sample(score, sde, (8, 2), predictor="none", corrector="ald", num_steps=5,
                           noise_removal=False)
        assert nfe == 5


def test_sample_dispatch_from_config(data):
    sde = SDES["vp"]()
    cfg = SamplingConfig(method="pc", predictor="euler_maruyama", corrector="none", num_steps=30, batch_size=7)
    x, nfe = sample(cfg, 1e-3, data.score_fn(sde), sde, (20, 2), generator=torch.Generator().manual_seed(0))
    assert x.shape == (20, 2) and nfe == 30 and torch.isfinite(x).all()
    cfg = SamplingConfig(method="ode", rtol=1e-3, atol=1e-3, batch_size=64)
    x, nfe = sample(cfg, 1e-3, data.score_fn(sde), sde, (20, 2), generator=torch.Generator().manual_seed(0))
    assert x.shape == (20, 2) and nfe > 10
    # same seed, same samples
    x2, _ = sample(cfg, 1e-3, data.score_fn(sde), sde, (20, 2), generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)


def test_progress_bar_option(data, capsys):
    sde = SDES["ve"]()
    pc_sample(data.score_fn(sde), sde, (4, 2), corrector="none", num_steps=5, progress=True)
    ode_sample(data.score_fn(sde), sde, (4, 2), rtol=1e-3, atol=1e-3, progress=True)
    err = capsys.readouterr().err
    assert "sampling pc" in err and "sampling ode" in err


# --------------------------------------------------------------------------- ODE solver
def _nonlinear(t, y):
    A = torch.tensor([[-0.5, 2.0], [-2.0, -0.3]], dtype=y.dtype)
    return (y @ A.T) * (1 + t[:, None]) + torch.sin(3 * t)[:, None] + 0.1 * y ** 2


def test_odeint_matches_scipy_rk45_step_for_step():
    """error_norm='global' is scipy's RK45 on the flattened batch: same steps, same nfev."""
    from scipy.integrate import solve_ivp

    y0 = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for t0, t1 in ((0.0, 2.0), (1.5, 0.1)):
        def f_np(t, y):
            return _nonlinear(torch.full((4,), t, dtype=torch.float64),
                              torch.from_numpy(y).reshape(4, 2)).reshape(-1).numpy()

        ref = solve_ivp(f_np, (t0, t1), y0.reshape(-1).numpy(), rtol=1e-5, atol=1e-5, method="RK45")
        y1, nfe = odeint_adaptive(_nonlinear, y0, t0, t1, rtol=1e-5, atol=1e-5, error_norm="global")
        assert nfe == ref.nfev
        np.testing.assert_allclose(y1.reshape(-1).numpy(), ref.y[:, -1], rtol=1e-10, atol=1e-12)
        # and the answer is right to the tolerance asked
        exact = solve_ivp(f_np, (t0, t1), y0.reshape(-1).numpy(), rtol=1e-12, atol=1e-12, method="DOP853")
        np.testing.assert_allclose(y1.reshape(-1).numpy(), exact.y[:, -1], atol=1e-3)


def test_odeint_per_sample_is_independent_of_the_batch():
    y0 = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * torch.tensor(
        [[0.1], [1.0], [3.0], [0.5], [2.0], [0.01]], dtype=torch.float64)
    yb, _ = odeint_adaptive(_nonlinear, y0, 0.0, 1.0, 1e-6, 1e-6, error_norm="per_sample")
    for i in range(6):
        yi, _ = odeint_adaptive(_nonlinear, y0[i:i + 1], 0.0, 1.0, 1e-6, 1e-6, error_norm="per_sample")
        torch.testing.assert_close(yb[i:i + 1], yi, rtol=1e-13, atol=1e-13)
    # check_every > 1 trades syncs for wasted evaluations but gives the same answer
    yc, _ = odeint_adaptive(_nonlinear, y0, 0.0, 1.0, 1e-6, 1e-6, error_norm="per_sample", check_every=4)
    torch.testing.assert_close(yc, yb, rtol=0, atol=0)


def test_odeint_linear_exact_solution():
    lam = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    y0 = torch.ones(3, 4, dtype=torch.float64)
    y1, nfe = odeint_adaptive(lambda t, y: lam[:, None] * y, y0, 0.0, 1.0, 1e-8, 1e-8, error_norm="per_sample")
    torch.testing.assert_close(y1, torch.exp(lam)[:, None].expand(3, 4), rtol=1e-6, atol=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_samplers_run_on_gpu(data):
    sde = SDES["ve"]()
    mu, U, lam = data.mu.cuda(), data.U.cuda(), data.lam.cuda()

    def score(x, t):
        a, std = sde.mean_coeff(t), sde.marginal_std(t)
        var = a[:, None] ** 2 * lam + std[:, None] ** 2
        return -(((x - a[:, None] * mu) @ U) / var) @ U.T

    g = torch.Generator(device="cuda").manual_seed(0)
    x, _ = pc_sample(score, sde, (N_SAMPLES, 2), device="cuda", generator=g, num_steps=500)
    assert x.device.type == "cuda"
    assert_moments(x.cpu(), data, what="cuda pc")
    x, _ = ode_sample(score, sde, (N_SAMPLES, 2), device="cuda", generator=g)
    assert_moments(x.cpu(), data, what="cuda ode")


class _TinyNet(torch.nn.Module):
    """Stand-in with the models' ``forward(x, labels)`` signature."""

    def __init__(self, ve: bool = False):
        super().__init__()
        self.ve = ve
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.out = torch.nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, labels):
        h = torch.nn.functional.silu(self.conv(x) + torch.sin(labels / 100.0)[:, None, None, None])
        if self.ve:  # labels = σ: a score of the right scale, -x/(1 + σ²) + small; a random
            # VE net makes the probability-flow ODE stiff (drift ~ g² ~ 4e4 at T)
            return (-x + 0.1 * self.out(h)) / (1 + labels ** 2)[:, None, None, None]
        return self.out(h)


@pytest.mark.parametrize("name", list(SDES))
def test_samplers_with_a_network_score(name):
    from pipeline.score import get_score_fn

    torch.manual_seed(0)
    sde = SDES[name]()
    score = get_score_fn(_TinyNet(ve=name == "ve").eval(), sde)
    x, nfe = pc_sample(score, sde, (3, 1, 8, 8), num_steps=10, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all() and nfe == 20
    x, nfe = ode_sample(score, sde, (3, 1, 8, 8), rtol=1e-3, atol=1e-3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all() and nfe > 5


def test_odeint_gives_up_clearly_on_a_stiff_problem():
    from pipeline.ode import ODEMaxStepsError

    with pytest.raises(ODEMaxStepsError, match="no convergence"):
        odeint_adaptive(lambda t, y: -1e6 * (y - torch.cos(t)[:, None]), torch.zeros(2, 1), 0.0, 1.0,
                        1e-6, 1e-6, max_steps=50)


def test_sample_set_written_batch_by_batch(tmp_path):
    """``write_sample_set`` (the trainer's and ``fpdiff sample``'s writer): the .npz holds every
    batch as uint8 in order, the labels and extra arrays; the grid shows the first ``grid_max``
    samples, one column per class when the labels cycle."""
    from PIL import Image

    from pipeline.images import to_uint8, write_sample_set

    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(n, 1, 8, 8, generator=g) * 2 - 1 for n in (3, 3, 1)]
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    extra = {"originals": np.arange(7 * 64, dtype=np.uint8).reshape(7, 1, 8, 8)}
    grid = write_sample_set(tmp_path / "s" / "samples.npz", tmp_path / "s" / "grid.png", iter(batches), (7, 1, 8, 8),
                            centered=True, labels=labels, extra=extra, grid_max=5)
    want = to_uint8(torch.cat(batches), centered=True).numpy()
    with np.load(tmp_path / "s" / "samples.npz") as z:
        assert sorted(z.files) == ["images", "labels", "originals"]
        np.testing.assert_array_equal(z["images"], want)
        np.testing.assert_array_equal(z["labels"], labels)
        np.testing.assert_array_equal(z["originals"], extra["originals"])
    png = np.asarray(Image.open(grid))
    assert png.shape == (2 * 10 + 2, 3 * 10 + 2)  # 5 shown, 3 columns (labels 0, 1, 2), 2-pixel gaps
    np.testing.assert_array_equal(png[12:20, 12:20], want[4, 0])  # the 5th sample: second row, second column
