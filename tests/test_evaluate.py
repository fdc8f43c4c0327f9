"""Evaluation stage: loading runs, bits/dim convention against closed-form Gaussians,
every test sample counted, 2-process bpd == 1-process bpd (same data and probe seeds)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers.eval_fixtures import (EVAL_WORKER, TINY_OVERRIDES, StandIn, build_extractor, clean_env, make_export,
                                    random_ref, run_eval, write_test_shards)


# --------------------------------------------------------------------------- loading
def test_load_for_eval_from_run_checkpoint_and_export(tmp_path):
    from pipeline.train.checkpoint import save_checkpoint
    from pipeline.config_files import load_config, save_config
    from pipeline.rundir import RunDir, find_weights, load_for_eval
    from pipeline.publish.export import write_export
    from pipeline.models import build_model

    cfg = load_config(None, TINY_OVERRIDES)
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    m = build_model(cfg)
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in m.state_dict().items()}
    save_checkpoint(run, 5, model_state=m.state_dict(), ema_state=m.state_dict(), optimizer_state={},
                    extra_state={}, json_state={}, keep_last=3)
    save_checkpoint(run, 12, model_state=m.state_dict(), ema_state=ema, optimizer_state={},
                    extra_state={}, json_state={}, keep_last=3)
    write_export(run / "export", ema, cfg.to_dict(), {"step": 12})
    for src, step in ((run, 12), (run / "checkpoints" / "step_00000005", 5), (run / "export", 12)):
        model, cfg2, got = load_for_eval(src, overrides=["sampling.num_steps=9"])
        assert got == step and cfg2.sampling.num_steps == 9 and not model.training
        want = m.state_dict() if step == 5 else ema
        for k, v in model.state_dict().items():
            assert torch.equal(v, want[k]), k
        assert find_weights(src).run == RunDir(run)
    with pytest.raises(FileNotFoundError):
        load_for_eval(tmp_path / "nothing")


# --------------------------------------------------------------------------- bpd convention
class GaussianScoreModel(nn.Module):
    """The exact score of p_t when p_0 = N(m, s² I), in the network parameterisation of
    pipeline.score (VE: the score, labels σ(t); VP/sub-VP: -score·std(t), labels 999 t)."""

    def __init__(self, sde, m: float, s: float):
        super().__init__()
        self.sde, self.m, self.s = sde, m, s

    def forward(self, x, labels):
        from pipeline.sde import VESDE, bcast
        if isinstance(self.sde, VESDE):
            var = self.s ** 2 + labels ** 2
            return -(x - self.m) / bcast(var, x)
        t = labels / 999.0
        a, std = self.sde.mean_coeff(t), self.sde.marginal_std(t)
        var = a * a * self.s ** 2 + std * std
        return (x - bcast(a, x) * self.m) / bcast(var, x) * bcast(std, x)


def exact_bpd(sde, x, m, s, eps, centered):
    from pipeline.likelihood import data_bpd_offset
    t = torch.full((x.shape[0],), eps, dtype=torch.float64)
    a, std = sde.mean_coeff(t), sde.marginal_std(t)
    var = (a * a * s * s + std * std).view(-1, 1)
    xf = x.double().flatten(1)
    logp = (-0.5 * (xf - a.view(-1, 1) * m) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).sum(1)
    return -logp / (xf.shape[1] * math.log(2)) + data_bpd_offset(centered)


@pytest.mark.parametrize("sde_type", ["ve", "vp", "subvp"])
def test_bpd_matches_closed_form_gaussian(sde_type):
    """Through evaluate_bpd (data path, offset, gathering): exact trace within 0.01 bits/dim
    of the exact Gaussian density; Gaussian Hutchinson probes over passes within 4 SE."""
    from pipeline.config_files import load_config
    from pipeline.eval.bpd import evaluate_bpd
    from pipeline.images import to_model_space
    from pipeline.sde import build_sde

    overrides = ["data.image_size=4", "data.num_channels=1", "model.ch_mult=[1]", f"sde.type={sde_type}",
                 "data.centered=true", "model.embedding_type=" + ("fourier" if sde_type == "ve" else "positional")]
    cfg = load_config(None, overrides)
    sde = build_sde(cfg.sde)
    m, s = 0.1, 0.4
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (5, 1, 4, 4), generator=g, dtype=torch.uint8)
    model = GaussianScoreModel(sde, m, s)
    eps = 1e-5
    truth = exact_bpd(sde, to_model_space(u8, True), m, s, eps, True)
    exact = load_config(None, overrides + ["eval.batch_size=2", "eval.hutchinson=exact", "eval.dequantize=false",
                                           f"eval.likelihood_eps={eps}"])
    res = evaluate_bpd(model, exact, sde, images=u8, progress=False, return_per_sample=True)
    assert res["N"] == 5 and res["offset_bits"] == 7.0
    np.testing.assert_array_equal(res["index"], np.arange(5))
    np.testing.assert_allclose(res["per_sample"][:, 0], truth.numpy(), atol=0.01)
    probes = load_config(None, overrides + ["eval.batch_size=5", "eval.hutchinson=gaussian", "eval.bpd_passes=12",
                                            "eval.dequantize=false", f"eval.likelihood_eps={eps}", "eval.rtol=1e-4",
                                            "eval.atol=1e-4"])
    hut = evaluate_bpd(model, probes, sde, images=u8, progress=False, return_per_sample=True)
    per = hut["per_sample"]  # (5, passes)
    se = per.std(1, ddof=1) / math.sqrt(per.shape[1])
    assert np.all(np.abs(per.mean(1) - res["per_sample"][:, 0]) <= 4 * se + 2e-3)


@pytest.mark.parametrize("argv, expected", [
    (["bpd", "RUN", "eval.seed=4", "--seed", "3", "--passes", "2", "--rtol", "1e-4", "--eps", "0.001",
      "--hutchinson", "exact", "--shards", "t/test-{000000..000002}.tar", "--no-dequantize"],
     {"eval.seed": 3, "eval.bpd_passes": 2, "eval.rtol": 1e-4, "eval.likelihood_eps": 1e-3, "eval.hutchinson": "exact",
      "data.test_shards": "t/test-{000000..000002}.tar", "eval.dequantize": False, "eval.atol": 1e-5}),
    (["fid", "RUN", "--num-samples", "11", "--batch-size", "3", "--sampler", "ode", "--no-kid",
      "--ref-stats", "cifar10:train", "--feature-extractor", "fe 1.pt"],
     {"eval.fid_num_samples": 11, "eval.batch_size": 3, "eval.sampler": "ode", "eval.kid": False,
      "eval.ref_stats": "cifar10:train", "eval.feature_extractor": "fe 1.pt", "eval.seed": 0}),
    (["fpe", "RUN", "eval.fpe_num_times=9", "--num-times", "4", "--max-samples", "7", "--shards", "t/a.tar", "--seed", "2"],
     {"eval.fpe_num_times": 4, "eval.fpe_max_samples": 7, "data.test_shards": "t/a.tar", "eval.seed": 2,
      "eval.batch_size": 100}),
    (["conservativity", "RUN", "--num-buckets", "3", "--probes", "2", "--max-samples", "5", "--batch-size", "4"],
     {"eval.conservativity_buckets": 3, "eval.conservativity_probes": 2, "eval.conservativity_max_samples": 5,
      "eval.batch_size": 4, "eval.fpe_max_samples": 256, "eval.seed": 0}),
    (["conservativity", "RUN"], {"eval.conservativity_buckets": 10, "eval.conservativity_probes": 1,
                                 "eval.conservativity_max_samples": 256}),
])
def test_eval_flags_become_config_overrides(argv, expected):
    """What ``fpdiff eval METRIC`` flags ask for reaches the metric as the config it reads: each
    given flag is a dotted override after the typed ones (the flag wins), the rest keep their defaults."""
    from pipeline.config_files import load_config
    from pipeline.eval.cli import build_parser, flag_overrides

    args = build_parser().parse_args(argv)
    cfg = load_config(None, list(args.overrides) + flag_overrides(args))
    for key, value in expected.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value, key


def test_bpd_offset_convention():
    from pipeline.likelihood import data_bpd_offset
    from pipeline.images import to_model_space
    assert data_bpd_offset(False) == 8.0 and data_bpd_offset(True) == 7.0
    u8 = torch.tensor([0, 255], dtype=torch.uint8)
    assert to_model_space(u8, False).tolist() == [0.0, 1.0]
    assert to_model_space(u8, True).tolist() == [-1.0, 1.0]
    noise = torch.tensor([0.0, 0.999])
    x = to_model_space(u8, False, noise)  # (k + u)/256 in [0, 1)
    assert x[0] == 0.0 and x[1] < 1.0


# --------------------------------------------------------------------------- distributed
@pytest.mark.slow
def test_bpd_two_processes_equal_one_process(tmp_path):
    """11 test images in 3 uneven shards, batch 4 (last batch partial): every image counts;
    2 ranks give the same per-pass means, mean and standard error as 1 rank."""
    pattern = write_test_shards(tmp_path / "shards", sizes=(5, 2, 4))
    export = make_export(tmp_path / "run")
    worker = EVAL_WORKER
    env = clean_env()
    out = {}
    for procs in (1, 2):
        run_eval(worker, ["bpd", str(export), "--shards", pattern, "--batch-size", "4", "--passes", "2",
                          "--rtol", "1e-4", "--atol", "1e-4", "--no-progress",
                          "--out", str(tmp_path / f"bpd{procs}.json")], procs, env)
        out[procs] = json.loads((tmp_path / f"bpd{procs}.json").read_text())
    one, two = out[1], out[2]
    assert one["N"] == two["N"] == 11 and two["world_size"] == 2 and one["passes"] == 2
    assert two["value"] == pytest.approx(one["value"], rel=1e-6)
    assert two["stderr"] == pytest.approx(one["stderr"], rel=1e-5)
    assert two["pass_means"] == pytest.approx(one["pass_means"], rel=1e-6)
    assert one["pass_means"][0] != one["pass_means"][1]  # fresh dequantisation noise per pass
    assert one["nfe"] > 0 and one["dequantize"] is True and one["offset_bits"] == 8.0
    lines = (tmp_path / "run" / "summary.txt").read_text().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["eval bpd", "eval bpd"]


def test_fpe_residual_over_t_grid():
    """`fpdiff eval fpe`: the FPE residual of a (stand-in) model over a t-grid, all samples."""
    from pipeline.config_files import load_config
    from pipeline.eval.cli import build_parser
    from pipeline.collectives import seed_for
    from pipeline.eval.fpe import evaluate_fpe, fpe_residual_by_t
    from pipeline.fpe import ResidualEstimator
    from pipeline.images import to_model_space
    from pipeline.sde import build_sde

    cfg = load_config(None, TINY_OVERRIDES)
    sde = build_sde(cfg.sde)
    u8 = torch.randint(0, 256, (5, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    model = StandIn(1)
    res = evaluate_fpe(model, load_config(None, TINY_OVERRIDES + ["eval.batch_size=3", "eval.fpe_num_times=3",
                                                                 "eval.fpe_max_samples=5"]), sde, images=u8)
    assert res["N"] == 5 and len(res["t"]) == len(res["norm"]) == len(res["sq_norm"]) == 3
    # the reference: each batch's residual by t (fpe_residual_by_t, the batch's own seed), weighted by
    # its size; the reported norm is the root of the mean, its value the mean over t
    estimator = ResidualEstimator.from_config(cfg.fpe, sde)
    t_grid = torch.linspace(cfg.fpe.t_min, cfg.fpe.t_max, 3)
    sq = sum(fpe_residual_by_t(model.eval(), estimator, to_model_space(u8[k * 3:(k + 1) * 3], cfg.data.centered), t_grid,
                               generator=torch.Generator().manual_seed(seed_for(cfg.eval.seed, k)))["sq_norm"].double()
             * u8[k * 3:(k + 1) * 3].shape[0] for k in range(2)) / 5
    assert res["sq_norm"] == pytest.approx(sq.tolist(), rel=1e-6)
    assert res["norm"] == pytest.approx(sq.clamp_min(0).sqrt().tolist(), rel=1e-6) and min(res["sq_norm"]) > 0
    assert res["value"] == pytest.approx(float(sq.clamp_min(0).sqrt().mean()), rel=1e-6)
    args = build_parser().parse_args(["fpe", "RUN", "--num-times", "4"])
    assert args.cmd == "fpe" and args.num_times == 4


def test_evaluate_in_training(tmp_path):
    """The trainer's eval.every hook: small FID + 1-batch bpd, metrics returned and logged."""
    from pipeline.config_files import load_config
    from pipeline.eval.cli import check_eval_inputs, evaluate_in_training
    from pipeline.sde import build_sde

    fe = build_extractor(tmp_path / "fe.pt")
    ref = random_ref(tmp_path / "ref.npz", fe)
    pattern = write_test_shards(tmp_path / "shards", sizes=(3, 4))
    cfg = load_config(None, TINY_OVERRIDES + [f"eval.feature_extractor={fe}", f"eval.ref_stats={ref}",
                                              "eval.fid_num_samples=6", "eval.batch_size=3",
                                              f"data.test_shards={pattern}", "eval.rtol=1e-3", "eval.atol=1e-3"])
    paths = check_eval_inputs(cfg)
    assert paths["ref_stats"] == ref
    model = StandIn(1).train()
    m = evaluate_in_training(model, cfg, build_sde(cfg.sde), step=40, run_dir=tmp_path)
    assert model.training  # mode restored for the training loop
    assert m["eval/fid_n"] == 6 and m["eval/bpd_n"] == 3 and math.isfinite(m["eval/fid"])
    assert math.isfinite(m["eval/bpd"]) and "eval/kid" in m
    line = json.loads((tmp_path / "eval" / "metrics.jsonl").read_text())
    assert line["step"] == 40 and line["eval/fid"] == m["eval/fid"]
