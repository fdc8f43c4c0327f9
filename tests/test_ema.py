"""EMA warm-up: the share of the initial weights left after N updates, in closed form."""
import math

import pytest
import torch

from pipeline.ema import EMA


def _init_share(warmup: bool, decay: float, n: int) -> float:
    """Track a model whose weights jump from 0 to 1 at the start: the EMA then reads
    1 - (share of the initialisation still in it)."""
    model = torch.nn.Linear(3, 2)
    torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
    ema = EMA(model, decay, warmup=warmup)
    with torch.no_grad():
        model.weight.fill_(1.0), model.bias.fill_(1.0)
    for i in range(n):
        ema.update(model, i)
    w = ema.model.weight.double()
    assert torch.allclose(w, w.flatten()[0])
    return 1.0 - float(w.flatten()[0])


@pytest.mark.parametrize("n", [1, 10, 100, 1500])
def test_warmup_follows_score_sde_schedule(n):
    # prod_{k<n} (1+k)/(10+k) = 9! n! / (n+9)!  (the cap 0.999 only binds from k = 8991 on)
    want = math.factorial(9) * math.factorial(n) / math.factorial(n + 9)
    assert _init_share(True, 0.999, n) == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_without_warmup_a_short_run_is_mostly_its_initialisation():
    assert _init_share(False, 0.999, 1500) == pytest.approx(0.999 ** 1500, rel=1e-4)  # 22%
    assert _init_share(True, 0.999, 1500) < 1e-6  # float32 resolution of 1.0


def test_decay_reaches_its_cap():
    ema = EMA(torch.nn.Linear(1, 1), 0.99, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10_000) == 0.99
    assert EMA(torch.nn.Linear(1, 1), 0.99, warmup=False).decay_at(0) == 0.99
