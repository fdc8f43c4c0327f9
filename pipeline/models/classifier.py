"""The time-dependent classifier p_t(y | x_t) (Song et al. 2021, §5): its network, the log-probability
that guided sampling differentiates (``pipeline.controllable.classifier_guided_score``), and its folder
(``model.safetensors`` + ``classifier.json``). Trained by the classifier stage (``pipeline.classifier``)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from pipeline.atomic import atomic_directory
from pipeline.models.layers import timestep_embedding
from pipeline.rundir import CLASSIFIER_META, MODEL_WEIGHTS, save_weights
from pipeline.sde import SDE, bcast

WEIGHTS, META = MODEL_WEIGHTS, CLASSIFIER_META  # the files of its folder


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(min(8, cout // 4), cout)
        self.dense = nn.Linear(temb, cout)

    def forward(self, h, emb):
        return F.silu(self.norm(self.conv(h)) + self.dense(emb)[:, :, None, None])


class NoiseConditionalClassifier(nn.Module):
    """logits(x_t, t): three conv blocks (the last two stride 2), 4×4 average pool, linear
    (a global mean pool kept too little of where the strokes are: ~50% on clean MNIST after 300
    steps).

    The input is scaled by c_in(t) = 1/√(a(t)² + σ(t)²) so that VE's large σ and VP's unit
    scale look alike (given as ``c_in``); the time enters through a sinusoidal embedding of 1000·t
    added in every block.
    """

    def __init__(self, channels: int, num_classes: int, nf: int = 32):
        super().__init__()
        self.settings = {"channels": channels, "num_classes": num_classes, "nf": nf}
        temb = 4 * nf
        self.nf = nf
        self.temb = nn.Sequential(nn.Linear(nf, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.blocks = nn.ModuleList([_Block(channels, nf, temb, 1), _Block(nf, 2 * nf, temb, 2),
                                     _Block(2 * nf, 2 * nf, temb, 2)])
        self.head = nn.Linear(2 * nf * 16, num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_in: torch.Tensor) -> torch.Tensor:
        emb = self.temb(timestep_embedding(1000.0 * t, self.nf))
        h = x * bcast(c_in, x)
        for b in self.blocks:
            h = b(h, emb)
        return self.head(F.adaptive_avg_pool2d(h, 4).flatten(1))


def input_scale(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    a, s = sde.mean_coeff(t), sde.marginal_std(t)
    return torch.rsqrt(a * a + s * s)


def log_prob_fn(clf: NoiseConditionalClassifier, sde: SDE):
    """(x, t, y) -> log p_t(y | x), differentiable in x (for ``classifier_guided_score``)."""

    def log_prob(x, t, y):
        logits = clf(x, t, input_scale(sde, t))
        return torch.log_softmax(logits.float(), 1).gather(1, y[:, None].long()).squeeze(1)

    return log_prob


# --------------------------------------------------------------------------- save / load
def save_classifier(folder: str | Path, clf: NoiseConditionalClassifier, meta: dict) -> Path:
    """Atomically write ``folder`` (weights + JSON); an existing folder is replaced whole."""
    with atomic_directory(folder) as tmp:
        save_weights(tmp / WEIGHTS, clf.state_dict())
        (tmp / META).write_text(json.dumps({**meta, "settings": clf.settings}, indent=1))
    return Path(folder)


def load_classifier(folder: str | Path, device="cpu") -> tuple[NoiseConditionalClassifier, dict]:
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / META).is_file():
        raise FileNotFoundError(f"classifier {folder}: no {WEIGHTS} + {META} there "
                                f"(train one with `fpdiff classifier --run-dir RUN`)")
    meta = json.loads((folder / META).read_text())
    clf = NoiseConditionalClassifier(**meta["settings"])
    clf.load_state_dict(load_file(str(folder / WEIGHTS)))
    return clf.to(device).eval(), meta
