"""One-shot GPU measurement (issue 16): every figure the GPU window should produce, in one go.

    bash benchmarks/gpu.sh --out gpu.json                      # on the GPU machine (installs wheels)
    python benchmarks/gpu.py --device cpu --tiny --out t.json  # smoke run, < 1 min (tests/test_gpu_bench.py)

Rows (ids in the JSON's ``rows``; ``meta.planned`` lists them all, in the order they run):

- ``train/<model>/<precision>/<eager|compile>``: DSM training throughput (img/s per GPU) and peak
  memory of the trainer's step (``pipeline.train.step.TrainStep``, what ``train()`` calls: DSM under
  the backend's autocast, backward, grad-norm clip, Adam, EMA, schedule; on a fixed in-memory batch,
  so the data loader is not in it), for configs/cifar10_ddpmpp.yaml and
  configs/cifar10_ncsnpp_deep.yaml at batch 128. Precisions: fp32 (TF32 off), tf32 (TF32 on
  for matmul and cuDNN), bf16 (``training.mixed_precision=bf16``); eager and
  ``training.compile=true`` (the DSM path only, as the trainer compiles it).
- ``fpe/<model>/<precision>/<default_subsample|whole_batch>``: the regularized step
  (``pipeline.fpe.FPERegularizer``) and the DSM step timed round-robin in the same run; the ratio.
- ``residual/ddpmpp/k=<k>``: per regularized sample, this project's residual against the official
  code's composition, with benchmarks/fpe_cost.py's variants (imported from it), each in the trainer's step.
- ``fused/ddpmpp``: the regularized step with ``pipeline.fused.FUSED_OPS`` = softmax only / all
  against PyTorch's own derivatives (``fused=False``).
- ``sample/ddpmpp/pc``, ``sample/ddpmpp/ode``, ``bpd/ddpmpp``: ``pipeline.sampling.pc_sample``
  (1000 steps), ``ode_sample`` (NFE reported) and ``pipeline.likelihood.log_likelihood``, images/s.
- ``ddp2/ddpmpp/<precision>``: 2-process DDP over NCCL, only when two GPUs are present.

Robust for a short window: a global time budget (``--budget-s``, default 480) and a per-row
budget (hard, by SIGALRM); a row that fails or runs out of time records an ``error`` string and
the run continues; rows the global budget cannot fit are recorded as ``skipped``; the JSON is
rewritten after every row, so a run that is cut keeps what it measured. On a GPU every timed call
is bracketed by CUDA events (after ``torch.cuda.synchronize``), warm-up iterations are excluded,
peak memory is ``torch.cuda.max_memory_allocated`` over the timed iterations. On a CPU peak memory
is the process's peak RSS (a smoke figure only). ``--tiny`` substitutes tiny models and few steps.
``--table FILE`` prints the table of a JSON that a cut run left.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import fpe_cost  # noqa: E402  (the CPU benchmark's variants (a)-(c): reused, not copied)
from pipeline.config_files import load_config  # noqa: E402
from pipeline.fpe import subsample_size  # noqa: E402
from pipeline.likelihood import log_likelihood  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.sampling import ode_sample, pc_sample  # noqa: E402
from pipeline.score import get_score_fn  # noqa: E402
from pipeline.sde import build_sde  # noqa: E402
from pipeline.train.step import TrainStep  # noqa: E402

CONFIGS = {"ddpmpp": "cifar10_ddpmpp.yaml", "ncsnpp_deep": "cifar10_ncsnpp_deep.yaml"}
# --tiny: the same code paths on tiny networks (mnist_tiny.yaml's DDPM++ blocks, two levels on 14x14
# with attention at 7x7; a small NCSN++ with FIR and the residual progressive input, i.e. the deep
# config's blocks)
TINY = {"ddpmpp": ("mnist_tiny.yaml", ["model.ch_mult=[1,2]", "data.image_size=14"]),
        "ncsnpp_deep": ("cifar10_ncsnpp_deep.yaml", ["model.nf=8", "model.num_res_blocks=1", "model.ch_mult=[1,2]",
                                                     "data.image_size=16", "model.attn_resolutions=[8]"])}
ANCHORS = [
    {"name": "EDM (Karras et al. 2022), DDPM++ cont. VP, CIFAR-10 training",
     "img_per_s_per_gpu": 145.0, "gpu": "V100", "detail": "200 Mimg in ~2 days on 8 V100s",
     "compare": "train/ddpmpp"},
    {"name": "score_sde (Song et al. 2021), NCSN++ batch 128",
     "img_per_s_per_gpu": round(128 / 0.56 / 4, 1), "gpu": "V100", "detail": "0.56 s/step on 4 V100s",
     "compare": "train/ncsnpp_deep"},
]
NOTES = {
    "channels_last": "not measured: the trainer has no channels-last option (no config key; pipeline/config.py, "
                     "pipeline/train/loop.py)",
    "tf32": "the trainer has no TF32 switch and runs with torch's defaults (cuDNN convolutions TF32 on, matmul "
            "TF32 off): rows 'default'; rows 'fp32' turn both off, 'tf32' both on (torch.backends flags)",
    "compile": "training.compile=true compiles the DSM path only (the regularizer runs the raw module: compiled "
               "modules have no double backward); compile time is in 'first_call_s', not in the step time",
    "fpe_precision": "the regularizer always runs in fp32 with autocast off and the math attention kernel; "
                     "'bf16' in fpe rows is the DSM term's autocast",
    "data": "a fixed in-memory batch: the WebDataset loader is measured by benchmarks/data_throughput.py",
    "weights": "freshly initialised weights (no trained checkpoint on the machine): the ODE sampler's and the "
               "likelihood's NFE are not those of a trained model; img/s per NFE carries over",
}


class RowTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise RowTimeout()


# --------------------------------------------------------------------------- timing
class Clock:
    """Times calls on one device: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        import psutil  # deferred: a dev dependency, for the CPU rows only
        return psutil.Process().memory_info().rss / 2 ** 20

    def call(self, fn) -> float:
        """Seconds of one call of fn, device work included."""
        self.sync()
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def measure(clock: Clock, cases: dict, warmup: int, iters: int, deadline: float) -> dict:
    """Round-robin timing of several callables: warm-up calls excluded; then up to ``iters`` timed
    rounds, fewer when ``deadline`` (time.monotonic) passes (at least one). Per case: median / min
    seconds, the timed calls and the peak memory over them."""
    first = {}
    for name, fn in cases.items():
        for i in range(warmup):
            dt = clock.call(fn)
            if i == 0:
                first[name] = dt
    out = {name: {"times_s": [], "peak_mem_mb": 0.0, "first_call_s": first.get(name)} for name in cases}
    for r in range(iters):
        if r and time.monotonic() > deadline:
            break
        for name, fn in cases.items():
            clock.reset_peak()
            out[name]["times_s"].append(clock.call(fn))
            out[name]["peak_mem_mb"] = max(out[name]["peak_mem_mb"], clock.peak_mb())
    for o in out.values():
        o["median_s"] = statistics.median(o["times_s"])
        o["min_s"] = min(o["times_s"])
        o["iters"] = len(o["times_s"])
    return out


