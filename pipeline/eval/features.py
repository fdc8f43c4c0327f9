"""Feature extraction and distributed statistics for FID / KID (clean-fid conventions).

Images reach the feature extractor as uint8 (model output quantised by ROUNDING, see
``pipeline.images.to_uint8``), are resized the way clean-fid's ``mode="clean"`` does
(PIL bicubic on float32 channels to 299x299, clipped to [0, 255]) and passed as float
(B, 3, 299, 299) in [0, 255] to either clean-fid's TorchScript Inception
(``inception-2015-12-05.pt``) or a user's TorchScript file with the same interface
(``--feature-extractor``). One-channel images are repeated to three channels (as
clean-fid's ``convert("RGB")``).

Statistics are distributed EDM-style: every rank accumulates n, Σf and Σfᵀf in float64
and one all-reduce sums them, so the mean and covariance do not depend on the number of
ranks (up to float64 summation order). Features are gathered (exactly N rows, no padding
duplicates) only when KID is asked for.

No network and no Inception file: ``check_feature_extractor`` raises ``MissingFileError``
with one line naming the file and where to put it, before anything is written.
"""
from __future__ import annotations

import os
import urllib.request
import warnings
from pathlib import Path
from typing import Optional

import cleanfid
import numpy as np
import torch
from PIL import Image

from pipeline.atomic import atomic_path
from pipeline.config import ConfigError
from pipeline.data.reader import file_sha256
from pipeline.status import MissingFileError
from pipeline.collectives import all_reduce_max_int, all_reduce_sum, gather_by_index

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 + INCEPTION_FILE)
CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats/"
RESIZE_TO = (299, 299)
DEFAULT_EXTRACTOR = "clean-fid inception-2015-12-05"


# --------------------------------------------------------------------------- feature extractor
def inception_path() -> Path:
    """Where clean-fid's Inception is looked for: ``$FPDIFF_INCEPTION_DIR`` (default /tmp,
    clean-fid's own fixed location) / inception-2015-12-05.pt."""
    return Path(os.environ.get("FPDIFF_INCEPTION_DIR", "/tmp")) / INCEPTION_FILE


