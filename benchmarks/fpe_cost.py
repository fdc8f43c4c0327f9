"""Cost of the FPE regularizer per training step (issue 3, check 6).

Variants, all measured side by side in one process (round-robin repetitions, median time), each one
optimizer step of the trainer's own step (pipeline.train.step.TrainStep: DSM, backward, clip, Adam,
EMA) with the variant in its regularizer slot:
  (a) dsm            the DSM step alone
  (b) reference      (a) + the residual computed the way sony/fp-diffusion does it on k samples:
                     s, then s recomputed inside a one-Gaussian-probe Hutchinson VJP
                     (create_graph), the x-gradient of (div + ‖s‖² + ⟨x,s⟩) and the reference's
                     3-point finite difference in t (t + 5e-4, t, t − 1e-3): 5 forwards (+ the
                     DSM forward = 6)
  (c) fpdiff         (a) + this project's L_FP, computed by the trainer's own code
                     (pipeline.fpe.FPERegularizer.loss_at, its ResidualEstimator built from the
                     config's fpe section): jvp in t, reverse-over-reverse in x; "1probe" (single
                     estimator) and "2probe" (the unbiased pair), each plain autograd and fused
                     (fpe.fused, pipeline/fused.py); "_first": the parameter gradient through the
                     first probe only (fpe.probe_gradient, the default)
each on the full batch (k = B) and on a subsample k. Reported: time, FLOPs (FlopCounterMode:
matmul / conv / attention FLOPs only), peak RSS increase, and per regularized sample the cost
(variant − dsm)/k relative to (b). ``--components`` adds a per-stage breakdown.

    python benchmarks/fpe_cost.py --model tiny --batch 16 --subsample 2 --repeats 5
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import threading
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

warnings.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pipeline.fused  # noqa: E402
from pipeline.config_files import load_config  # noqa: E402
from pipeline.fpe import FPEOutput, FPERegularizer, flat_dot, fpe_precision  # noqa: E402
from pipeline.score import get_score_fn  # noqa: E402
from pipeline.train.step import TrainStep  # noqa: E402


# --------------------------------------------------------------------------- models
def load(name: str, overrides=None):
    path = {"tiny": "mnist_tiny.yaml", "cifar": "cifar10_ddpmpp.yaml"}[name]
    return load_config(os.path.join(ROOT, "configs", path), overrides)


# --------------------------------------------------------------------------- the regularizers
def reference_residual_loss(model, sde, x, t, g, timer=None):
    """The official code's vector residual (VP), with its estimators, on k samples."""
    tick = timer or (lambda name: None)
    sf = get_score_fn(model, sde)
    x = x.detach().requires_grad_(True)
    t = t.detach()
    D = x[0].numel()
    s = sf(x, t)                                               # forward 1
    eps = torch.randn(x.shape, generator=g, device=g.device).to(x.device)
    score_e = (sf(x, t) * eps).sum()                           # forward 2: s recomputed
    tick("forwards")
    (gse,) = torch.autograd.grad(score_e, x, create_graph=True)
    div = flat_dot(gse, eps)
    tick("vjp")
    g2 = sde.diffusion(t) ** 2
    phi = div + s.flatten(1).pow(2).sum(1) + flat_dot(x, s)
    (grad_phi,) = torch.autograd.grad(phi.sum(), x, create_graph=True)
    rhs = 0.5 * g2.view(-1, 1, 1, 1) * grad_phi
    tick("double_backward")
    hs, hd = 1e-3, 5e-4                                        # forwards 3-5
    dsdt = (hs ** 2 * sf(x, t + hd) + (hd ** 2 - hs ** 2) * sf(x, t) - hd ** 2 * sf(x, t - hs)) / (hs * hd * (hd + hs))
    tick("fd_forwards")
    res = (dsdt - rhs).flatten(1).norm(dim=1) ** 2
    return (g2 * res).mean() / D ** 2


