"""Controllable generation (pipeline/controllable.py) against closed-form conditionals."""
import math

import pytest
import torch

from gaussian import SDES, GaussianData, moments
from helpers.eval_fixtures import TINY_OVERRIDES, write_test_shards
from mixture import GaussianMixture
from pipeline.controllable import classifier_guided_score, color_basis, colorize, inpaint, make_mask, to_basis
from pipeline.sampling import ode_sample, pc_sample


def mixture_log_posterior(gm: GaussianMixture, sde):
    """log p_t(y | x) of the mixture component y: the exact time-dependent classifier."""

    def log_prob(x, t, y):
        a, C = gm.marginal(sde, t)
        diff = x[:, None, :] - a[:, None, None] * gm.mu.to(x.dtype)
        sol = torch.linalg.solve(C, diff.unsqueeze(-1)).squeeze(-1)
        logn = -0.5 * (diff * sol).sum(-1) - 0.5 * torch.linalg.slogdet(C)[1] - 0.5 * gm.D * math.log(2 * math.pi)
        logits = gm.logpi.to(x.dtype) + logn
        return logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(logits, 1)

    return log_prob


def component(gm: GaussianMixture, k: int) -> GaussianData:
    return GaussianData(gm.mu[k], gm.cov[k])


@pytest.mark.parametrize("name", list(SDES))
def test_guided_score_is_the_component_score(name):
    """Bayes' rule for scores: s(x,t) + ∇x log p_t(y|x) = ∇x log p_t(x | y), exactly."""
    sde = SDES[name]()
    gm = GaussianMixture(3, K=3, seed=2)
    t = torch.tensor([0.05, 0.3, 0.6, 0.95], dtype=torch.float64)
    x = gm.sample_xt(sde, t, torch.Generator().manual_seed(0))
    for k in range(3):
        y = torch.full((4,), k)
        guided = classifier_guided_score(gm.score_fn(sde), mixture_log_posterior(gm, sde), y)(x, t)
        exact = component(gm, k).score(sde, x, t)
        assert torch.allclose(guided, exact, rtol=1e-9, atol=1e-9)
    # scale 0 is the unconditional score
    s0 = classifier_guided_score(gm.score_fn(sde), mixture_log_posterior(gm, sde), y, scale=0.0)(x, t)
    assert torch.allclose(s0, gm.score(sde, x, t))


@pytest.mark.parametrize("name,method", [("vp", "pc"), ("ve", "pc"), ("subvp", "ode")])
def test_class_conditional_samples_follow_the_component(name, method):
    """Sampling with the guided score draws from the chosen component (mean, covariance)."""
    sde = SDES[name]()
    gm = GaussianMixture(2, K=3, seed=2)
    k, n = 1, 3000
    y = torch.full((n,), k)
    score = classifier_guided_score(gm.score_fn(sde), mixture_log_posterior(gm, sde), y)
    g = torch.Generator().manual_seed(0)
    if method == "pc":
        x, _ = pc_sample(score, sde, (n, 2), num_steps=250, dtype=torch.float64, generator=g)
    else:
        x, _ = ode_sample(score, sde, (n, 2), dtype=torch.float64, generator=g, rtol=1e-5, atol=1e-5)
    m, C = moments(x)
    mu, S = gm.mu[k], gm.cov[k]
    d = S.diagonal()
    assert ((m - mu).abs() <= 4 * (d / n).sqrt() + 0.03 * d.sqrt()).all(), (m, mu)
    assert ((C - S).abs() <= 4 * ((d[:, None] * d[None, :] + S ** 2) / n).sqrt()
            + 0.04 * (d[:, None] * d[None, :]).sqrt()).all(), (C, S)
    # and not from the mixture: the other components' means are far
    for j in range(3):
        if j != k:
            assert (m - gm.mu[j]).norm() > 10 * (d.sum() / n).sqrt()


def _inpaint_gaussian(name, data_dist, y_known, n=6000, K=400, seed=0):
    sde = SDES[name]()
    data = torch.zeros(n, 1, 2)
    data[..., 1] = y_known
    mask = torch.tensor([0.0, 1.0]).view(1, 1, 2)  # coordinate 1 known, 0 to fill in
    x, nfe = inpaint(data_dist.score_fn(sde), sde, data, mask, num_steps=K,
                     generator=torch.Generator().manual_seed(seed))
    return x, nfe


