"""``fpdiff import score-sde``: checkpoints built exactly as score_sde_pytorch writes them
(tests/score_sde_reference.py, an independent reading of its NCSNpp), imported, and compared
with score_sde's forward pass layer by layer on random weights. Fast, CPU only."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file

import score_sde_reference as ref
from pipeline.cli import main as cli
from pipeline.publish.hub import load_weights_into
from pipeline.rundir import load_for_eval
from pipeline.models import build_model
from pipeline.publish.score_sde_import import SCORE_SDE_CONFIGS, fpdiff_config

from helpers.score_sde_ckpt import run_import, small_overrides, write_checkpoint


def labels_for(cfg, b):
    u = torch.rand(b)
    if cfg.sde.type == "ve":
        return cfg.sde.sigma_min * (cfg.sde.sigma_max / cfg.sde.sigma_min) ** u
    return 999.0 * u


# --------------------------------------------------------------------------- full-size layouts
@pytest.mark.parametrize("name", sorted(SCORE_SDE_CONFIGS))
def test_full_size_keys_and_shapes_match_score_sde(name):
    """Every key and shape of score_sde's NCSNpp for the real config (meta device: no memory)."""
    cfg = fpdiff_config(name)
    keys, trainable = ref.score_sde_state(cfg, shapes_only=True)
    with torch.device("meta"):
        net = build_model(cfg)
    ours = [(f"module.{k}", tuple(v.shape)) for k, v in net.state_dict().items()]
    assert keys[0][0] == "module.sigmas"
    assert ours == keys[1:]  # same keys, shapes and order
    assert [f"module.{n}" for n, p in net.named_parameters() if p.requires_grad] == trainable


def test_high_res_layout_details():
    """CelebA-HQ 256: the merge conv is Conv_0, the FIR pyramid resamplers take no index."""
    with torch.device("meta"):
        net = build_model(fpdiff_config("ve/celebahq_256_ncsnpp_continuous"))
    s = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    # conv_in 3, then level 0: 2 res blocks + down res block (4..6), then Combine at 7
    assert s["all_modules.7.Conv_0.weight"] == (128, 3, 1, 1) and "all_modules.7.Conv.weight" not in s
    assert not any(k.startswith("pyramid_") for k in s)


