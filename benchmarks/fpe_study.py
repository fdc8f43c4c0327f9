"""Issue 24: does the score-FPE regularizer do what FP-Diffusion says, and at what cost? (paired seeds)

    python benchmarks/fpe_study.py --data ../shared/data/mnist.npz [--inception FILE] [--commit]
    python benchmarks/fpe_study.py --data D.npz --quick --work W --out O     # every stage in minutes (a test)

The protocol (arms, seeds, steps, metrics and their inputs) is fixed in ``protocol()`` and written to
OUT/protocol.json before anything runs; a rerun with another protocol over the same OUT stops. Every
stage runs fpdiff's own commands (``python -m pipeline.cli ...``):

  data     ``fpdiff data shards DATA --name mnist`` -> WORK/data
  digits   the digit feature net (OUT/digit_net.pt, committed so every machine scores with the same
           features) and ``fpdiff eval ref-stats`` of the test set with it (and with ``--inception``)
  base     the DSM-only base WORK/arms/base (configs/fpe_study.yaml): skipped when finished, resumed
           from its newest checkpoint, or restored from the copy committed in OUT/base/; its final
           checkpoint is copied to OUT/base/ when it finishes
  gate     bits/dim and legibility of the base's last two checkpoints (OUT/gate/); with --jobs 2
           bits/dim and the samples are measured side by side
  arms     fine-tunes that continue the base (``training.init_from``), only the objective and seed set;
           (a, b) pairs first (a0 b0, a1 b1, c0, a2 b2, ...: ``in_pairs``), each measured as soon as it
           is trained (when 'metrics' is among the stages), so a study cut short leaves whole, measured pairs
  metrics  per arm (OUT/metrics/ARM/METRIC.json): eval bpd, eval fpe, eval conservativity, eval fid
           (digit net, PC and PF-ODE samples), legibility, the ODE-PC gap, Inception FID for (a), (b)
  report   OUT/results.json, table.md, report.md, plots (benchmarks/fpe_study_report.py)

Resumable at any point: a finished piece is a small JSON under OUT (no machine path in it) and is
skipped on rerun; ``--commit`` commits each one (``git commit --only``) as it finishes. A base that is
unfinished and was written in the last 15 minutes is left alone (another process may be training it;
``--resume-base`` overrides). ``--in-process`` runs the commands in this process (no interpreter start
each; ``--quick`` does so unless ``--subprocess``). Cost knobs: SCALE below; the study's model is the
config's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import fpe_study_report as report  # noqa: E402
import fpe_study_stats as stats  # noqa: E402
from fpe_study_files import StudyFiles, read_json, say  # noqa: E402
from fpe_study_protocol import EVAL_SEED, SCALE, protocol  # noqa: E402
from pipeline.config_files import load_config  # noqa: E402
from pipeline.rundir import RunDir, checkpoint_step  # noqa: E402
from pipeline.sde import build_sde  # noqa: E402

STAGES = ("data", "digits", "base", "gate", "arms", "metrics", "report")
CONFIG = ROOT / "configs" / "fpe_study.yaml"


class Study(StudyFiles):
    def __init__(self, a):
        super().__init__(a)
        self.quick = a.quick
        self.scale = SCALE["quick" if a.quick else "full"]
        self.cfg = yaml.safe_load(CONFIG.read_text())
        self.data_dir, self.base = self.work / "data", self.work / "arms" / "base"
        self.digit_net, self.ref = self.out / "digit_net.pt", self.work / "ref_digit_test.npz"
        self.inception = Path(a.inception).resolve() if a.inception else None
        self.ref_inception = self.work / "ref_inception_test.npz"
        self.proto = protocol(self.scale, self.cfg)
        self.lw = bool(self.cfg["training"].get("likelihood_weighting", False))

    @property
    def sde(self):
        return build_sde(load_config(str(CONFIG)).sde)

    def shards(self, split: str) -> str:
        """The data stage's shards, relative to the repository root when under it (as the base is started:
        ``data.shards=runs/fpe_study/data/...``; a continuation compares the patterns)."""
        idx = read_json(self.data_dir / f"mnist-{split}.json")
        if not idx:
            raise SystemExit(f"fpe_study: no {split} shards in {self.data_dir}; run the 'data' stage")
        return self.arg(self.data_dir / idx["pattern"])

    # ------------------------------------------------------------------ data, digits
    def stage_data(self) -> None:
        if all(read_json(self.data_dir / f"mnist-{s}.json") for s in ("train", "test")):
            return self.skip("data shards")
        say(f"data: fpdiff data shards -> {self.data_dir}")
        self.fpdiff(["data", "shards", Path(self.a.data).resolve(), "--out", self.data_dir, "--name", "mnist"], "data")

    def stage_digits(self) -> None:
        if self.digit_net.is_file() and read_json(self.out / "digit_net.json"):
            self.skip("digit net")
        else:
            say(f"digits: training the digit feature net ({self.scale['digit_images']} images seen)")
            rec = report.train_digit_net_file(Path(self.a.data).resolve(), self.digit_net, self.scale["digit_images"])
            self.write(self.out / "digit_net.json", {**rec, "file": self.digit_net}, "digit feature network")
            self.commit([self.digit_net], "digit feature network (TorchScript)")
        refs = [(self.ref, self.digit_net, self.shards("test"))]
        if self.inception:
            files = sorted(self.data_dir.glob("mnist-test-*.tar"))[: self.scale["inception_ref_shards"]]
            refs.append((self.ref_inception, self.inception, "::".join(self.arg(f) for f in files)))
        for ref, fe, shards in refs:
            if not ref.is_file():
                say(f"digits: fpdiff eval ref-stats ({fe.name})")
                self.fpdiff(["eval", "ref-stats", "--shards", shards, "--feature-extractor", fe, "--channels", "1",
                             "--out", ref, "--no-progress", "--keep-features", "10000"], ref.stem)

    # ------------------------------------------------------------------ training
    def train_args(self, run: Path, overrides: list[str], config: Path = CONFIG) -> list:
        ckpts = list((run / "checkpoints").glob("step_*")) if (run / "checkpoints").is_dir() else []
        resume = ["--resume", "auto"] if ckpts else (["--overwrite"] if run.exists() else [])
        s = self.scale
        return ["train", "--config", config, "--run-dir", run, "--no-progress", *resume,
                f"data.shards={self.shards('train')}", f"data.test_shards={self.shards('test')}",
                *(s["model"] if config == CONFIG else []),
                f"sampling.num_samples={s['train_grid_samples']}",
                *([f"sampling.num_steps={s['pc_steps']}"] if s["pc_steps"] else []), *overrides]

    def train_record(self, run: Path, extra: dict) -> dict:
        summary = read_json(run / "summary.json") or {}
        batch = self.proto["batch_size"]
        return {**extra, "final_step": summary.get("steps"), "final_loss": summary.get("final_loss"),
                "seconds_per_step": batch / summary["images_per_s"] if summary.get("images_per_s") else None,
                "threads": os.environ.get("OMP_NUM_THREADS") or f"unset ({os.cpu_count()} cores)",
                "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                "ran_with": "in process" if self.a.in_process else "one interpreter per command",
                "jobs_side_by_side": self.a.jobs}

    def base_target(self) -> int:
        saved = self.base / "config.yaml"
        cfg = yaml.safe_load(saved.read_text()) if saved.is_file() else self.cfg
        return int(self.scale["base_steps"] or cfg["training"]["n_steps"])

    def base_step(self) -> int:
        last = RunDir(self.base).latest_checkpoint()
        return checkpoint_step(last) if last is not None else -1

    def stage_base(self) -> None:
        saved = self.out / "base"
        restored = self.base_step() < 0 and (saved / "base.json").is_file()
        if restored:  # (its files are as new as the checkout: no other process is training it)
            report.restore_base(saved, self.base)
            say(f"base: restored step {self.base_step()} from {self.rel(saved)}")
        finished = read_json(self.base / "summary.json") and (self.base / "export" / "ema.safetensors").is_file()
        if self.a.save_base:  # an unfinished base's newest checkpoint, committed so any machine resumes it
            self.save_base(saved)
            return
        if finished or self.base_step() >= self.base_target():
            self.skip(f"base (step {self.base_step()})")
        else:
            if not restored:
                self.check_base_idle()
            say(f"base: training to step {self.base_target()}" + (" (resuming)" if self.base_step() >= 0 else ""))
            own = self.base / "config.yaml"
            keep = ["training.keep_last=2", f"training.ckpt_every={self.scale['ckpt_every']}"] if self.quick else []
            steps = [f"training.n_steps={self.scale['base_steps']}"] if self.scale["base_steps"] else []
            self.fpdiff(self.train_args(self.base, ["fpe.enabled=false", *keep, *steps],
                                        own if own.is_file() and self.base_step() >= 0 else CONFIG), "train_base")
        self.save_base(saved)

    def save_base(self, saved: Path) -> None:
        """Copy the base's newest checkpoint to OUT/base/ unless the copy there is as new (a partial
        base committed on one day is replaced by the finished one later)."""
        rec = read_json(saved / "base.json")
        if rec and rec["step"] >= self.base_step():
            return
        for old in saved.glob("step_*"):
            shutil.rmtree(old)
        rec = report.save_base(self.base, saved, self.portable)
        self.done += 1
        self.commit([saved], f"base checkpoint (step {rec['step']})")

    def check_base_idle(self, minutes: float = 15.0) -> None:
        """Stop rather than resume a base that another process may still be training (no lock exists)."""
        logs = [p for p in (self.base / "metrics.jsonl", self.base / "summary.txt") if p.is_file()]
        logs += list((self.base / "checkpoints").glob("step_*")) if (self.base / "checkpoints").is_dir() else []
        age = time.time() - max((p.stat().st_mtime for p in logs), default=0.0)
        if age < minutes * 60 and not self.a.resume_base:
            raise SystemExit(f"fpe_study: the base {self.rel(self.base)} is unfinished and was written {age:.0f}s ago: "
                             "another process may be training it; rerun when it finished, or pass --resume-base")

    def arm_name(self, arm: str, seed: int) -> str:
        return f"{arm}_s{seed}"

    def all_arms(self) -> list[tuple[str, int]]:
        return [(k, s) for k, arm in self.proto["arms"].items() for s in arm["seeds"]]

    def in_pairs(self) -> list[tuple[str, int]]:
        """Every (arm, seed), each arm's seeds spread evenly over the study and the arms of one place side
        by side (5, 5, 2 seeds: a0 b0, a1 b1, c0, a2 b2, a3 b3, a4 b4 c1): a study cut short holds whole
        (a, b) pairs, the comparison with the most seeds, and (c)'s first seed before half of them."""
        order, most = list(self.proto["arms"]), max(len(a["seeds"]) for a in self.proto["arms"].values())
        place = {k: most / len(a["seeds"]) for k, a in self.proto["arms"].items()}
        return sorted(self.all_arms(), key=lambda p: ((p[1] + 1) * place[p[0]], order.index(p[0])))

    def base_config(self) -> Path:
        """The base's own config.yaml: every arm continues it with only the objective and seed changed."""
        own = self.base / "config.yaml"
        if not own.is_file():
            raise SystemExit(f"fpe_study: no base run in {self.rel(self.base)}; run the 'base' stage")
        tc = yaml.safe_load(own.read_text())["training"]
        for key, want in (("batch_size", self.proto["batch_size"]), ("likelihood_weighting", self.lw)):
            if tc.get(key, False) != want:
                raise SystemExit(f"fpe_study: the base's training.{key} is {tc.get(key)}, the protocol's {want} "
                                 f"({self.rel(CONFIG)}); the protocol must describe the base its arms continue")
        return own

    def gate_metrics(self) -> dict:
        """{step folder: {metric: its JSON}} of the gate's committed results."""
        return {p.name: {m.stem: read_json(m) for m in sorted(p.glob("*.json"))}
                for p in sorted((self.out / "gate").glob("step_*"))}

    def stage_arms(self) -> None:
        self.base_config()  # checked once, before any arm starts
        gate = stats.gate(self.gate_metrics())
        if gate["status"] != "passed":  # the arms continue a converged base or none (--quick: a test)
            (say if self.quick else sys.exit)(f"fpe_study: the base's convergence gate is {gate['status']}"
                                               + (" (--quick goes on)" if self.quick else "; no arm starts "
                                                  "from an unconverged base (train it further, then rerun)"))
        self.parallel(self.train_and_measure, self.in_pairs())

    def train_and_measure(self, arm: str, seed: int) -> None:
        """One arm from start to its last metric (with the 'metrics' stage): a session that ends mid-study
        leaves measured arms, not trained ones whose weights stay on one machine."""
        self.train_arm(arm, seed)
        if "metrics" in self.a.stages:
            self.measure_arm(arm, seed)

    def train_arm(self, arm: str, seed: int) -> None:
        name = self.arm_name(arm, seed)
        rec_path, run = self.out / "arms" / f"{name}.json", self.work / "arms" / name
        if read_json(rec_path):
            return self.skip(f"train {name}")
        overrides = [f"training.init_from={self.arg(self.base)}", f"training.n_steps={self.proto['finetune_steps']}",
                     f"training.seed={seed}", f"training.ckpt_every={self.scale['ckpt_every']}",
                     "training.keep_last=1", *self.proto["arms"][arm]["overrides"]]
        if not (run / "export" / "ema.safetensors").is_file():
            self.set_aside_metrics(name)
            say(f"train {name}: {' '.join(overrides[2:])}")
            self.fpdiff(self.train_args(run, overrides, self.base_config()), f"train_{name}")
        self.write(rec_path, self.train_record(run, {"arm": arm, "seed": seed, "overrides": overrides,
                                                     "finetune_steps": self.proto["finetune_steps"]}),
                   f"arm {name} trained")

    def set_aside_metrics(self, name: str) -> None:
        """An arm trained again (its weights lost with another machine) is not the arm its committed metrics
        measured: CPU numerics differ across machines, so the new weights differ. Its earlier metrics move to
        OUT/replicates/NAME_earlier_weights/ (kept, not tabled) and every metric is measured from the new weights."""
        old = sorted((self.out / "metrics" / name).glob("*.json"))
        if not old:
            return
        dest = self.out / "replicates" / f"{name}_earlier_weights"
        dest.mkdir(parents=True, exist_ok=True)
        for f in old:
            f.replace(dest / f.name)
        say(f"{name}: {len(old)} metrics of its earlier weights moved to {self.rel(dest)}; all are measured again")
        self.commit([self.out / "metrics" / name, dest], f"{name}: metrics of its earlier weights set aside")

    # ------------------------------------------------------------------ metrics
    def metric_args(self, metric: str, weights: Path, feats: Path, fid_n: int) -> list:
        s, test = self.scale, self.shards("test")
        steps = [f"sampling.num_steps={s['pc_steps']}"] if s["pc_steps"] else []
        common = ["--seed", EVAL_SEED, "--no-progress"]
        if s["ode_tol"]:
            steps += [f"sampling.rtol={s['ode_tol']}", f"sampling.atol={s['ode_tol']}"]
        if metric == "bpd":
            return ["eval", "bpd", weights, "--shards", test, "--max-samples", s["bpd_n"], "--rtol", s["bpd_tol"],
                    "--atol", s["bpd_tol"], "--batch-size", s["bpd_batch"], *common]
        if metric == "fpe":
            return ["eval", "fpe", weights, "--shards", test, "--max-samples", s["fpe_n"], "--num-times", s["fpe_times"],
                    *common]
        if metric == "conservativity":
            return ["eval", "conservativity", weights, "--shards", test, "--max-samples", s["cons_n"],
                    "--num-buckets", s["cons_buckets"], *common]
        if metric in ("fid_pc", "fid_ode"):
            kind = metric[4:]
            return ["eval", "fid", weights, "--num-samples", fid_n if kind == "pc" else s["ode_n"], "--sampler", kind,
                    "--feature-extractor", self.digit_net, "--ref-stats", self.ref, "--save-features",
                    feats / f"{kind}.npy", "--grid", feats / f"grid_{kind}.png", *common, *steps,
                    *(["--save-samples", feats / "samples_pc"] if kind == "pc" else [])]
        if metric == "fid_inception":
            return ["eval", "fid", weights, "--from-samples", feats / "samples_pc", "--feature-extractor", self.inception,
                    "--ref-stats", self.ref_inception, *common,
                    *(["--num-samples", s["inception_n"]] if s["inception_n"] else [])]
        raise ValueError(metric)

    def metric(self, path: Path, metric: str, weights: Path, feats: Path, fid_n: int) -> dict:
        """PATH (METRIC.json under OUT) by fpdiff's command, or derived from what it saved; skipped when done."""
        rec = read_json(path)
        if rec and "value" in rec:
            self.skip(f"{metric} of {self.rel(path.parent)}")
            return rec
        say(f"{metric} of {self.rel(path.parent)}")
        if metric == "legibility":
            self.artifact(feats / "samples_pc", "fid_pc", weights, feats, fid_n)
            rec = {"metric": metric, **report.legibility(self.digit_net, feats / "samples_pc")}
        elif metric == "ode_pc":
            for name, m in (("pc.npy", "fid_pc"), ("ode.npy", "fid_ode")):
                self.artifact(feats / name, m, weights, feats, fid_n)
            rec = {"metric": metric, **report.ode_pc_gap(feats / "pc.npy", feats / "ode.npy")}
        else:
            if metric == "fid_inception":
                self.artifact(feats / "samples_pc", "fid_pc", weights, feats, fid_n)
            scratch = self.work / "scratch" / f"{path.parent.name}_{metric}.json"
            self.fpdiff(self.metric_args(metric, weights, feats, fid_n) + ["--out", scratch], f"{metric}_{path.parent.name}")
            rec = read_json(scratch)
            if metric == "fpe":
                rec.update(report.g2_weighted(rec, self.sde))
        rec["weights"] = weights
        self.write(path, rec, f"{metric} of {self.rel(path.parent)}")
        return rec

    def artifact(self, file: Path, metric: str, weights: Path, feats: Path, fid_n: int) -> None:
        """What a derived metric reads (saved samples or features): made again by the same command
        (same seed, same samples) when this machine lacks it; the committed JSON is left as it is."""
        if file.exists():
            return
        say(f"re-making {self.rel(file)} ({metric}, seed {EVAL_SEED})")
        self.fpdiff(self.metric_args(metric, weights, feats, fid_n) + ["--out", self.work / "scratch" / f"remake_{feats.name}.json"],
                    f"remake_{feats.name}")

    def arm_metrics(self, arm: str) -> list[str]:
        extra = ["fid_inception"] if self.inception and arm in ("a", "b") else []
        return ["fid_pc", "legibility", *extra, "fid_ode", "ode_pc", "bpd", "fpe", "conservativity"]

    def stage_metrics(self) -> None:
        self.parallel(self.measure_arm, self.in_pairs())

    def measure_arm(self, arm: str, seed: int) -> None:
        name = self.arm_name(arm, seed)
        weights = self.work / "arms" / name / "export"
        if not read_json(self.out / "arms" / f"{name}.json"):
            raise SystemExit(f"fpe_study: arm {name} is not trained; run the 'arms' stage")
        for m in self.arm_metrics(arm):
            done = read_json(self.out / "metrics" / name / f"{m}.json")
            if not (done and "value" in done) and not (weights / "ema.safetensors").is_file():
                raise SystemExit(f"fpe_study: {m} of {name} needs {weights}, which this machine lacks; "
                                 f"retrain the arm (delete {self.rel(self.out / 'arms' / (name + '.json'))}; its measured metrics are "
                                 "then set aside and measured again from the new weights)")
            self.metric(self.out / "metrics" / name / f"{m}.json", m, weights, self.work / "features" / name,
                        self.scale["fid_n"])

    def stage_gate(self) -> None:
        steps_file = self.out / "gate" / "steps.json"
        steps = (read_json(steps_file) or {}).get("steps")
        if not steps:
            ckpts = RunDir(self.base).list_checkpoints()[-2:]
            if len(ckpts) < 2 or checkpoint_step(ckpts[-1]) < self.base_target():
                say("gate: not measured (the base's last two checkpoints are not on this machine)")
                return
            steps = [checkpoint_step(c) for c in ckpts]
            self.write(steps_file, {"steps": steps}, "gate checkpoints")
        chains = []
        for step in steps:
            ck = self.base / "checkpoints" / f"step_{step:08d}"
            folder, feats = self.out / "gate" / f"step_{step:08d}", self.work / "features" / f"gate_{step}"
            # the EMA weights (1.3 MB) are committed, so any machine can measure the gate: the final
            # checkpoint is in OUT/base, an earlier one only on the machine that trained the base
            kept = folder / "checkpoint"
            if ck.is_dir() and not kept.is_dir() and not (self.out / "base" / ck.name).is_dir():
                kept.mkdir(parents=True)
                for name in ("ema.safetensors", "state.json"):
                    shutil.copy2(ck / name, kept / name)
                self.commit([kept], f"gate checkpoint {step} (EMA weights)")
            elif not ck.is_dir() and kept.is_dir():
                shutil.copytree(kept, ck)
            # bits/dim and the samples (FID, then legibility of the same samples) side by side with --jobs
            chains += [(step, ck, folder, feats, ("bpd",)), (step, ck, folder, feats, ("fid_pc", "legibility"))]
        self.parallel(self.gate_chain, chains)

    def gate_chain(self, step: int, ck: Path, folder: Path, feats: Path, metrics: tuple) -> None:
        for m in metrics:
            if "value" not in (read_json(folder / f"{m}.json") or {}) and not ck.is_dir():
                say(f"gate: {m} of step {step} not measured ({self.rel(ck)} is not on this machine)")
                continue
            self.metric(folder / f"{m}.json", m, ck, feats, self.scale["gate_fid_n"])

    # ------------------------------------------------------------------ report
    def stage_report(self) -> None:
        names = [self.arm_name(a, s) for a, s in self.all_arms()]
        arms = {n: read_json(self.out / "arms" / f"{n}.json") for n in names}
        metrics = {n: {p.stem: read_json(p) for p in sorted((self.out / "metrics" / n).glob("*.json"))} for n in names}
        gate = self.gate_metrics()
        setup = {"mode": "quick" if self.quick else "full", "scale": self.scale, "config": self.rel(CONFIG),
                 "data": self.rel(self.a.data), "digit_net": read_json(self.out / "digit_net.json"),
                 "base": read_json(self.out / "base" / "base.json"), "inception": self.rel(self.inception)
                 if self.inception else None, "ref_inception_images": report.ref_count(self.ref_inception)
                 if self.inception else None, "eval_seed": EVAL_SEED}
        grids = {n: self.work / "features" / n / "grid_pc.png" for n in names}
        written = report.write_report(self.out, self.proto, setup, arms, metrics, gate, grids, self.portable,
                                      self.arm_name, self.arm_metrics)
        self.commit(written, "report")
        say(f"report: {self.rel(self.out / 'report.md')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="keras-style .npz (x_train/y_train/x_test/y_test)")
    p.add_argument("--work", default=None, help="runs, shards, samples (default runs/fpe_study[_quick])")
    p.add_argument("--out", default=None, help="the committed results (default benchmarks/results/fpe_study[_quick])")
    p.add_argument("--quick", action="store_true", help="every stage with tiny steps and N (a test)")
    p.add_argument("--inception", default=None, help="TorchScript Inception (clean-fid's extractor interface: float "
                   "(B,3,299,299) in [0,255] -> 2048 features); without it Inception FID is not measured")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--in-process", action="store_true", help="run the fpdiff commands in this process instead "
                   "of one interpreter each (saves the start-up of every command; the default with --quick)")
    p.add_argument("--subprocess", action="store_true", help="with --quick: one interpreter per command all the same")
    p.add_argument("--jobs", type=int, default=1, help="arms trained / measured side by side (subprocesses; "
                   "with OMP_NUM_THREADS=1, one per core; every arm's s/step is then measured side by side)")
    p.add_argument("--commit", action="store_true", help="git-commit each finished result under --out as it lands")
    p.add_argument("--save-base", action="store_true", help="with --stages base: copy the base's newest checkpoint "
                   "to OUT/base/ (to commit an unfinished base) and train nothing")
    p.add_argument("--resume-base", action="store_true", help="resume an unfinished base even if it was written "
                   "in the last 15 minutes (by default the study waits for a base another process may be training)")
    a = p.parse_args(argv)
    if a.jobs > 1 and a.in_process:
        p.error("--jobs: more than one job needs a subprocess per command (not --in-process)")
    a.in_process = (a.in_process or a.quick) and not a.subprocess and a.jobs <= 1
    suffix = "_quick" if a.quick else ""
    a.work = a.work or str(ROOT / "runs" / f"fpe_study{suffix}")
    a.out = a.out or str(ROOT / "benchmarks" / "results" / f"fpe_study{suffix}")
    if not Path(a.data).exists():
        p.error(f"--data: {a.data} does not exist")
    if a.inception and not Path(a.inception).is_file():
        p.error(f"--inception: {a.inception} is not a file")
    st = Study(a)
    old = read_json(st.out / "protocol.json")
    if old is not None and old != json.loads(json.dumps(st.portable(st.proto))):
        p.error(f"--out: {st.rel(st.out / 'protocol.json')} holds another protocol; its results are not comparable "
                "with this one's (move them away first)")
    if old is None:
        st.write(st.out / "protocol.json", st.proto, "protocol, fixed before any arm runs")
    say(f"fpe study ({'quick' if a.quick else 'full'}): work {st.rel(st.work)}, out {st.rel(st.out)}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    for stage in STAGES:
        if stage in a.stages:
            say(f"stage {stage}")
            getattr(st, f"stage_{stage}")()
    say(f"done: {st.done} results written, {st.skipped} skipped (already on disk)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
