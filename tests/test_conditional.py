"""Class-conditional score models and classifier-free guidance (model.num_classes,
training.label_dropout, sampling.guidance_weight) against exact mixture scores."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from gaussian import SDES, GaussianData, moments
from mixture import GaussianMixture
from pipeline.config import ConfigError
from pipeline.config_files import CONFIG_DIR, load_config
from pipeline.fpe import FPERegularizer
from pipeline.sampling import pc_sample
from pipeline.score import cycled_labels, get_score_fn, guided_score_fn
from pipeline.train.step import class_labels

TINY = str(CONFIG_DIR / "mnist_tiny.yaml")


class ExactConditionalNet(nn.Module):
    """A "network" with the VP / sub-VP output convention (noise prediction −σ(t) s, label 999 t)
    whose scores are exact: component y of a Gaussian mixture for y < K, the mixture for y = K."""

    def __init__(self, gm: GaussianMixture, sde):
        super().__init__()
        self.gm, self.sde, self.K = gm, sde, gm.mu.shape[0]

    def forward(self, x, labels, class_labels=None):
        t = labels / 999.0
        y = torch.full((x.shape[0],), self.K) if class_labels is None else class_labels
        per_class = [GaussianData(self.gm.mu[k], self.gm.cov[k]).score(self.sde, x, t) for k in range(self.K)]
        s = torch.stack(per_class + [self.gm.score(self.sde, x, t)])[y, torch.arange(x.shape[0])]
        return -self.sde.marginal_std(t)[:, None] * s


@pytest.mark.parametrize("name", ["vp", "subvp"])
def test_guided_score_is_the_classifier_free_combination_of_exact_scores(name):
    sde = SDES[name]()
    gm = GaussianMixture(3, K=3, seed=2)
    net = ExactConditionalNet(gm, sde)
    n = 7  # not a multiple of K: labels 0, 1, 2, 0, 1, 2, 0
    t = torch.linspace(0.05, 0.95, n, dtype=torch.float64)
    x = gm.sample_xt(sde, t, torch.Generator().manual_seed(0))
    y = cycled_labels(n, 3)
    assert y.tolist() == [0, 1, 2, 0, 1, 2, 0]
    comp = torch.stack([GaussianData(gm.mu[k], gm.cov[k]).score(sde, x[i:i + 1], t[i:i + 1])[0]
                        for i, k in enumerate(y.tolist())])
    mix = gm.score(sde, x, t)
    torch.testing.assert_close(guided_score_fn(net, sde, 3, 0.0)(x, t), comp, rtol=1e-10, atol=1e-10)
    for w in (0.5, 3.0):
        torch.testing.assert_close(guided_score_fn(net, sde, 3, w)(x, t), (1 + w) * comp - w * mix,
                                   rtol=1e-10, atol=1e-10)
    # no label is the unconditional (mixture) score
    torch.testing.assert_close(get_score_fn(net, sde)(x, t), mix, rtol=1e-10, atol=1e-10)


def test_unguided_conditional_samples_follow_their_class():
    """PC sampling with the exact conditional scores at w = 0: the samples of label k have
    component k's mean and covariance; guidance w = 4 moves them further from the other classes."""
    sde = SDES["vp"]()
    gm = GaussianMixture(2, K=2, seed=3)
    net = ExactConditionalNet(gm, sde)
    n = 4000
    x, _ = pc_sample(guided_score_fn(net, sde, 2, 0.0), sde, (n, 2), num_steps=250, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(0))
    xg, _ = pc_sample(guided_score_fn(net, sde, 2, 4.0), sde, (n, 2), num_steps=250, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(0))
    y = cycled_labels(n, 2)
    for k in range(2):
        m, C = moments(x[y == k])
        mu, S = gm.mu[k], gm.cov[k]
        d, nk = S.diagonal(), n // 2
        assert ((m - mu).abs() <= 4 * (d / nk).sqrt() + 0.03 * d.sqrt()).all(), (k, m, mu)
        assert ((C - S).abs() <= 4 * ((d[:, None] * d[None, :] + S ** 2) / nk).sqrt()
                + 0.04 * (d[:, None] * d[None, :]).sqrt()).all(), (k, C, S)
        other = gm.mu[1 - k]
        assert (xg[y == k] - other).norm(dim=1).mean() > (x[y == k] - other).norm(dim=1).mean()


def test_network_class_embedding():
    # init_scale 1: the zero-initialised output convs of the default would hide the label's effect
    cfg = load_config(TINY, ["model.num_classes=3", "model.init_scale=1.0"])
    from pipeline.models import build_model
    torch.manual_seed(0)
    net = build_model(cfg)
    x, lab = torch.randn(1, 1, 28, 28).expand(4, -1, -1, -1), torch.full((4,), 500.0)  # one image, 4 labels
    out_none = net(x, lab)
    torch.testing.assert_close(out_none, net(x, lab, torch.full((4,), 3)), rtol=0, atol=0)
    out_y = net(x, lab, torch.tensor([0, 1, 2, 0]))
    scale = out_none.abs().max()

    def differ(a, b):
        return (a - b).abs().max() > 1e-3 * scale

    assert differ(out_y[0], out_none[0]) and differ(out_y[0], out_y[1]) and not differ(out_y[0], out_y[3])
    out_y.square().sum().backward()
    assert net.class_embed.weight.grad[:3].abs().sum() > 0 and net.class_embed.weight.grad[3].abs().sum() == 0
    plain = build_model(load_config(TINY, []))
    assert not any("class_embed" in k for k in plain.state_dict())  # score_sde checkpoints load by key
    with pytest.raises(ValueError, match="unconditional network"):
        plain(x, lab, torch.zeros(4, dtype=torch.long))