def _download(url: str, dest: Path, timeout: float = 30.0) -> None:
    """Download ``url`` to ``dest`` atomically (never leaves a partial file)."""
    with atomic_path(dest) as tmp, open(tmp, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
        while True:
            chunk = r.read(1 << 20)
            if not chunk:
                break
            f.write(chunk)


def downloads_allowed() -> bool:
    """False when FPDIFF_OFFLINE=1 (or HF_HUB_OFFLINE=1): missing files fail at once."""
    return not any(os.environ.get(v, "0").lower() in ("1", "true", "yes") for v in ("FPDIFF_OFFLINE", "HF_HUB_OFFLINE"))


def check_feature_extractor(path: Optional[str] = None, download: bool = True) -> Path:
    """Resolve the feature extractor file; download clean-fid's Inception when allowed.

    Raises ``MissingFileError`` (one line) when the file is absent and cannot be fetched.
    """
    if path:
        p = Path(path)
        if not p.is_file():
            raise MissingFileError(f"feature extractor not found: {p} (expected a TorchScript file)")
        return p
    p = inception_path()
    if p.is_file():
        return p
    if download and downloads_allowed():
        try:
            _download(INCEPTION_URL, p)
            return p
        except Exception as e:  # no network, proxy, HTTP error ...
            reason = type(e).__name__
    else:
        reason = "downloads disabled (offline)"
    raise MissingFileError(
        f"clean-fid Inception weights missing: put {INCEPTION_URL} at {p} "
        f"(or set FPDIFF_INCEPTION_DIR, or pass --feature-extractor FILE.pt); download failed: {reason}")


def _resize_channel(ch: np.ndarray) -> np.ndarray:
    # the operation of clean-fid's make_resizer("PIL", False, "bicubic", (299, 299)), one channel
    img = Image.fromarray(ch.astype(np.float32), mode="F").resize(RESIZE_TO, resample=Image.BICUBIC)
    return np.asarray(img).clip(0, 255).reshape(RESIZE_TO[1], RESIZE_TO[0], 1)


def clean_resize(img_hwc_u8: np.ndarray) -> np.ndarray:
    """clean-fid ``mode="clean"``: per-channel float32 PIL bicubic resize to 299x299, clipped;
    (H, W, C) -> (299, 299, 3) float32. One channel is resized once and repeated (clean-fid
    converts gray images to RGB first, which gives the same result)."""
    if img_hwc_u8.ndim == 2:
        img_hwc_u8 = img_hwc_u8[:, :, None]
    if img_hwc_u8.shape[2] == 1:
        return np.repeat(_resize_channel(img_hwc_u8[:, :, 0]), 3, axis=2).astype(np.float32)
    return np.concatenate([_resize_channel(img_hwc_u8[:, :, i]) for i in range(3)], axis=2).astype(np.float32)


def _to_rgb(images_u8: torch.Tensor) -> torch.Tensor:
    c = images_u8.shape[1]
    if c == 1:
        return images_u8.expand(-1, 3, -1, -1)
    if c == 4:
        return images_u8[:, :3]
    if c != 3:
        raise ValueError(f"images must have 1, 3 or 4 channels, got {c}")
    return images_u8


class FeatureExtractor:
    """uint8 images (B, C, H, W) -> float64 features (B, F) on the CPU.

    path: a TorchScript file taking float (B, 3, H', W') in [0, 255] and returning (B, F);
    empty/None: clean-fid's Inception (2048 features). resize: "clean" (299x299 as
    clean-fid) or "none" (native size; only sensible for a custom extractor).
    """

    def __init__(self, path: Optional[str] = None, device="cpu", resize: str = "clean",
                 download: bool = True):
        if resize not in ("clean", "none"):
            raise ValueError(f"resize must be 'clean' or 'none', got {resize!r}")
        self.device = torch.device(device)
        self.resize = resize
        p = check_feature_extractor(path, download=download)
        self.identity = extractor_identity(str(p) if path else None)
        if path:
            self.name = str(p)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self.net = torch.jit.load(str(p), map_location=self.device).eval()
        else:
            from cleanfid.inception_torchscript import InceptionV3W  # deferred: clean-fid takes seconds to import; only for its Inception
            self.name = DEFAULT_EXTRACTOR
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self.net = InceptionV3W(str(p.parent), download=False).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images_u8: torch.Tensor) -> torch.Tensor:
        if images_u8.dtype != torch.uint8:
            raise TypeError(f"feature extractor expects uint8 images, got {images_u8.dtype}")
        if images_u8.shape[0] == 0:
            return torch.zeros(0, 0, dtype=torch.float64)
        if self.resize == "clean":
            u8 = images_u8.cpu()
            if u8.shape[1] == 4:
                u8 = u8[:, :3]
            arr = u8.permute(0, 2, 3, 1).numpy()
            x = torch.from_numpy(np.stack([clean_resize(a) for a in arr])).permute(0, 3, 1, 2)
        else:
            x = _to_rgb(images_u8.cpu()).float()
        feats = self.net(x.float().contiguous().to(self.device))
        return feats.reshape(feats.shape[0], -1).to("cpu", torch.float64)