@pytest.mark.parametrize("name", list(SDES))
def test_inpainting_independent_block_is_exact(name):
    """Known and unknown coordinates independent: the fill-in follows its own marginal whatever
    the known value, and the known coordinate ends exactly at the data."""
    dist = GaussianData(torch.tensor([0.7, -0.4]), torch.tensor([[1.8, 0.0], [0.0, 0.6]]))
    for y in (2.0, -1.5):
        x, nfe = _inpaint_gaussian(name, dist, y)
        assert nfe == 800 and (x[:, 0, 1] == y).all()
        u = x[:, 0, 0].double()
        n = u.shape[0]
        assert abs(u.mean() - 0.7) < 4 * math.sqrt(1.8 / n) + 0.02 * math.sqrt(1.8)
        assert abs(u.var() - 1.8) < 4 * 1.8 * math.sqrt(2 / n) + 0.03 * 1.8


def test_inpainting_correlated_moves_to_the_conditional():
    """Correlated Gaussian: replacement-based imputation (score_sde's method) is an approximation
    of p(x_u | y_k). Measured (VP, 500 steps): it covers ~85% of the shift from the marginal to the
    exact conditional mean, with the variance within 7% of the exact conditional variance."""
    dist = GaussianData.random(2, seed=4, dtype=torch.float32)
    mu, S = dist.mu.double(), dist.cov.double()
    for name in ("vp", "ve"):
        for y in (1.5, -1.0):
            x, _ = _inpaint_gaussian(name, dist, y)
            u = x[:, 0, 0].double()
            cond_mean = mu[0] + S[0, 1] / S[1, 1] * (y - mu[1])
            cond_var = S[0, 0] - S[0, 1] ** 2 / S[1, 1]
            shift = (u.mean() - mu[0]) / (cond_mean - mu[0])
            assert 0.7 < shift < 1.15, (name, y, shift)
            assert abs(u.var() / cond_var - 1) < 0.12, (name, y, u.var(), cond_var)
            assert u.var() < 0.75 * S[0, 0]  # clearly narrower than the unconditional marginal


def test_masks_and_errors():
    shape = (2, 1, 8, 6)
    assert make_mask("left", shape)[..., :3].eq(1).all() and make_mask("left", shape)[..., 3:].eq(0).all()
    assert make_mask("top", shape)[..., :4, :].eq(1).all() and make_mask("bottom", shape)[..., :4, :].eq(0).all()
    c = make_mask("center", shape)
    assert c[..., 2:6, 1:4].eq(0).all() and c.sum() == 2 * (48 - 12)
    r = make_mask("random", (4, 1, 32, 32), generator=torch.Generator().manual_seed(0), keep=0.25)
    assert 0.2 < r.mean() < 0.3
    with pytest.raises(ValueError, match="unknown kind 'diagonal'"):
        make_mask("diagonal", shape)


# --------------------------------------------------------------------------- the CLI
def _tiny_export(tmp_path, overrides=()):
    from pipeline.config_files import load_config
    from pipeline.publish.export import write_export
    from pipeline.models import build_model

    cfg = load_config(None, TINY_OVERRIDES + list(overrides))
    torch.manual_seed(0)
    return write_export(tmp_path / "run" / "export", build_model(cfg).state_dict(), cfg.to_dict(), {"step": 7})