# --------------------------------------------------------------------------- layer by layer
@pytest.mark.parametrize("name", sorted(SCORE_SDE_CONFIGS))
def test_import_equals_score_sde_layer_by_layer(tmp_path, name):
    torch.manual_seed(1)
    cfg = fpdiff_config(name, small_overrides(name))
    state, shadow = write_checkpoint(tmp_path / "checkpoint_7.pth", cfg)
    assert run_import(tmp_path, name, tmp_path / "checkpoint_7.pth") == 0
    run = tmp_path / "run"
    x = torch.rand(2, 3, cfg.data.image_size, cfg.data.image_size)
    if cfg.data.centered:
        x = 2 * x - 1
    labels = labels_for(cfg, 2)
    ema_state = dict(state)
    _, trainable = ref.score_sde_state(cfg, shapes_only=True)
    ema_state.update(zip(trainable, shadow))
    for weights, want_state in ((run / "imported" / "model.safetensors", state),
                                (run / "export" / "ema.safetensors", ema_state)):
        net = build_model(cfg).eval()
        net.load_state_dict(load_file(str(weights)))
        seen = {}
        hooks = [mod.register_forward_hook(lambda _m, _i, out, i=i: seen.__setitem__(i, out))
                 for i, mod in enumerate(net.all_modules)]
        with torch.no_grad():
            out = net(x, labels)
            want, want_layers = ref.forward(want_state, cfg, x, labels)
        for h in hooks:
            h.remove()
        assert sorted(seen) == sorted(want_layers) == list(range(len(net.all_modules)))
        for i in want_layers:
            torch.testing.assert_close(seen[i], want_layers[i], rtol=1e-4, atol=1e-4, msg=f"all_modules.{i}")
        assert min(float(t.abs().mean()) for t in want_layers.values()) > 1e-2  # random weights: no layer ~ 0
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_imported_run_samples_and_initialises_finetuning(tmp_path):
    name = "ve/cifar10_ncsnpp_continuous"
    cfg = fpdiff_config(name, small_overrides(name))
    write_checkpoint(tmp_path / "c.pth", cfg)
    assert run_import(tmp_path, name, tmp_path / "c.pth") == 0
    run = tmp_path / "run"
    model, cfg2, _ = load_for_eval(run)
    assert cfg2.sde.type == "ve" and cfg2.sde.sigma_max == 50.0 and cfg2.model.progressive_input == "residual"
    ft = build_model(cfg2)
    assert load_weights_into(ft, run) == run / "export" / "ema.safetensors"  # training.init_from=RUN
    for (k, a), b in zip(ft.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert cli(["sample", "--run-dir", str(run), "--num-samples", "2", "sampling.num_steps=3"]) == 0
    assert (run / "samples" / "sample-001" / "grid.png").is_file()  # a new folder each call
    info = (run / "imported" / "import.json").read_text()
    assert '"step": 7' in info and '"ema_decay": 0.999' in info


# --------------------------------------------------------------------------- refusals
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_payload_is_refused_and_never_executed(tmp_path, capsys):
    name = "vp/cifar10_ddpmpp_continuous"
    cfg = fpdiff_config(name, small_overrides(name))
    marker = tmp_path / "pwned"
    write_checkpoint(tmp_path / "evil.pth", cfg, edit=lambda c: c.__setitem__("extra", _Payload(marker)))
    assert run_import(tmp_path, name, tmp_path / "evil.pth") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused" in err and "arbitrary unpickling" in err
    assert not marker.exists() and not (tmp_path / "run").exists()
    torch.load(tmp_path / "evil.pth", weights_only=False)  # the payload is live: a plain load runs it
    assert marker.exists()


def _drop_key(key):
    return lambda c: c["model"].pop(key)


@pytest.mark.parametrize("edit,expect", [
    (lambda c: c["model"].__setitem__("module.all_modules.4.Conv_0.weight", torch.zeros(8, 8, 1, 3)),
     "key 'module.all_modules.4.Conv_0.weight': checkpoint shape (8, 8, 1, 3), config {n} expects (8, 8, 3, 3)"),
    (_drop_key("module.sigmas"), "missing key 'module.sigmas'"),
    (lambda c: c["model"].__setitem__("module.sigmas", c["model"]["module.sigmas"][:10]),
     "key 'module.sigmas': checkpoint shape (10,), config {n} expects (1000,)"),
    (lambda c: c["model"].__setitem__("module.sigmas", c["model"]["module.sigmas"] * 2),
     "key 'module.sigmas': noise levels 100..0.02 differ"),
    (_drop_key("module.all_modules.7.Conv2d_0.bias"), "missing key 'module.all_modules.7.Conv2d_0.bias'"),
    (lambda c: c["model"].__setitem__("module.all_modules.99.W", torch.zeros(3)), "unexpected key 'module.all_modules.99.W'"),
    (lambda c: c["ema"]["shadow_params"].pop(), "ema: shadow_params has"),
])
def test_mismatch_fails_in_one_line_and_writes_nothing(tmp_path, capsys, edit, expect):
    name = "ve/cifar10_ncsnpp_continuous"
    cfg = fpdiff_config(name, small_overrides(name))
    write_checkpoint(tmp_path / "c.pth", cfg, edit=edit)
    assert run_import(tmp_path, name, tmp_path / "c.pth") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect.format(n=name) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth"]  # no run dir, no staging leftovers


def test_wrong_config_names_first_mismatch(tmp_path, capsys):
    """A VP DDPM++ checkpoint imported as NCSN++ (VE): first differing key named with both shapes."""
    vp = fpdiff_config("vp/cifar10_ddpmpp_continuous", small_overrides("vp/cifar10_ddpmpp_continuous"))
    write_checkpoint(tmp_path / "c.pth", vp)
    assert run_import(tmp_path, "ve/cifar10_ncsnpp_continuous", tmp_path / "c.pth") == 2
    err = capsys.readouterr().err.strip()
    assert "missing key 'module.all_modules.0.W'" in err or "checkpoint shape" in err, err
    assert not (tmp_path / "run").exists()


def test_fine_tuning_recipe_runs_with_the_regularizer(tmp_path):
    """README's two commands: import, then train from it (training.init_from) with fpe on."""
    import numpy as np

    from pipeline.data.shards import shards_main

    name = "ve/cifar10_ncsnpp_continuous"
    write_checkpoint(tmp_path / "c.pth", fpdiff_config(name, small_overrides(name)))
    assert run_import(tmp_path, name, tmp_path / "c.pth") == 0
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "x.npz", x=rng.integers(0, 256, (8, 16, 16, 3)).astype(np.uint8), y=np.zeros(8, np.int64))
    assert shards_main([str(tmp_path / "x.npz"), "--out", str(tmp_path / "shards")]) == 0
    run, ft = tmp_path / "run", tmp_path / "ft"
    assert cli(["train", "--config", str(run / "config.yaml"), "--run-dir", str(ft), f"training.init_from={run}",
                "fpe.enabled=true", "training.n_steps=2", "training.batch_size=4", "training.ckpt_every=2",
                "sampling.num_steps=2", "sampling.num_samples=2", f"data.shards={tmp_path / 'shards' / 'x-000000.tar'}",
                "logging.backend=none"]) == 0
    assert (ft / "export" / "ema.safetensors").is_file()
    # it continued the checkpoint (step 7, its Adam state and EMA position) for 2 more steps
    record = json.loads((ft / "init_from.json").read_text())
    assert record["kind"] == "imported" and record["optimizer"] and record["start_step"] == 7
    assert record["ema_updates"] == 7 and record["fresh"] == {"data": "the imported has no data position"}
    last = sorted((ft / "checkpoints").glob("step_*"))[-1]
    assert last.name == "step_00000009"
    adam = torch.load(last / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert {float(st["step"]) for st in adam.values()} == {9.0}


def test_import_keeps_the_optimizer_and_fine_tuning_continues_it(tmp_path, mnist_shards):
    """imported/optimizer.pt holds the checkpoint's Adam moments mapped from score_sde's
    model.parameters() order to fpdiff's trainable parameters; init_from on the imported run
    continues them, its step (7) and EMA position (7 updates)."""
    from pipeline.rundir import RunDir
    from pipeline.train.init_source import load_init_source

    name = "ve/cifar10_ncsnpp_continuous"
    cfg = fpdiff_config(name, small_overrides(name))
    write_checkpoint(tmp_path / "c.pth", cfg)
    raw = torch.load(tmp_path / "c.pth", weights_only=True)
    assert run_import(tmp_path, name, tmp_path / "c.pth") == 0
    run = RunDir(tmp_path / "run")
    saved = torch.load(run.imported / "optimizer.pt", weights_only=True)["optimizer"]
    model = build_model(cfg)
    names = [n for n, _ in model.named_parameters()]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) < len(names)  # the Fourier W is frozen: the two orders differ
    for j, n in enumerate(trainable):
        src = raw["optimizer"]["state"][names.index(n)]
        assert torch.equal(saved["state"][j]["exp_avg"], src["exp_avg"]), n
        assert torch.equal(saved["state"][j]["exp_avg_sq"], src["exp_avg_sq"]), n
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    opt.load_state_dict(saved)  # fits fpdiff's optimizer as built by the trainer
    source = load_init_source(str(run.path))
    assert source.kind == "imported" and source.step == 7 and source.ema_updates == 7
    assert source.optimizer is not None and source.model is not None


def test_import_without_optimizer_notes_it_and_bad_moments_are_refused(tmp_path, capsys):
    name = "ve/cifar10_ncsnpp_continuous"
    cfg = fpdiff_config(name, small_overrides(name))
    write_checkpoint(tmp_path / "a.pth", cfg, edit=lambda c: c.pop("optimizer"))
    assert run_import(tmp_path, name, tmp_path / "a.pth", out="a") == 0
    err = capsys.readouterr().err
    assert "has no optimizer entry; a fine-tune from it starts a fresh Adam" in err
    assert not (tmp_path / "a" / "imported" / "optimizer.pt").exists()

    def shrink(c):
        first = min(c["optimizer"]["state"])
        c["optimizer"]["state"][first]["exp_avg"] = c["optimizer"]["state"][first]["exp_avg"][:1]
    write_checkpoint(tmp_path / "b.pth", cfg, edit=shrink)
    assert run_import(tmp_path, name, tmp_path / "b.pth", out="b") == 2
    err = capsys.readouterr().err
    assert "optimizer: parameter" in err and "exp_avg: checkpoint shape" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
