"""Helpers of benchmarks/fpe_study.py: the digit net file, the committed base checkpoint, derived metrics
(legibility, the ODE-PC gap, the g²-weighted residual) and the report (results.json, table.md, report.md,
plots). The statistics are in benchmarks/fpe_study_stats.py."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

import fpe_study_stats as stats
from digits import judge, load_mnist_arrays, train_digit_net
from pipeline.atomic import atomic_path, atomic_write_json, atomic_write_text
from pipeline.eval.features import frechet_distance
from pipeline.rundir import RunDir, checkpoint_step
from fpe_study_stats import CONFIDENCE, METRICS, sig


# --------------------------------------------------------------------------- inputs
def train_digit_net_file(data: Path, out: Path, images_seen: int) -> dict:
    """The digit feature net trained on DATA's training split, saved as TorchScript at OUT."""
    t0 = time.time()
    torch.manual_seed(0)
    net, acc = train_digit_net(load_mnist_arrays(data), images_seen=images_seen, progress=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.jit.save(torch.jit.script(net), str(tmp))
    return {"test_accuracy": acc, "seconds": time.time() - t0, "images_seen": images_seen, "features": 128,
            "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}


def save_base(run: Path, saved: Path, portable) -> dict:
    """The base's newest checkpoint (weights, EMA, optimizer.pt, state.json) and its config.yaml, copied to
    SAVED (machine paths in the config made relative) with base.json last, so a partial copy is redone."""
    ck = RunDir(run).latest_checkpoint()
    if ck is None:
        raise SystemExit(f"fpe_study: the base {run} has no checkpoint to save")
    dest = saved / ck.name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(ck, dest, ignore=shutil.ignore_patterns("deepspeed", ".tmp-*"))
    cfg = portable(yaml.safe_load((run / "config.yaml").read_text()))
    atomic_write_text(saved / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    files = {str(p.relative_to(saved)): p.stat().st_size for p in sorted(saved.rglob("*"))
             if p.is_file() and p.name != "base.json"}  # (an older base.json is about to be replaced)
    rec = {"step": checkpoint_step(ck), "checkpoint": ck.name, "files": files, "bytes": sum(files.values())}
    atomic_write_json(saved / "base.json", rec)
    return rec


def restore_base(saved: Path, run: Path) -> None:
    """The committed base (``save_base``) back into a run dir: config.yaml and checkpoints/step_X."""
    rec = json.loads((saved / "base.json").read_text())
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy2(saved / "config.yaml", run / "config.yaml")
    shutil.copytree(saved / rec["checkpoint"], run / "checkpoints" / rec["checkpoint"], dirs_exist_ok=True)


def ref_count(path: Path):
    """Images behind a reference-statistics .npz (None when it is not there)."""
    try:
        with np.load(path) as z:
            return int(z["n"])
    except (OSError, KeyError, ValueError):
        return None


# --------------------------------------------------------------------------- derived metrics
def legibility(digit_net: Path, samples_dir: Path) -> dict:
    """``digits.judge`` (benchmarks/digits.py) of the PNG samples ``eval fid --save-samples`` wrote, with the
    binomial standard error of the legible share."""
    files = sorted(f for f in Path(samples_dir).glob("*.png") if not f.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no samples in {samples_dir}")
    x = np.stack([np.asarray(Image.open(f).convert("L")) for f in files])
    r = judge(torch.jit.load(str(digit_net)).eval(), x)
    v = r["legible_share"]
    return {"value": v, "stderr": math.sqrt(v * (1 - v) / r["n"]), **r}


def ode_pc_gap(pc_feats: Path, ode_feats: Path) -> dict:
    """FID between the PF-ODE samples and as many PC samples of the same model (digit-net features)."""
    b = np.load(ode_feats).astype(np.float64)
    a = np.load(pc_feats).astype(np.float64)[: len(b)]
    d = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    return {"value": float(d), "n_pc": len(a), "n_ode": len(b), "features": "digit net"}


def g2_weighted(fpe_rec: dict, sde) -> dict:
    """The FPE residual norm's mean over the t-grid weighted by g(t)² (the regularizer's weighting)."""
    g2 = sde.diffusion(torch.tensor(fpe_rec["t"], dtype=torch.float64)).pow(2).numpy()
    return {"g2_weighted": float(np.sum(g2 * np.asarray(fpe_rec["norm"])) / np.sum(g2)), "g2": g2.tolist()}


# --------------------------------------------------------------------------- text
def _iv(r: dict, digits: int = 4, signed: bool = False) -> str:
    if not r or r.get("mean") is None:
        return "—"
    f = (lambda x: f"{sig(x, digits):+g}") if signed else (lambda x: f"{sig(x, digits):g}")
    if r.get("low") is None:
        return f"{f(r['mean'])} (n=1)"
    return f"{f(r['mean'])} [{f(r['low'])}, {f(r['high'])}] (n={r['n']})"


def arm_table(proto: dict, per_arm: dict) -> str:
    keys = [k for k in METRICS if any(k in per_arm[a] for a in per_arm)]
    lines = ["| metric | " + " | ".join(proto["arms"][a]["label"] for a in per_arm) + " |",
             "|---|" + "---|" * len(per_arm)]
    for k in keys:
        lines.append(f"| {METRICS[k][0]} ({METRICS[k][3]} is better) | "
                     + " | ".join(_iv(per_arm[a].get(k), METRICS[k][4]) for a in per_arm) + " |")
    return "\n".join(lines)


def paired_table(pairs: dict) -> str:
    lines = ["| metric | " + " | ".join(f"{_diff_label(d)}, paired" for d in pairs) + " |",
             "|---|" + "---|" * len(pairs)]
    for k in METRICS:
        if any(k in pairs[d] for d in pairs):
            cells = []
            for d in pairs:
                r = pairs[d].get(k)
                cell = _iv(r, METRICS[k][4], signed=True)
                if r and r.get("p_value") is not None:
                    cell += f", p={sig(r['p_value'], 2):g}"
                if r and "relative" in r and r["relative"].get("mean") is not None:
                    cell += f"; relative {_iv(r['relative'], 3, signed=True)}"
                cells.append(cell)
            lines.append(f"| {METRICS[k][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _diff_label(diff: str) -> str:
    """'b-a' -> '(b) − (a)'."""
    return f"({diff[0]}) − ({diff[2]})"


def reading(pairs: dict, detect: dict, gate: dict) -> list[str]:
    """One sentence per finding, each naming the table it rests on; every number is in results.json."""
    out = []
    if gate.get("status") in ("passed", "failed"):
        out.append(f"- Gate ({gate['status']}; section 'Base convergence gate'): bits/dim moved by "
                   f"{sig(gate['bpd_change']):+g} between the base's last two checkpoints and the legible share by "
                   f"{sig(gate['legible_change']):+g}; the last checkpoint reads {sig(gate['legible'][1]):g} of its "
                   f"samples as legible digits.")
    else:
        out.append("- Gate: not measured yet (section 'Base convergence gate').")
    claims = (("bpd", "lower bits/dim (better likelihood)"), ("asymmetry", "make the score more conservative "
                                                                       "(lower Jacobian asymmetry)"))
    for key, claim in claims:
        r = pairs.get("b-a", {}).get(key)
        if r and r.get("low") is not None:
            verb = "did" if r["high"] < 0 else ("did not; it raised it" if r["low"] > 0 else "did not detectably")
            out.append(f"- The paper's claim that the regularizer would {claim}, (b) − (a) (table 'Paired "
                       f"differences'): it {verb}, paired 95% interval [{sig(r['low']):+g}, {sig(r['high']):+g}].")
    for diff, row in pairs.items():
        x = _diff_label(diff)
        for k in ("bpd", "residual", "residual_g2", "asymmetry", "fid_digit", "legible", "fid_inception",
                  "ode_pc_gap", "s_per_step"):
            r = row.get(k)
            if not r or r.get("low") is None:
                continue
            label, _, _, _, digits = METRICS[k]
            excl = r["low"] > 0 or r["high"] < 0
            what = ("no difference the interval can tell from 0" if not excl else
                    f"the regularized arm is {stats.direction(k, r['mean'])}")
            out.append(f"- {x}, {label} (table 'Paired differences'): mean {sig(r['mean'], digits):+g} over "
                       f"{r['n']} seeds, 95% interval [{sig(r['low'], digits):+g}, {sig(r['high'], digits):+g}]: "
                       f"{what}.")
    for name, d in detect.items():
        if d["verdict"] in ("seen", "ruled out", "inconclusive"):
            size = f"{sig(d['size'] * 100, 3):g}% of (a)'s value" if d["relative"] else f"{sig(d['size']):g}"
            verdict = {"seen": f"an effect of at least {size} was seen, and the regularized arm is {d.get('direction')} "
                               f"(mean {sig(d['mean']):+g}; {METRICS[name.split()[1]][3]} is better).",
                       "ruled out": f"an effect of {size} was ruled out.",
                       "inconclusive": f"inconclusive: the interval holds both no effect and one of {size}."}[d["verdict"]]
            out.append(f"- Expected effect, {_diff_label(name.split()[0])} {METRICS[name.split()[1]][0]} "
                       f"(table 'Expected effects'): {verdict}")
    return out


# --------------------------------------------------------------------------- plots
def _plt():  # pyplot loads only after the Agg backend is chosen, and only the report plots
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(proto: dict, metrics: dict, name_of, source: str, field: str, ylabel: str, path: Path) -> bool:
    """Mean over seeds of a per-t curve (``eval fpe``'s norm, ``eval conservativity``'s ratio) per arm."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    for arm, spec in proto["arms"].items():
        recs = [metrics.get(name_of(arm, s), {}).get(source) for s in spec["seeds"]]
        recs = [r for r in recs if r and field in r]
        if recs:
            ax.plot(recs[0]["t"], np.mean([r[field] for r in recs], axis=0), marker=".", label=f"{spec['label']} (n={len(recs)})")
            drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.set_xlabel("t")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def plot_paired(pairs: dict, path: Path) -> bool:
    """Paired differences: mean with its 95% interval and each seed's difference, one panel per metric."""
    keys = [k for k in METRICS if any(pairs[d].get(k, {}).get("mean") is not None for d in pairs)]
    if not keys:
        return False
    plt = _plt()
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(12, 2.6 * math.ceil(len(keys) / cols)), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        for i, d in enumerate(pairs):
            r = pairs[d].get(k)
            if r and r.get("mean") is not None:
                err = [[r["mean"] - r["low"]], [r["high"] - r["mean"]]] if r.get("low") is not None else None
                ax.errorbar([i], [r["mean"]], yerr=err, fmt="o", capsize=4)
                seeds = list(r["per_seed"].values())
                ax.scatter([i + 0.12] * len(seeds), seeds, s=9, color="gray", alpha=0.6)  # one dot per seed
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(range(len(pairs)))
        ax.set_xticklabels([f"({d[0]})−({d[2]})" for d in pairs])
        ax.set_title(f"{METRICS[k][0]}\n({METRICS[k][3]} is better)", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_grids(grids: list[tuple[str, Path]], path: Path) -> bool:
    grids = [(t, p) for t, p in grids if p and p.is_file()]
    if not grids:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.6), squeeze=False)
    for ax, (title, p) in zip(axes[0], grids):
        ax.imshow(np.asarray(Image.open(p).convert("L")), cmap="gray")
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- report
def progress(proto: dict, arms: dict, metrics: dict, gate_rec: dict, setup: dict, name_of, expected_metrics) -> dict:
    """Which parts of the protocol are done."""
    missing_arms, missing = [], []
    for arm, spec in proto["arms"].items():
        for s in spec["seeds"]:
            n = name_of(arm, s)
            if not arms.get(n):
                missing_arms.append(n)
            missing += [f"{n}/{m}" for m in expected_metrics(arm) if "value" not in (metrics.get(n, {}).get(m) or {})]
    total = sum(len(spec["seeds"]) for spec in proto["arms"].values())
    return {"base": "done" if setup.get("base") else "not done", "gate": gate_rec["status"],
            "arms_trained": total - len(missing_arms), "arms_total": total, "arms_missing": missing_arms,
            "metrics_missing": missing, "complete": bool(setup.get("base")) and gate_rec["status"] != "not measured"
            and not missing_arms and not missing}


def write_report(out: Path, proto: dict, setup: dict, arms: dict, metrics: dict, gate_metrics: dict, grids: dict,
                 portable, name_of, expected_metrics) -> list[Path]:
    per_arm = stats.per_arm(proto, arms, metrics, name_of)
    pairs = stats.paired(proto, arms, metrics, name_of)
    detect = stats.detectable(pairs)
    gate_rec = stats.gate(gate_metrics)
    prog = progress(proto, arms, metrics, gate_rec, setup, name_of, expected_metrics)
    results = portable({"protocol": proto, "progress": prog, "setup": setup, "gate": gate_rec, "gate_metrics": gate_metrics,
                        "per_arm": per_arm, "paired": pairs, "expected_effects": detect, "confidence": CONFIDENCE,
                        "arms": arms, "metrics": metrics})
    written = [out / "results.json", out / "table.md", out / "report.md"]
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    tables = ["### Per arm (mean over seeds [95% t-interval over seeds] (n seeds))", "", arm_table(proto, per_arm), "",
              "### Paired differences (mean of per-seed differences [95% t-interval of that mean] (n seeds), "
              "two-sided p of a paired t-test)", "", paired_table(pairs)]
    atomic_write_text(out / "table.md", "\n".join(tables) + "\n")
    name0 = {a: name_of(a, 0) for a in proto["arms"]}
    plots = {"residual_vs_t.png": lambda p: plot_curves(proto, metrics, name_of, "fpe", "norm", "FPE residual ‖r‖/D (test images)", p),
             "conservativity_vs_t.png": lambda p: plot_curves(proto, metrics, name_of, "conservativity", "ratio",
                                                              "E‖(J−Jᵀ)v‖² / E‖Jv‖² (test images)", p),
             "paired_differences.png": lambda p: plot_paired(pairs, p),
             "samples_arms.png": lambda p: plot_grids([(f"{proto['arms'][a]['label']}, seed 0", grids.get(n))
                                                       for a, n in name0.items()], p)}
    shown = [name for name, draw in plots.items() if draw(out / name)]
    written += [out / name for name in shown]
    done = (f"Done so far: base {prog['base']}; gate {prog['gate']}; {prog['arms_trained']} of {prog['arms_total']} "
            f"arms trained; {len(prog['metrics_missing'])} arm metrics missing"
            + (f" ({', '.join(prog['metrics_missing'][:12])}{', ...' if len(prog['metrics_missing']) > 12 else ''})"
               if prog["metrics_missing"] else "") + ("." if not prog["complete"] else "; the protocol is complete."))
    g = gate_rec
    gate_text = ("not measured yet" if g["status"] == "not measured" else
                 f"{g['status']}. Checkpoints {g['steps'][0]} and {g['steps'][1]}: bits/dim {sig(g['bpd'][0]):g} ± "
                 f"{sig(g['bpd_stderr'][0], 2):g} and {sig(g['bpd'][1]):g} ± {sig(g['bpd_stderr'][1], 2):g} (± one "
                 f"standard error over test images); legible share {sig(g['legible'][0]):g} ± "
                 f"{sig(g['legible_stderr'][0], 2):g} and {sig(g['legible'][1]):g} ± {sig(g['legible_stderr'][1], 2):g} "
                 f"(± one binomial standard error). Rule: {g['rule']}.")
    arms_text = "\n".join(f"- {spec['label']}: seeds {', '.join(map(str, spec['seeds']))}; overrides "
                          f"`{' '.join(spec['overrides'])}`" for spec in proto["arms"].values())
    det_lines = ["| difference, metric | expected effect | verdict | paired mean [95% interval] |", "|---|---|---|---|"]
    for name, d in detect.items():
        iv = f"{sig(d['mean']):+g} [{sig(d['low']):+g}, {sig(d['high']):+g}]" if d.get("low") is not None else "—"
        det_lines.append(f"| {_diff_label(name.split()[0])}, {METRICS[name.split()[1]][0]} | {sig(d['size']):g}{' (relative to (a))' if d['relative'] else ''} | {d['verdict']}{' (' + d['direction'] + ')' if d.get('direction') else ''} | {iv} |")
    md = [f"## FP-Diffusion study on MNIST, paired seeds ({setup['mode']} run)", "", done, "",
          f"`python benchmarks/fpe_study.py --data {setup['data']}` (config `{setup['config']}`; results here are "
          "each written as their step finishes; `results.json` holds every number below).", "",
          "### Protocol (fixed before any arm ran: protocol.json)", "", proto["question"], "", arms_text, "",
          f"- Start: {proto['start']}. Every arm runs {proto['finetune_steps']} fine-tune steps of batch {proto['batch_size']}.",
          f"- FPE settings: {proto['fpe_settings']}. DSM term: {proto['dsm_weighting']}.",
          f"- α search: {proto['alpha_search']}.", f"- Pairing: {proto['pairing']}.",
          *[f"- {k}: {v}" for k, v in proto["metrics"].items()],
          f"- Inception file: {setup['inception'] or 'none given to this run: Inception FID appears only where an earlier run measured it'}.",
          f"- Statistics: {proto['statistics']}.", "",
          "### Base convergence gate", "", gate_text, "", "### Tables", "", *tables, "",
          "An interval over seeds says where the mean over training seeds lies (evaluation inputs fixed); a paired "
          "interval says where the mean per-seed difference to (a) lies: one that excludes 0 is a difference at the "
          "5% level, one that includes 0 means these seeds cannot tell the arms apart.", "",
          "### Expected effects", "",
          "The issue's detectable sizes with 5 paired seeds: seen = the paired interval excludes 0 and the mean is at "
          "least that size; ruled out = the whole interval is inside ± that size; inconclusive otherwise.", "",
          *det_lines, "", "### Reading", "", *reading(pairs, detect, gate_rec), "",
          *[f"![{n[:-4]}]({n})" for n in shown], ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    return written