def test_sample_cli_samples_and_inpaints(tmp_path, capsys):
    import json

    import numpy as np

    from pipeline.sample.cli import sample_main

    export = _tiny_export(tmp_path)
    shards = write_test_shards(tmp_path / "shards")
    out = tmp_path / "out"
    assert sample_main(["--run-dir", str(export), "--num-samples", "5", "--out", str(out), "--device", "cpu"]) == 0
    rec = json.loads((out / "samples.json").read_text())
    assert rec["nfe"] == 4 and (out / "grid.png").stat().st_size > 0
    assert np.load(out / "samples.npz")["images"].shape == (5, 1, 8, 8)

    assert sample_main(["--run-dir", str(export), "--num-samples", "6", "--out", str(out), "--device", "cpu",
                        "--inpaint", "left", "--data", shards]) == 0
    z = np.load(out / "inpaint.npz")
    imgs, orig, masks = z["images"], z["originals"], z["masks"]
    assert imgs.shape == orig.shape == (6, 1, 8, 8) and masks.shape == (6, 1, 8, 8)
    assert (imgs[..., :4] == orig[..., :4]).all() and (masks[..., :4] == 1).all()  # known half kept exactly
    assert (imgs[..., 4:] != orig[..., 4:]).any()  # the hidden half was generated
    rec = json.loads((out / "inpaint.json").read_text())
    assert rec["mask"] == "left" and rec["num_samples"] == 6 and rec["mse_hidden"] > 0
    hidden = masks == 0  # the MSE is that of the saved (clipped) images, up to their 8-bit rounding
    assert rec["mse_hidden"] == pytest.approx(((imgs / 255.0 - orig / 255.0) ** 2)[hidden].mean(), abs=5e-3)
    from PIL import Image
    assert Image.open(out / "inpaint.png").size[0] > 3 * 8 * 4  # originals, masked, filled side by side

    capsys.readouterr()
    assert sample_main(["--run-dir", str(export), "--inpaint", "diagonal", "--data", shards]) == 2
    err = capsys.readouterr().err.strip()
    assert "--inpaint: unknown mask 'diagonal'" in err and len(err.splitlines()) == 1
    assert sample_main(["--run-dir", str(export), "--inpaint", "left", "--data", str(tmp_path / "none-{0..1}.tar")]) == 2
    assert "none-0.tar does not exist" in capsys.readouterr().err
    assert sample_main(["--run-dir", str(export), "--inpaint", "left", "--class-label", "1"]) == 2
    assert "--inpaint and --class-label: choose one" in capsys.readouterr().err


# --------------------------------------------------------------------------- time-dependent classifier
def test_classifier_learns_mnist_and_guides_sampling(tmp_path, tiny_overrides, capsys):
    """`fpdiff classifier` on the real MNIST shards: clearly above chance at low noise; the saved
    folder reloads; `fpdiff sample --class-label` steers samples towards the label."""
    import json
    import os

    import numpy as np

    from pipeline.classifier.train import accuracy_by_t, classifier_main
    from pipeline.models.classifier import load_classifier
    from pipeline.config_files import load_config, save_config
    from pipeline.publish.export import write_export
    from pipeline.models import build_model
    from pipeline.sample.cli import sample_main
    from pipeline.sde import build_sde

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "mnist_tiny.yaml"), tiny_overrides)
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    assert classifier_main(["--run-dir", str(run), "--steps", "300", "--batch-size", "32", "--nf", "8",
                            "--eval-samples", "400", "--device", "cpu"]) == 0
    meta = json.loads((run / "classifier" / "classifier.json").read_text())
    low = meta["acc_t0.00-0.25"]
    assert low > 0.6, meta  # chance is 0.1
    assert low > meta["acc_t0.75-1.00"]  # at high noise the label is (nearly) gone
    # the saved folder reloads to the same classifier: its test accuracies are reproduced exactly
    clf, _ = load_classifier(run / "classifier")
    again = accuracy_by_t(clf, build_sde(cfg.sde), cfg, cfg.training.eps, max_samples=400, batch_size=32,
                          device="cpu")
    assert all(again[k] == meta[k] for k in again), (again, meta)

    torch.manual_seed(0)
    write_export(run / "export", build_model(cfg).state_dict(), cfg.to_dict(), {"step": 1})
    agree = {}
    for scale in ("0", "16"):
        out = tmp_path / f"s{scale}"
        assert sample_main(["--run-dir", str(run / "export"), "--classifier", str(run / "classifier"),
                            "--class-label", "3", "--guidance-scale", scale, "--num-samples", "16",
                            "--out", str(out), "--device", "cpu", "sampling.num_steps=30",
                            "sampling.corrector=none"]) == 0
        rec = json.loads((out / "samples.json").read_text())
        assert rec["class_labels"] == [3] * 16
        assert (np.load(out / "samples.npz")["labels"] == 3).all()
        assert 0 <= rec["classifier_agrees"] <= 1
        agree[scale] = rec["classifier_log_prob"]
    # an untrained score model: guidance cannot make digits, but it must raise log p(y | x)
    # (measured over 4 seeds: +0.4 to +0.6 nats)
    assert agree["16"] > agree["0"] + 0.2, agree

    capsys.readouterr()
    assert sample_main(["--run-dir", str(run / "export"), "--class-label", "3"]) == 2  # no classifier there
    err = capsys.readouterr().err.strip()
    assert "no model.safetensors + classifier.json" in err and len(err.splitlines()) == 1
    assert sample_main(["--run-dir", str(run / "export"), "--classifier", str(run / "classifier"),
                        "--class-label", "12"]) == 2
    assert "--class-label: need 'all' or an integer in [0, 10)" in capsys.readouterr().err
    assert classifier_main(["--run-dir", str(tmp_path / "nowhere")]) == 2
    assert "no config.yaml" in capsys.readouterr().err