@contextlib.contextmanager
def tf32(enabled: bool):
    m, c = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = m, c


@contextlib.contextmanager
def fused_ops_set(ops):
    import pipeline.fused as fused
    old = fused.FUSED_OPS
    fused.FUSED_OPS = set(ops)
    try:
        yield
    finally:
        fused.FUSED_OPS = old


# --------------------------------------------------------------------------- the trainer's step
def load(name: str, tiny: bool, overrides=()):
    path, extra = TINY[name] if tiny else (CONFIGS[name], [])
    return load_config(os.path.join(ROOT, "configs", path), list(extra) + list(overrides))


def fake_batch(cfg, batch: int, device) -> torch.Tensor:
    C, H = cfg.data.num_channels, cfg.data.image_size
    x = torch.rand(batch, C, H, H, generator=torch.Generator().manual_seed(0))
    return (2 * x - 1 if cfg.data.centered else x).to(device)


@contextlib.contextmanager
def trainer_step(cfg, device, batch: int):
    """The trainer's own step (pipeline.train.step.TrainStep, its Accelerate backend) on a fixed batch of
    ``batch`` images per process: yields (step, take), ``take(regularize=True)`` one optimizer step."""
    step = TrainStep.standalone(cfg, cpu=device.type == "cpu")
    try:
        yield step, step.repeat_on(fake_batch(cfg, batch, step.device))
    finally:
        step.backend.end()


