"""FID stage: statistics, clean-fid conventions, offline failure, 2-process == 1-process.

A small TorchScript feature extractor (tests/helpers/eval_fixtures.py; no Inception download); the
score model of the CLI runs is a tiny stand-in swapped in for ``build_model`` inside the worker
processes (tests/helpers/eval_worker.py), so the real CLI path (loading, start-up checks, sampling, distributed
statistics, results JSON, summary line) runs on CPU in seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers.eval_fixtures import (EVAL_WORKER, ROOT, TINY_OVERRIDES, TinyExtractor, build_extractor, clean_env,
                                    make_export, random_ref, run_eval, write_test_shards)
from ports import free_port


# --------------------------------------------------------------------------- unit tests
def test_feature_stats_match_numpy_and_cleanfid():
    from cleanfid.fid import fid_from_feats, frechet_distance

    from pipeline.eval.features import FeatureStats

    rng = np.random.default_rng(0)
    a = rng.normal(size=(101, 12)) * rng.uniform(0.5, 2, 12) + 3.0
    b = rng.normal(size=(77, 12))
    st = FeatureStats()
    for chunk in np.array_split(a, 7):  # uneven chunks, one per "batch"
        st.update(torch.from_numpy(chunk))
    mu, sigma = st.mean_cov()
    assert st.n == 101
    np.testing.assert_allclose(mu, a.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(a, rowvar=False), rtol=1e-9, atol=1e-12)
    ours = frechet_distance(mu, sigma, b.mean(0), np.cov(b, rowvar=False))
    assert ours == pytest.approx(fid_from_feats(a, b), rel=1e-9)


def test_clean_resize_matches_cleanfid():
    from PIL import Image
    from cleanfid.resize import build_resizer

    from pipeline.eval.features import clean_resize

    fn = build_resizer("clean")
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    np.testing.assert_array_equal(clean_resize(rgb), fn(rgb))
    gray = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    as_rgb = np.asarray(Image.fromarray(gray).convert("RGB"))  # what clean-fid does with gray files
    out = clean_resize(gray[:, :, None])
    assert out.shape == (299, 299, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, fn(as_rgb))


def test_extractor_sees_rounded_uint8_and_exactly_n(tmp_path):
    from pipeline.config_files import load_config
    from pipeline.eval.fid import evaluate_fid
    from pipeline.sde import build_sde

    cfg = load_config(None, TINY_OVERRIDES + ["eval.fid_num_samples=7", "eval.batch_size=3"])
    seen, idx_seen = [], []
    levels = torch.tensor([0.4, 0.6, 1.49, 1.51, 253.5 + 1e-3, 254.7, -3.0, 300.0]) / 255.0

    def generate(n, g):  # every pixel of a sample = one level; sample content from its generator
        k = torch.randint(0, len(levels), (n,), generator=g)
        idx_seen.append(k)
        return levels[k].view(n, 1, 1, 1).expand(n, 1, 8, 8).clone(), 3

    def extractor(u8):
        seen.append(u8.clone())
        return u8.flatten(1)[:, :4].double() + torch.arange(4)

    res = evaluate_fid(torch.nn.Identity(), cfg, build_sde(cfg.sde), feature_extractor=extractor, ref_stats=None,
                       generate_fn=generate, return_features=True, progress=False)
    u8 = torch.cat(seen)
    assert u8.dtype == torch.uint8 and u8.shape[0] == 7 and res["N"] == 7
    expect = torch.tensor([0, 1, 1, 2, 254, 255, 0, 255], dtype=torch.uint8)  # rounding, clamped
    np.testing.assert_array_equal(u8[:, 0, 0, 0].numpy(), expect[torch.cat(idx_seen)].numpy())
    assert res["features"].shape == (7, 4) and res["nfe"] == 3
    assert "value" not in res  # no reference: statistics only


def test_missing_inception_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import pipeline.eval.features as fid

    folder = tmp_path / "incep"
    folder.mkdir()
    monkeypatch.setenv("FPDIFF_INCEPTION_DIR", str(folder))
    monkeypatch.delenv("FPDIFF_OFFLINE", raising=False)
    monkeypatch.setattr(fid, "INCEPTION_URL", "http://127.0.0.1:9/inception-2015-12-05.pt")  # refused
    with pytest.raises(fid.MissingFileError) as ei:
        fid.check_feature_extractor(None)
    msg = str(ei.value)
    assert "\n" not in msg and str(folder / fid.INCEPTION_FILE) in msg and "--feature-extractor" in msg
    assert list(folder.iterdir()) == []  # no partial download left behind
    monkeypatch.setenv("FPDIFF_OFFLINE", "1")
    with pytest.raises(fid.MissingFileError, match="offline"):
        fid.check_feature_extractor(None)
    with pytest.raises(fid.MissingFileError, match="not found"):
        fid.check_feature_extractor(str(tmp_path / "nope.pt"))
    with pytest.raises(fid.MissingFileError, match="clean-fid reference statistics missing"):
        fid.check_ref_stats("some_dataset_name", 32)


def test_cli_offline_fails_at_startup_with_one_line(tmp_path):
    export = make_export(tmp_path / "run")
    ref = random_ref(tmp_path / "ref.npz", build_extractor(tmp_path / "fe.pt"))
    env = clean_env(FPDIFF_OFFLINE="1", FPDIFF_INCEPTION_DIR=str(tmp_path / "empty"))
    for extra in ([f"--ref-stats={ref}"],  # no Inception file, no network
                  [f"--feature-extractor={tmp_path / 'fe.pt'}", f"--ref-stats={tmp_path / 'missing.npz'}"]):
        r = subprocess.run([sys.executable, "-m", "pipeline.eval", "fid", str(export), "--num-samples", "4",
                            "--out", str(tmp_path / "out" / "fid.json"), "--save-samples", str(tmp_path / "png")]
                           + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2, r.stderr
        assert len(lines) == 1 and lines[0].startswith("fpdiff eval: error:"), r.stderr
        assert not (tmp_path / "out").exists() and not (tmp_path / "png").exists()
        assert not (tmp_path / "run" / "eval").exists() and not (tmp_path / "run" / "summary.txt").exists()


# --------------------------------------------------------------------------- distributed
@pytest.mark.slow
def test_fid_two_processes_equal_one_process(tmp_path):
    """Same samples (seeds per global batch), same extractor: FID/KID of 2 ranks == 1 rank
    (1e-6 relative), == clean-fid's frechet_distance on the gathered features, and the
    gathered features are exactly the N samples (N=11, batch 3: ranks get 2 and 2 batches,
    the last one partial)."""
    from cleanfid.fid import frechet_distance

    export = make_export(tmp_path / "run")
    fe = build_extractor(tmp_path / "fe.pt")
    ref = random_ref(tmp_path / "ref.npz", fe)
    worker = EVAL_WORKER
    env = clean_env()
    out = {}
    for procs in (1, 2):
        args = ["fid", str(export), "--feature-extractor", str(fe), "--ref-stats", str(ref), "--num-samples", "11",
                "--batch-size", "3", "--no-progress", "--out", str(tmp_path / f"fid{procs}.json"),
                "--save-features", str(tmp_path / f"feats{procs}.npy"), "--save-samples", str(tmp_path / f"png{procs}")]
        run_eval(worker, args, procs, env)
        out[procs] = json.loads((tmp_path / f"fid{procs}.json").read_text())
    one, two = out[1], out[2]
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert one["N"] == two["N"] == 11 and one["checkpoint_step"] == 7
    assert two["value"] == pytest.approx(one["value"], rel=1e-6)
    assert two["kid"] == pytest.approx(one["kid"], rel=1e-6, abs=1e-9)
    f1, f2 = np.load(tmp_path / "feats1.npy"), np.load(tmp_path / "feats2.npy")
    assert f1.shape == f2.shape == (11, 16)
    assert f2.dtype == np.float64
    np.testing.assert_allclose(f2, f1, rtol=1e-6, atol=1e-9)
    assert len({row.tobytes() for row in f2}) == 11  # no duplicated padding rows
    assert sorted(os.listdir(tmp_path / "png2")) == [f"{i:06d}.png" for i in range(11)]
    with np.load(ref) as z:
        expect = frechet_distance(f2.astype(np.float64).mean(0), np.cov(f2.astype(np.float64), rowvar=False),
                                  z["mu"], z["sigma"])
    assert two["value"] == pytest.approx(expect, rel=1e-6)
    summary = (tmp_path / "run" / "summary.txt").read_text().splitlines()
    assert len(summary) == 2 and all(s.startswith("eval fid:") for s in summary)


def test_fid_from_saved_samples_equals_fid_while_sampling(tmp_path):
    """`eval fid --from-samples DIR...` scores PNGs saved by --save-samples: one folder gives the
    same features and FID as the run that sampled them (PNG is lossless uint8); two folders pool
    (N = 2 x 7); an empty folder is a one-line error and writes nothing."""
    export = make_export(tmp_path / "run")
    fe = build_extractor(tmp_path / "fe.pt")
    ref = random_ref(tmp_path / "ref.npz", fe)
    worker, env = EVAL_WORKER, clean_env()
    base = ["fid", str(export), "--feature-extractor", str(fe), "--ref-stats", str(ref), "--batch-size", "3",
            "--no-progress"]
    for seed in (0, 1):
        run_eval(worker, base + ["--num-samples", "7", "--seed", str(seed), "--out", str(tmp_path / f"s{seed}.json"),
                                 "--save-features", str(tmp_path / f"s{seed}.npy"),
                                 "--save-samples", str(tmp_path / f"png{seed}")], 1, env)
    run_eval(worker, base + ["--from-samples", str(tmp_path / "png0"), "--out", str(tmp_path / "r0.json"),
                             "--save-features", str(tmp_path / "r0.npy")], 1, env)
    sampled, rescored = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("s0", "r0"))
    assert rescored["N"] == 7 and rescored["sampler"] == "saved samples" and rescored["nfe"] == 0
    np.testing.assert_array_equal(np.load(tmp_path / "r0.npy"), np.load(tmp_path / "s0.npy"))
    assert rescored["value"] == pytest.approx(sampled["value"], rel=1e-12)
    run_eval(worker, base + ["--from-samples", str(tmp_path / "png0"), str(tmp_path / "png1"),
                             "--out", str(tmp_path / "pooled.json"), "--save-features", str(tmp_path / "pooled.npy")], 1, env)
    pooled = json.loads((tmp_path / "pooled.json").read_text())
    assert pooled["N"] == 14
    run_eval(worker, base + ["--from-samples", str(tmp_path / "png0"), str(tmp_path / "png1"), "--num-samples", "9",
                             "--out", str(tmp_path / "first9.json"), "--save-features", str(tmp_path / "first9.npy")], 1, env)
    assert json.loads((tmp_path / "first9.json").read_text())["N"] == 9  # --num-samples: the first N files
    np.testing.assert_allclose(np.load(tmp_path / "first9.npy"), np.load(tmp_path / "pooled.npy")[:9], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.load(tmp_path / "pooled.npy"),  # other batch make-up: float32 rounding only
                               np.concatenate([np.load(tmp_path / "s0.npy"), np.load(tmp_path / "s1.npy")]), rtol=1e-5, atol=1e-7)
    (tmp_path / "empty").mkdir()
    cmd = [sys.executable, str(worker)] + base + ["--from-samples", str(tmp_path / "empty"), "--out", str(tmp_path / "e.json")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "holds no .png samples" in r.stderr and not (tmp_path / "e.json").exists()


@pytest.mark.slow
def test_ref_stats_two_processes_equal_one_process(tmp_path):
    """`ref-stats` over shards split across 2 ranks == 1 rank (uneven shards, 1 channel)."""
    pattern = write_test_shards(tmp_path / "shards", sizes=(5, 2, 4))
    fe = build_extractor(tmp_path / "fe.pt")
    worker = EVAL_WORKER
    env = clean_env()
    z = {}
    for procs in (1, 2):
        out = tmp_path / f"ref{procs}.npz"
        run_eval(worker, ["ref-stats", "--shards", pattern, "--channels", "1", "--feature-extractor", str(fe),
                          "--batch-size", "2", "--out", str(out), "--no-progress"], procs, env)
        z[procs] = dict(np.load(out))
    assert int(z[1]["n"]) == int(z[2]["n"]) == 11
    np.testing.assert_allclose(z[2]["mu"], z[1]["mu"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(z[2]["sigma"], z[1]["sigma"], rtol=1e-6, atol=1e-9)
    assert z[1]["feats"].shape == z[2]["feats"].shape == (11, 16)


@pytest.mark.slow
def test_cli_offline_two_processes_one_line_no_hang(tmp_path):
    """Under accelerate launch (2 ranks) a missing Inception file stops every rank at start-up
    (no rank left waiting in a collective), with one error line from the main rank."""
    export = make_export(tmp_path / "run")
    ref = random_ref(tmp_path / "ref.npz", build_extractor(tmp_path / "fe.pt"))
    worker = EVAL_WORKER
    env = clean_env(FPDIFF_OFFLINE="1", FPDIFF_INCEPTION_DIR=str(tmp_path / "empty"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(worker), "fid", str(export),
           "--ref-stats", str(ref), "--out", str(tmp_path / "out" / "fid.json")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if "fpdiff eval: error:" in ln]
    assert len(errors) == 1 and "inception-2015-12-05.pt" in errors[0], r.stderr[-3000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "run" / "summary.txt").exists()


def test_fid_refuses_reference_statistics_of_another_extractor_or_image_size(tmp_path):
    """`ref-stats` records its feature network (sha256) and image size; `eval fid` with another
    network or on another image size stops in one line naming both, and writes no result."""
    shards = write_test_shards(tmp_path / "shards", sizes=(6,))  # 8x8 digits
    fe = build_extractor(tmp_path / "fe.pt")
    other = TinyExtractor()
    with torch.no_grad():
        other.conv.bias.add_(1.0)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(other).save(str(tmp_path / "other.pt"))
    worker, env = EVAL_WORKER, clean_env()
    ref = tmp_path / "ref.npz"
    run_eval(worker, ["ref-stats", "--shards", shards, "--channels", "1", "--feature-extractor", str(fe),
                      "--out", str(ref), "--no-progress"], 1, env)
    z = np.load(ref)
    assert str(z["meta_image_size"]) == "8x8" and str(z["meta_feature_extractor_id"]).startswith("sha256:")

    def fid(export, extractor, out):
        cmd = [sys.executable, str(worker), "fid", str(export), "--feature-extractor", str(extractor),
               "--ref-stats", str(ref), "--num-samples", "4", "--no-progress", "--out", str(out)]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    export8 = make_export(tmp_path / "run8")
    r = fid(export8, fe, tmp_path / "ok.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "ok.json").read_text())["value"] >= 0
    r = fid(export8, tmp_path / "other.pt", tmp_path / "other.json")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert f"made with feature extractor {fe} on 8x8 images, this evaluation uses {tmp_path / 'other.pt'} on 8x8" in err[0]
    export16 = make_export(tmp_path / "run16", ["data.image_size=16"])
    r = fid(export16, fe, tmp_path / "size.json")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "on 8x8 images" in err[0] and f"uses {fe} on 16x16 images" in err[0]
    assert not (tmp_path / "other.json").exists() and not (tmp_path / "size.json").exists()
