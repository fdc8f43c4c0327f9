"""Tests of the NCSN++ / DDPM++ score networks (pipeline.models). Fast, CPU only."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.config import ConfigError
from pipeline.config_files import CONFIG_DIR, config_from_dict, load_config
from pipeline.models import build_model, count_parameters, fir
from pipeline.models.layers import timestep_embedding


def tiny_cfg(sde="vp", image_size=28, channels=1, centered=True, **model):
    ve = sde == "ve"
    m = dict(nf=16, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[image_size // 4], dropout=0.1,
             embedding_type="fourier" if ve else "positional", scale_by_sigma=ve,
             fir=ve, progressive_input="residual" if ve else "none")
    m.update(model)
    return config_from_dict({"model": m, "sde": {"type": sde},
                             "data": {"image_size": image_size, "num_channels": channels, "centered": centered}})


def labels_for(sde, b, gen=None):
    u = torch.rand(b, generator=gen)
    return 0.01 * (50 / 0.01) ** u if sde == "ve" else 999.0 * u  # sigma(t) for VE, 999 t otherwise


def randomize_(model, std=0.05, seed=0):
    """Move the zero-initialised output convs away from 0 so derivatives are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


# --------------------------------------------------------------------------- shapes and sizes
@pytest.mark.parametrize("sde,size,channels,ch_mult,extra", [
    ("vp", 28, 1, [1, 2, 2], {}),
    ("ve", 28, 1, [1, 2, 2], {}),
    ("subvp", 16, 3, [1, 2, 2, 2], {"attn_resolutions": [4]}),
    ("ve", 16, 3, [1, 2, 2], {"progressive": "output_skip", "progressive_input": "input_skip",
                              "progressive_combine": "cat"}),
    ("ve", 16, 3, [1, 2, 2], {"progressive": "residual", "resblock_type": "ddpm"}),
    ("vp", 12, 1, [1, 2], {"resblock_type": "ddpm", "fir": False, "num_heads": 2, "attn_resolutions": [6]}),
])
def test_output_shape(sde, size, channels, ch_mult, extra):
    cfg = tiny_cfg(sde, image_size=size, channels=channels, ch_mult=ch_mult,
                   **{"attn_resolutions": [size // 2], **extra})
    net = build_model(cfg)
    x = torch.randn(3, channels, size, size)
    out = net(x, labels_for(sde, 3))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_tiny_model_under_1m_params():
    net = build_model(tiny_cfg("vp"))
    assert count_parameters(net) < 1_000_000
    rec = tiny_cfg("vp", nf=24, attn_resolutions=[7])  # the setting recommended for 28x28x1 demos
    assert count_parameters(build_model(rec)) < 1_000_000


@pytest.mark.parametrize("path,paper", [("cifar10_ddpmpp.yaml", 62e6), ("cifar10_ncsnpp_deep.yaml", 108e6)])
def test_cifar10_sizes_match_paper(path, paper):
    cfg = load_config(CONFIG_DIR / path)
    with torch.device("meta"):
        net = build_model(cfg)
    n = count_parameters(net)
    assert abs(n - paper) / paper < 0.05, n
    assert next(net.parameters()).device.type == "meta"


# --------------------------------------------------------------------------- state-dict layout
def _shapes(net):
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def test_state_dict_layout_ddpmpp():
    """Keys and shapes of score_sde_pytorch's NCSNpp with the DDPM++ cont. (VP) config:
    no embedding module (positional), 2 Dense, conv_in, then level by level."""
    with torch.device("meta"):
        net = build_model(load_config(CONFIG_DIR / "cifar10_ddpmpp.yaml"))
    s = _shapes(net)
    assert len(net.all_modules) == 55
    expected = {
        "all_modules.0.weight": (512, 128), "all_modules.1.weight": (512, 512),
        "all_modules.2.weight": (128, 3, 3, 3),                      # conv_in
        "all_modules.3.GroupNorm_0.weight": (128,), "all_modules.3.Conv_0.weight": (128, 128, 3, 3),
        "all_modules.3.Dense_0.weight": (128, 512), "all_modules.3.Conv_1.weight": (128, 128, 3, 3),
        "all_modules.7.Conv_2.weight": (128, 128, 1, 1),             # down resblock, 1x1 shortcut
        "all_modules.8.Conv_2.weight": (256, 128, 1, 1),             # 128 -> 256 at 16x16
        "all_modules.9.NIN_0.W": (256, 256), "all_modules.9.NIN_3.b": (256,),  # attention at 16
        "all_modules.27.NIN_1.W": (256, 256),                        # middle attention
        "all_modules.29.Conv_0.weight": (256, 512, 3, 3),            # first up block (concat skip)
        "all_modules.46.GroupNorm_0.weight": (256,),                 # up attention at 16
        "all_modules.48.Conv_0.weight": (128, 384, 3, 3),              # 256 up + 128 skip
        "all_modules.53.weight": (128,), "all_modules.54.weight": (3, 128, 3, 3),
    }
    for k, shape in expected.items():
        assert s.get(k) == shape, (k, s.get(k), shape)
    assert "all_modules.3.Conv_2.weight" not in s and "all_modules.10.NIN_0.W" not in s


def test_state_dict_layout_ncsnpp_deep():
    with torch.device("meta"):
        net = build_model(load_config(CONFIG_DIR / "cifar10_ncsnpp_deep.yaml"))
    s = _shapes(net)
    assert len(net.all_modules) == 95
    expected = {
        "all_modules.0.W": (128,),                                    # Gaussian Fourier features
        "all_modules.1.weight": (512, 256), "all_modules.2.weight": (512, 512),
        "all_modules.3.weight": (128, 3, 3, 3),
        "all_modules.13.Conv2d_0.weight": (128, 3, 3, 3),             # input-pyramid FIR conv
        "all_modules.13.Conv2d_0.bias": (128,),
        "all_modules.15.NIN_2.W": (256, 256),
        "all_modules.31.Conv2d_0.weight": (256, 128, 3, 3),
        "all_modules.41.Conv2d_0.weight": (256, 256, 3, 3),
        "all_modules.51.NIN_0.W": (256, 256),                         # middle attention
        "all_modules.82.NIN_3.W": (256, 256),
        "all_modules.92.Conv_2.weight": (128, 256, 1, 1),
        "all_modules.93.weight": (128,), "all_modules.94.weight": (3, 128, 3, 3),
    }
    for k, shape in expected.items():
        assert s.get(k) == shape, (k, s.get(k), shape)
    assert not net.all_modules[0].W.requires_grad
    # fpdiff's network has no buffers; score_sde's NCSNpp adds a `sigmas` buffer, which the
    # importer checks against the config and drops (tests/test_import.py builds such checkpoints)
    assert len(s) == len(list(net.parameters())) and not list(net.buffers())


# --------------------------------------------------------------------------- label semantics
def test_ve_labels_and_scale_by_sigma():
    torch.manual_seed(0)
    cfg = tiny_cfg("ve")
    net = randomize_(build_model(cfg)).eval()
    seen = {}
    net.all_modules[0].register_forward_hook(lambda m, i, o: seen.update({"in": i[0]}))
    x, sig = torch.randn(4, 1, 28, 28), labels_for("ve", 4)
    out = net(x, sig)
    torch.testing.assert_close(seen["in"], torch.log(sig))      # Fourier features of log sigma
    unscaled = build_model(tiny_cfg("ve", scale_by_sigma=False)).eval()
    unscaled.load_state_dict(net.state_dict())
    ref = unscaled(x, sig)
    torch.testing.assert_close(out, ref / sig[:, None, None, None])
    assert ref.abs().mean() > 1e-3


def test_vp_positional_labels():
    torch.manual_seed(0)
    net = randomize_(build_model(tiny_cfg("vp"))).eval()
    seen = {}
    net.all_modules[0].register_forward_hook(lambda m, i, o: seen.update({"in": i[0]}))
    lab = torch.tensor([0.0, 1.5, 500.0, 999.0])
    net(torch.randn(4, 1, 28, 28), lab)
    emb = seen["in"]
    assert emb.shape == (4, 16)
    torch.testing.assert_close(emb, timestep_embedding(lab, 16))
    torch.testing.assert_close(emb[0], torch.cat([torch.zeros(8), torch.ones(8)]))  # sin 0, cos 0
    torch.testing.assert_close(emb[:, 0], torch.sin(lab))                           # frequency 1


def test_uncentered_data_is_mapped_inside():
    """score_sde convention: with data.centered false the net sees 2x - 1."""
    a = randomize_(build_model(tiny_cfg("ve", centered=False))).eval()
    b = build_model(tiny_cfg("ve", centered=True)).eval()
    b.load_state_dict(a.state_dict())
    x, sig = torch.rand(2, 1, 28, 28), labels_for("ve", 2)
    torch.testing.assert_close(a(x, sig), b(2 * x - 1, sig))


@pytest.mark.parametrize("sde", ["vp", "ve"])
def test_patch_size_is_the_unet_on_unshuffled_patches(sde):
    """model.patch_size p: the same UNet built for C p² channels at H / p, between a pixel unshuffle
    and a pixel shuffle; same parameters, same values (so its derivatives are the UNet's)."""
    net = randomize_(build_model(tiny_cfg(sde, ch_mult=[1, 2], patch_size=2, attn_resolutions=[7]))).eval()
    inner = build_model(tiny_cfg(sde, image_size=14, channels=4, ch_mult=[1, 2], attn_resolutions=[7])).eval()
    inner.load_state_dict(net.state_dict())
    x, lab = torch.randn(3, 1, 28, 28), labels_for(sde, 3)
    # each 2x2 patch becomes one pixel's 4 channels
    torch.testing.assert_close(F.pixel_unshuffle(x, 2)[:, :, 3, 5], x[:, 0, 6:8, 10:12].reshape(3, 4))
    torch.testing.assert_close(net(x, lab), F.pixel_shuffle(inner(F.pixel_unshuffle(x, 2), lab), 2))
    with pytest.raises(ConfigError, match="data.image_size: 28 is not divisible .* model.patch_size 2"):
        tiny_cfg(sde, ch_mult=[1, 2, 2], patch_size=2)


def test_bad_model_configs_fail_with_key():
    with pytest.raises(ConfigError, match="model.scale_by_sigma"):
        build_model(tiny_cfg("vp", scale_by_sigma=True))
    with pytest.raises(ConfigError, match="model.num_heads"):
        build_model(tiny_cfg("vp", num_heads=3))


# --------------------------------------------------------------------------- higher-order AD
@pytest.mark.parametrize("sde", ["ve", "vp"])
def test_jvp_in_labels_and_double_backward_with_dropout(sde):
    torch.manual_seed(0)
    net = randomize_(build_model(tiny_cfg(sde, dropout=0.2, image_size=16))).train()
    x = torch.randn(2, 1, 16, 16, requires_grad=True)
    lab = labels_for(sde, 2)
    with sdpa_kernel([SDPBackend.MATH]):
        out, tangent = torch.func.jvp(lambda l: net(x, l), (lab,), (torch.ones_like(lab),))
        assert out.shape == tangent.shape == x.shape and torch.isfinite(tangent).all()
        y = net(x, lab)
        v = torch.randn_like(y)
        (g,) = torch.autograd.grad((y * v).sum(), x, create_graph=True)
        loss = (g ** 2).sum() + tangent.square().sum()
        loss.backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    # the output bias shifts s but not its x- or label-derivatives (unless divided by sigma)
    last_bias = f"all_modules.{len(net.all_modules) - 1}.bias"
    assert missing == ([] if sde == "ve" else [last_bias])
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert all(torch.isfinite(gr).all() for gr in grads)
    assert all(gr.abs().sum() > 0 for gr in grads)


@pytest.mark.parametrize("sde", ["ve", "vp"])
def test_derivatives_match_finite_differences(sde):
    """fp64, no dropout: jvp in the label and a double-backward HVP agree with central
    differences (the FPE regularizer relies on both being exact)."""
    torch.manual_seed(1)
    net = randomize_(build_model(tiny_cfg(sde, dropout=0.0, image_size=12, ch_mult=[1, 2],
                                          attn_resolutions=[6]))).double().eval()
    x = torch.randn(1, 1, 12, 12, dtype=torch.float64)
    lab = labels_for(sde, 1).double()
    dl = lab.clone() if sde == "ve" else torch.ones_like(lab)  # d sigma = sigma d log sigma
    with sdpa_kernel([SDPBackend.MATH]):
        _, tan = torch.func.jvp(lambda l: net(x, l), (lab,), (dl,))
        e = 1e-6
        fd = (net(x, lab + e * dl) - net(x, lab - e * dl)) / (2 * e)
        assert tan.abs().max() > 1e-4
        torch.testing.assert_close(tan, fd, rtol=1e-5, atol=1e-7)

        v, u = torch.randn_like(x), torch.randn_like(x)

        def grad_of(xx):
            xx = xx.detach().requires_grad_(True)
            (g,) = torch.autograd.grad((net(xx, lab) * v).sum(), xx, create_graph=True)
            return xx, g
        xx, g = grad_of(x)
        (hvp,) = torch.autograd.grad((g * u).sum(), xx)
        h = 1e-4
        fd = (grad_of(x + h * u)[1] - grad_of(x - h * u)[1]) / (2 * h)
        torch.testing.assert_close(hvp, fd.detach(), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- FIR resampling
def test_fir_resampling_ground_truth():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    # taps [1, 1] reduce to nearest upsampling and 2x2 average pooling
    torch.testing.assert_close(fir.upsample_2d(x, (1, 1)), F.interpolate(x, scale_factor=2, mode="nearest"))
    torch.testing.assert_close(fir.downsample_2d(x, (1, 1)), F.avg_pool2d(x, 2))
    # [1, 3, 3, 1]: an impulse at pixel 3 spreads to output pixels 5..8 as [1, 3, 3, 1] / 4 (per axis)
    imp = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    imp[0, 0, 3, 3] = 1.0
    k1 = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64) / 4
    up = torch.zeros(16, 16, dtype=torch.float64)
    up[5:9, 5:9] = torch.outer(k1, k1)
    torch.testing.assert_close(fir.upsample_2d(imp)[0, 0], up)
    # downsampling an impulse at pixel 4: outputs 1 and 2 get 1/8 and 3/8 (per axis)
    imp = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    imp[0, 0, 4, 4] = 1.0
    d1 = torch.tensor([0.0, 1.0, 3.0, 0.0], dtype=torch.float64) / 8
    torch.testing.assert_close(fir.downsample_2d(imp)[0, 0], torch.outer(d1, d1))
    # the fused conv versions equal "resample then conv" away from the border
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    a, b = fir.conv_downsample_2d(x, w), fir.downsample_2d(F.conv2d(x, w, padding=1))
    assert a.shape == (2, 4, 4, 4)
    torch.testing.assert_close(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1])
    a, b = fir.upsample_conv_2d(x, w), F.conv2d(fir.upsample_2d(x), w, padding=1)
    assert a.shape == (2, 4, 16, 16)
    torch.testing.assert_close(a[..., 2:-2, 2:-2], b[..., 2:-2, 2:-2])


def test_attention_heads_one_matches_dense_softmax():
    """num_heads=1 is score_sde's channel attention: softmax(q·k / sqrt(C)) v."""
    from pipeline.models.layers import AttnBlock
    torch.manual_seed(0)
    blk = randomize_(AttnBlock(8, skip_rescale=True), std=0.3)
    x = torch.randn(2, 8, 4, 4)
    h = blk.GroupNorm_0(x)
    q, k, v = blk.NIN_0(h), blk.NIN_1(h), blk.NIN_2(h)
    w = torch.einsum("bchw,bcij->bhwij", q, k).reshape(2, 4, 4, 16) * 8 ** -0.5
    w = w.softmax(-1).reshape(2, 4, 4, 4, 4)
    ref = (x + blk.NIN_3(torch.einsum("bhwij,bcij->bchw", w, v))) / 2 ** 0.5
    torch.testing.assert_close(blk(x), ref)
    blk2 = copy.deepcopy(blk)
    blk2.num_heads = 2
    assert not torch.allclose(blk2(x), ref)