PRECISIONS = {"fp32": ("no", False), "tf32": ("no", True), "bf16": ("bf16", True), "default": ("no", None)}


@contextlib.contextmanager
def precision_flags(precision: str):
    _, t = PRECISIONS[precision]
    with (tf32(t) if t is not None else contextlib.nullcontext()):
        yield


# --------------------------------------------------------------------------- rows
class Bench:
    def __init__(self, a):
        self.a = a
        self.device = torch.device(a.device)
        self.clock = Clock(self.device)
        self.t0 = time.monotonic()
        self.rows = []
        self.planned = []
        self.meta = {"argv": sys.argv[1:], "device": str(self.device), "tiny": a.tiny, "budget_s": a.budget_s,
                     "torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
                     "cpu_threads": torch.get_num_threads(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}
        if self.device.type == "cuda":
            p = torch.cuda.get_device_properties(self.device)
            self.meta.update(gpu=p.name, gpu_mem_gb=round(p.total_memory / 2 ** 30, 1), cuda=torch.version.cuda,
                             cudnn=torch.backends.cudnn.version())

    def remaining(self) -> float:
        return self.a.budget_s - (time.monotonic() - self.t0)

    def write(self, complete=False):
        if not self.a.out:
            return
        self.meta.update(elapsed_s=round(time.monotonic() - self.t0, 2), complete=complete)
        doc = {"meta": self.meta, "planned": self.planned, "anchors": ANCHORS, "notes": NOTES, "rows": self.rows}
        tmp = self.a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, self.a.out)

    def run(self, row_id: str, budget_s: float, fn, **info):
        """fn(deadline) -> dict of results; recorded with status ok / error / skipped."""
        row = {"id": row_id, **info, "budget_s": budget_s}
        left = self.remaining()
        t0 = time.monotonic()
        if left < min(budget_s, 5.0) or left < 1.0:
            row.update(status="skipped", error=f"global budget: {left:.0f}s left of {self.a.budget_s:.0f}s")
        else:
            hard = max(1.0, min(budget_s, left))
            old = signal.signal(signal.SIGALRM, _alarm)
            signal.setitimer(signal.ITIMER_REAL, hard)
            try:
                if row_id in self.a.fail_rows:
                    raise RuntimeError("injected failure (--fail-row)")
                # measured iterations stop at 60% of the row's budget (warm-up and compile take the rest)
                row.update(fn(t0 + 0.6 * hard))
                row["status"] = "ok"
            except RowTimeout:
                row.update(status="error", error=f"row time budget of {hard:.0f}s exceeded")
            except Exception as e:  # one row's failure (OOM, a compile error) must not end the run
                tb = traceback.format_exc().strip().splitlines()
                row.update(status="error", error=f"{type(e).__name__}: {str(e)[:500]}", traceback=tb[-6:])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)
                self.cleanup()
        row["seconds"] = round(time.monotonic() - t0, 2)
        self.rows.append(row)
        self.write()
        print(f"[gpu-bench] {row_id}: {row['status']} ({row['seconds']:.1f}s, {self.remaining():.0f}s left)"
              + (f" {row['error'][:200]}" if "error" in row else ""), file=sys.stderr, flush=True)

    def cleanup(self):
        if "torch._dynamo" in sys.modules:  # a compile row's caches (and a half-done compile)
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def train_row(b: Bench, name: str, precision: str, compiled: bool, batch: int, iters: int, warmup: int):
    def fn(deadline):
        mp, _ = PRECISIONS[precision]
        ov = ["fpe.enabled=false", f"training.mixed_precision={mp}", f"training.compile={str(compiled).lower()}"]
        if compiled and b.a.compile_backend:
            ov.append(f"training.compile_backend={b.a.compile_backend}")
        cfg = load(name, b.a.tiny, ov)
        with precision_flags(precision), trainer_step(cfg, b.device, batch) as (step, take):
            r = measure(b.clock, {"dsm": take}, warmup, iters, deadline)["dsm"]
        return {"img_per_s": batch / r["median_s"], "step_s": r["median_s"], "peak_mem_mb": r["peak_mem_mb"],
                "first_call_s": r["first_call_s"], "iters": r["iters"], "warmup": warmup, "batch": batch,
                "params_m": step.n_params / 1e6, "compile_backend": cfg.training.compile_backend if compiled else None,
                "times_s": r["times_s"]}
    return fn


