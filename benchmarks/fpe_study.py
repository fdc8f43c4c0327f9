"""Issue 15: does the score-FPE regularizer do what FP-Diffusion says, and at what cost?

    python benchmarks/fpe_study.py --data ../shared/data/mnist.npz            # the full study
    python benchmarks/fpe_study.py --data /tmp/d.npz --quick --work W --out O  # every stage, minutes

Every stage runs fpdiff's own commands as subprocesses (``python -m pipeline.cli ...``), so it
measures what users run:

  data      ``fpdiff data shards DATA`` (its own train/test split) -> WORK/data
  digits    the digit feature net (``pipeline.eval.digits``) trained on the training set, saved as
            TorchScript (WORK/digit_net.pt); ``fpdiff eval ref-stats`` of the test set with it
            (and with ``--inception FILE`` when given)
  base      one DSM-only VP run from configs/fpe_study.yaml -> WORK/arms/base
  arms      fine-tunes from WORK/arms/base, all with the same number of steps: (a) DSM only, seeds
            0..; (b) DSM+FPE for each alpha of the grid at the 1/64 subsample; the best alpha (lowest
            mean FPE residual on test images, ``fpdiff eval fpe``) with more seeds; the subsample
            ablation at the best alpha (whole batch, 1/8, 1/64)
  metrics   per arm, on its export: ``eval fpe``, ``eval bpd``, ``eval fid`` (digit net, PC sampler),
            legibility (``pipeline.eval.digits.judge`` of the FID samples); for (a) and the best (b) also
            ``eval fid --sampler ode`` and the FID between the ODE and PC sample sets; Inception FID
            with ``--inception``
  report    OUT/results.json, table.md, report.md and PNG plots (benchmarks/fpe_study_report.py)

Resumable: a finished arm is WORK/arms/NAME/summary.json + export (recorded as OUT/arms/NAME.json),
a metric is OUT/metrics/NAME/METRIC.json; a rerun skips what exists, a killed training run
continues from its newest checkpoint. Cost knobs: the config and SCALE below.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import fpe_study_report as report  # noqa: E402

# Cost knobs. None: the config's value. Seeds of (a) and the best (b) stay at 3 in "full" (issue 15:
# shrink the model or the ablation's N, not these seeds).
SCALE = {
    "full": dict(  # sized for ~2 hours of 2 shared CPU cores (see benchmarks/RESULTS.md for what was cut)
        base_steps=None,          # training.n_steps of configs/fpe_study.yaml
        finetune_steps=60,        # every fine-tune arm (DSM, alpha grid, seeds, ablation)
        finetune_lr=5e-4,
        ckpt_every=30,
        alphas=(0.05, 0.15, 0.5),
        seeds=3,                  # seeds of arm (a) and of the best (b)
        digit_images=120_000,     # images the digit net sees while training
        fpe_max_samples=64, fpe_num_times=10,
        bpd_max_samples=64, bpd_rtol=1e-3, bpd_batch=64,
        fid_n=500,                # the other alphas and the subsample ablation
        fid_n_main=1000,          # arm (a) and best (b) (10000 = the whole test set, if budget allows)
        fid_n_pooled=2000,        # every arm: a second PC set (eval.seed+1) tops the first up to this N; FID
                                  # of the pooled set by `eval fid --from-samples` (the table's FID)
        inception_ref_shards=2,   # Inception reference: the first test shards (1,000 images each; ~4 img/s/core)
        inception_n=500,          # Inception FID of every main arm: the first N of its first PC set (None: all;
                                  # ~4 images/s per CPU core at 299x299) ...
        inception_pooled_seeds=1, # ... and of the whole pooled set (N = fid_n_pooled) for these seeds of (a) / best (b)
        pc_steps=None,            # sampling.num_steps of the config
        ode_rtol=1e-3,
        ode_seeds=1,              # PF-ODE samples (~12 CPU-min per arm at N 1,000) for seed 0 of (a) and best (b)
        train_grid_samples=16,    # samples.png at the end of each training run
    ),
    "quick": dict(
        base_steps=6, finetune_steps=3, finetune_lr=5e-4, ckpt_every=3, alphas=(0.05, 0.15, 0.5), seeds=2,
        digit_images=4000, fpe_max_samples=8, fpe_num_times=4, bpd_max_samples=4, bpd_rtol=1e-2, bpd_batch=4,
        fid_n=64, fid_n_main=64, pc_steps=4, ode_rtol=1e-2, ode_seeds=2, train_grid_samples=4,
        fid_n_pooled=96, inception_ref_shards=1, inception_n=None, inception_pooled_seeds=1,
    ),
}
STAGES = ("data", "digits", "base", "arms", "metrics", "report")
CONFIG = ROOT / "configs" / "fpe_study.yaml"
NO_INCEPTION = "not measured: no offline Inception file"
T0 = time.time()


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.0f}s] {msg}", flush=True)


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj) -> None:
    from pipeline.atomic import atomic_write_json
    atomic_write_json(path, obj)


def ref_count(path: Path):
    """Images behind a reference-statistics .npz (None when it is not there)."""
    import numpy as np
    try:
        with np.load(path) as z:
            return int(z["n"])
    except (OSError, KeyError, ValueError):
        return None


def fpdiff(args: list, log: Path) -> None:
    """``python -m pipeline.cli ARGS`` with its output in LOG; a failure raises with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pipeline.cli", *map(str, args)]
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"fpe_study: `fpdiff {args[0]} {args[1] if len(args) > 1 else ''}` exited {rc}; "
                         f"log {log}:\n{tail}")


