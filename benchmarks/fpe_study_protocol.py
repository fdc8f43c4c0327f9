"""The FP-Diffusion study's design (benchmarks/fpe_study.py, issue 24), fixed before anything runs: the
cost knobs (SCALE) and ``protocol()``, which the study writes to OUT/protocol.json."""
from __future__ import annotations

import dataclasses

from pipeline.config import FPEConfig
from pipeline.fpe import subsample_size

from fpe_study_stats import EXPECTED_EFFECT

# Cost knobs: N of every metric, steps, seeds; "model": overrides of the config's model (quick only).
SCALE = {
    "full": dict(base_steps=None, finetune_steps=1500, ckpt_every=500, seeds={"a": 5, "b": 5, "c": 2},
                 digit_images=120_000, bpd_n=256, bpd_tol=1e-5, bpd_batch=64, fpe_n=256, fpe_times=10,
                 cons_n=256, cons_buckets=10, fid_n=2000, ode_n=1000, pc_steps=None,
                 inception_ref_shards=2, inception_n=None, gate_fid_n=2000, train_grid_samples=16,
                 ode_tol=None, model=[]),
    "quick": dict(base_steps=6, finetune_steps=3, ckpt_every=3, seeds={"a": 2, "b": 2, "c": 1},
                  digit_images=2000, bpd_n=4, bpd_tol=1e-2, bpd_batch=4, fpe_n=4, fpe_times=3,
                  cons_n=4, cons_buckets=2, fid_n=48, ode_n=24, pc_steps=4,
                  inception_ref_shards=1, inception_n=None, gate_fid_n=32, train_grid_samples=4,
                  ode_tol=1e-2, model=["model.nf=8", "model.ch_mult=[1,2]", "model.attn_resolutions=[]"]),
}
EVAL_SEED = 0  # the same test images, dequantisation, probes, times and sampling noise for every arm
PAPER_ALPHA = 0.15


def protocol(scale: dict, cfg: dict) -> dict:
    """The study's design, fixed before anything runs (OUT/protocol.json)."""
    batch = int(cfg["training"]["batch_size"])
    default_sub = FPEConfig.subsample
    fpe = ["fpe.enabled=true", f"fpe.alpha={PAPER_ALPHA}", "fpe.weighting=likelihood"]
    arms = {
        "a": {"label": "(a) DSM only", "overrides": ["fpe.enabled=false"]},
        "b": {"label": f"(b) DSM + FPE, α={PAPER_ALPHA}, default subsample",
              "overrides": fpe + [f"fpe.subsample={default_sub}"],
              "fpe_samples_per_step": subsample_size(default_sub, batch)},
        "c": {"label": f"(c) DSM + FPE, α={PAPER_ALPHA}, subsample 1/8", "overrides": fpe + ["fpe.subsample=0.125"],
              "fpe_samples_per_step": subsample_size(0.125, batch)},
    }
    for k, arm in arms.items():
        arm["seeds"] = list(range(scale["seeds"][k]))
    lw = bool(cfg["training"].get("likelihood_weighting", False))
    return {
        "question": "does the score-FPE regularizer lower bits/dim, the FPE residual and the score's Jacobian "
                    "asymmetry (FP-Diffusion's claims), and at what cost in sample quality and time?",
        "arms": arms, "finetune_steps": scale["finetune_steps"], "batch_size": batch,
        "start": "every arm continues the same base checkpoint (training.init_from=the base run: weights, EMA, "
                 "Adam state, schedule position); only the objective and training.seed change",
        "pairing": "seed s of every arm: the same training.seed; every arm is scored on the same test images, "
                   f"dequantisation, probes, times and sampling noise (eval seed {EVAL_SEED})",
        "fpe_settings": f"the paper's: alpha {PAPER_ALPHA}, residual weighted by g(t)^2 (fpe.weighting=likelihood), "
                        f"other fpe.* at fpdiff's defaults (fpe_defaults); default subsample {default_sub} of a batch",
        "fpe_defaults": {f.name: getattr(FPEConfig, f.name) for f in dataclasses.fields(FPEConfig)
                         if f.name not in ("enabled", "alpha", "weighting", "subsample")},
        "dsm_weighting": ("likelihood weighting (g^2), as the base uses it" if lw else
                          "the base's unweighted DSM loss (training.likelihood_weighting=false: the "
                          "score-matching weighting lambda(t)=sigma(t)^2), as the base uses it; the official "
                          "code's likelihood weighting is not applied because the base does not use it"),
        "alpha_search": "none: alpha is the paper's 0.15, chosen before any run",
        "metrics": {
            "bpd": f"fpdiff eval bpd: first {scale['bpd_n']} test images, rtol=atol={scale['bpd_tol']:g}",
            "fpe": f"fpdiff eval fpe: first {scale['fpe_n']} test images, {scale['fpe_times']} times; its mean and "
                   "its g(t)^2-weighted mean over the t-grid",
            "conservativity": f"fpdiff eval conservativity: first {scale['cons_n']} test images, "
                              f"{scale['cons_buckets']} t-buckets",
            "fid_pc": f"fpdiff eval fid: {scale['fid_n']} PC samples (seed {EVAL_SEED}) in the digit network's "
                      "features, FID and KID against the test set; legibility by the digit judge",
            "fid_ode": f"fpdiff eval fid --sampler ode: {scale['ode_n']} samples (seed {EVAL_SEED}); ODE-PC gap: "
                       "FID between the ODE set and the first as many PC samples",
            "fid_inception": "Inception FID of the PC samples, arms (a) and (b), when an Inception file is given",
            "s_per_step": "training seconds per step of each arm, with the thread count",
        },
        "gate": "the base's last two checkpoints: bits/dim (same inputs as the arms) and legible share "
                f"({scale['gate_fid_n']} PC samples); converged when bits/dim moved less than "
                f"{EXPECTED_EFFECT['bpd']} (the effect the study looks for) and the legible share "
                "within its 95% interval",
        "statistics": "per arm: mean over seeds with a 95% t-interval; paired differences (b - a, c - a) per "
                      "seed with a 95% t-interval (scipy.stats.t) of their mean",
        "expected_detectable_effect": EXPECTED_EFFECT,
    }
