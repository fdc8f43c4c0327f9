"""Statistics of benchmarks/fpe_study.py: per-arm means with t-intervals, paired differences per seed,
whether the issue's expected effect sizes were seen, and the base's convergence gate.

Every interval is a 95% Student-t interval (scipy.stats.t). Over seeds it is an interval for the mean over
training seeds (the randomness of fine-tuning, with the evaluation inputs held fixed); a paired interval
is one for the mean of the per-seed differences (arm − (a), same seed, same evaluation inputs).
"""
from __future__ import annotations

import math

import numpy as np

from scipy import stats as scipy_stats

CONFIDENCE = 0.95

# metric key -> (label, METRIC.json, field, better, digits shown)
METRICS = {
    "bpd": ("bits/dim", "bpd", "value", "lower", 4),
    "residual": ("FPE residual (mean over t)", "fpe", "value", "lower", 4),
    "residual_g2": ("FPE residual (g²-weighted mean)", "fpe", "g2_weighted", "lower", 4),
    "asymmetry": ("Jacobian asymmetry (mean over t)", "conservativity", "value", "lower", 4),
    "fid_digit": ("FID, digit net (PC)", "fid_pc", "value", "lower", 4),
    "kid_digit": ("KID, digit net (PC)", "fid_pc", "kid", "lower", 3),
    "legible": ("legible share (PC)", "legibility", "value", "higher", 3),
    "fid_ode": ("FID, digit net (PF-ODE)", "fid_ode", "value", "lower", 4),
    "ode_pc_gap": ("FID(ODE set, PC set)", "ode_pc", "value", "lower", 4),
    "fid_inception": ("Inception FID (PC)", "fid_inception", "value", "lower", 4),
    "s_per_step": ("seconds per training step", None, "seconds_per_step", "lower", 3),
}
# the detectable effects with 5 paired seeds; the residual's is relative to (a)
EXPECTED_EFFECT = {"bpd": 0.02, "fid_inception": 8.0, "residual_relative": 0.17}


def sig(x: float, digits: int = 4) -> float:
    """x rounded to ``digits`` significant digits (the form the report prints and results.json stores)."""
    if x is None or not math.isfinite(x) or x == 0:
        return x
    return float(f"{x:.{digits}g}")


def t_interval(values) -> dict:
    """Mean, SD, n and the 95% t-interval of the mean (None bounds below 2 values)."""
    v = np.asarray([float(x) for x in values if x is not None and math.isfinite(float(x))], dtype=np.float64)
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "low": None, "high": None, "p_value": None}
    mean = float(v.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "low": None, "high": None, "p_value": None}
    sd = float(v.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
    p = float(2 * scipy_stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1)) if sd > 0 else (0.0 if mean else 1.0)
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half, "p_value": p}


def value_of(arm_rec: dict, metrics: dict, key: str):
    _, source, field, _, _ = METRICS[key]
    rec = arm_rec if source is None else (metrics or {}).get(source)
    v = (rec or {}).get(field)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None


def per_arm(proto: dict, arms: dict, metrics: dict, name_of) -> dict:
    """{arm: {metric: t_interval over its seeds + per-seed values}}."""
    out = {}
    for arm, spec in proto["arms"].items():
        row = {}
        for key in METRICS:
            seeds = {s: value_of(arms.get(name_of(arm, s)) or {}, metrics.get(name_of(arm, s)), key) for s in spec["seeds"]}
            seeds = {s: v for s, v in seeds.items() if v is not None}
            if seeds:
                row[key] = {**t_interval(list(seeds.values())), "per_seed": seeds}
        out[arm] = row
    return out


def paired(proto: dict, arms: dict, metrics: dict, name_of) -> dict:
    """{"b-a": {metric: interval of the per-seed differences}, "c-a": ...}; relative differences for the residual."""
    out = {}
    for arm in [k for k in proto["arms"] if k != "a"]:
        row = {}
        for key in METRICS:
            d, rel = {}, {}
            for s in proto["arms"][arm]["seeds"]:
                va = value_of(arms.get(name_of("a", s)) or {}, metrics.get(name_of("a", s)), key)
                vx = value_of(arms.get(name_of(arm, s)) or {}, metrics.get(name_of(arm, s)), key)
                if va is not None and vx is not None:
                    d[s] = vx - va
                    rel[s] = (vx - va) / va if va else None
            if d:
                row[key] = {**t_interval(list(d.values())), "per_seed": d}
                if key in ("residual", "residual_g2"):
                    row[key]["relative"] = {**t_interval(list(rel.values())), "per_seed": rel}
        out[f"{arm}-a"] = row
    return out