def fpe_row(b: Bench, name: str, precision: str, subsample, batch: int, iters: int, warmup: int):
    """``subsample`` = 1.0 (the whole batch): on out-of-memory k is halved (down to 8) and the
    largest k that fits is measured, with ``oom_at_k`` recording the ones that did not."""
    def fn(deadline):
        mp, _ = PRECISIONS[precision]
        k = subsample_size(subsample, batch)
        ooms = []
        while True:
            sub = subsample if k == subsample_size(subsample, batch) else k
            cfg = load(name, b.a.tiny, ["fpe.enabled=true", f"training.mixed_precision={mp}", f"fpe.subsample={sub}"])
            oom = False
            try:
                with precision_flags(precision), trainer_step(cfg, b.device, batch) as (step, take):
                    r = measure(b.clock, {"dsm": lambda: take(regularize=False), "regularized": take}, warmup,
                                iters, deadline)
                break
            except torch.OutOfMemoryError:
                if subsample != 1.0 or k <= 8:
                    raise
                oom = True
            if oom:  # outside the except block: its traceback's frames no longer hold the tensors
                step = None
                b.cleanup()
                ooms.append(k)
                k //= 2
        d, g = r["dsm"], r["regularized"]
        est = step.regularizer.estimator  # what the regularized step ran with
        return {"k": subsample_size(cfg.fpe.subsample, batch), "batch": batch, "subsample": cfg.fpe.subsample,
                "oom_at_k": ooms, "dsm_step_s": d["median_s"], "reg_step_s": g["median_s"],
                "ratio": g["median_s"] / d["median_s"], "reg_img_per_s": batch / g["median_s"],
                "reg_per_sample_s": (g["median_s"] - d["median_s"]) / subsample_size(cfg.fpe.subsample, batch),
                "dsm_peak_mem_mb": d["peak_mem_mb"], "reg_peak_mem_mb": g["peak_mem_mb"], "iters": g["iters"],
                "warmup": warmup, "probe_gradient": est.probe_gradient, "n_probes": est.n_probes,
                "fused": est.fused}
    return fn


def residual_row(b: Bench, batch: int, k: int, iters: int, warmup: int):
    variants = ["dsm", "reference", "ours_1probe_fused", "ours_2probe_fused_first"]

    def fn(deadline):
        cfg = fpe_cost.load("tiny", TINY["ddpmpp"][1]) if b.a.tiny else fpe_cost.load("cifar")
        with trainer_step(cfg, b.device, batch) as (step, _):
            x0 = fake_batch(cfg, batch, step.device)
            r = measure(b.clock, fpe_cost.variant_steps(step, x0, [(v, k) for v in variants]), warmup, iters,
                        deadline)
        dsm, ref = r[("dsm", k)]["median_s"], r[("reference", k)]["median_s"]
        res = {"batch": batch, "k": k, "variants": {}}
        for v in variants:
            m = r[(v, k)]
            e = {"step_s": m["median_s"], "x_dsm": m["median_s"] / dsm, "peak_mem_mb": m["peak_mem_mb"],
                 "iters": m["iters"]}
            if v != "dsm":
                e["time_per_sample_vs_reference"] = (m["median_s"] - dsm) / max(ref - dsm, 1e-9)
            res["variants"][v] = e
        res["default_vs_reference"] = res["variants"]["ours_2probe_fused_first"]["time_per_sample_vs_reference"]
        return res
    return fn