# --------------------------------------------------------------------------- colorization
def _colorize_gaussian(name, dist, gray, n=6000, K=400, seed=0):
    sde = SDES[name]()
    g = torch.full((n, 1), float(gray))
    x, nfe = colorize(dist.score_fn(sde), sde, g, num_steps=K, generator=torch.Generator().manual_seed(seed))
    return x, nfe


def _exact_chroma_conditional(dist, gray):
    """Exact p(chroma | gray) of N(μ, Σ) in color_basis coordinates y = Mᵀx (y0 = √3·gray)."""
    M = color_basis(torch.float64)
    nu, G = M.T @ dist.mu.double(), M.T @ dist.cov.double() @ M
    y0 = 3 ** 0.5 * gray
    mean = nu[1:] + G[1:, 0] / G[0, 0] * (y0 - nu[0])
    cov = G[1:, 1:] - torch.outer(G[1:, 0], G[0, 1:]) / G[0, 0]
    return nu[1:], G[1:, 1:], mean, cov


def test_color_basis_is_orthogonal_with_gray_axis():
    M = color_basis(torch.float64)
    assert torch.allclose(M.T @ M, torch.eye(3, dtype=torch.float64), atol=1e-15)
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    y = to_basis(x, M)
    assert torch.allclose(y[:, 0], 3 ** 0.5 * x.mean(1), atol=1e-14)  # coordinate 0 = √3 · gray
    assert torch.allclose(to_basis(y, M.T), x, atol=1e-14)


@pytest.mark.parametrize("name", list(SDES))
def test_colorize_gray_independent_of_chroma_is_exact(name):
    """Σ diagonal in the colour basis: chroma is independent of gray, so the exact conditional is
    the chroma marginal; the output's channel mean is the gray input exactly."""
    M = color_basis(torch.float64)
    lam = torch.tensor([1.2, 0.5, 0.25], dtype=torch.float64)
    dist = GaussianData(torch.tensor([0.3, -0.2, 0.5]), M @ torch.diag(lam) @ M.T)
    for gray in (1.0, -0.8):
        x, nfe = _colorize_gaussian(name, dist, gray)
        assert nfe == 800 and x.shape == (6000, 3)
        assert torch.allclose(x.double().mean(1), torch.full((6000,), gray, dtype=torch.float64), atol=1e-6)
        _, _, cmean, ccov = _exact_chroma_conditional(dist, gray)
        m, C = moments(to_basis(x.double(), M)[:, 1:])
        n, d = x.shape[0], ccov.diagonal()
        assert ((m - cmean).abs() < 4 * (d / n).sqrt() + 0.02 * d.sqrt()).all(), (name, m, cmean)
        assert ((C - ccov).abs() < 4 * d.max() * math.sqrt(2 / n) + 0.03 * d.max()).all(), (name, C, ccov)