def direction(key: str, mean: float) -> str:
    """'better' or 'worse' for the regularized arm, a difference (regularized − (a)) of METRICS[key]."""
    return "better" if (mean < 0) == (METRICS[key][3] == "lower") else "worse"


def detectable(pairs: dict) -> dict:
    """Per expected effect: 'seen' (the interval excludes 0 and the mean is at least the size), 'ruled out'
    (the whole interval is inside ± the size), 'inconclusive' otherwise, 'not measured' without data.
    A seen effect also says its direction: the paper expects 'better', and a harmful effect must not read
    like a confirmation."""
    out = {}
    for diff, row in pairs.items():
        for key, size in (("bpd", EXPECTED_EFFECT["bpd"]), ("fid_inception", EXPECTED_EFFECT["fid_inception"]),
                          ("residual", EXPECTED_EFFECT["residual_relative"])):
            iv = row.get(key, {})
            iv = iv.get("relative", iv) if key == "residual" else iv
            if iv.get("low") is None:
                verdict = "not measured" if not iv else "one seed, no interval"
            elif (iv["low"] > 0 or iv["high"] < 0) and abs(iv["mean"]) >= size:
                verdict = "seen"
            elif -size < iv["low"] and iv["high"] < size:
                verdict = "ruled out"
            else:
                verdict = "inconclusive"
            out[f"{diff} {key}"] = {"size": size, "relative": key == "residual", "verdict": verdict,
                                    "direction": direction(key, iv["mean"]) if verdict == "seen" else None,
                                    "mean": iv.get("mean"), "low": iv.get("low"), "high": iv.get("high")}
    return out


def gate(gate_metrics: dict) -> dict:
    """The base's convergence gate from its last two checkpoints' bits/dim and legibility."""
    steps = sorted(gate_metrics)
    if len(steps) < 2 or any(not gate_metrics[s].get(m) for s in steps for m in ("bpd", "legibility")):
        return {"status": "not measured", "steps": steps}
    (p, q) = (gate_metrics[s] for s in steps[-2:])
    z = 1.959963984540054
    dbpd = q["bpd"]["value"] - p["bpd"]["value"]
    se_bpd = math.hypot(p["bpd"]["stderr"], q["bpd"]["stderr"])
    lp, lq = p["legibility"]["value"], q["legibility"]["value"]
    se_leg = math.hypot(*(math.sqrt(v * (1 - v) / r["legibility"]["n"]) for v, r in ((lp, p), (lq, q))))
    bpd_ok = abs(dbpd) < EXPECTED_EFFECT["bpd"]
    leg_ok = abs(lq - lp) <= z * se_leg
    return {"status": "passed" if bpd_ok and leg_ok else "failed", "steps": steps[-2:],
            "bpd": [p["bpd"]["value"], q["bpd"]["value"]], "bpd_stderr": [p["bpd"]["stderr"], q["bpd"]["stderr"]],
            "bpd_change": dbpd, "bpd_change_ci95": [dbpd - z * se_bpd, dbpd + z * se_bpd], "bpd_ok": bpd_ok,
            "legible": [lp, lq], "legible_stderr": [math.sqrt(v * (1 - v) / r["legibility"]["n"]) for v, r in ((lp, p), (lq, q))],
            "legible_change": lq - lp, "legible_change_ci95": [lq - lp - z * se_leg, lq - lp + z * se_leg],
            "legible_ok": leg_ok, "mostly_legible": lq > 0.5,
            "rule": f"bits/dim moved less than {EXPECTED_EFFECT['bpd']} and the legible share's change is inside its "
                    "95% interval (normal, binomial SE); the intervals treat the two checkpoints as independent "
                    "(they share test images and sampling seeds, so they are wider than a paired interval)"}