def fused_row(b: Bench, batch: int, k: int, iters: int, warmup: int):
    sets = {"pytorch": None, "softmax": {"softmax"}, "all": {"softmax", "silu", "group_norm"}}

    def fn(deadline):
        cfg = fpe_cost.load("tiny", TINY["ddpmpp"][1]) if b.a.tiny else fpe_cost.load("cifar")
        with trainer_step(cfg, b.device, batch) as (step, _):
            x0 = fake_batch(cfg, batch, step.device)
            steps = fpe_cost.variant_steps(step, x0, [("ours_2probe_plain_first", k), ("ours_2probe_fused_first", k)])
            plain, fused = steps[("ours_2probe_plain_first", k)], steps[("ours_2probe_fused_first", k)]

            def with_ops(ops):
                def go():
                    with fused_ops_set(ops):
                        fused()
                return go
            cases = {n: (plain if ops is None else with_ops(ops)) for n, ops in sets.items()}
            r = measure(b.clock, cases, warmup, iters, deadline)
        base = r["pytorch"]["median_s"]
        return {"batch": batch, "k": k, "variants": {n: {"step_s": r[n]["median_s"], "x_pytorch": r[n]["median_s"] / base,
                                                         "peak_mem_mb": r[n]["peak_mem_mb"], "iters": r[n]["iters"]}
                                                     for n in sets},
                "fused_ops": {n: sorted(o) if o else [] for n, o in sets.items()}}
    return fn


def _eval_model(b: Bench, name: str):
    cfg = load(name, b.a.tiny)
    torch.manual_seed(0)
    model = build_model(cfg).to(b.device).eval()
    sde = build_sde(cfg.sde)
    return cfg, sde, get_score_fn(model, sde)


def pc_row(b: Bench, name: str, batch: int, steps: int, probe_steps: int):
    def fn(deadline):
        cfg, sde, score = _eval_model(b, name)
        sc = cfg.sampling
        shape = (batch, cfg.data.num_channels, cfg.data.image_size, cfg.data.image_size)

        def run(n):
            g = torch.Generator(device=b.device).manual_seed(0)
            return pc_sample(score, sde, shape, predictor=sc.predictor, corrector=sc.corrector, snr=sc.snr,
                             n_steps_each=sc.n_steps_each, num_steps=n, noise_removal=sc.noise_removal,
                             device=b.device, generator=g)
        b.clock.call(lambda: run(2))  # warm-up
        t_probe = b.clock.call(lambda: run(probe_steps))
        per_step = t_probe / probe_steps
        fit = int((deadline - time.monotonic()) / per_step)
        n = steps if fit >= steps else max(probe_steps, fit)
        box = {}
        b.clock.reset_peak()
        t = b.clock.call(lambda: box.update(nfe=run(n)[1]))
        per_step = t / n
        return {"batch": batch, "steps": steps, "steps_run": n, "extrapolated": n < steps, "nfe_run": box["nfe"],
                "nfe": round(box["nfe"] * steps / n), "predictor": sc.predictor, "corrector": sc.corrector,
                "seconds_for_steps": per_step * steps, "img_per_s": batch / (per_step * steps),
                "peak_mem_mb": b.clock.peak_mb()}
    return fn


