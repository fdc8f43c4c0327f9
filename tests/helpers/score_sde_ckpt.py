"""score_sde checkpoints for the import tests: reduced sizes of each config's layout, a checkpoint
file as score_sde's utils.save_checkpoint writes it, and ``fpdiff import score-sde`` on one."""
from __future__ import annotations

import torch

import score_sde_reference as ref
from pipeline.cli import main as cli

# reduced width / resolution / depth with each config's layout pattern (embedding, FIR, pyramids)
SMALL = {"cifar10": ["model.nf=8", "data.image_size=16", "model.num_res_blocks=1"],
         "256": ["model.nf=8", "data.image_size=32", "model.ch_mult=[1,1,2,2,2]", "model.num_res_blocks=1"],
         "1024": ["model.nf=4", "data.image_size=32", "model.ch_mult=[1,2,4,8,8]"]}


def small_overrides(name: str) -> list[str]:
    if "cifar10" in name:
        return SMALL["cifar10"] + (["model.num_res_blocks=2"] if "deep" in name else [])
    return SMALL["1024" if name in ("ve/ffhq_ncsnpp_continuous", "ve/celebahq_ncsnpp_continuous") else "256"]


def write_checkpoint(path, cfg, seed=0, edit=None):
    """A checkpoint file as score_sde's utils.save_checkpoint writes it; returns (model state,
    EMA shadow list)."""
    g = torch.Generator().manual_seed(seed)
    state, trainable = ref.score_sde_state(cfg, g)
    shadow = [state[k] + 0.01 * torch.randn(state[k].shape, generator=g) for k in trainable]
    # score_sde's Adam over model.parameters() (the frozen Fourier W included, without state)
    params = [k for k in state if k != "module.sigmas"]
    opt = {"state": {i: {"step": torch.tensor(7.0), "exp_avg": 0.01 * torch.randn(state[k].shape, generator=g),
                         "exp_avg_sq": 1e-4 * torch.rand(state[k].shape, generator=g)}
                     for i, k in enumerate(params) if k in trainable},
           "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0,
                             "amsgrad": False, "params": list(range(len(params)))}]}
    ckpt = {"optimizer": opt, "model": state, "ema": {"decay": 0.999, "num_updates": 7, "shadow_params": shadow},
            "step": 7}
    if edit:
        edit(ckpt)
    torch.save(ckpt, path)
    return state, shadow


def run_import(tmp_path, name, ckpt, out="run", extra=()):
    return cli(["import", "score-sde", str(ckpt), "--config", name, "--out", str(tmp_path / out),
                *small_overrides(name), *extra])