# --------------------------------------------------------------------------- statistics
class FeatureStats:
    """Running n, Σf, Σfᵀf in float64; optionally keeps (index, feature) rows for KID."""

    def __init__(self, keep_features: bool = False, max_keep: Optional[int] = None,
                 keep_dtype: torch.dtype = torch.float32):
        self.n = 0
        self.sum: Optional[torch.Tensor] = None
        self.sumsq: Optional[torch.Tensor] = None
        self.keep = keep_features
        self.max_keep = max_keep
        self._idx: list[torch.Tensor] = []
        self._feats: list[torch.Tensor] = []
        self._kept = 0
        self.keep_dtype = keep_dtype

    @property
    def dim(self) -> int:
        return 0 if self.sum is None else int(self.sum.shape[0])

    def update(self, feats: torch.Tensor, index: Optional[torch.Tensor] = None) -> None:
        f = feats.detach().to("cpu", torch.float64)
        if f.shape[0] == 0:
            return
        if self.sum is None:
            self.sum = torch.zeros(f.shape[1], dtype=torch.float64)
            self.sumsq = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.sumsq += f.T @ f
        if self.keep and (self.max_keep is None or self._kept < self.max_keep):
            take = f.shape[0] if self.max_keep is None else min(f.shape[0], self.max_keep - self._kept)
            if index is None:
                index = torch.full((f.shape[0],), -1, dtype=torch.int64)
            self._idx.append(index[:take].to(torch.int64).cpu())
            self._feats.append(f[:take].to(self.keep_dtype))
            self._kept += take

    def all_reduce(self) -> "FeatureStats":
        """Sum over ranks in place (every rank must call). Ranks without samples take part."""
        d = all_reduce_max_int(self.dim)
        if d == 0:
            return self
        if self.sum is None:
            self.sum = torch.zeros(d, dtype=torch.float64)
            self.sumsq = torch.zeros(d, d, dtype=torch.float64)
        self.n = int(all_reduce_sum(torch.tensor([self.n], dtype=torch.int64)).item())
        self.sum = all_reduce_sum(self.sum)
        self.sumsq = all_reduce_sum(self.sumsq)
        return self

    def gathered_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, features) from all ranks, sorted by global index (every rank must call)."""
        d = all_reduce_max_int(self.dim)
        idx = torch.cat(self._idx) if self._idx else torch.zeros(0, dtype=torch.int64)
        feats = torch.cat(self._feats) if self._feats else torch.zeros(0, d, dtype=self.keep_dtype)
        return gather_by_index(idx, feats)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance (as ``np.cov(rowvar=False)``)."""
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.n}")
        mu = self.sum / self.n
        cov = (self.sumsq - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), cov.numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    from cleanfid.fid import frechet_distance as fd  # deferred: clean-fid takes seconds to import; only when an FID is computed
    return float(fd(mu1, sigma1, mu2, sigma2))