def ode_row(b: Bench, name: str, batch: int, tol: float, likelihood: bool):
    def fn(deadline):
        cfg, sde, score = _eval_model(b, name)
        shape = (batch, cfg.data.num_channels, cfg.data.image_size, cfg.data.image_size)
        box = {}

        def go():
            g = torch.Generator(device=b.device).manual_seed(0)
            if likelihood:
                x = fake_batch(cfg, batch, b.device)
                logp, _, box["nfe"] = log_likelihood(score, sde, x, rtol=tol, atol=tol, generator=g)
                box["bpd"] = float((-logp / (math.log(2) * x[0].numel())).mean())
            else:
                box["nfe"] = ode_sample(score, sde, shape, rtol=tol, atol=tol, device=b.device, generator=g)[1]
        b.clock.reset_peak()
        t = b.clock.call(go)  # one call: its NFE is the work; a warm-up would double it
        out = {"batch": batch, "rtol": tol, "atol": tol, "nfe": box["nfe"], "seconds": t, "img_per_s": batch / t,
               "nfe_img_per_s": batch * box["nfe"] / t, "peak_mem_mb": b.clock.peak_mb(),
               "includes_first_call": True}
        if likelihood:
            out["bpd_untrained"] = box["bpd"]
        return out
    return fn


def ddp_row(b: Bench, name: str, precision: str, batch: int, iters: int, warmup: int):
    """2-process DDP (NCCL) of the trainer's step, in a torchrun child; img/s over both GPUs."""
    def fn(deadline):
        with tempfile.TemporaryDirectory() as d:
            res = os.path.join(d, "ddp.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   os.path.abspath(__file__), "--ddp-child", res, "--ddp-model", name, "--ddp-precision", precision,
                   "--ddp-batch", str(batch), "--ddp-iters", str(iters), "--ddp-warmup", str(warmup)]
            cmd += ["--tiny"] if b.a.tiny else []
            subprocess.run(cmd, check=True, timeout=max(10.0, deadline - time.monotonic() + 30))
            with open(res) as f:
                return json.load(f)
    return fn