class Study:
    def __init__(self, a):
        import yaml

        self.a = a
        self.scale = dict(SCALE["quick" if a.quick else "full"])
        self.work, self.out = Path(a.work).resolve(), Path(a.out).resolve()
        self.cfg = yaml.safe_load(CONFIG.read_text())
        self.batch = int(self.cfg["training"]["batch_size"])
        self.data_dir = self.work / "data"
        self.digit_net = self.work / "digit_net.pt"
        self.ref = self.work / "ref_digit_test.npz"
        self.inception = Path(a.inception).resolve() if a.inception else None
        self.ref_inception = self.work / "ref_inception_test.npz"
        self.skipped = self.done = 0

    # ------------------------------------------------------------------ helpers
    def shards(self, split: str) -> str:
        idx = read_json(self.data_dir / f"mnist-{split}.json")
        if not idx:
            raise SystemExit(f"fpe_study: no {split} shards in {self.data_dir}; run the 'data' stage")
        return str(self.data_dir / idx["pattern"])

    def test_shard_files(self, k: int) -> str:
        """The first k test shards as a brace pattern (the Inception reference's subset)."""
        files = sorted(self.data_dir.glob("mnist-test-*.tar"))[:k]
        if not files:
            raise SystemExit(f"fpe_study: no test shards in {self.data_dir}; run the 'data' stage")
        return str(files[0]) if len(files) == 1 else str(self.data_dir / ("{" + ",".join(f.name for f in files) + "}"))

    def skip(self, what: str, quiet: bool = False) -> None:
        self.skipped += 1
        if not quiet:
            say(f"skip {what} (done)")

    def parallel(self, fn, items) -> list:
        """fn over items, --jobs at a time (each job is one fpdiff subprocess chain)."""
        if self.a.jobs <= 1:
            return [fn(*it) for it in items]
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(self.a.jobs) as pool:
            return list(pool.map(lambda it: fn(*it), items))

    def log(self, name: str) -> Path:
        return self.work / "logs" / f"{name}.log"

    # ------------------------------------------------------------------ stage 1
    def stage_data(self) -> None:
        if all(read_json(self.data_dir / f"mnist-{s}.json") for s in ("train", "test")):
            return self.skip("data shards")
        say(f"data: fpdiff data shards {self.a.data} -> {self.data_dir}")
        fpdiff(["data", "shards", Path(self.a.data).resolve(), "--out", self.data_dir, "--name", "mnist"],
               self.log("data"))
        self.done += 1

    # ------------------------------------------------------------------ stage 2
    def stage_digits(self) -> None:
        if self.digit_net.is_file() and read_json(self.out / "digit_net.json"):
            self.skip("digit net")
        else:
            import numpy as np
            import torch

            from pipeline.atomic import atomic_path
            from pipeline.eval.digits import train_digit_net
            from pipeline.data.sources import load_source

            say(f"digits: training the digit feature net on the training set ({self.scale['digit_images']} images seen)")
            src = load_source(Path(self.a.data).resolve())
            split = src.natural_split or {"train": np.arange(len(src)), "test": np.arange(0)}
            arr = {f"{k}_{s}": v for s in ("train", "test")
                   for k, v in (("x", np.stack([src.images[i][..., 0] for i in split[s]]) if len(split[s]) else
                                 np.zeros((0, 28, 28), np.uint8)), ("y", src.labels[split[s]]))}
            t0 = time.time()
            torch.manual_seed(0)
            net, acc = train_digit_net(arr, images_seen=self.scale["digit_images"], progress=False)
            with atomic_path(self.digit_net) as tmp:
                torch.jit.save(torch.jit.script(net), str(tmp))
            write_json(self.out / "digit_net.json", {"test_accuracy": acc, "seconds": time.time() - t0,
                                                     "images_seen": self.scale["digit_images"],
                                                     "file": str(self.digit_net), "features": 128})
            say(f"digits: test accuracy {acc:.4f}")
            self.done += 1
        refs = [(self.ref, self.digit_net, "digit net")]
        if self.inception:
            refs.append((self.ref_inception, self.inception, "Inception"))
        for ref, fe, what in refs:
            if ref.is_file():
                self.skip(f"reference statistics ({what})")
                continue
            say(f"digits: fpdiff eval ref-stats of the test set ({what})")
            shards = self.shards("test") if fe is self.digit_net else self.test_shard_files(self.scale["inception_ref_shards"])
            fpdiff(["eval", "ref-stats", "--shards", shards, "--feature-extractor", fe,
                    "--channels", "1", "--out", ref, "--no-progress", "--keep-features", "10000"], self.log(ref.stem))
            self.done += 1

    # ------------------------------------------------------------------ training
    def train(self, name: str, overrides: list[str], meta: dict) -> dict:
        """One training run WORK/arms/NAME; its record OUT/arms/NAME.json."""
        rec_path, run = self.out / "arms" / f"{name}.json", self.work / "arms" / name
        rec = read_json(rec_path)
        if rec and (run / "export" / "ema.safetensors").is_file():
            self.skip(f"train {name}")
            return rec
        summary = read_json(run / "summary.json")
        if not (summary and (run / "export" / "ema.safetensors").is_file()):
            ckpts = sorted((run / "checkpoints").glob("step_*")) if (run / "checkpoints").is_dir() else []
            resume = ["--resume", "auto"] if ckpts else (["--overwrite"] if run.exists() else [])
            say(f"train {name}: {' '.join(overrides)}" + (" (resuming)" if ckpts else ""))
            fpdiff(["train", "--config", CONFIG, "--run-dir", run, "--no-progress", *resume,
                    f"data.shards={self.shards('train')}", f"data.test_shards={self.shards('test')}",
                    f"training.ckpt_every={self.scale['ckpt_every']}", "training.keep_last=1",
                    f"sampling.num_samples={self.scale['train_grid_samples']}",
                    *([f"sampling.num_steps={self.scale['pc_steps']}"] if self.scale["pc_steps"] else []),
                    *overrides], self.log(f"train_{name}"))
            summary = read_json(run / "summary.json")
            self.done += 1
            resumed = bool(ckpts)
        else:
            resumed = False
        s_per_step = self.batch / summary["images_per_s"]
        rec = {"arm": name, **meta, "overrides": overrides, "steps": summary["steps"],
               "seconds_per_step": s_per_step, "wall_s": s_per_step * summary["steps"],
               "seconds_this_process": summary["seconds"], "resumed": resumed, "final_loss": summary["final_loss"],
               "batch_size": self.batch, "threads": os.environ.get("OMP_NUM_THREADS", ""),
               "jobs_side_by_side": self.a.jobs, "export": str(run / "export")}
        write_json(rec_path, rec)
        say(f"train {name}: {summary['steps']} steps, {s_per_step:.3f} s/step")
        return rec

    def fpe_knobs(self, denominator: int) -> list[str]:
        """The fraction 1/denominator of each batch as fpe.subsample (+ fpe.every below one sample a step)."""
        if denominator == 1:
            return ["fpe.subsample=1.0", "fpe.every=1"]
        k = self.batch / denominator
        if k >= 1:
            return [f"fpe.subsample={int(round(k))}", "fpe.every=1"]
        return ["fpe.subsample=1", f"fpe.every={int(round(1 / k))}"]

    def ft_overrides(self, seed: int) -> list[str]:
        s = self.scale
        return [f"training.init_from={self.work / 'arms' / 'base'}", f"training.n_steps={s['finetune_steps']}",
                f"training.seed={seed}", *([f"training.lr={s['finetune_lr']}"] if s["finetune_lr"] else [])]

    def arm_dsm(self, seed: int) -> dict:
        return self.train(f"dsm_s{seed}", self.ft_overrides(seed) + ["fpe.enabled=false"],
                          {"group": "dsm", "alpha": 0.0, "subsample": None, "seed": seed})

    def arm_fpe(self, alpha: float, den: int, seed: int) -> dict:
        return self.train(f"fpe_a{alpha:g}_sub{den}_s{seed}",
                          self.ft_overrides(seed) + ["fpe.enabled=true", f"fpe.alpha={alpha:g}", *self.fpe_knobs(den)],
                          {"group": f"fpe_a{alpha:g}_sub{den}", "alpha": alpha, "subsample": f"1/{den}", "seed": seed})

    # ------------------------------------------------------------------ stages 3, 4
    def stage_base(self) -> None:
        s = self.scale
        self.train("base", ["fpe.enabled=false", *([f"training.n_steps={s['base_steps']}"] if s["base_steps"] else [])],
                   {"group": "base", "alpha": 0.0, "subsample": None, "seed": 0})

    def best_alpha(self) -> float:
        path = self.out / "best_alpha.json"
        rec = read_json(path)
        if rec:
            return rec["alpha"]
        res = {}
        for alpha in self.scale["alphas"]:
            arm = f"fpe_a{alpha:g}_sub64_s0"
            res[f"{alpha:g}"] = self.metric(arm, "fpe")["value"]
        best = min(res, key=res.get)
        write_json(path, {"alpha": float(best), "rule": "lowest mean FPE residual (fpdiff eval fpe, mean over the "
                          "t-grid) of the seed-0 arms at the 1/64 subsample", "mean_residual": res})
        say(f"best alpha {best} by the mean FPE residual: {res}")
        return float(best)

    def stage_arms(self) -> None:
        n = self.scale["seeds"]
        self.parallel(lambda f, *a: f(*a), [(self.arm_dsm, seed) for seed in range(n)] +
                      [(self.arm_fpe, alpha, 64, 0) for alpha in self.scale["alphas"]])
        best = self.best_alpha()
        self.parallel(self.arm_fpe, [(best, 64, seed) for seed in range(1, n)] + [(best, den, 0) for den in (1, 8)])

    def arm_names(self) -> list[str]:
        """Every arm of the study (base first); the best alpha must be known."""
        n, best = self.scale["seeds"], self.best_alpha()
        names = ["base"] + [f"dsm_s{i}" for i in range(n)] + [f"fpe_a{a:g}_sub64_s0" for a in self.scale["alphas"]]
        names += [f"fpe_a{best:g}_sub64_s{i}" for i in range(1, n)] + [f"fpe_a{best:g}_sub{d}_s0" for d in (1, 8)]
        return names

    def main_arms(self) -> list[str]:
        best = self.best_alpha()
        return [f"dsm_s{i}" for i in range(self.scale["seeds"])] + \
               [f"fpe_a{best:g}_sub64_s{i}" for i in range(self.scale["seeds"])]

    # ------------------------------------------------------------------ stage 5
    def metric(self, arm: str, metric: str, quiet: bool = False) -> dict:
        """OUT/metrics/ARM/METRIC.json, computed by fpdiff's command when missing."""
        path = self.out / "metrics" / arm / f"{metric}.json"
        rec = read_json(path)
        if rec and "value" in rec:
            self.skip(f"{metric} of {arm}", quiet)
            return rec
        export = self.work / "arms" / arm / "export"
        if not (export / "ema.safetensors").is_file():
            raise SystemExit(f"fpe_study: arm {arm} has no export ({export}); run the 'base'/'arms' stages")
        s, feats = self.scale, self.work / "features" / arm
        say(f"metric {metric} of {arm}")
        if metric == "fpe":
            args = ["eval", "fpe", export, "--shards", self.shards("test"), "--max-samples", s["fpe_max_samples"],
                    "--num-times", s["fpe_num_times"]]
        elif metric == "bpd":
            args = ["eval", "bpd", export, "--shards", self.shards("test"), "--max-samples", s["bpd_max_samples"],
                    "--rtol", s["bpd_rtol"], "--atol", s["bpd_rtol"], "--batch-size", s["bpd_batch"]]
        elif metric in ("fid_pc_pooled", "fid_inception_pc", "fid_inception_pooled"):  # saved PC samples, scored again
            dirs = [feats / "samples_pc"]
            if metric != "fid_inception_pc":
                self.metric(arm, "fid_pc_more", quiet=True)
                dirs.append(feats / "samples_pc_more")
            fe, ref = (self.inception, self.ref_inception) if "inception" in metric else (self.digit_net, self.ref)
            args = ["eval", "fid", export, "--from-samples", *dirs, "--feature-extractor", fe, "--ref-stats", ref]
            if metric == "fid_pc_pooled":
                args += ["--save-features", feats / "pc_pooled.npy"]
            elif metric == "fid_inception_pc" and s["inception_n"]:
                args += ["--num-samples", s["inception_n"]]
        elif metric in ("fid_pc", "fid_ode", "fid_pc_more"):
            sampler = "ode" if metric == "fid_ode" else "pc"
            n = s["fid_n_main"] if arm in self.main_arms() else s["fid_n"]
            seed = 0
            if metric == "fid_pc_more":  # the second set: another seed, topping the first up to fid_n_pooled
                n, seed = max(s["fid_n_pooled"] - self.metric(arm, "fid_pc", quiet=True)["N"], 1), 1
            fe, ref = self.digit_net, self.ref
            args = ["eval", "fid", export, "--num-samples", n, "--sampler", sampler, "--feature-extractor", fe,
                    "--ref-stats", ref, "--seed", seed]
            if metric != "fid_pc_more":
                args += ["--save-features", feats / f"{sampler}.npy", "--grid", feats / f"grid_{sampler}.png"]
            if metric == "fid_pc":
                args += ["--save-samples", feats / "samples_pc"]
            if metric == "fid_pc_more":
                args += ["--save-samples", feats / "samples_pc_more"]
            args += ["sampling.rtol=%g" % s["ode_rtol"], "sampling.atol=%g" % s["ode_rtol"]]
            if s["pc_steps"]:
                args.append(f"sampling.num_steps={s['pc_steps']}")
        elif metric == "legibility":
            return self._derived(path, arm, lambda: report.legibility(self.digit_net, feats / "samples_pc"), ["fid_pc"])
        elif metric == "legibility_pooled":
            return self._derived(path, arm, lambda: report.legibility(
                self.digit_net, feats / "samples_pc", feats / "samples_pc_more"), ["fid_pc", "fid_pc_more"])
        elif metric == "ode_pc":
            return self._derived(path, arm, lambda: report.ode_pc_gap(feats / "pc.npy", feats / "ode.npy"),
                                 ["fid_pc", "fid_ode"])
        else:
            raise ValueError(metric)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        fpdiff(args + ["--out", tmp, "--no-progress"], self.log(f"{metric}_{arm}"))
        rec = read_json(tmp)
        rec["arm"] = arm
        write_json(path, rec)
        tmp.unlink(missing_ok=True)
        self.done += 1
        return rec

    def _derived(self, path: Path, arm: str, compute, needs: list[str]) -> dict:
        for m in needs:
            self.metric(arm, m, quiet=True)
        rec = {"metric": path.stem, "arm": arm, **compute()}
        write_json(path, rec)
        self.done += 1
        return rec

    def stage_metrics(self) -> None:
        main = self.main_arms()

        def one_arm(arm):
            for m in ("fpe", "bpd", "fid_pc", "legibility", "fid_pc_pooled", "legibility_pooled"):
                self.metric(arm, m)
            if arm in main and int(arm.rsplit("_s", 1)[1]) < self.scale["ode_seeds"]:
                self.metric(arm, "ode_pc")  # runs fid_ode as well
            if arm in main and self.inception:
                self.metric(arm, "fid_inception_pc")
                if int(arm.rsplit("_s", 1)[1]) < self.scale["inception_pooled_seeds"]:
                    self.metric(arm, "fid_inception_pooled")
        self.parallel(one_arm, [(arm,) for arm in self.arm_names()])

    # ------------------------------------------------------------------ stage 6
    def stage_report(self) -> None:
        arms = {n: read_json(self.out / "arms" / f"{n}.json") for n in self.arm_names()}
        metrics = {n: {p.stem: read_json(p) for p in sorted((self.out / "metrics" / n).glob("*.json"))}
                   for n in arms}
        for m in metrics.values():  # the table's FID and legibility: the pooled set where it exists
            for key in ("fid_pc", "legibility"):
                if f"{key}_pooled" in m:
                    m[f"{key}_first_set"], m[key] = m[key], m[f"{key}_pooled"]
        for n in metrics:
            if "fid_inception_pc" not in metrics[n] and n in self.main_arms():
                metrics[n]["fid_inception_pc"] = {"status": NO_INCEPTION}
        setup = {"mode": "quick" if self.a.quick else "full", "scale": self.scale, "config": str(CONFIG.relative_to(ROOT)),
                 "data": str(self.a.data), "batch_size": self.batch, "threads": os.environ.get("OMP_NUM_THREADS", ""),
                 "jobs": self.a.jobs, "digit_net": read_json(self.out / "digit_net.json"), "best_alpha": read_json(self.out / "best_alpha.json"),
                 "main_arms": self.main_arms(), "inception": str(self.inception) if self.inception else NO_INCEPTION,
                 "inception_ref_images": ref_count(self.ref_inception) if self.inception else None}
        report.write_report(self.out, setup, arms, metrics, grids={n: self.work / "features" / n / "grid_pc.png"
                                                                   for n in arms})
        say(f"report: {self.out / 'report.md'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="keras-style .npz (x_train/y_train/x_test/y_test) or MNIST IDX folder")
    p.add_argument("--work", default=None, help="runs, shards, samples (default runs/fpe_study[_quick])")
    p.add_argument("--out", default=None, help="JSON results, table, plots, report "
                   "(default benchmarks/results/fpe_study[_quick])")
    p.add_argument("--quick", action="store_true", help="every stage with tiny steps and N (a test)")
    p.add_argument("--inception", default=None, help="TorchScript Inception with clean-fid's extractor interface "
                   "(float (B,3,299,299) in [0,255] -> 2048 features); without it Inception FID is not measured")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--jobs", type=int, default=1, help="fpdiff commands run at once (default 1; more than 1 "
                   "distorts the s/step of the arms trained side by side)")
    a = p.parse_args(argv)
    suffix = "_quick" if a.quick else ""
    a.work = a.work or str(ROOT / "runs" / f"fpe_study{suffix}")
    a.out = a.out or str(ROOT / "benchmarks" / "results" / f"fpe_study{suffix}")
    if not Path(a.data).exists():
        p.error(f"--data: {a.data} does not exist")
    if a.inception and not Path(a.inception).is_file():
        p.error(f"--inception: {a.inception} is not a file")
    st = Study(a)
    say(f"fpe study ({'quick' if a.quick else 'full'}): work {st.work}, out {st.out}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    for stage in STAGES:
        if stage in a.stages:
            say(f"stage {stage}")
            getattr(st, f"stage_{stage}")()
    say(f"done: {st.done} steps computed, {st.skipped} skipped (already on disk)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
