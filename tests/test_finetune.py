"""training.init_from continues its source (issue 23): a fine-tune with the regularizer off is the
source run continued, bitwise; with it on, only the loss changes; what cannot be brought is said."""
import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError
from pipeline.config_files import CONFIG_DIR, load_config
from pipeline.rundir import RunDir
from pipeline.train import checkpoint as ckpt
from pipeline.app import train

TINY = str(CONFIG_DIR / "mnist_tiny.yaml")
S, N = 6, 4  # the source's steps, the fine-tune's


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist_shards):
    """A source trained S steps, the same config trained S + N steps uninterrupted, and the source
    fine-tuned N steps with the regularizer off (no other change)."""
    train_p, test_p = mnist_shards
    common = [f"data.shards={train_p}", f"data.test_shards={test_p}", "logging.backend=none",
              "fpe.enabled=false", "training.ckpt_every=2", "training.log_every=1", "training.keep_last=20",
              "sampling.num_samples=4", "sampling.num_steps=3"]
    root = tmp_path_factory.mktemp("finetune")
    src, ref, ft = root / "src", root / "ref", root / "ft"
    assert train(load_config(TINY, common + [f"training.n_steps={S}"]), src, progress=False) == 0
    assert train(load_config(TINY, common + [f"training.n_steps={S + N}"]), ref, progress=False) == 0
    assert train(load_config(TINY, common + [f"training.n_steps={N}", f"training.init_from={src}"]), ft,
                 progress=False) == 0
    return dict(common=common, src=src, ref=ref, ft=ft, root=root)


def checkpoint_at(run, step):
    return ckpt.load_checkpoint(RunDir(run).checkpoint(step))