def test_label_dropout_rate_and_bad_labels():
    y = torch.arange(20000) % 10
    out = class_labels(y, 10, 0.2, torch.Generator().manual_seed(0), "cpu")
    dropped = out == 10
    assert abs(dropped.float().mean().item() - 0.2) < 4 * (0.2 * 0.8 / 20000) ** 0.5
    assert torch.equal(out[~dropped], y[~dropped])
    assert torch.equal(class_labels(y, 10, 0.0, torch.Generator().manual_seed(0), "cpu"), y)
    with pytest.raises(ConfigError, match=r"model.num_classes=10.*label -1"):
        class_labels(torch.tensor([3, -1]), 10, 0.1, torch.Generator(), "cpu")
    with pytest.raises(ConfigError, match=r"label 12"):
        class_labels(torch.tensor([12]), 10, 0.1, torch.Generator(), "cpu")


def test_config_refuses_guidance_without_an_unconditional_score():
    with pytest.raises(ConfigError, match="model.num_classes"):
        load_config(TINY, ["sampling.guidance_weight=1"])
    with pytest.raises(ConfigError, match="training.label_dropout"):
        load_config(TINY, ["model.num_classes=10", "sampling.guidance_weight=1", "training.label_dropout=0"])
    for bad, key in (("model.num_classes=-1", "model.num_classes"), ("training.label_dropout=1.0", "label_dropout"),
                     ("sampling.guidance_weight=-1", "guidance_weight")):
        with pytest.raises(ConfigError, match=key):
            load_config(TINY, ["model.num_classes=10", bad])


def test_fpe_regularizer_takes_each_sample_its_own_label():
    """The residual of a conditional model is that of s(x, t | y_i) for each regularized sample i."""
    sde = SDES["vp"]()
    cfg = load_config(TINY, ["model.num_classes=3", "fpe.subsample=2", "model.init_scale=1.0"])
    from pipeline.models import build_model
    torch.manual_seed(0)
    net = build_model(cfg)
    x0, y = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 1, 0])
    reg = FPERegularizer(cfg.fpe, sde)
    out = reg(net, x0, generator=torch.Generator().manual_seed(5), class_labels=y)
    plain = reg(net, x0, generator=torch.Generator().manual_seed(5))
    assert out.indices.tolist() == plain.indices.tolist()
    # the same points and probes with the selected labels bound directly
    from pipeline.fpe import select_points
    g = torch.Generator().manual_seed(5)
    idx = torch.randperm(6, generator=g)[:2]
    xs, ts = select_points(cfg.fpe, sde, x0, None, None, idx, g)
    loss, _ = reg.loss_at(get_score_fn(net, sde, y[idx]), xs, ts, generator=g, batch_size=6)
    torch.testing.assert_close(out.loss, loss, rtol=1e-6, atol=0)
    assert (out.loss - plain.loss).abs() > 1e-3 * plain.loss.abs()  # and not the unconditional residual


def test_conditional_run_trains_resumes_and_samples_with_labels(tiny_overrides, tmp_path, capsys):
    """A conditional tiny run: bitwise resume (label dropout draws from the step's generator),
    samples.npz with the cycled labels, `fpdiff sample` with another guidance weight."""
    from safetensors.torch import load_file

    from pipeline.rundir import RunDir
    from pipeline.sample.cli import sample_main
    from pipeline.app import train

    common = tiny_overrides + ["model.num_classes=10", "training.label_dropout=0.25", "sampling.guidance_weight=2",
                               "training.n_steps=6", "training.ckpt_every=3", "sampling.num_samples=12",
                               "sampling.batch_size=12", "sampling.num_steps=5"]
    assert train(load_config(TINY, common), tmp_path / "a", progress=False) == 0
    assert train(load_config(TINY, common + ["training.n_steps=3"]), tmp_path / "b", progress=False) == 0
    assert train(load_config(TINY, common), tmp_path / "b", resume="auto", progress=False) == 0
    for name in ("model", "ema"):
        wa = load_file(str(RunDir(tmp_path / "a").latest_checkpoint() / f"{name}.safetensors"))
        wb = load_file(str(RunDir(tmp_path / "b").latest_checkpoint() / f"{name}.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
        assert any(k.endswith("class_embed.weight") for k in wa), name
    assert np.load(tmp_path / "a" / "samples.npz")["labels"].tolist() == [i % 10 for i in range(12)]
    capsys.readouterr()
    assert sample_main(["--run-dir", str(tmp_path / "a"), "--num-samples", "5", "--out", str(tmp_path / "s"),
                        "sampling.guidance_weight=0.5", "sampling.num_steps=4"]) == 0
    import json
    rec = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert rec["class_labels"] == [0, 1, 2, 3, 4] and rec["guidance_weight"] == 0.5
    assert np.load(tmp_path / "s" / "samples.npz")["labels"].tolist() == [0, 1, 2, 3, 4]