def kernel_distance(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100,
                    max_subset_size: int = 1000, seed: int = 0) -> float:
    """KID with clean-fid's estimator (cubic polynomial kernel, subsets), seeded."""
    rng = np.random.default_rng(seed)
    feats1 = np.asarray(feats1, dtype=np.float64)
    feats2 = np.asarray(feats2, dtype=np.float64)
    n = feats1.shape[1]
    m = min(feats1.shape[0], feats2.shape[0], max_subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 features on each side")
    t = 0.0
    for _ in range(num_subsets):
        x = feats2[rng.choice(feats2.shape[0], m, replace=False)]
        y = feats1[rng.choice(feats1.shape[0], m, replace=False)]
        a = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3
        b = (x @ y.T / n + 1) ** 3
        t += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(t / num_subsets / m)


# --------------------------------------------------------------------------- reference statistics
def save_stats(path: str | Path, stats: FeatureStats, *, feats: Optional[np.ndarray] = None,
               meta: Optional[dict] = None) -> Path:
    """Write mu, sigma, n (and feats for KID) to an .npz, atomically."""
    mu, sigma = stats.mean_cov()
    path = Path(path)
    arrays = {"mu": mu, "sigma": sigma, "n": np.array(stats.n)}
    if feats is not None and len(feats):
        arrays["feats"] = np.asarray(feats, dtype=np.float32)
    for k, v in (meta or {}).items():
        if v is None:
            continue
        arrays[f"meta_{k}"] = np.array(str(v))
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a handle: np.savez adds no ".npz" to it
        np.savez(fh, **arrays)
    return path


def _cleanfid_stats_file(name: str, split: str, res: int) -> tuple[Path, str]:
    rel = f"{name}_clean_{split}_{res}.npz".lower()
    return Path(os.path.dirname(cleanfid.__file__)) / "stats" / rel, CLEANFID_STATS_URL + rel


def check_ref_stats(spec: str, res: int, download: bool = True) -> Path:
    """Resolve a reference-statistics spec to a local .npz (one-line MissingFileError if not).

    spec: a path to an .npz (from ``fpdiff eval ref-stats``), or a clean-fid dataset name
    ``NAME`` / ``NAME:SPLIT`` (split default ``train``) fetched from clean-fid's server once.
    """
    if not spec:
        raise MissingFileError("no reference statistics: pass --ref-stats FILE.npz or a clean-fid "
                               "dataset name (or make them with `fpdiff eval ref-stats --shards ... --out FILE.npz`)")
    p = Path(spec)
    if spec.endswith(".npz") or p.exists() or os.sep in spec:
        if not p.is_file():
            raise MissingFileError(f"reference statistics not found: {p} (make them with "
                                   f"`fpdiff eval ref-stats --shards ... --out {p}`)")
        return p
    name, _, split = spec.partition(":")
    local, url = _cleanfid_stats_file(name, split or "train", res)
    if local.is_file():
        return local
    if download and downloads_allowed():
        try:
            _download(url, local)
            return local
        except Exception as e:
            reason = type(e).__name__
    else:
        reason = "downloads disabled (offline)"
    raise MissingFileError(f"clean-fid reference statistics missing: put {url} at {local} "
                           f"(or pass --ref-stats FILE.npz); download failed: {reason}")


def load_ref_stats(path: str | Path) -> dict:
    """mu, sigma (feats, n) of a reference .npz, and its ``meta`` (feature extractor, image size)
    as written by ``fpdiff eval ref-stats``; clean-fid's own files are Inception at their size."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        out = {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64), "path": str(path),
               "meta": {k[len("meta_"):]: str(z[k]) for k in z.files if k.startswith("meta_")}}
        if "feats" in z.files:
            out["feats"] = z["feats"]
        if "n" in z.files:
            out["n"] = int(z["n"])
    if not out["meta"] and path.parent == _cleanfid_stats_file("x", "x", 0)[0].parent:
        res = path.stem.rsplit("_", 1)[-1]  # NAME_clean_SPLIT_RES.npz
        out["meta"] = {"feature_extractor": DEFAULT_EXTRACTOR, "feature_extractor_id": DEFAULT_EXTRACTOR,
                       "image_size": f"{res}x{res}"}
    return out


def extractor_identity(path: Optional[str]) -> str:
    """What makes two feature networks the same: the sha256 of a TorchScript file, or clean-fid's
    Inception."""
    if not path:
        return DEFAULT_EXTRACTOR
    return "sha256:" + file_sha256(path)


def check_ref_matches(ref: dict, extractor_name: str, extractor_id: Optional[str], image_size) -> None:
    """Refuse reference statistics made with another feature network or at another image size
    (their FID against these samples would be a wrong number that looks right). Statistics with
    no record of either (made before fpdiff recorded them) are not checked."""
    meta = ref.get("meta") or {}
    theirs_id, theirs_size = meta.get("feature_extractor_id"), meta.get("image_size")
    size = f"{image_size[0]}x{image_size[1]}" if isinstance(image_size, (tuple, list)) else f"{image_size}x{image_size}"
    same_net = theirs_id is None or extractor_id is None or theirs_id == extractor_id
    same_size = theirs_size is None or theirs_size == size
    if not (same_net and same_size):
        raise ConfigError(
            f"reference statistics {ref.get('path', '')}: made with feature extractor "
            f"{meta.get('feature_extractor', '?')} on {theirs_size or '?'} images, this evaluation uses {extractor_name} "
            f"on {size} images; an FID across them is meaningless (make matching statistics with "
            f"`fpdiff eval ref-stats --feature-extractor ...`)")


# --------------------------------------------------------------------------- public names
__all__ = [
    "MissingFileError", "FeatureExtractor", "FeatureStats", "check_feature_extractor",
    "check_ref_stats", "check_ref_matches", "extractor_identity", "load_ref_stats", "save_stats", "frechet_distance", "kernel_distance",
    "inception_path", "clean_resize",
]