def ddp_child(a):
    """One rank of the torchrun child: the trainer's step under its Accelerate backend, which wraps the
    model in DDP (NCCL; gloo on a CPU, the --force-ddp smoke check)."""
    mp, _ = PRECISIONS[a.ddp_precision]
    cfg = load(a.ddp_model, a.tiny, ["fpe.enabled=false", f"training.mixed_precision={mp}",
                                     f"training.batch_size={a.ddp_batch}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with precision_flags(a.ddp_precision), trainer_step(cfg, device, a.ddp_batch // 2) as (step, take):
        # the global batch split over the 2 ranks
        r = measure(Clock(step.device), {"dsm": take}, a.ddp_warmup, a.ddp_iters, time.monotonic() + 60)["dsm"]
        if step.backend.is_main:
            with open(a.ddp_child, "w") as f:
                json.dump({"img_per_s_total": a.ddp_batch / r["median_s"],
                           "img_per_s_per_gpu": a.ddp_batch / r["median_s"] / 2, "step_s": r["median_s"],
                           "peak_mem_mb": r["peak_mem_mb"], "batch": a.ddp_batch, "iters": r["iters"]}, f)


# --------------------------------------------------------------------------- plan and table
def plan(b: Bench):
    """(id, budget_s, fn), most wanted first: a cut run keeps the rows users ask for."""
    a, tiny = b.a, b.a.tiny
    B = 8 if tiny else 128
    it, wu = (2, 1) if tiny else (10, 3)
    rows = []
    for name in CONFIGS:
        for p in ("fp32", "tf32", "bf16"):
            rows.append((f"train/{name}/{p}/eager", 20 if tiny else 60, train_row(b, name, p, False, B, it, wu)))
    it1 = 1 if tiny else 3  # the regularizer's heavier rows
    rows += [("fpe/ddpmpp/default/default_subsample", 30 if tiny else 60,
              fpe_row(b, "ddpmpp", "default", 0.015625, B, it, 1 if tiny else wu)),
             ("fpe/ddpmpp/bf16/default_subsample", 30 if tiny else 45,
              fpe_row(b, "ddpmpp", "bf16", 0.015625, B, it, 1 if tiny else wu)),
             ("fpe/ddpmpp/default/whole_batch", 30 if tiny else 90,
              fpe_row(b, "ddpmpp", "default", 1.0, 4 if tiny else B, it1, 1))]
    rb = 2 if tiny else 8  # fpe_cost's batch: the CPU table's --model cifar --batch 8 --full
    for k in ((rb,) if tiny else (1, rb)):  # --tiny: k = B only (the same code, half the time)
        rows.append((f"residual/ddpmpp/k={k}", 30 if tiny else 60, residual_row(b, rb, k, it1, 1)))
    rows.append(("fused/ddpmpp", 30 if tiny else 45, fused_row(b, rb, rb, it1, 1)))
    tol, eb = (1e-2, 4) if tiny else (1e-5, B)
    rows.append(("sample/ddpmpp/pc", 20 if tiny else 75, pc_row(b, "ddpmpp", eb, 10 if tiny else 1000, 4 if tiny else 20)))
    rows.append(("sample/ddpmpp/ode", 20 if tiny else 45, ode_row(b, "ddpmpp", eb, tol, False)))
    rows.append(("bpd/ddpmpp", 20 if tiny else 45, ode_row(b, "ddpmpp", eb, tol, True)))
    if (not tiny and b.meta["gpu_count"] >= 2 and b.device.type == "cuda") or a.force_ddp:
        for p in ("bf16", "fp32"):
            rows.append((f"ddp2/ddpmpp/{p}", 90, ddp_row(b, "ddpmpp", p, B, it, wu)))
    fpe_ncsn = ("fpe/ncsnpp_deep/default/default_subsample", 30 if tiny else 60,
                fpe_row(b, "ncsnpp_deep", "default", 0.015625, B, it, 1))
    # compile last: minutes of compilation each on a GPU; bf16 first (the fastest path users pick)
    comp = ("bf16",) if tiny else ("bf16", "tf32", "fp32")
    rows.append(fpe_ncsn)
    for p in comp:
        for name in (("ddpmpp",) if tiny else CONFIGS):  # --tiny: one (NCSN++ compiles the same way)
            rows.append((f"train/{name}/{p}/compile", 30 if tiny else (120 if name == "ddpmpp" else 150),
                         train_row(b, name, p, True, B, it, 2)))
    if a.only:
        keep = [s.strip() for s in a.only.split(",") if s.strip()]
        rows = [r for r in rows if any(r[0].startswith(k) for k in keep)]
    return rows


def fmt(v, nd=1):
    return "-" if v is None else (f"{v:,.{nd}f}" if isinstance(v, (int, float)) else str(v))


def table(b: Bench) -> str:
    m = b.meta
    lines = [f"device: {m.get('gpu', m['device'])}  torch {m['torch']}  tiny={m['tiny']}  "
             f"elapsed {m.get('elapsed_s', 0):.0f}s of {m['budget_s']:.0f}s",
             f"| {'row':44s} | {'status':7s} | {'img/s':>9s} | {'step s':>8s} | {'x DSM':>6s} | {'peak MB':>9s} | note"]
    lines.append("|" + "-" * 46 + "|---------|-----------|----------|--------|-----------|-----")
    for r in b.rows:
        ok = r["status"] == "ok"
        note, x = "", None
        img, st, mem = r.get("img_per_s"), r.get("step_s"), r.get("peak_mem_mb")
        if r["id"].startswith("fpe/") and ok:
            img, st, mem, x = r["reg_img_per_s"], r["reg_step_s"], r["reg_peak_mem_mb"], r["ratio"]
            note = f"k={r['k']} of {r['batch']}, DSM step {r['dsm_step_s']:.4f}s"
        elif r["id"].startswith("residual/") and ok:
            v = r["variants"]
            st = v["ours_2probe_fused_first"]["step_s"]
            x = v["ours_2probe_fused_first"]["x_dsm"]
            note = (f"k={r['k']} of {r['batch']}: per sample vs reference: default {r['default_vs_reference']:.2f}, "
                    f"1 probe {v['ours_1probe_fused']['time_per_sample_vs_reference']:.2f}")
        elif r["id"].startswith("fused/") and ok:
            v = r["variants"]
            st = v["softmax"]["step_s"]
            note = f"x PyTorch's own: softmax {v['softmax']['x_pytorch']:.2f}, all {v['all']['x_pytorch']:.2f}"
        elif r["id"].startswith(("sample/", "bpd/")) and ok:
            st = r.get("seconds_for_steps", r.get("seconds"))
            note = f"NFE {r['nfe']}" + (" (extrapolated)" if r.get("extrapolated") else "")
        elif r["id"].startswith("ddp2/") and ok:
            img = r["img_per_s_per_gpu"]
            note = "per GPU, 2 GPUs"
        elif ok and r.get("first_call_s") is not None and "compile" in r["id"]:
            note = f"first call (compile) {r['first_call_s']:.1f}s"
        if not ok:
            note = r.get("error", "")[:90]
        lines.append(f"| {r['id']:44s} | {r['status']:7s} | {fmt(img):>9s} | {fmt(st, 4):>8s} | {fmt(x, 2):>6s} | "
                     f"{fmt(mem, 0):>9s} | {note}")
    lines.append("published anchors (per GPU):")
    for an in ANCHORS:
        ours = [r for r in b.rows if r["id"].startswith(an["compare"]) and r["status"] == "ok"]
        best = max(ours, key=lambda r: r["img_per_s"], default=None)
        if m["tiny"]:
            best = None  # tiny models: nothing to compare
        cmp = (f"; best here {best['img_per_s']:,.1f} img/s ({best['id']}), {best['img_per_s'] / an['img_per_s_per_gpu']:.2f}x"
               if best else "")
        lines.append(f"  {an['name']}: {an['img_per_s_per_gpu']} img/s per {an['gpu']} ({an['detail']}){cmp}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="", help="JSON written after every row")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny models, few steps (the CPU smoke run)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="global time budget (seconds)")
    ap.add_argument("--only", default="", help="comma list of row-id prefixes to run")
    ap.add_argument("--compile-backend", default="", help="training.compile_backend for compile rows "
                    "(default: inductor; --tiny on a CPU: eager, i.e. dynamo without code generation)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave)")
    ap.add_argument("--table", default="", metavar="JSON", help="only print the table of a JSON written "
                    "before (e.g. by a run that was cut)")
    ap.add_argument("--fail-row", action="append", default=[], dest="fail_rows", help=argparse.SUPPRESS)
    ap.add_argument("--force-ddp", action="store_true", help=argparse.SUPPRESS)  # plan the 2-process rows anyway
    ap.add_argument("--ddp-child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--ddp-model", default="ddpmpp", help=argparse.SUPPRESS)
    ap.add_argument("--ddp-precision", default="bf16", help=argparse.SUPPRESS)
    ap.add_argument("--ddp-batch", type=int, default=128, help=argparse.SUPPRESS)
    ap.add_argument("--ddp-iters", type=int, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--ddp-warmup", type=int, default=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.ddp_child:
        return ddp_child(a)
    if a.table:
        with open(a.table) as f:
            doc = json.load(f)
        print(table(argparse.Namespace(meta=doc["meta"], rows=doc["rows"])))
        return doc
    if a.tiny and a.device == "cpu" and not a.compile_backend:
        a.compile_backend = "eager"
    b = Bench(a)
    rows = plan(b)
    b.planned = [r[0] for r in rows]
    b.write()
    for row_id, budget, fn in rows:
        b.run(row_id, budget, fn)
    b.write(complete=True)
    print(table(b))
    return b


if __name__ == "__main__":
    main()