def test_colorize_correlated_moves_to_the_conditional():
    """Gray correlated with chroma: imputation in the colour basis (score_sde's method) is an
    approximation of p(chroma | gray). Measured (VP and VE, 400 steps, 6000 samples): it covers
    97-100% of the shift from the chroma marginal to the exact conditional mean, with variances
    1.03-1.07x the exact conditional ones (the marginal's are 1.47x and 1.82x)."""
    M = color_basis(torch.float64)
    G = torch.tensor([[1.0, 0.6, -0.4], [0.6, 0.8, 0.1], [-0.4, 0.1, 0.5]], dtype=torch.float64)
    dist = GaussianData(M @ torch.tensor([0.2, -0.3, 0.4], dtype=torch.float64), M @ G @ M.T)
    for name in ("vp", "ve"):
        for gray in (1.0, -0.7):
            x, _ = _colorize_gaussian(name, dist, gray)
            assert torch.allclose(x.double().mean(1), torch.full((6000,), gray, dtype=torch.float64), atol=1e-6)
            marg_mean, marg_cov, cmean, ccov = _exact_chroma_conditional(dist, gray)
            m, C = moments(to_basis(x.double(), M)[:, 1:])
            shift = ((m - marg_mean) @ (cmean - marg_mean)) / (cmean - marg_mean).square().sum()
            assert 0.9 < shift < 1.08, (name, gray, shift)
            assert ((C.diagonal() / ccov.diagonal() - 1).abs() < 0.1).all(), (name, gray, C, ccov)
            assert (C.diagonal() < 0.8 * marg_cov.diagonal()).all()  # clearly narrower than the marginal


def test_sample_cli_colorizes(tmp_path, capsys):
    import json

    import numpy as np

    from pipeline.sample.cli import sample_main
    from pipeline.data.shards import shards_main

    rng = np.random.default_rng(0)
    a = rng.random((6, 8, 8, 1))  # two-colour images: random foreground / background
    x = np.rint(a * rng.integers(0, 256, (6, 1, 1, 3)) + (1 - a) * rng.integers(0, 256, (6, 1, 1, 3)))
    np.savez(tmp_path / "c.npz", x=x.astype(np.uint8), y=np.arange(6) % 2)
    assert shards_main([str(tmp_path / "c.npz"), "--out", str(tmp_path / "shards")]) == 0
    shards = str(tmp_path / "shards" / "c-000000.tar")
    export = _tiny_export(tmp_path, ["data.num_channels=3"])
    out = tmp_path / "out"
    assert sample_main(["--run-dir", str(export), "--num-samples", "6", "--out", str(out), "--device", "cpu",
                        "--colorize", "--data", shards]) == 0
    z = np.load(out / "colorize.npz")
    assert z["images"].shape == z["originals"].shape == (6, 3, 8, 8)
    want = sorted(im.tobytes() for im in x.astype(np.uint8).transpose(0, 3, 1, 2))
    assert sorted(im.tobytes() for im in z["originals"]) == want  # the shard's images (writer's order)
    rec = json.loads((out / "colorize.json").read_text())
    assert rec["nfe"] == 4 and rec["max_gray_deviation"] < 1e-5  # the gray input is kept (model space)
    saved, orig = z["images"] / 255.0, z["originals"] / 255.0
    assert rec["mse"] > 0 and 0 <= rec["out_of_range"] <= 1
    assert abs(rec["mse"] - ((saved - orig) ** 2).mean()) < 2e-3  # MSE of the saved (clipped) images
    assert abs(rec["mse_gray_baseline"] - ((orig.mean(1, keepdims=True) - orig) ** 2).mean()) < 1e-6
    from PIL import Image
    assert Image.open(out / "colorize.png").size[0] > 3 * 8 * 4  # gray input, colorized, original

    capsys.readouterr()
    gray_export = _tiny_export(tmp_path / "gray")
    assert sample_main(["--run-dir", str(gray_export), "--colorize", "--data", shards]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--colorize: needs a 3-channel model, this one has 1") and len(err.splitlines()) == 1
    assert sample_main(["--run-dir", str(export), "--colorize", "--inpaint", "left", "--data", shards]) == 2
    assert "--inpaint and --colorize: choose one" in capsys.readouterr().err