def assert_same_tree(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_fine_tune_without_regularizer_is_the_source_run_continued_bitwise(runs):
    ref, ft = checkpoint_at(runs["ref"], S + N), checkpoint_at(runs["ft"], S + N)
    for part in ("model", "ema", "optimizer", "scheduler"):
        assert_same_tree(ref[part], ft[part], part)
    assert ft["state"]["counters"]["ema_updates"] == ref["state"]["counters"]["ema_updates"] == S + N
    assert ft["state"]["loader"]["ranks"] == ref["state"]["loader"]["ranks"]  # the data position continued
    # the fine-tune's own checkpoints carry the global step; it trained exactly N steps
    assert [p.name for p in RunDir(runs["ft"]).list_checkpoints()] == [f"step_{s:08d}" for s in (S + 2, S + 4)]
    record = json.loads(RunDir(runs["ft"]).init_source.read_text())
    assert record["kind"] == "checkpoint" and record["source_step"] == S and record["start_step"] == S
    assert record["optimizer"] and record["data_position"] and record["fresh"] == {}
    assert record["init_from"] == str(runs["src"])
    summary = json.loads(RunDir(runs["ft"]).summary_json.read_text())
    assert (summary["start_step"], summary["steps"]) == (S, S + N)


def test_regularizer_on_changes_only_the_loss(runs):
    """Same start (weights, Adam state, step, batch, times, noise): the first step's DSM loss is the
    continued run's to the bit; the FPE term is added on top; the step count continues."""
    fpe = runs["root"] / "ft_fpe"
    cfg = load_config(TINY, runs["common"] + [f"training.n_steps={N}", f"training.init_from={runs['src']}",
                                              "fpe.enabled=true", "fpe.subsample=2"])
    assert train(cfg, fpe, progress=False) == 0

    def first_log(run):
        return json.loads(RunDir(run).metrics_log.read_text().splitlines()[0])

    on, off = first_log(fpe), first_log(runs["ft"])
    assert on["step"] == off["step"] == S + 1
    assert on["loss/dsm"] == off["loss/dsm"] and on["lr"] == off["lr"]
    assert off["loss/fpe"] == 0.0 and on["loss/fpe"] > 0.0
    a, b = checkpoint_at(fpe, S + N), checkpoint_at(runs["ft"], S + N)
    steps = {int(s["step"]) for o in (a, b) for s in o["optimizer"]["state"].values()}
    assert steps == {S + N}  # Adam's bias correction continued from the source's S steps in both
    assert not all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # the loss did change


def test_init_fresh_restarts_the_parts_named(runs):
    """init_fresh=[optimizer,ema,schedule]: the old behaviour. Adam restarts (its step count is N),
    the EMA warm-up restarts at the source's EMA weights w0 (after one update, decay 0.1: w0 + 0.9 (w1 - w0)),
    and the step count starts at 0."""
    old = runs["root"] / "ft_fresh"
    cfg = load_config(TINY, runs["common"] + ["training.n_steps=1", "training.ckpt_every=1", "training.warmup=0",
                                              f"training.init_from={runs['src']}",
                                              "training.init_fresh=[optimizer,ema,schedule]"])
    assert train(cfg, old, progress=False) == 0
    last = checkpoint_at(old, 1)
    w0 = load_file(str(RunDir(runs["src"]).checkpoint(S) / "ema.safetensors"))
    for k in w0:
        torch.testing.assert_close(last["ema"][k], w0[k] + 0.9 * (last["model"][k] - w0[k]), rtol=1e-5, atol=1e-7)
    assert {int(s["step"]) for s in last["optimizer"]["state"].values()} == {1}
    record = json.loads(RunDir(old).init_source.read_text())
    assert set(record["fresh"]) == {"optimizer", "ema", "schedule"} and record["start_step"] == 0
    with pytest.raises(ConfigError, match=r"training.init_fresh: unknown part 'adam'"):
        load_config(TINY, ["training.init_fresh=[adam]"])


def test_export_source_says_what_it_could_not_bring(runs, capsys, mnist_shards):
    """An export has EMA weights only: the model starts from them, and the start-up line names
    the optimizer, EMA position and data position as fresh; other shards start the data anew."""
    out = runs["root"] / "ft_export"
    cfg = load_config(TINY, runs["common"] + ["training.n_steps=1", f"training.init_from={runs['src'] / 'export'}"])
    assert train(cfg, out, progress=False) == 0
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "fine-tuning from" in ln)
    assert "(export)" in line and "starts fresh" in line and "has no optimizer state" in line
    record = json.loads(RunDir(out).init_source.read_text())
    assert record["kind"] == "export" and not record["optimizer"] and set(record["fresh"]) >= {"optimizer", "data"}
    # a checkpoint source with other training shards: all else continues, the data starts anew
    other = runs["root"] / "ft_other_data"
    cfg = load_config(TINY, runs["common"] + ["training.n_steps=1", f"training.init_from={runs['src']}",
                                              f"data.shards={mnist_shards[1]}"])
    assert train(cfg, other, progress=False) == 0
    record = json.loads(RunDir(other).init_source.read_text())
    assert record["fresh"] == {"data": "data.shards differ from the source's"} and record["optimizer"]


def test_a_continued_fine_tune_keeps_the_source_data_order_and_its_seed_draws_new_noise(runs):
    """training.seed of a fine-tune that continues its source's data position changes the times,
    noise and probes (they are drawn from (seed, step, micro-shard)) but not the batches: the
    loader continues where the source stopped, in the source's order (the study's paired seeds
    rely on both)."""
    seeded = runs["root"] / "ft_seed1"
    cfg = load_config(TINY, runs["common"] + ["training.n_steps=2", f"training.init_from={runs['src']}",
                                              "training.seed=1"])
    assert train(cfg, seeded, progress=False) == 0
    other, same_seed = checkpoint_at(seeded, S + 2), checkpoint_at(runs["ft"], S + 2)
    assert other["state"]["loader"] == same_seed["state"]["loader"]  # the same batches, the same position

    def first_dsm(run):
        return json.loads(RunDir(run).metrics_log.read_text().splitlines()[0])["loss/dsm"]

    assert first_dsm(seeded) != first_dsm(runs["ft"])  # same weights and batch, other times and noise
    assert any(not torch.equal(other["model"][k], same_seed["model"][k]) for k in other["model"])