class ReferenceRegularizer:
    """(b): the official code's residual on k random samples of the micro-batch, in the trainer's
    regularizer slot (``TrainStep.regularizer``)."""

    def __init__(self, fpe_cfg, sde, k: int):
        self.alpha, self.sde, self.k, self.timer = fpe_cfg.alpha, sde, k, None

    def __call__(self, model, x0, xt, t, *, step=0, generator=None, class_labels=None):
        if self.timer:
            self.timer("dsm_forward")
        idx = torch.randperm(x0.shape[0], generator=generator, device=generator.device)[:self.k].to(x0.device)
        xs, ts = xt[idx], t[idx].clamp_min(2e-3)
        with fpe_precision(x0.device):
            loss = self.alpha * reference_residual_loss(model, self.sde, xs, ts, generator, self.timer)
        return FPEOutput(loss=loss, residual_norm=loss.detach().expand(ts.shape), t=ts, indices=idx,
                         sq_norm=loss.detach().expand(ts.shape))


class StagedRegularizer(FPERegularizer):
    """(c): the trainer's regularizer, its stages timed when ``timer`` is set (``--components``)."""

    timer = None

    def __call__(self, *args, **kwargs):
        if self.timer:
            self.timer("dsm_forward")
        return super().__call__(*args, **kwargs)

    def loss_at(self, score_fn, xs, ts, **kwargs):
        return super().loss_at(score_fn, xs, ts, stage=self.timer, **kwargs)


def variant_regularizer(variant: str, cfg, sde, k: int):
    """None for dsm; the reference; or ours_<n>probe_<plain|fused>[_first]: the config's fpe section
    with the variant's probes, on k samples."""
    if variant == "dsm":
        return None
    if variant == "reference":
        return ReferenceRegularizer(cfg.fpe, sde, k)
    parts = variant.split("_")
    n_probes = int(parts[1][0])
    return StagedRegularizer(dataclasses.replace(
        cfg.fpe, enabled=True, every=1, subsample=k, n_probes=n_probes, fused=parts[2] == "fused",
        probe_gradient="first" if parts[3:] == ["first"] else "all",
        norm_estimator="unbiased" if n_probes > 1 else "single"), sde)


def variant_steps(step: TrainStep, x0: torch.Tensor, cases) -> dict:
    """(variant, k) -> a callable(timer=None): one optimizer step of the trainer on x0 with that
    variant's regularizer (the same model, optimizer and EMA for all: round-robin timing)."""
    regs = {c: variant_regularizer(c[0], step.cfg, step.sde, c[1]) for c in cases}
    take = step.repeat_on(x0)

    def case(reg):
        def run(timer=None):
            step.regularizer = reg
            if reg is not None:
                reg.timer = timer
            take(regularize=reg is not None)
            if x0.device.type == "cuda":
                torch.cuda.synchronize()
            if timer:
                timer("backward_and_update")
        return run
    return {c: case(r) for c, r in regs.items()}


# --------------------------------------------------------------------------- measurement
class PeakRSS:
    def __init__(self):
        import psutil  # deferred: a dev dependency
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = False

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.th = threading.Thread(target=self._poll, daemon=True)
        self.th.start()
        return self

    def _poll(self):
        while not self._stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *a):
        self._stop = True
        self.th.join()

    @property
    def mb(self):
        return (self.peak - self.base) / 2 ** 20


class StageTimer:
    def __init__(self):
        self.t = time.perf_counter()
        self.acc = {}

    def __call__(self, name):
        now = time.perf_counter()
        self.acc[name] = self.acc.get(name, 0.0) + now - self.t
        self.t = now


