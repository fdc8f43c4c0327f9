"""Exponential moving average of parameters; sampling and evaluation use these weights.

With ``warmup`` the decay after n updates is min(decay, (1 + n) / (10 + n)), as score_sde's
``ExponentialMovingAverage``: without it the average of a run shorter than a few times
1 / (1 - decay) steps is still mostly its random initialisation (0.999^1500 = 22%).
"""
from __future__ import annotations

import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, num_updates: int) -> float:
        """The decay of the update that follows ``num_updates`` earlier ones."""
        return min(self.decay, (1 + num_updates) / (10 + num_updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, num_updates: int) -> None:
        """``num_updates``: updates applied before this one (the trainer keeps it in its
        checkpointed counters, so a resumed run continues the same schedule)."""
        weight = 1.0 - self.decay_at(num_updates)
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), weight)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, sd):
        self.model.load_state_dict(sd)