class FlopCount(TorchDispatchMode):
    """Dispatch-mode FLOP counter with torch's formulas (mm / conv / attention; elementwise
    work counts 0). torch's FlopCounterMode also tracks modules with hooks that break
    autograd.grad, hence this bare version."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry
        self.reg = flop_registry
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        f = self.reg.get(func._overloadpacket)
        if f is not None:
            self.total += f(*args, **kwargs, out_val=out)
        return out


def flops_of(step):
    with FlopCount() as fc:
        step()
    return fc.total


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", choices=["tiny", "cifar"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--subsample", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default="dsm,reference,ours_1probe_plain,ours_1probe_fused,"
                                          "ours_2probe_plain,ours_2probe_fused,ours_2probe_plain_first,"
                                          "ours_2probe_fused_first")
    ap.add_argument("--full", action="store_true", help="also the full batch k = B")
    ap.add_argument("--components", action="store_true")
    ap.add_argument("--no-flops", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override of the model's config, e.g. model.nf=64 (repeatable)")
    ap.add_argument("--json", default="")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fused-ops", default="softmax", help="pipeline.fused.FUSED_OPS, comma list "
                    "of softmax,silu,group_norm")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    pipeline.fused.FUSED_OPS = set(a.fused_ops.split(",")) if a.fused_ops else set()
    cfg = load(a.model, a.set)
    step = TrainStep.standalone(cfg, cpu=a.device == "cpu")
    C, H = cfg.data.num_channels, cfg.data.image_size
    x0 = torch.rand(a.batch, C, H, H, generator=torch.Generator().manual_seed(0)).to(step.device)
    ks = [a.subsample] + ([a.batch] if a.full and a.batch != a.subsample else [])
    names = a.variants.split(",")
    cases = [("dsm", 0)] + [(v, k) for k in ks for v in names if v != "dsm"]
    steps = variant_steps(step, x0, cases)
    for c in cases:  # warm-up
        steps[c]()
    times = {c: [] for c in cases}
    for _ in range(a.repeats):
        for c in cases:
            t0 = time.perf_counter()
            steps[c]()
            times[c].append(time.perf_counter() - t0)
    res = {}
    for c in cases:
        if x0.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as m:
            steps[c]()
        res[c] = {"time_s": statistics.median(times[c]), "times": times[c], "peak_rss_mb": m.mb}
        if x0.device.type == "cuda":  # the GPU's peak instead of the host's RSS
            res[c]["peak_rss_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        if not a.no_flops:
            res[c]["gflop"] = flops_of(steps[c]) / 1e9
        if a.components and c[0] != "dsm":
            st = StageTimer()
            steps[c](st)
            res[c]["components_s"] = st.acc
    dsm = res[("dsm", 0)]
    print(f"model={a.model} {' '.join(a.set)} params={step.n_params/1e6:.2f}M batch={a.batch} "
          f"image={C}x{H}x{H} threads={a.threads} repeats={a.repeats} fused_ops={a.fused_ops}")
    hdr = f"{'variant':22s} {'k':>3s} {'time s':>8s} {'x DSM':>6s} {'GFLOP':>8s} {'peak MB':>8s} " \
          f"{'time/sample vs ref':>18s} {'FLOP/sample vs ref':>18s}"
    print(hdr)
    for c in cases:
        r = res[c]
        line = f"{c[0]:22s} {c[1]:3d} {r['time_s']:8.3f} {r['time_s']/dsm['time_s']:6.2f} " \
               f"{r.get('gflop', float('nan')):8.2f} {r['peak_rss_mb']:8.0f}"
        if c[0] != "dsm" and ("reference", c[1]) in res:
            ref = res[("reference", c[1])]
            tr = (r["time_s"] - dsm["time_s"]) / max(ref["time_s"] - dsm["time_s"], 1e-9)
            fr = (r.get("gflop", 0) - dsm.get("gflop", 0)) / max(ref.get("gflop", 0) - dsm.get("gflop", 0), 1e-9)
            line += f" {tr:18.2f} {fr:18.2f}"
            r["time_ratio_vs_ref"], r["flop_ratio_vs_ref"] = tr, fr
        print(line)
        if "components_s" in r:
            print("    " + ", ".join(f"{k}={v:.3f}s" for k, v in r["components_s"].items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({f"{c[0]}@{c[1]}": r for c, r in res.items()}, f, indent=1)
    step.backend.end()
    return res


if __name__ == "__main__":
    main()
